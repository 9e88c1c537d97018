"""Decisions of archetypes: one model request per archetype that the cache does not already hold.

Order of one call of :meth:`Decider.decide`:

1. render the prompt of every archetype row (context rounded by the spec);
2. look every prompt up in the response cache (``replay``: any miss is an error before anything is sent);
3. send one request per distinct missing prompt, concurrently (the backend bounds requests in flight);
4. store the new answers, and return every row's distribution in input order.

A failed request is retried by the backend and then reported: with ``on_failure="error"`` the call raises
:class:`LLMError` naming the archetypes left undecided; with ``on_failure="return"`` their rows are NaN and
listed in ``Decisions.failed``. Never a made-up number.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lpm.archetype import ArchetypeSpec
from lpm.backend import Answer, Backend
from lpm.cache import ResponseCache, cache_key
from lpm.decoding import DEFAULT_SCORING, MIN_COVERAGE, Decoding
from lpm.elicitation import Elicitation
from lpm.errors import CacheMissError, InputError, LLMError, LpmError, ServerError
from lpm.prompt import PromptTemplate

FAILURE_POLICIES = ("error", "return")


@dataclass
class Decisions:
    """Distributions over the actions for K archetype rows, in input order.

    probs: (K, A) float32, each row sums to 1 (NaN rows for ``failed``). mode: the mode each answer came from.
    cached: whether each row came from the cache. coverage: first-token mass on tokens that begin an action,
    before renormalisation (NaN where no first token was read). scoring: how each row's probabilities were
    read (:data:`lpm.logprobs.SCORINGS`; ``""`` for failed rows). prompt_tokens / completion_tokens: of the requests sent
    now. requests: model calls sent now (one per distinct missing prompt; retries in ``retries``).
    failed: indices of rows left undecided (only with ``on_failure="return"``).
    """

    actions: list[str]
    rows: list[dict[str, str]]
    probs: torch.Tensor
    mode: list[str]
    cached: list[bool]
    coverage: list[float] = field(default_factory=list)
    scoring: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    failed: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per archetype: its attributes, ``p_<action>`` per action, ``mode``, ``scoring``,
        ``coverage`` and ``cached``."""
        frame = pd.DataFrame(self.rows)
        probs = self.probs.double().numpy()
        for j, action in enumerate(self.actions):
            frame[f"p_{action}"] = probs[:, j]
        frame["mode"] = self.mode
        frame["scoring"] = self.scoring or [""] * len(self.rows)
        frame["coverage"] = self.coverage or [math.nan] * len(self.rows)
        frame["cached"] = self.cached
        return frame


