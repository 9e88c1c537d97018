"""What the commands that ask a model directly (``lpm decide``, ``lpm probe``) share: their model options,
checked once, and the Decider they ask through (:class:`ModelOptions`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console

from lpm.cache import CACHE_MODES, ResponseCache
from lpm.decision import Decider
from lpm.endpoint import Endpoint, default_mode, llm_backend
from lpm.errors import InputError


@dataclass(frozen=True)
class ModelOptions:
    """The model options of a command (the names of its parameters; :func:`lpm.cli.options` declares them)."""

    llm_url: str | None
    llm_model: str | None
    weights: Path | None
    revision: str | None
    api_key_env: str
    server: str
    cache: str
    cache_dir: Path | None
    mode: str
    n_samples: int
    scoring: str
    elicitation: str
    concurrency: int
    llm_timeout: float

    @property
    def llm_weights(self) -> str | None:  # the names Endpoint.for_config reads
        return None if self.weights is None else str(self.weights)

    @property
    def llm_revision(self) -> str | None:
        return self.revision

    @classmethod
    def pick(cls, values: dict[str, Any]) -> ModelOptions:
        """The options among a command's parameters (``locals()``), checked: a bad cache mode is an error
        before anything starts."""
        options = cls(**{f.name: values[f.name] for f in fields(cls)})
        if options.cache not in CACHE_MODES:
            raise InputError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {options.cache!r}")
        return options

    @contextmanager
    def decider(self, *, progress: bool = True) -> Iterator[tuple[Decider, dict[str, Any], ResponseCache]]:
        """A Decider asking the model these options name, the run record of that model
        (:func:`lpm.endpoint.llm_backend`) and the response cache; a local server lpm starts is announced on
        stderr and stopped on leaving the block."""
        cache = ResponseCache(self.cache_dir, mode=self.cache)
        err = Console(stderr=True)
        endpoint = Endpoint.for_config(self, max_concurrency=self.concurrency)

        def announce(local: Any) -> None:
            err.print(f"starting a local {local.kind.label} server (logs: {local.log_path}) ...")

        with llm_backend(endpoint, on_start=announce) as (backend, info):
            decider = Decider(
                backend,
                cache,
                mode=default_mode(self.mode, self.server),
                n_samples=self.n_samples,
                scoring=self.scoring,
                elicitation=self.elicitation,
                progress=progress,
            )
            yield decider, info, cache
