"""Policies: how archetypes turn a step's context into a probability distribution over actions.

A policy answers once per archetype per decision step with a (K, A) probability table; the engine
broadcasts it to the agents (``probs[group_ids]``) and every agent samples its own action. Policies plug
in through :class:`Policy` (checked at construction: a subclass must implement ``decide``).

Context values are numbers or text shared by every archetype, or a :class:`ByAttribute` whose value
depends on one archetype attribute (e.g. the unemployment rate of the archetype's borough);
:func:`resolve_context` turns a step's context into one plain dict per archetype.

* :class:`HeuristicPolicy`: rule functions of archetype attributes and context, no model (mode
  ``"heuristic"``). The reference policy, used by tests and benchmarks.
* :class:`ArchetypeLLMPolicy`: one model request per archetype per decision step, through a *decider*.
* :class:`AgentLLMPolicy`: one model request per agent (K = N), for small populations only.

A decider is any object with ``decide(spec, rows, context)`` returning an object with ``probs``
(len(rows), A) tensor, ``mode`` list[str], ``cached`` list[bool], ``prompt_tokens``,
``completion_tokens`` and ``requests`` (ints); :class:`lpm.decision.Decider` is the real one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm import nyc
from lpm.archetype import ArchetypeSpec, Grouping
from lpm.errors import InputError
from lpm.population import Population, smallest_int_dtype

__all__ = [
    "AgentLLMPolicy",
    "ArchetypeLLMPolicy",
    "ByAttribute",
    "HeuristicPolicy",
    "Policy",
    "PolicyDecision",
    "resolve_context",
]

#: Names of the counters every policy keeps (summed over the run).
COUNTERS = ("llm_queries", "cache_hits", "prompt_tokens", "completion_tokens", "fallbacks")


@dataclass(frozen=True)
class ByAttribute:
    """A context value that depends on one archetype attribute: ``values[row[attribute]]``.

    >>> ByAttribute("borough", {"Bronx": 14.1, "Queens": 12.0})
    """

    attribute: str
    values: Mapping[str, Any]

    def for_row(self, row: Mapping[str, Any]) -> Any:
        try:
            return self.values[str(row[self.attribute])]
        except KeyError:
            raise InputError(
                f"context value by {self.attribute!r} has no entry for archetype {dict(row)} "
                f"(it has {sorted(self.values)})"
            ) from None


def resolve_context(rows: list[Mapping[str, Any]], context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One plain context dict per archetype row: shared values copied, :class:`ByAttribute` looked up."""
    return [
        {k: v.for_row(row) if isinstance(v, ByAttribute) else v for k, v in context.items()} for row in rows
    ]


@dataclass
class PolicyDecision:
    """The answer of a policy at one decision step.

    probs: (K, A) float32, row k the action distribution of archetype k (rows sum to 1).
    records: one dict per archetype (``archetype``, ``mode``, ``cached``, ``p_<action>`` …), the rows of
    decisions.parquet. Counters: this step's model requests, cache hits, tokens and fallbacks.
    """

    probs: torch.Tensor
    records: list[dict[str, Any]]
    llm_queries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallbacks: int = 0

    def counters(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTERS}


