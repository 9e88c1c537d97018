"""Policies: how archetypes turn a step's context into a probability distribution over actions.

A policy answers once per archetype per decision step with a (K, A) probability table; the engine
broadcasts it to the agents (``probs[group_ids]``) and every agent samples its own action. Policies plug
in through :class:`Policy` (checked at construction: a subclass must implement ``decide``).

A policy object is immutable configuration that many simulations (and every decision of a scenario) may
share: :meth:`Policy.setup` returns the per-run :class:`Archetypes` of one decision (its spec, grouping and
rows), which the simulation owns and passes back to :meth:`Policy.decide` at each decision step.

Context values are numbers or text shared by every archetype, or a :class:`ByAttribute` whose value
depends on one archetype attribute (e.g. the unemployment rate of the archetype's borough);
:func:`resolve_context` turns a step's context into one plain dict per archetype.

* :class:`HeuristicPolicy`: rule functions of archetype attributes and context, no model (mode
  ``"heuristic"``); by default each decision's own rules (:class:`lpm.scenarios.Decision`).
* :class:`ArchetypeLLMPolicy`: one model request per archetype per decision step, through a *decider*.
* :class:`AgentLLMPolicy`: one model request per agent (K = N), for small populations only.

A decider is any object with ``decide(spec, rows, context)`` returning an object with ``probs``
(len(rows), A) tensor, ``mode`` list[str], ``cached`` list[bool], ``prompt_tokens``,
``completion_tokens`` and ``requests`` (ints); :class:`lpm.decision.Decider` is the real one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm.archetype import ArchetypeSpec, Grouping
from lpm.errors import InputError
from lpm.population import Population, smallest_int_dtype

__all__ = [
    "AgentLLMPolicy",
    "ArchetypeLLMPolicy",
    "Archetypes",
    "ByAttribute",
    "HeuristicPolicy",
    "Policy",
    "PolicyDecision",
    "age_of",
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


Rule = Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]


@dataclass
class Archetypes:
    """The archetypes of one decision in one run: what :meth:`Policy.setup` returns, owned by the simulation.

    decision: the decision's name. spec: its archetype spec. grouping: each agent's archetype (the one the
    engine broadcasts with). rows: the K archetypes' attribute labels. heuristic: the decision's default
    rules (action -> rule). frame: ``rows`` as a pandas frame. fallback: the fallback policy's archetypes,
    when the policy has one.
    """

    decision: str
    spec: ArchetypeSpec
    grouping: Grouping
    heuristic: Mapping[str, Rule]
    rows: list[dict[str, Any]] = field(init=False)
    frame: pd.DataFrame = field(init=False)
    fallback: Archetypes | None = None

    def __post_init__(self) -> None:
        self.rows = self.grouping.rows()
        self.frame = pd.DataFrame(self.rows, index=range(len(self.rows)))

    @property
    def k(self) -> int:
        return self.grouping.k


class Policy(ABC):
    """Base of policies: immutable configuration. ``setup`` once per run and decision, then ``decide``.

    Subclasses implement :meth:`decide`; they may override :meth:`setup` to replace the grouping
    (:class:`AgentLLMPolicy` makes every agent its own archetype).
    """

    def setup(self, decision: Any, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Archetypes:
        """The archetypes of ``decision`` (an :class:`lpm.scenarios.Decision`) in this run."""
        return Archetypes(decision.name, spec, grouping, dict(decision.heuristic))

    @abstractmethod
    def decide(self, archetypes: Archetypes, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        """(K, A) action probabilities of the K archetypes given this step's ``context``."""

    @property
    def mode(self) -> str:
        """Short name recorded with the run (``heuristic``, ``llm-archetype``, ``llm-agent``)."""
        return type(self).__name__

    # shared helper
    def _records(
        self,
        archetypes: Archetypes,
        probs: torch.Tensor,
        modes: list[str],
        cached: list[bool],
        scoring: list[str] | None = None,
        coverage: list[float] | None = None,
    ) -> list[dict[str, Any]]:
        """The rows of decisions.parquet: archetype, mode, scoring, coverage (NaN where no first token was
        read), cached and ``p_<action>``."""
        values = probs.detach().cpu().double().numpy()
        out = []
        for k in range(values.shape[0]):
            rec: dict[str, Any] = {
                "archetype": k,
                "mode": modes[k],
                "scoring": scoring[k] if scoring else "",
                "coverage": float(coverage[k]) if coverage else math.nan,
                "cached": bool(cached[k]),
            }
            for a, action in enumerate(archetypes.spec.actions):
                rec[f"p_{action}"] = float(values[k, a])
            out.append(rec)
        return out


