"""Where model requests go: a server at a given URL, or a local one lpm starts at the first cache miss.

Used by ``lpm run`` and ``lpm decide`` alike, so both treat ``--llm-url``, ``--llm-model``, ``--engine``
and ``--cache replay`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lpm.backend import Backend, LocalServerBackend, OpenAIBackend
from lpm.errors import InputError

#: Never contacted: with ``--cache replay`` and no URL every answer must come from the cache.
REPLAY_URL = "http://replay.invalid/v1"
ENGINES = ("vllm", "llamacpp")


def default_mode(mode: str, engine: str) -> str:
    """The decision mode to use: ``auto`` means ``sample`` on llama.cpp, whose top log-probabilities are
    taken before its grammar is applied (so they are not a distribution over the choices)."""
    return "sample" if mode == "auto" and engine == "llamacpp" else mode


@contextmanager
def llm_backend(
    url: str | None,
    model: str | None,
    *,
    cache_mode: str = "use",
    engine: str = "vllm",
    api_key_env: str = "OPENAI_API_KEY",
    max_concurrency: int = 16,
    on_start: Callable[[Any], None] | None = None,
) -> Iterator[tuple[Backend, dict[str, Any]]]:
    """A backend and a record of it (``url``, ``model``, ``engine``, ``local_server`` …) for the run folder.

    url: a running OpenAI-compatible server; its only model is used when ``model`` is None.
    None: a local ``engine`` server serving ``model`` (default SmolLM2-135M-Instruct), started at the
    first request that misses the cache and stopped on leaving the block; with ``cache_mode="replay"``
    none is ever started. engine: also the answer-constraint format of a server at ``url``.
    """
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    kwargs = {"api_key_env": api_key_env, "max_concurrency": max_concurrency, "constraint": engine}
    server = None
    info: dict[str, Any] = {"engine": engine, "local_server": False}
    try:
        if url:
            if not model:
                from lpm.server import check_server

                models = check_server(url)["models"]
                if len(models) != 1:
                    raise InputError(f"--llm-model is needed: {url} serves {models or 'no models'}")
                model = str(models[0])
            backend: Backend = OpenAIBackend(url, model, **kwargs)
        elif cache_mode == "replay":
            from lpm.model import DEFAULT_MODEL_NAME

            model = model or DEFAULT_MODEL_NAME
            backend = OpenAIBackend(REPLAY_URL, model, **kwargs)
        else:
            from lpm.server import ModelServer

            server = ModelServer(engine, served_name=model)
            backend = LocalServerBackend(server, **kwargs)
            backend.on_start = on_start
            url, model = server.url, server.model
            info["local_server"] = True
        info |= {"url": url, "model": model}
        yield backend, info
    finally:
        if server is not None:
            if server.running:
                info["server_started_seconds"] = server.startup_seconds
            server.stop()