class Policy(ABC):
    """Base of policies. ``setup`` once per run, then ``decide`` at each decision step.

    Subclasses implement :meth:`decide`; they may override :meth:`setup` to replace the grouping
    (:class:`AgentLLMPolicy` makes every agent its own archetype).
    """

    spec: ArchetypeSpec
    grouping: Grouping
    rows: list[dict[str, Any]]

    def setup(self, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Grouping:
        """Remember the spec and the archetypes; return the grouping the engine broadcasts with."""
        self.spec, self.grouping = spec, grouping
        self.rows = grouping.rows()
        return grouping

    @abstractmethod
    def decide(self, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        """(K, A) action probabilities of the K archetypes given this step's ``context``."""

    @property
    def mode(self) -> str:
        """Short name recorded with the run (``heuristic``, ``llm-archetype``, ``llm-agent``)."""
        return type(self).__name__

    # shared helper
    def _records(self, probs: torch.Tensor, modes: list[str], cached: list[bool]) -> list[dict[str, Any]]:
        values = probs.detach().cpu().double().numpy()
        out = []
        for k in range(values.shape[0]):
            rec: dict[str, Any] = {"archetype": k, "mode": modes[k], "cached": bool(cached[k])}
            for a, action in enumerate(self.spec.actions):
                rec[f"p_{action}"] = float(values[k, a])
            out.append(rec)
        return out


# -- heuristic ---------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def age_midpoint(label: str) -> float:
    """Middle of an age-band label: ``"25-34"`` -> 29.5, ``"75+"`` -> 80, ``"41"`` -> 41."""
    label = str(label).strip()
    if label.endswith("+"):
        return float(label[:-1]) + 5.0
    if "-" in label:
        lo, hi = label.split("-", 1)
        return (float(lo) + float(hi)) / 2.0
    return float(label)


def _age(frame: pd.DataFrame) -> np.ndarray:
    if "age" in frame:
        return frame["age"].astype(float).to_numpy()
    if "age_group" in frame:
        return frame["age_group"].map(age_midpoint).to_numpy(dtype=float)
    return np.full(len(frame), 40.0)


def isolation_rule(rows: pd.DataFrame, ctx: pd.DataFrame) -> np.ndarray:
    """P(isolate): rises with weekly cases per 100,000 (log scale), with a rising trend and with age.

    rows: K archetype attributes; ctx: K resolved contexts (``cases`` per week citywide,
    ``cases_change`` percent). Returns (K,) probabilities. About 8 % at no cases, 50 % for a 40-year-old
    at 200 weekly cases per 100,000, higher for older residents.
    """
    per_100k = ctx["cases"].astype(float).to_numpy() / nyc.city_population() * 1e5
    change = ctx["cases_change"].astype(float).to_numpy() if "cases_change" in ctx else np.zeros(len(ctx))
    x = -2.4 + 0.85 * np.log1p(per_100k) + 0.004 * np.clip(change, -100, 200) + 0.03 * (_age(rows) - 40)
    return _sigmoid(x)


def work_rule(rows: pd.DataFrame, ctx: pd.DataFrame) -> np.ndarray:
    """P(work): falls with monthly cases per 100,000, rises with the borough's unemployment rate.

    ``cases`` is citywide cases in the past month, ``unemployment_rate`` in percent. About 95 % with no
    cases and 4 % unemployment; about 85 % at 1,000 monthly cases per 100,000.
    """
    per_100k = ctx["cases"].astype(float).to_numpy() / nyc.city_population() * 1e5
    unemp = (
        ctx["unemployment_rate"].astype(float).to_numpy()
        if "unemployment_rate" in ctx
        else np.full(len(ctx), 4.0)
    )
    x = 2.9 - 0.0012 * per_100k + 0.08 * (unemp - 4.0) - 0.01 * np.clip(_age(rows) - 50, 0, None)
    return _sigmoid(x)


Rule = Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]


@dataclass
class HeuristicPolicy(Policy):
    """Rule functions of archetype attributes and context; no model calls (mode ``"heuristic"``).

    rules: action name -> function ``(rows, contexts) -> (K,) probability`` of that action. Actions
    without a rule share the remaining probability equally. The defaults cover the shipped specs:
    ``isolate`` (:func:`isolation_rule`) and ``work`` (:func:`work_rule`).
    """

    rules: dict[str, Rule] = field(default_factory=lambda: {"isolate": isolation_rule, "work": work_rule})

    def setup(self, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Grouping:
        grouping = super().setup(spec, pop, grouping)
        if not any(a in self.rules for a in spec.actions):
            raise InputError(
                f"{spec.where}: field 'actions': the heuristic policy has no rule for any of {spec.actions}",
                hint=f"it has rules for {sorted(self.rules)}; pass HeuristicPolicy(rules={{action: fn}})",
            )
        self._frame = pd.DataFrame(self.rows)
        return grouping

    @property
    def mode(self) -> str:
        return "heuristic"

    def decide(self, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        ctx = pd.DataFrame(resolve_context(self.rows, context), index=range(len(self.rows)))
        k, actions = len(self.rows), self.spec.actions
        probs = np.zeros((k, len(actions)))
        ruled = [a for a in actions if a in self.rules]
        for a in ruled:
            probs[:, actions.index(a)] = np.clip(self.rules[a](self._frame, ctx), 0.0, 1.0)
        total = probs.sum(axis=1)
        rest = [i for i, a in enumerate(actions) if a not in self.rules]
        if rest:
            probs[:, rest] = np.clip(1.0 - total, 0.0, None)[:, None] / len(rest)
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        table = torch.from_numpy(probs.astype(np.float32))
        return PolicyDecision(table, self._records(table, ["heuristic"] * k, [False] * k))


# -- model-backed ------------------------------------------------------------------------------------


def _check_decider(decider: Any) -> None:
    if not callable(getattr(decider, "decide", None)):
        raise TypeError(f"a decider needs a decide(spec, rows, context) method; got {type(decider).__name__}")


class ArchetypeLLMPolicy(Policy):
    """One model request per archetype per decision step, through ``decider`` (e.g. :class:`lpm.decision.Decider`).

    The decider gets the spec, the K archetype rows (attribute labels) and the step's context, and
    returns ``probs`` (K, A), ``mode`` and ``cached`` per row, token counts and the number of requests
    it sent. Context values given :class:`ByAttribute` are resolved per archetype: the rows are split by
    their resolved context and the decider is called once per distinct context (rows keep their order).
    Counters: ``llm_queries`` = requests sent, ``cache_hits`` = rows answered from the cache,
    ``fallbacks`` = rows whose mode is not a model mode (``"fallback…"``).
    """

    def __init__(self, decider: Any, *, fallback: Policy | None = None):
        _check_decider(decider)
        if fallback is not None and not isinstance(fallback, Policy):
            raise TypeError(f"fallback must be an lpm.policy.Policy, got {type(fallback).__name__}")
        self.decider = decider
        self.fallback = fallback

    def setup(self, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Grouping:
        grouping = super().setup(spec, pop, grouping)
        if self.fallback is not None:
            self.fallback.setup(spec, pop, grouping)
        return grouping

    @property
    def mode(self) -> str:
        return "llm-archetype"

    def decide(self, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        rows = self.rows
        per_row = resolve_context(rows, context)
        groups: dict[tuple, list[int]] = {}
        for i, ctx in enumerate(per_row):
            groups.setdefault(tuple(sorted((k, repr(v)) for k, v in ctx.items())), []).append(i)
        a = len(self.spec.actions)
        probs = torch.zeros(len(rows), a, dtype=torch.float32)
        modes: list[str] = [""] * len(rows)
        cached: list[bool] = [False] * len(rows)
        out = PolicyDecision(probs, [])
        fallback_probs: torch.Tensor | None = None
        for idx in groups.values():
            answer = self.decider.decide(self.spec, [rows[i] for i in idx], per_row[idx[0]])
            p = torch.as_tensor(answer.probs, dtype=torch.float32).reshape(len(idx), a).clone()
            failed = sorted(set(getattr(answer, "failed", ()) or ()))
            if failed:  # only when the decider was told to return failures: fill from the fallback, counted
                if self.fallback is None:
                    raise ValueError(
                        f"decider left rows {failed} undecided at step {step} and there is no fallback"
                    )
                if fallback_probs is None:
                    fallback_probs = self.fallback.decide(context, step=step).probs
                for j in failed:
                    p[j] = fallback_probs[idx[j]]
            if not torch.isfinite(p).all() or (p < 0).any():
                raise ValueError(f"decider returned invalid probabilities at step {step}: {p}")
            probs[idx] = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
            for j, i in enumerate(idx):
                modes[i], cached[i] = str(answer.mode[j]), bool(answer.cached[j])
            for j in failed:
                modes[idx[j]], cached[idx[j]] = f"fallback-{self.fallback.mode}", False
            out.llm_queries += int(answer.requests)
            out.prompt_tokens += int(answer.prompt_tokens)
            out.completion_tokens += int(answer.completion_tokens)
        out.cache_hits = sum(cached)
        out.fallbacks = sum(m.startswith("fallback") for m in modes)
        out.records = self._records(probs, modes, cached)
        return out


class AgentLLMPolicy(ArchetypeLLMPolicy):
    """One model request per agent: every member is its own archetype (K = members), its row holding the
    spec's attributes plus ``extra`` columns (single-year ``age`` and ``zip`` by default).

    For comparing archetype answers with individual ones on small populations; refuses more than
    ``max_agents`` (5,000) deciding agents.
    """

    def __init__(
        self,
        decider: Any,
        *,
        extra: tuple[str, ...] = ("age", "zip"),
        max_agents: int = 5000,
        fallback: Policy | None = None,
    ):
        super().__init__(decider, fallback=fallback)
        self.extra, self.max_agents = tuple(extra), int(max_agents)

    @property
    def mode(self) -> str:
        return "llm-agent"

    def setup(self, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Grouping:
        members = grouping.ids >= 0
        n = int(members.sum())
        if n > self.max_agents:
            raise InputError(
                f"the per-agent LLM policy asks the model once per agent; {n:,} agents decide under "
                f"{spec.name!r}, more than its limit of {self.max_agents:,}",
                hint="use the archetype policy, or a population of at most that many agents (--agents)",
            )
        ids = torch.full((len(pop),), -1, dtype=torch.int64, device=grouping.ids.device)
        ids[members] = torch.arange(n, device=ids.device)
        index = torch.nonzero(members).squeeze(1).cpu()
        frame = pop.to_pandas().iloc[index.numpy()]
        cols = spec.attribute_names + [c for c in self.extra if c in pop and c not in spec.attribute_names]
        table = frame[cols].astype(str).reset_index(drop=True)
        table["agents"] = 1
        table.index.name = "archetype"
        agent = Grouping(
            ids=ids.to(smallest_int_dtype(-1, max(n - 1, 0))),
            k=n,
            counts=torch.ones(n, dtype=torch.int64),
            table=table,
        )
        return super().setup(spec, pop, agent)