# -- heuristic ---------------------------------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise."""
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


def age_of(rows: pd.DataFrame, default: float = 40.0) -> np.ndarray:
    """(K,) age of each archetype row: its ``age``, else the middle of its ``age_group``, else ``default``."""
    if "age" in rows:
        return rows["age"].astype(float).to_numpy()
    if "age_group" in rows:
        return rows["age_group"].map(age_midpoint).to_numpy(dtype=float)
    return np.full(len(rows), default)


@dataclass(frozen=True, eq=False)
class HeuristicPolicy(Policy):
    """Rule functions of archetype attributes and context; no model calls (mode ``"heuristic"``).

    rules: action name -> function ``(rows, contexts) -> (K,) probability`` of that action; None (the
    default) uses each decision's own rules (``Decision.heuristic``). Actions without a rule share the
    remaining probability equally.
    """

    rules: Mapping[str, Rule] | None = None

    def setup(self, decision: Any, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Archetypes:
        archetypes = super().setup(decision, spec, pop, grouping)
        rules = self._rules(archetypes)
        if not any(a in rules for a in spec.actions):
            raise InputError(
                f"{spec.where}: field 'actions': the heuristic policy has no rule for any of {spec.actions}",
                hint=f"it has rules for {sorted(rules)}; pass HeuristicPolicy(rules={{action: fn}})",
            )
        return archetypes

    def _rules(self, archetypes: Archetypes) -> Mapping[str, Rule]:
        return self.rules if self.rules is not None else archetypes.heuristic

    @property
    def mode(self) -> str:
        return "heuristic"

    def decide(self, archetypes: Archetypes, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        rows = archetypes.rows
        ctx = pd.DataFrame(resolve_context(rows, context), index=range(len(rows)))
        rules, actions = self._rules(archetypes), archetypes.spec.actions
        probs = np.zeros((len(rows), len(actions)))
        ruled = [a for a in actions if a in rules]
        for a in ruled:
            probs[:, actions.index(a)] = np.clip(rules[a](archetypes.frame, ctx), 0.0, 1.0)
        total = probs.sum(axis=1)
        rest = [i for i, a in enumerate(actions) if a not in rules]
        if rest:
            probs[:, rest] = np.clip(1.0 - total, 0.0, None)[:, None] / len(rest)
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        table = torch.from_numpy(probs.astype(np.float32))
        k = len(rows)
        return PolicyDecision(
            table, self._records(archetypes, table, ["heuristic"] * k, [False] * k, ["rule"] * k)
        )


# -- model-backed ------------------------------------------------------------------------------------


def _check_decider(decider: Any) -> None:
    if not callable(getattr(decider, "decide", None)):
        raise TypeError(f"a decider needs a decide(spec, rows, context) method; got {type(decider).__name__}")


@dataclass(frozen=True, eq=False)
class ArchetypeLLMPolicy(Policy):
    """One model request per archetype per decision step, through ``decider`` (e.g. :class:`lpm.decision.Decider`).

    The decider gets the spec, the K archetype rows (attribute labels) and the step's context, and
    returns ``probs`` (K, A), ``mode`` and ``cached`` per row, token counts and the number of requests
    it sent. Context values given :class:`ByAttribute` are resolved per archetype: the rows are split by
    their resolved context and the decider is called once per distinct context (rows keep their order).
    Counters: ``llm_queries`` = requests sent, ``cache_hits`` = rows answered from the cache,
    ``fallbacks`` = rows whose mode is not a model mode (``"fallback…"``).
    """

    decider: Any
    fallback: Policy | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _check_decider(self.decider)
        if self.fallback is not None and not isinstance(self.fallback, Policy):
            raise TypeError(f"fallback must be an lpm.policy.Policy, got {type(self.fallback).__name__}")

    def setup(self, decision: Any, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Archetypes:
        archetypes = super().setup(decision, spec, pop, grouping)
        if self.fallback is not None:
            archetypes.fallback = self.fallback.setup(decision, spec, pop, archetypes.grouping)
        return archetypes

    @property
    def mode(self) -> str:
        return "llm-archetype"

    def decide(self, archetypes: Archetypes, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        rows, spec = archetypes.rows, archetypes.spec
        per_row = resolve_context(rows, context)
        groups: dict[tuple, list[int]] = {}
        for i, ctx in enumerate(per_row):
            groups.setdefault(tuple(sorted((k, repr(v)) for k, v in ctx.items())), []).append(i)
        a = len(spec.actions)
        probs = torch.zeros(len(rows), a, dtype=torch.float32)
        modes: list[str] = [""] * len(rows)
        cached: list[bool] = [False] * len(rows)
        scoring: list[str] = [""] * len(rows)
        coverage: list[float] = [math.nan] * len(rows)
        out = PolicyDecision(probs, [])
        fallback_probs: torch.Tensor | None = None
        for idx in groups.values():
            answer = self.decider.decide(spec, [rows[i] for i in idx], per_row[idx[0]])
            p = torch.as_tensor(answer.probs, dtype=torch.float32).reshape(len(idx), a).clone()
            failed = sorted(set(getattr(answer, "failed", ()) or ()))
            if failed:  # only when the decider was told to return failures: fill from the fallback, counted
                if self.fallback is None or archetypes.fallback is None:
                    raise ValueError(
                        f"decider left rows {failed} undecided at step {step} and there is no fallback"
                    )
                if fallback_probs is None:
                    fallback_probs = self.fallback.decide(archetypes.fallback, context, step=step).probs
                for j in failed:
                    p[j] = fallback_probs[idx[j]]
            if not torch.isfinite(p).all() or (p < 0).any():
                raise ValueError(f"decider returned invalid probabilities at step {step}: {p}")
            probs[idx] = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
            answer_scoring = getattr(answer, "scoring", None) or [""] * len(idx)
            answer_coverage = getattr(answer, "coverage", None) or [math.nan] * len(idx)
            for j, i in enumerate(idx):
                modes[i], cached[i] = str(answer.mode[j]), bool(answer.cached[j])
                scoring[i], coverage[i] = str(answer_scoring[j]), float(answer_coverage[j])
            for j in failed:
                modes[idx[j]], cached[idx[j]] = f"fallback-{self.fallback.mode}", False
                scoring[idx[j]], coverage[idx[j]] = "rule", math.nan
            out.llm_queries += int(answer.requests)
            out.prompt_tokens += int(answer.prompt_tokens)
            out.completion_tokens += int(answer.completion_tokens)
        out.cache_hits = sum(cached)
        out.fallbacks = sum(m.startswith("fallback") for m in modes)
        out.records = self._records(archetypes, probs, modes, cached, scoring, coverage)
        return out


@dataclass(frozen=True, eq=False)
class AgentLLMPolicy(ArchetypeLLMPolicy):
    """One model request per agent: every member is its own archetype (K = members), its row holding the
    spec's attributes plus ``extra`` columns (single-year ``age`` and ``zip`` by default).

    For comparing archetype answers with individual ones on small populations; refuses more than
    ``max_agents`` (5,000) deciding agents.
    """

    extra: tuple[str, ...] = field(default=("age", "zip"), kw_only=True)
    max_agents: int = field(default=5000, kw_only=True)

    @property
    def mode(self) -> str:
        return "llm-agent"

    def setup(self, decision: Any, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Archetypes:
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
        labels = dict(grouping.labels)
        for c in cols:
            labels.setdefault(
                c, pop.labels(c) if pop.is_categorical(c) else sorted(set(table[c]), key=_natural)
            )
        agent = Grouping(
            ids=ids.to(smallest_int_dtype(-1, max(n - 1, 0))),
            k=n,
            counts=torch.ones(n, dtype=torch.int64),
            table=table,
            labels=labels,
        )
        return super().setup(decision, spec, pop, agent)


def _natural(label: str) -> tuple:
    """Sort key putting numeric labels in numeric order (``"9"`` before ``"10"``)."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
