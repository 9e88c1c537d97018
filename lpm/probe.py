"""Probes of a decision: how much the model's answers move when the situation it is told about changes.

A *probe* holds every attribute and context variable of an archetype spec at a *base* situation and sweeps
one at a time: each context variable over its probe values (``probe:`` in the spec, or ``vary``), each
attribute over its labels. Rows that share a context go to the model in one :meth:`Decider.decide` call, so
each distinct prompt is one request (or a cache hit). The result is a tidy table, the range of every
action's probability over each sweep, and a verdict: are the answers informative, or near-constant?

:func:`decision_spread` measures the same thing on a run's decisions (across archetypes and over steps);
the run's ``summary.json`` and ``report.md`` carry it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from lpm.archetype import ArchetypeSpec
from lpm.errors import InputError

if TYPE_CHECKING:
    from lpm.decision import Decider
    from lpm.population import Population

NEAR_CONSTANT = 0.05
"""Largest change of an action's probability (0 to 1) below which answers count as near-constant.

A judgment, not a test statistic. With ``logprobs`` decoding a prompt always gets the same answer, so any
change comes from what the prompt says; a change under 5 percentage points moves the share of agents
taking an action far less than the behaviour the scenarios are about (the covid heuristic moves isolation
from about 8 % with no cases to 50 % and more). In ``sample`` mode with n answers a share carries noise of
about sqrt(p (1 - p) / n) (0.11 at p = 0.5, n = 20), so a range there means something only well above that.
"""

PROBE_AGENTS = 10_000
"""Agents of the synthetic NYC population whose attribute labels a probe sweeps when none is given."""

Kind = Literal["context", "attribute"]
COLUMNS = ["variable", "kind", "value", "action", "probability", "mode", "cached"]


@dataclass(frozen=True)
class Sweep:
    """One probed variable: its name, kind and the values it takes in order (labels for attributes)."""

    name: str
    kind: Kind
    values: list[Any]


@dataclass
class ProbeResult:
    """What a probe measured.

    table: tidy, one row per variable × value × action (:data:`COLUMNS`); ``probability`` of the action
    (0 to 1) in the base situation with that one variable set to ``value``. base: the base value of every
    attribute and context variable. requests: model calls sent; cached: answers taken from the cache;
    tokens: prompt + completion tokens of the requests sent; wall_s: seconds.
    """

    spec: str
    actions: list[str]
    base: dict[str, Any]
    sweeps: list[Sweep]
    table: pd.DataFrame
    requests: int = 0
    cached: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    threshold: float = NEAR_CONSTANT

    def ranges(self) -> pd.DataFrame:
        """Per variable × action: ``low``, ``high`` and ``range`` (high − low) of the probability over the sweep."""
        g = self.table.groupby(["variable", "action"], sort=False)["probability"]
        out = pd.DataFrame({"low": g.min(), "high": g.max()})
        out["range"] = out["high"] - out["low"]
        out = out.reset_index()
        kinds = {s.name: s.kind for s in self.sweeps}
        out.insert(1, "kind", out["variable"].map(kinds))
        return out

    @property
    def largest(self) -> tuple[float, str, str]:
        """``(range, variable, action)`` of the largest range over every variable and action."""
        r = self.ranges()
        top = r.loc[r["range"].idxmax()]
        return float(top["range"]), str(top["variable"]), str(top["action"])

    @property
    def informative(self) -> bool:
        """Whether some probability moves by at least :attr:`threshold` across the probed situations."""
        return self.largest[0] >= self.threshold

    def verdict(self) -> str:
        """One line for people: the largest range, and whether the answers are near-constant."""
        r, variable, _ = self.largest
        if self.informative:
            return f"answers vary by up to {r:.3f} ({variable})"
        return (
            f"answers vary by at most {r:.3f} across all probed situations (below {self.threshold}): "
            "the model's answers are near-constant"
        )

    def summary(self) -> dict[str, Any]:
        """The figures of ``probe.json``: base, each variable's values and per-action range, the verdict."""
        r = self.ranges()
        largest, variable, action = self.largest
        return {
            "spec": self.spec,
            "actions": self.actions,
            "base": self.base,
            "variables": {
                s.name: {
                    "kind": s.kind,
                    "values": s.values,
                    "range": {
                        str(a): round(float(x), 4)
                        for a, x in r[r["variable"] == s.name].set_index("action")["range"].items()
                    },
                }
                for s in self.sweeps
            },
            "largest_range": round(largest, 4),
            "largest_variable": variable,
            "largest_action": action,
            "threshold": self.threshold,
            "informative": self.informative,
            "verdict": self.verdict(),
            "modes": sorted(set(self.table["mode"])),
            "requests": self.requests,
            "cached": self.cached,
            "tokens": self.tokens,
            "wall_seconds": round(self.wall_s, 3),
        }


