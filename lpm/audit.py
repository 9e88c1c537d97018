"""What grouping into archetypes loses: the shadow audit and the sweep of archetype granularity.

* :func:`shadow_audit` runs a scenario under the archetype LLM policy and, at every decision step, also asks
  the model with the *per-agent* prompt (as :class:`lpm.policy.AgentLLMPolicy` renders it: the archetype's
  attributes plus the agent's own columns, single-year ``age`` and ``zip`` by default) for a seeded random
  sample of agents. Per archetype it reports the Jensen–Shannon divergence between the archetype's answer
  and each sampled member's own answer (the mean over members and decision steps), and what each side costs
  in model queries. The run itself follows the archetype answers only; the per-agent answers are observed,
  never used. With ``extra=()`` the per-agent prompt carries nothing beyond the archetype's attributes: it is
  the archetype's own prompt, and the divergence is exactly 0 (the audit's control).
* :func:`granularity_sweep` runs the archetype LLM policy with the decision's attributes from none (one
  archetype) through every subset to the full product, and then per agent, on one small population, and
  records the number of archetypes, the model queries and the error against the real series.

Divergences are in bits (log base 2, so 0 ≤ JSD ≤ 1); ``nats`` = bits × ln 2 is given beside them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm.archetype import ArchetypeSpec, Attribute, Grouping
from lpm.errors import InputError
from lpm.policy import AgentLLMPolicy, ArchetypeLLMPolicy, Archetypes, Policy, PolicyDecision
from lpm.population import Population, smallest_int_dtype
from lpm.prompt import PromptTemplate

__all__ = [
    "ANCHOR",
    "AuditedArchetypes",
    "ShadowAudit",
    "granularity_specs",
    "granularity_sweep",
    "jensen_shannon",
    "shadow_audit",
]

#: The published point our audit is printed beside.
ANCHOR = {
    "jsd": 0.094,
    "fewer_calls": 381.0,
    "source": "arXiv 2605.27419",
    "note": "its log base is not stated (bits and nats are both printed for ours)",
}

#: Columns the per-agent prompt adds by default (those :class:`AgentLLMPolicy` adds).
DEFAULT_EXTRA = ("age", "zip")


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, *, base: float = 2.0) -> torch.Tensor:
    """Jensen–Shannon divergence between distributions along the last axis: (..., A), (..., A) -> (...).

    ``0.5 KL(p ‖ m) + 0.5 KL(q ‖ m)`` with ``m = (p + q) / 2``, in units of log ``base`` (2: bits, in [0, 1];
    e: nats, in [0, ln 2]). Terms with a zero probability contribute 0. Computed in float64.
    """
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        terms = torch.where(a > 0, a * (torch.log(a.clamp_min(1e-300)) - torch.log(m.clamp_min(1e-300))), 0.0)
        return terms.sum(-1)

    return ((kl(p) + kl(q)) / (2 * math.log(base))).clamp_min(0.0)


# -- the shadow audit -----------------------------------------------------------------------------------


@dataclass
class AuditedArchetypes(Archetypes):
    """The archetypes of one decision under :class:`ShadowAudit`, with the audit's per-run state.

    sample: the sampled agents as archetypes of their own (rows: the spec's attributes and ``extra``).
    agent_index: (n,) population index of each sampled agent; of: (n,) its archetype.
    steps: one entry per decision step (``step``, ``archetype`` (n, A) and ``agent`` (n, A) probabilities,
    ``queries`` sent and ``cache_hits`` of the per-agent side).
    """

    sample: Archetypes | None = None
    agent_index: torch.Tensor | None = None
    of: torch.Tensor | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class ShadowAudit(Policy):
    """The archetype policy ``inner``, plus per-agent questions for a random sample of agents.

    inner: the archetype LLM policy whose answers the run follows. agent: an archetype LLM policy whose
    decider renders per-agent prompts (``Decider(per_agent=True)``; with ``extra=()`` the archetype prompt).
    agents: how many agents to sample (all members if fewer). seed: of the sample. extra: population
    columns the per-agent prompt adds to the archetype's attributes.
    """

    inner: ArchetypeLLMPolicy
    agent: ArchetypeLLMPolicy
    agents: int
    seed: int = 0
    extra: tuple[str, ...] = DEFAULT_EXTRA

    @property
    def mode(self) -> str:
        return self.inner.mode

    def setup(self, decision: Any, spec: ArchetypeSpec, pop: Population, grouping: Grouping) -> Archetypes:
        base = self.inner.setup(decision, spec, pop, grouping)
        missing = [c for c in self.extra if c not in pop]
        if missing:
            raise InputError(
                f"audit option 'extra': the population has no column(s) {missing}",
                hint=f"population columns: {', '.join(pop.columns)}",
            )
        members = torch.nonzero(base.grouping.ids.cpu() >= 0).squeeze(1)
        generator = torch.Generator().manual_seed(self.seed)
        chosen = members[torch.randperm(len(members), generator=generator)[: self.agents]].sort().values
        cols = spec.attribute_names + [c for c in self.extra if c not in spec.attribute_names]
        table = pop.to_pandas().iloc[chosen.numpy()][cols].astype(str).reset_index(drop=True)
        table["agents"] = 1
        table.index.name = "archetype"
        n = len(chosen)
        sample = Grouping(
            ids=torch.arange(n, dtype=smallest_int_dtype(-1, max(n - 1, 0))),
            k=n,
            counts=torch.ones(n, dtype=torch.int64),
            table=table,
            labels=dict(base.grouping.labels),
        )
        return AuditedArchetypes(
            base.decision,
            spec,
            base.grouping,
            base.heuristic,
            fallback=base.fallback,
            sample=Archetypes(base.decision, spec, sample, base.heuristic),
            agent_index=chosen,
            of=base.grouping.ids.cpu()[chosen].long(),
        )

    def decide(self, archetypes: Archetypes, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        decision = self.inner.decide(archetypes, context, step=step)
        if not isinstance(archetypes, AuditedArchetypes) or archetypes.sample is None:
            raise TypeError("ShadowAudit.decide needs the archetypes its own setup() returned")
        if archetypes.sample.k:
            own = self.agent.decide(archetypes.sample, context, step=step)
            archetypes.steps.append(
                {
                    "step": step,
                    "archetype": decision.probs[archetypes.of].double(),
                    "agent": own.probs.double(),
                    "queries": own.llm_queries,
                    "cache_hits": own.cache_hits,
                    "tokens": own.prompt_tokens + own.completion_tokens,
                }
            )
        return decision


def audit_report(archetypes: AuditedArchetypes) -> dict[str, Any]:
    """The audit's figures from the state a :class:`ShadowAudit` run left in ``archetypes``.

    Per archetype with sampled members: its attributes, ``agents`` (members in the population),
    ``sampled``, ``jsd_bits`` (mean over sampled members and decision steps), ``jsd_max_bits``,
    ``archetype_queries`` (one per decision step) and ``per_agent_queries`` (members × decision steps: what
    asking every member would cost). Overall: the mean JSD over every sampled agent and step (``jsd_bits``,
    ``jsd_nats``), the queries of each side for the whole population and their ratio (``fewer_calls``).
    """
    steps = archetypes.steps
    if not steps:
        raise InputError("the shadow audit has no decision step with sampled agents (no members?)")
    jsd = torch.stack([jensen_shannon(s["archetype"], s["agent"]) for s in steps])  # (steps, n)
    of = archetypes.of
    assert of is not None
    table = archetypes.grouping.table
    attrs = [c for c in table.columns if c != "agents"]
    rows = []
    for k in sorted(set(of.tolist())):
        cols = jsd[:, of == k]
        rows.append(
            {
                **{a: str(table.iloc[k][a]) for a in attrs},
                "agents": int(table.iloc[k]["agents"]),
                "sampled": int(cols.shape[1]),
                "jsd_bits": float(cols.mean()),
                "jsd_max_bits": float(cols.max()),
                "archetype_queries": len(steps),
                "per_agent_queries": int(table.iloc[k]["agents"]) * len(steps),
            }
        )
    members = int(table["agents"].sum())
    archetype_queries = archetypes.k * len(steps)
    per_agent_queries = members * len(steps)
    mean = float(jsd.mean())
    return {
        "decision": archetypes.decision,
        "sampled_agents": int(jsd.shape[1]),
        "decision_steps": [int(s["step"]) for s in steps],
        "extra": [c for c in archetypes.sample.grouping.table.columns if c not in attrs and c != "agents"]
        if archetypes.sample is not None
        else [],
        "jsd_bits": mean,
        "jsd_nats": mean * math.log(2),
        "jsd_max_bits": float(jsd.max()),
        "archetypes": archetypes.k,
        "members": members,
        "archetype_queries": archetype_queries,
        "per_agent_queries": per_agent_queries,
        "fewer_calls": per_agent_queries / max(archetype_queries, 1),
        "audit_queries_sent": int(sum(s["queries"] for s in steps)),
        "audit_cache_hits": int(sum(s["cache_hits"] for s in steps)),
        "audit_tokens": int(sum(s["tokens"] for s in steps)),
        "per_archetype": rows,
        "anchor": dict(ANCHOR),
    }


def shadow_audit(
    scenario: Any,
    pop: Population,
    decider: Any,
    agent_decider: Any,
    *,
    agents: int,
    steps: int,
    seed: int = 0,
    extra: Sequence[str] = DEFAULT_EXTRA,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run ``scenario`` for ``steps`` under the archetype policy of ``decider`` and audit every decision
    step on ``agents`` sampled members (seeded by ``seed``); returns :func:`audit_report`'s figures per
    decision (``{"decisions": {name: report}}``, and the run's own counters under ``run``).

    agent_decider: renders per-agent prompts (``Decider(..., per_agent=True)``) when ``extra`` is not
    empty; with ``extra=()`` it must render the archetype prompt (``per_agent=False``), the control whose
    divergence is 0.
    """
    from lpm.engine import Simulation

    if agents < 1:
        raise InputError(f"--audit takes a number of agents >= 1, got {agents}")
    policy = ShadowAudit(
        ArchetypeLLMPolicy(decider), ArchetypeLLMPolicy(agent_decider), agents, seed, tuple(extra)
    )
    sim = Simulation(scenario, pop, policy, seed=seed, device=device)
    result = sim.run(steps)
    reports = {d.name: audit_report(d.archetypes) for d in sim.asked}  # type: ignore[arg-type]
    return {"decisions": reports, "run": dict(result.counters)}


# -- the granularity sweep ------------------------------------------------------------------------------


def _label(name: str) -> str:
    return name.replace("_", " ")


def _about(names: Sequence[str]) -> str:
    """The sentence that tells the model who it is: ``About you: sex {sex}; age group {age_group}.``"""
    return "About you: " + "; ".join(f"{_label(n)} {{{n}}}" for n in names) + "." if names else ""


def _rewrite(text: str, attributes: Sequence[str], say: str) -> str:
    """``text`` with every sentence that names an attribute variable removed and ``say`` put where the first
    of them was (nothing when ``say`` is empty). Sentences end at ``.``, ``?`` or ``!``."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, attributes)) + r")\}")
    parts = re.split(r"(?<=[.?!])(\s+)", text)
    out: list[str] = []
    placed = False
    for i in range(0, len(parts), 2):
        sentence, gap = parts[i], parts[i + 1] if i + 1 < len(parts) else ""
        if pattern.search(sentence):
            if not placed and say:
                out.append(say + gap)
            placed = True
            continue
        out.append(sentence + gap)
    return "".join(out).strip() + "\n"


def granularity_specs(
    spec: ArchetypeSpec, pop: Population, *, keep: Sequence[str] = ()
) -> list[tuple[str, ArchetypeSpec]]:
    """``(label, spec)`` from one archetype (no attribute) through every subset of ``spec``'s attributes to
    the full product, each with the same actions, context, members and cadence. Attributes in ``keep``
    are in every subset (those a context value depends on, e.g. labor's unemployment rate by borough).

    Every spec's prompt is the original with the sentences that name attributes replaced by one sentence
    listing the kept ones (``About you: age group {age_group}; borough {borough}.``), and its
    ``agent_user`` the same with ``age`` and ``zip`` added (for the per-agent point): one wording for every
    point of the sweep, so only the attributes change (it is not the spec's own wording). One archetype is
    a single bin over a numeric population column that no prompt mentions.
    """
    template = PromptTemplate.load(spec)
    names = spec.attribute_names
    numeric = [c for c in pop.columns if not pop.is_categorical(c) and pop[c].dtype != torch.bool]
    if not numeric:
        raise InputError("the granularity sweep needs a numeric population column to hold one archetype")
    column = numeric[0]
    everyone = Attribute(
        name=column,
        bins=[float(pop[column].min()), float(pop[column].max()) + 1],
        labels=["everyone"],
    )
    extra = [c for c in DEFAULT_EXTRA if c in pop and c not in names]
    free = [n for n in names if n not in keep]
    out = []
    for size in range(len(free) + 1):
        for chosen in itertools.combinations(free, size):
            kept = [n for n in names if n in chosen or n in keep]
            prompt = {
                "system": _rewrite(template.texts["system"], names, ""),
                "user": _rewrite(template.texts["user"], names, _about(kept)),
                "agent_user": _rewrite(template.texts["user"], names, _about([*kept, *extra])),
            }
            attributes = [a for a in spec.attributes if a.name in kept] or [everyone]
            raw = spec.model_dump(mode="json", exclude={"prompt", "attributes", "source"})
            raw |= {
                "name": f"{spec.name}_by_{'_'.join(kept) or 'none'}",
                "prompt": prompt,
                "attributes": [a.model_dump(mode="json", exclude_none=True) for a in attributes],
            }
            label = " × ".join(kept) if kept else "one archetype"
            out.append((label, ArchetypeSpec.from_mapping(raw, where=f"{spec.where} (granularity: {label})")))
    return out


def granularity_sweep(
    scenario: Any,
    pop: Population,
    make_decider: Callable[[bool], Any],
    *,
    steps: int,
    seed: int = 0,
    error: Callable[[Any], dict[str, Any]],
    per_agent: bool = True,
    device: str = "cpu",
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``scenario``'s first decision at every granularity of :func:`granularity_specs` (other decisions
    keep their specs), then per agent (:class:`AgentLLMPolicy` on the full-product spec) when
    ``per_agent``; same population and seed for every point.

    make_decider(per_agent) -> a decider. error(result) -> the error against the real series (by quantity).
    Per point: ``granularity``, ``attributes`` (those the prompt names), ``always`` (attributes a context value
    depends on, in every point), ``archetypes`` (K), ``asked`` (archetype answers the run needed: K ×
    decision steps, what a cold cache sends), ``sent`` (requests sent now), ``cache_hits``, ``tokens``,
    ``error``, ``seconds``, ``first_action`` and ``p_first`` (the mean over deciding agents and decision
    steps of the probability each agent's answer gives the decision's first action) and, with
    ``per_agent``, ``gap_to_per_agent``: the mean over the same agents and steps of the total variation
    distance between an agent's distribution in this point and its own answer in the per-agent point (0
    for the per-agent point; what the grouping changes in the decisions, which a small population's
    error against the real series may not show).
    """
    import time

    from lpm.engine import Simulation

    decision = scenario.decisions[0]
    spec = scenario.specs()[decision.name]
    keep = _context_attributes(scenario, pop, device)
    points = [
        (label, s, ArchetypeLLMPolicy(make_decider(False)))
        for label, s in granularity_specs(spec, pop, keep=keep)
    ]
    if per_agent:
        full = points[-1][1]
        points.append(("per agent", full, AgentLLMPolicy(make_decider(True))))
    out, probs = [], []  # probs: each point's (decision steps, deciders, A) answers, for the gaps
    for label, point_spec, policy in points:
        attributes = [a for a in point_spec.attribute_names if a in spec.attribute_names]
        if isinstance(policy, AgentLLMPolicy):
            attributes += [c for c in policy.extra if c in pop and c not in attributes]
        started = time.perf_counter()
        sim = Simulation(scenario, pop, policy, seed=seed, device=device, specs={decision.name: point_spec})
        result = sim.run(steps)
        asked = result.decisions[result.decisions["decision"] == decision.name]
        counters = result.decision_counters[decision.name]
        row = {
            "granularity": label,
            "attributes": attributes,
            "always": keep,
            "archetypes": int(sim.asked[0].archetypes.k),
            "asked": int(len(asked.drop_duplicates(["step", "archetype"]))),
            "sent": int(counters["llm_queries"]),
            "cache_hits": int(counters["cache_hits"]),
            "tokens": int(counters["prompt_tokens"] + counters["completion_tokens"]),
            "error": error(result),
            "seconds": round(time.perf_counter() - started, 3),
        }
        probs.append(_agent_probs(sim, result.decisions, decision.name))
        row["first_action"] = list(spec.actions)[0]
        row["p_first"] = round(float(probs[-1][..., 0].mean()), 4)
        out.append(row)
        if on_point is not None:
            on_point(row)
    if per_agent:  # the last point is the per-agent one
        for row, p in zip(out, probs, strict=True):
            row["gap_to_per_agent"] = round(float(0.5 * np.abs(p - probs[-1]).sum(-1).mean()), 4)
    return out


def _agent_probs(sim: Any, decisions: pd.DataFrame, name: str) -> np.ndarray:
    """(decision steps, deciding agents, A) each deciding agent's distribution at each decision step of the
    run: its archetype's row of the decision records, in the spec's action order."""
    d = next(a for a in sim.asked if a.name == name)
    frame = decisions[decisions["decision"] == name]
    actions = list(d.spec.actions)
    steps = sorted(frame["step"].unique())
    table = np.zeros((len(steps), d.k, len(actions)))
    wide = frame.pivot_table(index=["step", "archetype"], columns="action", values="probability")
    for i, step in enumerate(steps):
        rows = wide.loc[step]
        table[i, rows.index.to_numpy(int)] = rows[actions].to_numpy(float)
    return table[:, d.gid[d.member].cpu().numpy().astype(np.int64)]


def _context_attributes(scenario: Any, pop: Population, device: str) -> list[str]:
    """Attributes the first decision's context values depend on (:class:`ByAttribute`), read off the
    scenario's ``observe`` at step 0."""
    from lpm.engine import Simulation
    from lpm.policy import ByAttribute, HeuristicPolicy

    sim = Simulation(scenario, pop, HeuristicPolicy(), device=device)
    context = scenario.observe(sim.world, sim.initial_state().scenario, 0)
    return sorted({v.attribute for v in context.values() if isinstance(v, ByAttribute)})


def per_archetype_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """The per-archetype rows of an audit report as a frame, largest divergence first."""
    frame = pd.DataFrame(report["per_archetype"])
    return frame.sort_values("jsd_bits", ascending=False, kind="stable").reset_index(drop=True)
