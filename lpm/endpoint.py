"""Where model requests go, and which model answers them: a server at a given URL, or a local one lpm starts
at the first cache miss, serving weights it can name.

Used by ``lpm run``, ``lpm decide``, ``lpm calibrate``, ``lpm compare`` and ``lpm probe`` alike, so all treat
``--llm-url``, ``--llm-model``, ``--model``, ``--model-revision``, the server kind and ``--cache replay`` the
same way (:class:`Endpoint`):

- ``--llm-url URL``: the server there (or several servers of the same model, replicas, as ``URL,URL``: requests
  are spread across them and a request one fails goes to another, see :mod:`lpm.backend`; each must answer
  and serve the model at start); ``--llm-model`` names the served model (default: its only one) and
  ``--model-revision`` says which version of it, for the response cache's key (otherwise the name alone
  identifies the answers, and a server that serves other weights under the same name would share them).
- no URL: a local server of the kind ``--server`` serving ``--model PATH`` (a model folder or a .gguf file;
  default SmolLM2-135M-Instruct), under the name ``--llm-model`` (default: the weights' own name), with a
  random API key that only this process knows. The cache key holds the SHA-256 fingerprint of those weights
  (:func:`lpm.model.weights_fingerprint`). A name without weights is refused: lpm would otherwise serve the
  default weights under a name that says something else.
- ``--cache replay`` without a URL: no server at all; the key is the one the recorded run used.

URLs are written to run folders without credentials or query (:func:`redact_url`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpm.backend import Backend, LocalServerBackend, OpenAIBackend, redact_url, replica_urls
from lpm.errors import InputError, ServerError
from lpm.server_kind import ServerKind, server_kind

#: Never contacted: with ``--cache replay`` and no URL every answer must come from the cache.
REPLAY_URL = "http://replay.invalid/v1"


def default_mode(mode: str, server: str) -> str:
    """The decision mode to use with a ``server`` kind: ``auto`` means ``sample`` on llama.cpp, whose top
    log-probabilities are taken before its grammar is applied (so they are not a distribution over the
    choices); see :meth:`lpm.server_kind.ServerKind.resolve_mode`."""
    return server_kind(server).resolve_mode(mode)


def served_name(weights: str | Path | None) -> str:
    """The name a local server serves ``weights`` under by default: the default model's name, else the
    .gguf file's stem or the folder's name."""
    if weights is None:
        from lpm.model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    path = Path(weights)
    return path.stem if path.suffix == ".gguf" else path.name


@dataclass
class Endpoint:
    """The model a command asks, resolved from its options (see the module docstring).

    url: the server's URL, or the replicas' URLs joined by commas (None: local or replay). model: the served
    name. kind: the server kind.
    weights: the weights' fingerprint (local, replay of local) or ``revision:REV`` (a server at a URL), None
    when unknown. local: the :class:`lpm.server.ModelServer` lpm starts at the first cache miss (not yet
    started), or None.
    """

    url: str | None
    model: str
    kind: ServerKind
    weights: str | None
    local: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Any, **options: Any) -> Endpoint:
        """:meth:`resolve` with the LLM fields of a :class:`lpm.run.RunConfig`, a
        :class:`lpm.compare.CompareConfig` or a command's :class:`lpm.cli.asking.ModelOptions` (``llm_url``,
        ``llm_model``, ``llm_weights``, ``llm_revision``, ``cache``, ``server``, ``api_key_env``,
        ``llm_timeout``); ``options``: more of :meth:`resolve`'s (``max_concurrency``)."""
        return cls.resolve(
            config.llm_url,
            config.llm_model,
            weights=config.llm_weights,
            revision=config.llm_revision,
            cache_mode=config.cache,
            server=config.server,
            api_key_env=config.api_key_env,
            timeout=config.llm_timeout,
            **options,
        )

    @classmethod
    def resolve(
        cls,
        url: str | None,
        model: str | None,
        *,
        weights: str | Path | None = None,
        revision: str | None = None,
        cache_mode: str = "use",
        server: str = "vllm",
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout: float = 60.0,
    ) -> Endpoint:
        """Check the options and name the model; starts nothing (a local server is made, not started).

        timeout: seconds to wait for the answer to one request (``--llm-timeout``), for the backends made.
        """
        kind = server_kind(server, field="--server")
        if not timeout > 0:
            raise InputError(f"--llm-timeout must be > 0 seconds, got {timeout:g}")
        options = {"api_key_env": api_key_env, "max_concurrency": max_concurrency, "timeout": timeout}
        if url and weights is not None:
            raise InputError(
                f"--model {weights} serves weights on a local server, but --llm-url {redact_url(url)} was given",
                hint="with --llm-url, name the served model with --llm-model and its version with --model-revision",
            )
        if weights is not None and revision:
            raise InputError(
                "--model-revision names the version of a model at --llm-url; weights given with --model are "
                "named by their content",
                hint="leave --model-revision out",
            )
        tag = f"revision:{revision}" if revision else None
        if url:
            urls = replica_urls(url)
            if len(urls) > 1:
                return cls(",".join(urls), same_model(urls, model, api_key_env), kind, tag, options=options)
            if not model:
                import os

                from lpm.server import check_server

                models = check_server(url, api_key=os.environ.get(api_key_env))["models"]
                if not models:  # an OpenAI-compatible server (check_server refuses anything else) with none
                    raise ServerError(
                        f"{redact_url(url)} serves no models (its /models list is empty)",
                        hint="load a model on that server, or pass the URL of one that serves it",
                    )
                if len(models) > 1:
                    raise InputError(
                        f"--llm-model is needed: {redact_url(url)} serves {', '.join(models)}",
                        hint="name one of them with --llm-model",
                    )
                model = str(models[0])
            return cls(url, model, kind, tag, options=options)
        if model and weights is None and cache_mode != "replay":
            raise InputError(
                f"--llm-model {model!r} without --llm-url: lpm would serve its default weights "
                f"({served_name(None)}) under that name",
                hint="pass --model PATH (a model folder or .gguf file) to serve those weights, or --llm-url of "
                "a server that serves the model",
            )
        if cache_mode == "replay" and model and weights is None:  # answers recorded from a server at a URL
            return cls(None, model, kind, tag, options=options)
        from lpm.model import weights_fingerprint

        if weights is not None and not Path(weights).exists():
            raise InputError(
                f"--model {weights}: no such file or folder", hint="pass a model folder or .gguf file"
            )
        fingerprint = weights_fingerprint(
            None if weights is None else Path(weights), served_as=kind.model_format
        )
        name = model or served_name(weights)
        if cache_mode == "replay":
            return cls(None, name, kind, fingerprint, options=options)
        from lpm.server import ModelServer, new_api_key

        local = ModelServer(kind, weights, served_name=name, api_key=new_api_key())
        return cls(None, name, kind, fingerprint, local=local, options=options)

    @property
    def urls(self) -> list[str]:
        """The URLs of the server at ``url`` or of its replicas; [] for a local server or a replay."""
        return self.url.split(",") if self.url else []

    def backend(self, on_start: Callable[[Any], None] | None = None) -> Backend:
        """A backend asking this model (a local server starts at its first request, once)."""
        if self.url:
            return OpenAIBackend(self.url, self.model, server=self.kind, weights=self.weights, **self.options)
        if self.local is None:
            return OpenAIBackend(
                REPLAY_URL, self.model, server=self.kind, weights=self.weights, **self.options
            )
        backend = LocalServerBackend(self.local, weights=self.weights, **self.options)
        backend.on_start = on_start
        return backend

    def info(self) -> dict[str, Any]:
        """What a run folder records of the model (no key, no credentials)."""
        return {
            "url": redact_url(self.url or (self.local.url if self.local is not None else None)),
            "model": self.model,
            "server": self.kind.name,
            "weights": self.weights,
            "local_server": self.local is not None,
        } | ({"replicas": [redact_url(u) for u in self.urls]} if len(self.urls) > 1 else {})

    def live_url(self) -> str | None:
        """The URL of a server that answers now: the one at ``url``, or the local one once it runs."""
        return self.url or (self.local.url if self.local is not None and self.local.running else None)

    def close(self) -> None:
        """Stop the local server if it runs."""
        if self.local is not None:
            self.local.stop()