class Decider:
    """Asks a backend for the decisions of archetypes, through a response cache.

    backend: an :class:`lpm.backend.Backend`. cache: a :class:`ResponseCache`, or None for no caching.
    mode: ``auto`` (logprobs, else sampling), ``logprobs`` or ``sample``. n_samples: answers per
    request in sample mode. scoring: ``sequence`` (default, :data:`lpm.decoding.DEFAULT_SCORING`) or
    ``first-token`` (:data:`lpm.decoding.SCORING_CHOICES`).
    min_coverage: least first-token mass on action tokens (:data:`lpm.decoding.MIN_COVERAGE`). All are
    checked once, into :attr:`decoding` (a :class:`lpm.decoding.Decoding`, what every request sends and every
    cache key hashes), and the backend is asked whether it can honour them (:meth:`Backend.check`).
    elicitation: how the question is put (:data:`lpm.elicitation.ELICITATIONS`: ``choice``, ``yes-no``,
    ``scale``); the answers are mapped back to the spec's actions.
    on_failure: ``error`` (raise) or ``return`` (NaN rows listed in ``failed``).
    progress: show a progress bar (stderr) when more than one request is sent.
    per_agent: render the prompt file's ``agent_user`` message (rows carry each agent's own columns).
    """

    def __init__(
        self,
        backend: Backend,
        cache: ResponseCache | None = None,
        *,
        mode: str = "auto",
        n_samples: int = 20,
        scoring: str = DEFAULT_SCORING,
        min_coverage: float = MIN_COVERAGE,
        elicitation: str = "choice",
        on_failure: str = "error",
        progress: bool = True,
        per_agent: bool = False,
    ):
        if not isinstance(backend, Backend):
            raise InputError(f"backend must be an lpm.backend.Backend, got {type(backend).__name__}")
        if cache is not None and not isinstance(cache, ResponseCache):
            raise InputError(f"cache must be a ResponseCache or None, got {type(cache).__name__}")
        decoding = Decoding(mode=mode, n_samples=n_samples, scoring=scoring, min_coverage=min_coverage)
        backend.check(decoding)
        self.elicitation = Elicitation.check_name(elicitation)
        if on_failure not in FAILURE_POLICIES:
            raise InputError(f"on_failure must be one of {', '.join(FAILURE_POLICIES)}, got {on_failure!r}")
        self.backend = backend
        self.cache = cache
        self.decoding = decoding
        self.on_failure = on_failure
        self.progress = progress
        self.per_agent = per_agent
        self._prompts: dict[tuple[str, str], PromptTemplate] = {}

    def prompt(self, spec: ArchetypeSpec) -> PromptTemplate:
        """The spec's prompt template, loaded once per Decider."""
        key = (spec.name, str(spec.prompt))
        if key not in self._prompts:
            self._prompts[key] = PromptTemplate.load(spec)
        return self._prompts[key]

    def decide(
        self,
        spec: ArchetypeSpec,
        rows: Sequence[dict[str, str]],
        context: dict[str, Any],
        *,
        progress: bool | None = None,
    ) -> Decisions:
        """Synchronous :meth:`adecide` for code outside an event loop (runs its own loop each call)."""
        coro_args = (spec, rows, context)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._decide_and_close(*coro_args, progress=progress))
        # called from inside a running loop (a notebook): run in a worker thread with its own loop
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._decide_and_close(*coro_args, progress=progress)).result()

    async def _decide_and_close(self, *args: Any, progress: bool | None) -> Decisions:
        try:
            return await self.adecide(*args, progress=progress)
        finally:
            await self.backend.aclose()

    async def adecide(
        self,
        spec: ArchetypeSpec,
        rows: Sequence[dict[str, str]],
        context: dict[str, Any],
        *,
        progress: bool | None = None,
    ) -> Decisions:
        """Distributions over ``spec.actions`` for each row of attribute labels (see the module docstring).

        rows: K dicts of attribute labels, e.g. ``Grouping.rows()``. context: values of the spec's context
        variables this step (rounded by the spec before they enter the prompt); a name the spec does not
        declare, or text where the variable rounds numbers, is an :class:`InputError`.
        """
        start = asyncio.get_running_loop().time()
        spec.check_context(context)
        rows = [dict(r) for r in rows]
        elicit = Elicitation(self.elicitation, tuple(spec.actions))
        actions = elicit.asked  # what the model may answer (the spec's actions, unless elicited otherwise)
        template = self.prompt(spec)
        messages = [elicit.messages(template.render(r, context, per_agent=self.per_agent)) for r in rows]
        identity = self.backend.identity()
        params = self.backend.request_params(actions, self.decoding)
        keys = [cache_key(model=identity, messages=m, actions=actions, decoding=params) for m in messages]

        answers: list[Answer | None] = [None] * len(rows)
        cached = [False] * len(rows)
        missing: dict[str, list[int]] = {}  # key -> rows sharing that prompt
        replay_misses: list[int] = []
        for i, key in enumerate(keys):
            if key in missing:
                missing[key].append(i)
                continue
            try:
                hit = self.cache.get(key, label=label(spec, rows[i])) if self.cache is not None else None
            except CacheMissError:
                replay_misses.append(i)
                continue
            if hit is not None:
                answers[i], cached[i] = hit, True
            else:
                missing[key] = [i]
        if replay_misses:
            names = "; ".join(label(spec, rows[i]) for i in replay_misses[:3])
            more = f" and {len(replay_misses) - 3} more" if len(replay_misses) > 3 else ""
            assert self.cache is not None
            raise CacheMissError(
                f"{spec.name}: {len(replay_misses)} of {len(rows)} archetypes have no cached answer in "
                f"{self.cache.directory} (cache mode replay): {names}{more}",
                hint="run once with --cache use (and a model server) to fill the cache, or check that the model, "
                "prompt, context and mode match the recorded run",
            )

        errors: dict[int, BaseException] = {}
        totals = {"prompt": 0, "completion": 0, "retries": 0}
        show = (self.progress if progress is None else progress) and len(missing) > 1
        bar = _progress_bar() if show else None
        task = bar.add_task(f"{spec.name}: asking the model", total=len(missing)) if bar else None

        async def ask(key: str, idx: list[int]) -> None:
            try:
                answer = await self.backend.choose(messages[idx[0]], actions, self.decoding)
                _check(answer, actions)
            except Exception as exc:  # noqa: BLE001 - every failure of a request is reported, none escapes
                errors[idx[0]] = (
                    exc if isinstance(exc, LpmError) else LLMError(f"{type(exc).__name__}: {exc}")
                )
                return
            finally:
                if bar is not None and task is not None:
                    bar.advance(task)
            totals["prompt"] += answer.prompt_tokens
            totals["completion"] += answer.completion_tokens
            totals["retries"] += max(answer.attempts - 1, 0)
            if self.cache is not None:
                self.cache.put(key, answer)
            for i in idx:
                answers[i] = answer

        if bar is not None:
            bar.start()
        try:
            await asyncio.gather(*(ask(k, idx) for k, idx in missing.items()))
        finally:
            if bar is not None:
                bar.stop()

        failed = sorted(i for first, _ in errors.items() for i in missing[keys[first]])
        if errors:
            server = next((e for e in errors.values() if isinstance(e, ServerError)), None)
            if server is not None:
                raise server
            if self.on_failure == "error":
                first = next(iter(errors.values()))
                names = "; ".join(label(spec, rows[i]) for i in failed[:3])
                more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
                raise LLMError(
                    f"{spec.name}: {len(failed)} of {len(rows)} archetypes left undecided ({names}{more}): {first}",
                    hint=getattr(first, "hint", None),
                )

        probs = torch.full((len(rows), len(actions)), math.nan, dtype=torch.float32)
        modes = [""] * len(rows)
        scoring = [""] * len(rows)
        coverage = [math.nan] * len(rows)
        for i, answer in enumerate(answers):
            if answer is not None:
                probs[i] = torch.tensor(answer.probs, dtype=torch.float32)
                modes[i], scoring[i] = answer.mode, answer.scoring
                coverage[i] = math.nan if answer.coverage is None else float(answer.coverage)
        ok = ~torch.isnan(probs).any(1)
        probs[ok] /= probs[ok].sum(1, keepdim=True)  # exact float32 sums
        probs = elicit.to_actions(probs)
        return Decisions(
            actions=list(spec.actions),
            rows=rows,
            probs=probs,
            mode=modes,
            cached=cached,
            coverage=coverage,
            scoring=scoring,
            prompt_tokens=totals["prompt"],
            completion_tokens=totals["completion"],
            requests=len(missing),
            retries=totals["retries"],
            failed=failed,
            wall_s=asyncio.get_running_loop().time() - start,
        )


def label(spec: ArchetypeSpec, row: dict[str, str]) -> str:
    """A readable name of one archetype: ``covid_isolation[age_group=20-29, sex=female, borough=Bronx]``."""
    return f"{spec.name}[" + ", ".join(f"{a}={row.get(a)}" for a in spec.attribute_names) + "]"


def _check(answer: Answer, actions: list[str]) -> None:
    if len(answer.probs) != len(actions):
        raise LLMError(f"the backend returned {len(answer.probs)} probabilities for {len(actions)} actions")
    if not all(math.isfinite(p) and p >= 0 for p in answer.probs) or abs(sum(answer.probs) - 1) > 1e-4:
        raise LLMError(f"the backend returned an invalid distribution {answer.probs}")


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
