"""Where model requests go: a server at a given URL, or a local one lpm starts at the first cache miss.

Used by ``lpm run`` and ``lpm decide`` alike, so both treat ``--llm-url``, ``--llm-model``, the server kind
and ``--cache replay`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lpm.backend import Backend, LocalServerBackend, OpenAIBackend
from lpm.errors import InputError
from lpm.server_kind import server_kind

#: Never contacted: with ``--cache replay`` and no URL every answer must come from the cache.
REPLAY_URL = "http://replay.invalid/v1"


def default_mode(mode: str, server: str) -> str:
    """The decision mode to use with a ``server`` kind: ``auto`` means ``sample`` on llama.cpp, whose top
    log-probabilities are taken before its grammar is applied (so they are not a distribution over the
    choices); see :meth:`lpm.server_kind.ServerKind.resolve_mode`."""
    return server_kind(server).resolve_mode(mode)


@contextmanager
def running_server(
    url: str | None, model: str | None, *, server: str = "vllm"
) -> Iterator[tuple[str, str, float | None]]:
    """``(url, model, startup seconds)`` of the server at ``url``, or of a local server of kind ``server``
    started now (serving ``model``) and stopped on leaving the block. For a server at ``url`` the startup
    is None and ``model`` defaults to the default model's name. Used by scripts that need a live server
    for clients of their own (the benchmarks)."""
    if url:
        from lpm.model import DEFAULT_MODEL_NAME

        yield url, model or DEFAULT_MODEL_NAME, None
        return
    from lpm.server import ModelServer

    with ModelServer(server_kind(server, field="--server"), served_name=model) as local:
        yield local.url, local.model, local.startup_seconds


@contextmanager
def llm_backend(
    url: str | None,
    model: str | None,
    *,
    cache_mode: str = "use",
    server: str = "vllm",
    api_key_env: str = "OPENAI_API_KEY",
    max_concurrency: int = 16,
    on_start: Callable[[Any], None] | None = None,
) -> Iterator[tuple[Backend, dict[str, Any]]]:
    """A backend and a record of it (``url``, ``model``, ``server``, ``local_server`` …) for the run folder.

    url: a running OpenAI-compatible server; its only model is used when ``model`` is None.
    None: a local server of kind ``server`` serving ``model`` (default SmolLM2-135M-Instruct), started at
    the first request that misses the cache and stopped on leaving the block; with ``cache_mode="replay"``
    none is ever started. server: the server kind (:data:`lpm.server_kind.SERVER_KINDS`), also the
    answer-constraint format of a server at ``url``.
    """
    kind = server_kind(server, field="--server")
    kwargs = {"api_key_env": api_key_env, "max_concurrency": max_concurrency}
    local = None
    info: dict[str, Any] = {"server": kind.name, "local_server": False}
    try:
        if url:
            if not model:
                from lpm.server import check_server

                models = check_server(url)["models"]
                if len(models) != 1:
                    raise InputError(f"--llm-model is needed: {url} serves {models or 'no models'}")
                model = str(models[0])
            backend: Backend = OpenAIBackend(url, model, server=kind, **kwargs)
        elif cache_mode == "replay":
            from lpm.model import DEFAULT_MODEL_NAME

            model = model or DEFAULT_MODEL_NAME
            backend = OpenAIBackend(REPLAY_URL, model, server=kind, **kwargs)
        else:
            from lpm.server import ModelServer

            local = ModelServer(kind, served_name=model)
            backend = LocalServerBackend(local, **kwargs)
            backend.on_start = on_start
            url, model = local.url, local.model
            info["local_server"] = True
        info |= {"url": url, "model": model}
        yield backend, info
    finally:
        if local is not None:
            if local.running:
                info["server_started_seconds"] = local.startup_seconds
            local.stop()