def attribute_labels(spec: ArchetypeSpec, population: Population | None = None) -> dict[str, list[str]]:
    """The labels each attribute of ``spec`` takes among the spec's members, in label order.

    population: whose members to read (default: a synthetic NYC population of :data:`PROBE_AGENTS`);
    a label no member has (a labor-force member aged 0-4) is left out.
    """
    if population is None:
        from lpm.population import Population

        population = Population.synthesize("nyc", agents=PROBE_AGENTS, seed=0)
    grouping = spec.group(population)
    return {
        name: [lab for lab in labels if lab in set(grouping.table[name])]
        for name, labels in grouping.labels.items()
    }


def plan(
    spec: ArchetypeSpec,
    labels: dict[str, list[str]],
    *,
    base: dict[str, Any] | None = None,
    vary: dict[str, list[Any]] | None = None,
) -> tuple[dict[str, Any], list[Sweep]]:
    """The base situation and the sweeps of a probe (context variables first, then attributes).

    labels: each attribute's labels (:func:`attribute_labels`). vary: values replacing a variable's sweep
    (a context variable's probe values, an attribute's labels). base: a value per variable replacing its
    default, the middle of its sweep (the lower middle for an even count). Bad names and values are an
    :class:`InputError` naming the spec file.
    """
    base, vary = dict(base or {}), dict(vary or {})
    known = [*spec.context, *spec.attribute_names]
    for field, given in (("vary", vary), ("base", base)):
        for name in given:
            if name not in known:
                raise InputError(
                    f"{spec.where}: {field} names {name!r}, which is neither a context variable nor an "
                    f"attribute of {spec.name}",
                    hint=f"context: {', '.join(spec.context) or '-'}; attributes: {', '.join(spec.attribute_names)}",
                )
    sweeps: list[Sweep] = []
    for name, var in spec.context.items():
        values = vary.get(name, var.probe)
        if not values:
            raise InputError(
                f"{spec.where}: field 'context.{name}.probe': context variable {name!r} has no probe values",
                hint=f"add probe: [v1, v2, ...] to the spec, or pass its values in vary (lpm probe --vary {name}=v1,v2,...)",
            )
        values = [_context_value(spec, name, v) for v in values]
        if name in base:
            base[name] = _context_value(spec, name, base[name])
        sweeps.append(Sweep(name, "context", _distinct(values)))
    for name in spec.attribute_names:
        values = [str(v) for v in vary.get(name, labels[name])]
        for v in values + ([str(base[name])] if name in base else []):
            if v not in labels[name]:
                raise InputError(
                    f"{spec.where}: {name}={v!r} is not a label of attribute {name!r}",
                    hint=f"labels: {', '.join(labels[name])}",
                )
        if name in base:
            base[name] = str(base[name])
        sweeps.append(Sweep(name, "attribute", _distinct(values)))
    for s in sweeps:
        if not s.values:
            raise InputError(f"{spec.where}: vary gives {s.name!r} no values")
        base.setdefault(s.name, s.values[(len(s.values) - 1) // 2])
    return {name: base[name] for name in known}, sweeps


def probe(
    spec: ArchetypeSpec,
    decider: Decider,
    *,
    population: Population | None = None,
    base: dict[str, Any] | None = None,
    vary: dict[str, list[Any]] | None = None,
    threshold: float = NEAR_CONSTANT,
    progress: bool | None = None,
) -> ProbeResult:
    """Sweep each context variable and attribute of ``spec`` around a base situation (see the module doc).

    decider: asks the model (through its cache). population: whose attribute labels are swept (default:
    a synthetic NYC population, :func:`attribute_labels`). base, vary: see :func:`plan`. threshold: the
    near-constant line of the verdict. One ``decide`` call per distinct rendered context, its rows the
    distinct attribute rows asked in that context, so each distinct prompt is asked once.
    """
    start = time.perf_counter()
    base_values, sweeps = plan(spec, attribute_labels(spec, population), base=base, vary=vary)
    attributes = spec.attribute_names
    situations = []  # (sweep, value, row, context)
    for s in sweeps:
        for value in s.values:
            point = {**base_values, s.name: value}
            situations.append(
                (s, value, {a: point[a] for a in attributes}, {c: point[c] for c in spec.context})
            )
    # one decide call per distinct context as the prompt shows it (rounded), one row per distinct row
    batches: dict[tuple, tuple[dict[str, Any], dict[tuple, dict[str, str]]]] = {}
    for _, _, row, context in situations:
        shown = tuple(spec.context[c].render(v) for c, v in context.items())
        batches.setdefault(shown, (context, {}))[1].setdefault(tuple(row.values()), row)
    answers: dict[tuple, tuple[list[float], str, bool]] = {}
    requests = cached = tokens = 0
    for shown, (context, rows) in batches.items():
        out = decider.decide(spec, list(rows.values()), context, progress=progress)
        requests += out.requests
        cached += sum(out.cached)
        tokens += out.prompt_tokens + out.completion_tokens
        for i, key in enumerate(rows):
            answers[(shown, key)] = (out.probs[i].tolist(), out.mode[i], out.cached[i])
    records = []
    for s, value, row, context in situations:
        shown = tuple(spec.context[c].render(v) for c, v in context.items())
        probs, mode, hit = answers[(shown, tuple(row.values()))]
        records += [
            (s.name, s.kind, value, action, float(p), mode, hit)
            for action, p in zip(spec.actions, probs, strict=True)
        ]
    return ProbeResult(
        spec=spec.name,
        actions=list(spec.actions),
        base=base_values,
        sweeps=sweeps,
        table=pd.DataFrame.from_records(records, columns=COLUMNS),
        requests=requests,
        cached=cached,
        tokens=tokens,
        wall_s=time.perf_counter() - start,
        threshold=threshold,
    )


def plot(result: ProbeResult, path: str | Path) -> Path:
    """One PNG: a panel per variable, the probability of each action against its value, the base marked.

    Context sweeps of positive numbers spanning more than two decades get a log x axis; attributes and text
    values a categorical one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.sweeps)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    for ax, s in zip(axes.flat, result.sweeps, strict=False):
        part = result.table[result.table["variable"] == s.name]
        numeric = s.kind == "context" and all(isinstance(v, int | float) for v in s.values)
        base = result.base[s.name]
        for action in result.actions:
            probs = part[part["action"] == action].set_index("value")["probability"]
            y = [probs.loc[v] for v in s.values]
            x = s.values if numeric else list(range(len(s.values)))
            ax.plot(x, y, marker="o", markersize=3, label=f"P({action})")
        if numeric:
            low, high = min(s.values), max(s.values)
            if low > 0 and high / low > 100:
                ax.set_xscale("log")
            ax.axvline(base, color="grey", linestyle="--", linewidth=1)
        else:
            ax.set_xticks(
                range(len(s.values)), [str(v) for v in s.values], rotation=45, ha="right", fontsize=7
            )
            ax.set_xlim(-0.5, len(s.values) - 0.5)
            if base in s.values:
                ax.axvline(s.values.index(base), color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{s.name} ({s.kind}; base {base})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result.spec}: {result.verdict()}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decision_spread(decisions: pd.DataFrame, *, threshold: float = NEAR_CONSTANT) -> dict[str, Any]:
    """How much a run's decisions vary, per decision and action (probabilities, 0 to 1).

    decisions: the run's tidy frame (``step, decision, archetype, action, probability`` …).
    ``across_archetypes``: the mean over decision steps of the largest minus the smallest probability among
    the archetypes at a step. ``across_steps``: the largest minus the smallest archetype mean (unweighted)
    over the decision steps; None with a single decision step. A decision is ``near_constant`` when both
    stay below ``threshold`` for every action.
    """
    out: dict[str, Any] = {"threshold": threshold, "decisions": {}}
    if not len(decisions):
        return out
    g = decisions.groupby(["decision", "action", "step"], observed=True)["probability"]
    per_step = pd.DataFrame({"spread": g.max() - g.min(), "mean": g.mean()})
    by = per_step.groupby(level=["decision", "action"], observed=True, sort=False)
    across_archetypes = by["spread"].mean()
    across_steps = by["mean"].max() - by["mean"].min()
    steps = decisions.groupby("decision", observed=True)["step"].nunique()
    archetypes = decisions.groupby("decision", observed=True)["archetype"].nunique()
    for decision in steps.index:
        actions = {}
        for (d, action), spread in across_archetypes.items():
            if d != decision:
                continue
            response = float(across_steps[(d, action)]) if steps[decision] > 1 else None
            actions[str(action)] = {
                "across_archetypes": round(float(spread), 4),
                "across_steps": None if response is None else round(response, 4),
            }
        largest = max(max(a["across_archetypes"], a["across_steps"] or 0.0) for a in actions.values())
        out["decisions"][str(decision)] = {
            "archetypes": int(archetypes[decision]),
            "decision_steps": int(steps[decision]),
            "actions": actions,
            "largest": round(largest, 4),
            "near_constant": bool(largest < threshold),
        }
    return out


def _context_value(spec: ArchetypeSpec, name: str, value: Any) -> float | int | str:
    """A context value as a number (whole numbers as int) or text; non-finite numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InputError(f"{spec.where}: context variable {name!r}: {value!r} is neither a number nor text")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"{spec.where}: context variable {name!r}: values must be finite, got {value}")
        return int(value) if value.is_integer() else value
    return value


def _distinct(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))