@contextmanager
def running_server(
    url: str | None, model: str | None, *, server: str = "vllm"
) -> Iterator[tuple[str, str, float | None]]:
    """``(url, model, startup seconds)`` of the server at ``url``, or of a local server of kind ``server``
    started now (serving the default model, under ``model`` if given) and stopped on leaving the block. For a
    server at ``url`` the startup is None and ``model`` defaults to the default model's name. Used by scripts
    that need a live server for clients of their own (the benchmarks); the local one takes no API key."""
    if url:
        yield url, model or served_name(None), None
        return
    from lpm.server import ModelServer

    with ModelServer(server_kind(server, field="--server"), served_name=model) as local:
        yield local.url, local.model, local.startup_seconds


@contextmanager
def llm_backend(
    endpoint: Endpoint, *, on_start: Callable[[Any], None] | None = None, own: bool = True
) -> Iterator[tuple[Backend, dict[str, Any]]]:
    """A backend asking ``endpoint`` (:meth:`Endpoint.resolve`) and a record of it (:meth:`Endpoint.info` and
    ``identity``, the cache key's model part) for the run folder. On leaving the block the record gains
    ``server_figures`` (:func:`lpm.server.server_figures`: the server's tokens and prefix-cache hit rate
    while the block ran) where the server exports metrics. A local server starts at the first request that
    misses the cache (``on_start(server)`` just before); with ``own`` it is stopped on leaving the block,
    else its owner stops it (``lpm compare`` shares one between runs). The record also gains ``requests``
    and ``retries``: the HTTP requests the backend sent (retries included; whole-action scoring sends one
    per action, where ``llm_queries`` counts prompts) and how many were retries.
    """
    from lpm.server import server_figures

    backend = endpoint.backend(on_start)
    info = endpoint.info() | {"identity": backend.identity()}
    live = endpoint.live_url()
    before = _counters(live) if live else None  # a server started later starts from zero
    try:
        yield backend, info
    finally:
        live = endpoint.live_url()
        if live:
            info["server_figures"] = server_figures(before, _counters(live))
        if endpoint.local is not None and endpoint.local.running:
            info["server_started_seconds"] = endpoint.local.startup_seconds
        stats = getattr(getattr(backend, "inner", backend), "stats", None)
        if stats is not None:  # HTTP requests, retries included (llm_queries counts prompts)
            info["requests"], info["retries"] = stats.requests, stats.retries
            if len(endpoint.urls) > 1:  # requests sent to each replica, and those sent on after one failed
                info["replica_requests"], info["failovers"] = dict(stats.replicas), stats.failovers
        if own:
            endpoint.close()


def same_model(urls: list[str], model: str | None, api_key_env: str) -> str:
    """The model every replica at ``urls`` serves: ``model``, or the only one the first serves. Each replica
    is asked (GET /models) now; one that does not answer, or does not serve that model, is an error naming its
    URL (without credentials)."""
    import os

    from lpm.server import check_server

    for url in urls:
        shown = redact_url(url)
        try:
            models = [str(m) for m in check_server(url, api_key=os.environ.get(api_key_env))["models"]]
        except ServerError as exc:
            raise ServerError(
                f"--llm-url replica {shown}: {str(exc).replace(url, shown or url)}", hint=exc.hint
            ) from None
        if model is None:
            if len(models) != 1:
                raise InputError(
                    f"--llm-model is needed: the replica {shown} serves "
                    f"{', '.join(models) if models else 'no model'}",
                    hint="name the model every replica serves with --llm-model",
                )
            model = models[0]
        elif model not in models:
            raise InputError(
                f"--llm-url replica {shown} serves {', '.join(models) or 'no model'}, not {model!r}: the "
                "replicas must serve the same model",
                hint="give only URLs of servers of the same model (the same --served-model-name)",
            )
    assert model is not None
    return model


def _counters(url: str) -> dict[str, float | None] | None:
    """:func:`lpm.server.token_counters` of the server at ``url``, summed over the replicas of a
    comma-separated list (None when one of them exports no metrics)."""
    from lpm.server import token_counters

    readings = [token_counters(u) for u in url.split(",")]
    if any(r is None for r in readings):
        return None
    summed: dict[str, float | None] = {}
    for reading in readings:
        assert reading is not None
        for name, value in reading.items():
            total = summed.get(name, 0.0)
            summed[name] = None if value is None or total is None else total + value
    return summed
