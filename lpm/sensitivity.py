"""Sensitivity: the derivative of chosen outcomes with respect to each parameter, by autograd next to finite
differences, with elasticities for a tornado plot.

An *outcome* is a scalar of a run's recorded series, named ``KIND:QUANTITY``:

``total:Q``
    Q summed over the run and its breakdown (quantities the scenario declares with ``total=True``, flows
    such as ``reported_cases``).
``peak:Q``
    the largest value of Q's citywide series per *period*: a week of daily steps (Q summed over each full
    week for flows, averaged for stocks and rates; a trailing part week is dropped), a step otherwise.
``peak_week:Q`` (``peak_month:Q`` in monthly scenarios)
    when that peak comes, in periods from the start (1 = the first): the argmax is not differentiable, so
    the outcome is a soft-argmax, ``sum_p p w_p`` with ``w = softmax(log y / temperature)`` over the
    periodic series ``y`` (a period's weight grows as ``y ** (1 / temperature)``; temperature 0.1 by
    default), for autograd and finite differences alike; the hard peak's date of the base run is reported
    beside it (``peak_date``).
``final:Q``
    Q's citywide value at the last step.

The *citywide* value of a quantity broken down by an attribute is the sum over its labels, except for a
rate (a name ending in ``_rate``): the ratio of the recorded counts where :data:`CITYWIDE_RATES` names them
and the scenario records them (``unemployment_rate``: 100 × unemployed / labor force, summed over
boroughs), else the unweighted mean over labels.

For each outcome and parameter :func:`sensitivity` gives the autograd derivative of the differentiable
run (mean and standard deviation over seeds), the central finite difference of the *inference* run at
``value ± rel_step × value`` with the same seeds (common random numbers; mean and standard deviation),
their ratio, and the elasticity ``d log outcome / d log parameter = derivative × value / outcome`` (for an
alignment offset, whose value is 0 and already a log, ``d log outcome / d offset``). The parameters are
the scenario's learnable ones by default, and optionally ``offsets.<decision>:<action>``: a common shift
of one action's alignment offsets over the decision's archetypes, as in :mod:`lpm.gradcheck`.

The decisions' context is detached in the gradient (as in :mod:`lpm.gradcheck`): autograd leaves out the
path from the simulated series to the next decisions, which the finite differences keep when the policy
reads the series (the default heuristic does), unless ``replay`` holds each seed's base-run decisions
fixed in them (:class:`lpm.gradcheck.ReplayPolicy`). ``frame.attrs["note"]`` says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.gradcheck import ReplayPolicy, _offset_shift, weekly_totals
from lpm.policy import HeuristicPolicy, Policy
from lpm.population import Population
from lpm.sampling import DEFAULT_ESTIMATOR, choose_estimator
from lpm.scenarios.base import Quantity, Scenario

__all__ = [
    "CITYWIDE_RATES",
    "KINDS",
    "Outcome",
    "default_outcomes",
    "markdown",
    "outcome",
    "sensitivity",
    "tornado",
]

KINDS = ("total", "peak", "peak_week", "peak_month", "final")
#: A rate broken down by an attribute -> (numerator, denominator, factor): its citywide value is
#: ``factor × sum(numerator) / sum(denominator)`` over the labels, when the scenario records both counts.
CITYWIDE_RATES = {"unemployment_rate": ("unemployed", "labor_force", 100.0)}
TEMPERATURE = 0.1
OFFSETS = "offsets."


@dataclass(frozen=True)
class Outcome:
    """A scalar of a run's series (module docstring): ``kind`` and ``quantity``; ``period``: steps per
    period (7 for weeks of daily steps, else 1); ``citywide``: how the breakdown is reduced (``sum``,
    ``mean`` or ``numerator/denominator``)."""

    kind: str
    quantity: Quantity
    period: int
    citywide: str
    temperature: float = TEMPERATURE

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.quantity.name}"

    @property
    def is_peak(self) -> bool:
        return self.kind.startswith("peak")

    def series(self, series: dict[str, torch.Tensor]) -> torch.Tensor:
        """(T,) citywide values per step (float64)."""
        q = self.quantity
        if q.by is None:
            return series[q.name].double()
        if self.citywide == "sum":
            return series[q.name].double().sum(1)
        if self.citywide == "mean":
            return series[q.name].double().mean(1)
        num, den, factor = CITYWIDE_RATES[q.name]
        return factor * series[num].double().sum(1) / series[den].double().sum(1).clamp_min(1.0)

    def periodic(self, series: dict[str, torch.Tensor]) -> torch.Tensor:
        """(periods,) citywide values per period: sums of a flow's steps, means of a stock's or a rate's."""
        city = self.series(series)
        if self.period == 1:
            return city
        sums = weekly_totals(city, self.period)
        return sums if self.quantity.total and self.citywide == "sum" else sums / self.period

    def value(self, series: dict[str, torch.Tensor]) -> torch.Tensor:
        """The outcome, a float64 scalar (with gradients where the series have them)."""
        if self.kind == "total":
            return self.series(series).sum()
        if self.kind == "final":
            return self.series(series)[-1]
        y = self.periodic(series)
        if self.kind == "peak":
            return y.max()
        weights = torch.softmax(torch.log(y.clamp_min(1e-12)) / self.temperature, 0)
        return (weights * torch.arange(1, len(y) + 1, dtype=y.dtype, device=y.device)).sum()

    def hard_peak(self, series: dict[str, torch.Tensor]) -> int:
        """0-based period of the largest value (the hard argmax)."""
        return int(self.periodic(series).detach().argmax())


def outcome(scenario: Scenario, text: str, *, steps: int, temperature: float = TEMPERATURE) -> Outcome:
    """The outcome ``KIND:QUANTITY`` of ``scenario`` over ``steps`` steps; :class:`InputError` naming the
    bad kind or quantity and listing the valid ones."""
    kinds = _kinds(scenario)
    names = [q.name for q in scenario.quantities]
    kind, sep, name = text.strip().partition(":")
    if not sep:
        raise InputError(
            f"outcomes: {text!r} is not KIND:QUANTITY",
            hint=f"e.g. {default_outcomes(scenario)[0]}; kinds: {', '.join(kinds)}",
        )
    if kind not in kinds:
        raise InputError(
            f"outcomes: unknown kind {kind!r} in {text!r}",
            hint=f"kinds of the {scenario.name} scenario: {', '.join(kinds)}",
        )
    if name not in names:
        raise InputError(
            f"outcomes: the {scenario.name} scenario records no quantity {name!r} (in {text!r})",
            hint=f"quantities: {', '.join(names)}",
        )
    q = scenario.quantity(name)
    if kind == "total" and not q.total:
        totals = [x.name for x in scenario.quantities if x.total]
        raise InputError(
            f"outcomes: {text!r}: {name!r} is not a flow whose run total is declared (total=True)",
            hint=f"total: works for {', '.join(totals) or 'none of its quantities'}; or use final:{name}",
        )
    period = 7 if scenario.step_unit == "day" else 1
    if kind.startswith("peak") and steps < period:
        raise InputError(f"outcomes: {text!r} needs at least one full week ({period} steps), got {steps}")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    return Outcome(kind, q, period, _citywide(scenario, q), temperature)


def default_outcomes(scenario: Scenario) -> list[str]:
    """The outcomes of the scenario's first quantity with a real series (else its first): for a flow its
    total, peak and the peak's date; for a stock or a rate its final value."""
    q = next((q for q in scenario.quantities if q.real), scenario.quantities[0])
    if q.total:
        return [f"total:{q.name}", f"peak:{q.name}", f"{_kinds(scenario)[2]}:{q.name}"]
    return [f"final:{q.name}"]


def _kinds(scenario: Scenario) -> tuple[str, ...]:
    when = "peak_month" if scenario.step_unit == "month" else "peak_week"
    return ("total", "peak", when, "final")


def _citywide(scenario: Scenario, q: Quantity) -> str:
    if q.by is None or not q.name.endswith("_rate"):
        return "sum"
    recorded = {x.name for x in scenario.quantities}
    counts = CITYWIDE_RATES.get(q.name)
    if counts and set(counts[:2]) <= recorded:
        return f"{counts[0]}/{counts[1]}"
    return "mean"


# -- parameters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parameter:
    name: str
    value: float
    decision: str | None = None  # an alignment offset: its decision and action index
    action: int = 0


def _parameters(scenario: Scenario, names: Sequence[str] | None) -> list[_Parameter]:
    decisions = {d.name: d for d in scenario.decisions}
    forms = [f"{OFFSETS}{d.name}:{a}" for d in scenario.decisions for a in d.actions]
    valid = ", ".join([*scenario.learnable, *forms])
    out = []
    for name in scenario.learnable if names is None else names:
        name = name.strip()
        if name.startswith(OFFSETS):
            decision, _, action = name.removeprefix(OFFSETS).partition(":")
            d = decisions.get(decision)
            if d is None or (action and action not in d.actions):
                raise InputError(
                    f"parameters: unknown alignment offset {name!r}", hint=f"parameters: {valid}"
                )
            a = d.actions.index(action) if action else 0
            out.append(_Parameter(f"{OFFSETS}{d.name}:{d.actions[a]}", 0.0, d.name, a))
        elif name in scenario.learnable:
            out.append(_Parameter(name, float(getattr(scenario.config, name))))
        else:
            raise InputError(
                f"parameters: {name!r} is not a learnable parameter of the {scenario.name} scenario",
                hint=f"parameters: {valid}",
            )
    if not out:
        raise InputError("parameters: none given", hint=f"parameters: {valid}")
    if len({p.name for p in out}) != len(out):
        raise InputError(f"parameters: names repeat: {[p.name for p in out]}")
    return out


# -- the comparison ---------------------------------------------------------------------------------------


def sensitivity(
    make_scenario: Callable[[dict[str, Any]], Scenario],
    pop: Population,
    policy: Policy | None = None,
    *,
    outcomes: Sequence[str] | None = None,
    steps: int | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    parameters: Sequence[str] | None = None,
    rel_step: float = 0.05,
    offset_step: float = 0.2,
    estimator: str = DEFAULT_ESTIMATOR,
    replay: bool = False,
    temperature: float = TEMPERATURE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Derivatives of ``outcomes`` with respect to ``parameters``: autograd next to finite differences.

    make_scenario: parameter overrides -> scenario (``{}``: the base point). policy: the decisions'
    policy (default: the scenario's heuristic). outcomes: ``KIND:QUANTITY`` names (default:
    :func:`default_outcomes`). steps: the horizon (default: the scenario's). seeds: one differentiable
    run and two inference runs per parameter each (the finite differences use the same seeds: common
    random numbers). parameters: learnable names and ``offsets.<decision>:<action>`` (default: every
    learnable parameter). rel_step: the finite difference's step, a share of the parameter's value
    (``offset_step`` for offsets). estimator: the gradient estimator (:data:`lpm.sampling.ESTIMATORS`).
    replay: the finite differences replay each seed's base-run decisions (held fixed, as in the gradient).

    Returns one row per outcome × parameter: ``outcome``, ``parameter``, ``value``, ``outcome_value`` and
    ``outcome_sd`` (the base run's, mean and SD over seeds), ``autograd``, ``autograd_sd``, ``fd``,
    ``fd_sd``, ``difference_se`` (standard error of the mean of the per-seed autograd − finite
    difference), ``ratio`` (autograd / fd, NaN where fd is 0), ``elasticity`` (autograd's),
    ``elasticity_fd`` and ``peak_date`` (the hard peak's first day in the seeds' mean base series, for
    peak outcomes). ``attrs`` holds the settings and ``note``, what the gradient leaves out.
    """
    base = make_scenario({})
    estimator = choose_estimator(estimator, base.pruned)  # "auto": the name the report shows
    steps = int(base.horizon if steps is None else steps)
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("seeds: give at least one seed")
    if not rel_step > 0 or not offset_step > 0:
        raise InputError(f"rel_step and offset_step must be > 0, got {rel_step} and {offset_step}")
    if not base.differentiable:
        raise InputError(
            f"{type(base).where()}: the {base.name} scenario does not declare differentiable=True"
        )
    wanted = list(outcomes) if outcomes else default_outcomes(base)
    outs = [outcome(base, o, steps=steps, temperature=temperature) for o in wanted]
    if len({o.name for o in outs}) != len(outs):
        raise InputError(f"outcomes: names repeat: {[o.name for o in outs]}")
    params = _parameters(base, parameters)
    steps_of = {p.name: offset_step if p.decision else rel_step * (abs(p.value) or 1.0) for p in params}
    scenarios = {}  # parameter -> (scenario at value - h, at value + h): validated before any run
    for p in params:
        if p.decision is None:
            h = steps_of[p.name]
            try:
                scenarios[p.name] = tuple(make_scenario({p.name: p.value + s * h}) for s in (-1, 1))
            except InputError as exc:
                raise InputError(
                    f"the finite difference of {p.name!r} steps outside its range: {exc}",
                    hint="a smaller rel_step (--rel-step)",
                ) from None
    policy = policy if policy is not None else HeuristicPolicy()

    def run(scenario: Scenario, seed: int, fd_policy: Policy, **kw: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return Simulation(scenario, pop, fd_policy, seed=seed, device=device, **kw).run(steps).series

    shape = (len(seeds), len(outs), len(params))
    grads, fds = np.zeros(shape), np.zeros(shape)
    values = np.zeros((len(seeds), len(outs)))
    means: list[torch.Tensor] = []  # per outcome, the sum over seeds of the base run's periodic series
    bar = _bar(progress)
    with bar if bar is not None else nullcontext():
        task = None
        if bar is not None:
            task = bar.add_task(
                f"{base.name} · sensitivity · {len(pop):,} agents · "
                f"{len(seeds)} seeds × (autograd + {len(params)} parameters)",
                total=len(seeds) * (1 + len(params)),
                unit="",
            )
        for i, seed in enumerate(seeds):
            sim = Simulation(
                base, pop, policy, seed=seed, device=device, differentiable=True, estimator=estimator
            )
            series = sim.run(steps).series
            inputs = [sim.params[f"offsets.{p.decision}" if p.decision else p.name] for p in params]
            for j, o in enumerate(outs):
                y = o.value(series)
                values[i, j] = float(y.detach())
                g = torch.autograd.grad(y, inputs, retain_graph=j < len(outs) - 1, allow_unused=True)
                for k, (p, gk) in enumerate(zip(params, g, strict=True)):
                    if gk is not None:
                        grads[i, j, k] = float(gk[:, p.action].sum() if p.decision else gk)
                if i == 0:
                    means.append(o.periodic(series).detach().clone())
                else:
                    means[j] += o.periodic(series).detach()
            del series, sim
            fd_policy = policy
            if replay:
                fd_policy = ReplayPolicy(policy)
                run(base, seed, fd_policy)  # records the base run's decisions
            if bar is not None:
                bar.update(task, advance=1)
            for k, p in enumerate(params):
                if p.decision is None:
                    minus, plus = scenarios[p.name]
                    lo, hi = run(minus, seed, fd_policy), run(plus, seed, fd_policy)
                else:
                    probe = Simulation(base, pop, fd_policy, seed=seed, device=device)
                    shift = {
                        s: {p.decision: _offset_shift(probe, p.decision, p.action, s * offset_step)}
                        for s in (-1, 1)
                    }
                    lo = run(base, seed, fd_policy, offsets=shift[-1])
                    hi = run(base, seed, fd_policy, offsets=shift[1])
                for j, o in enumerate(outs):
                    fds[i, j, k] = float(o.value(hi) - o.value(lo)) / (2 * steps_of[p.name])
                if bar is not None:
                    bar.update(task, advance=1)
    frame = _frame(base, outs, params, grads, fds, values, means, len(seeds))
    note = (
        "autograd detaches the decisions' context (the simulated series a policy reads): it leaves out "
        "how the next decisions react to a change; "
        + (
            "the finite differences replay each seed's base-run decisions, so they leave it out too"
            if replay
            else f"the finite differences keep it (policy {policy.mode})"
        )
    )
    frame.attrs.update(
        scenario=base.name,
        start=str(base.config.start),
        steps=steps,
        step_unit=base.step_unit,
        agents=len(pop),
        seeds=seeds,
        estimator=estimator,
        rel_step=rel_step,
        offset_step=offset_step,
        temperature=temperature,
        replay=replay,
        policy=policy.mode,
        citywide={o.name: o.citywide for o in outs},
        note=note,
    )
    return frame


def _frame(
    scenario: Scenario,
    outs: list[Outcome],
    params: list[_Parameter],
    grads: np.ndarray,
    fds: np.ndarray,
    values: np.ndarray,
    means: list[torch.Tensor],
    n: int,
) -> pd.DataFrame:
    def sd(x: np.ndarray) -> np.ndarray:
        return x.std(0, ddof=1) if n > 1 else np.full(x.shape[1:], np.nan)

    g, f, v = grads.mean(0), fds.mean(0), values.mean(0)
    g_sd, f_sd, v_sd = sd(grads), sd(fds), sd(values)
    diff_se = sd(grads - fds) / np.sqrt(n)
    rows = []
    for j, o in enumerate(outs):
        peak_date = None
        if o.is_peak:
            period = int(means[j].argmax())
            peak_date = str(scenario.date(period * o.period).date())
        for k, p in enumerate(params):
            scale = (1.0 if p.decision else p.value) / v[j] if v[j] != 0 else np.nan
            rows.append(
                {
                    "outcome": o.name,
                    "parameter": p.name,
                    "value": p.value,
                    "outcome_value": v[j],
                    "outcome_sd": v_sd[j],
                    "autograd": g[j, k],
                    "autograd_sd": g_sd[j, k],
                    "fd": f[j, k],
                    "fd_sd": f_sd[j, k],
                    "difference_se": diff_se[j, k],
                    "ratio": g[j, k] / f[j, k] if f[j, k] != 0 else np.nan,
                    "elasticity": g[j, k] * scale,
                    "elasticity_fd": f[j, k] * scale,
                    "peak_date": peak_date,
                }
            )
    return pd.DataFrame(rows)


def _bar(enabled: bool) -> Any:
    from lpm.run import _progress

    return _progress(enabled)


# -- the table and the plot ---------------------------------------------------------------------------------


def markdown(frame: pd.DataFrame) -> str:
    """The frame as Markdown: the settings and the note, then per outcome its base value and a table
    (parameter, value, autograd ± SD, finite difference ± SD, ratio, elasticity), rows by |elasticity|."""
    from lpm.report import number

    a = frame.attrs
    lines = [
        f"# Sensitivity · {a.get('scenario', '')}",
        "",
        f"{a.get('agents', 0):,} agents, {a.get('steps')} {a.get('step_unit', 'step')}s from {a.get('start')}, "
        f"seeds {', '.join(map(str, a.get('seeds', [])))} (± is the SD over seeds), estimator "
        f"{a.get('estimator')}, policy {a.get('policy')}; finite differences central, ±{a.get('rel_step')} "
        f"× the value (±{a.get('offset_step')} for offsets), inference runs with the same seeds. "
        f"Elasticity: d log outcome / d log parameter (per unit of an offset). peak_week / peak_month: "
        f"soft-argmax of the periodic series, temperature {a.get('temperature')}.",
        "",
        f"Note: {a.get('note', '')}.",
    ]
    for name, rows in frame.groupby("outcome", sort=False):
        first = rows.iloc[0]
        city = a.get("citywide", {}).get(name, "sum")
        head = f"## {name} = {number(first['outcome_value'])} ± {number(first['outcome_sd'])}"
        if isinstance(first["peak_date"], str):
            head += f" (hard peak in the period from {first['peak_date']})"
        lines += ["", head, ""]
        if city != "sum":
            lines += [f"Citywide: {city}.", ""]
        lines += [
            "| parameter | value | autograd | finite difference | ratio | elasticity |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        order = rows.assign(m=rows["elasticity"].abs()).sort_values("m", ascending=False, kind="stable")
        for r in order.itertuples():
            lines.append(
                f"| {r.parameter} | {number(r.value)} | {number(r.autograd)} ± {number(r.autograd_sd)} "
                f"| {number(r.fd)} ± {number(r.fd_sd)} | {_fmt(r.ratio, '{:.3f}')} | {_fmt(r.elasticity, '{:+.3g}')} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or not np.isfinite(x) else spec.format(x)


def tornado(frame: pd.DataFrame, path: str | Path) -> Path:
    """A tornado plot: one panel per outcome, a horizontal bar per parameter of its autograd elasticity,
    largest magnitude on top, the finite difference's elasticity as a marker (± its standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(frame.groupby("outcome", sort=False))
    n = len(frame.attrs.get("seeds", [])) or 1
    height = max(2.5, 0.32 * max(len(rows) for _, rows in groups) + 1.2)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), height), squeeze=False)
    for ax, (name, rows) in zip(axes[0], groups, strict=True):
        rows = rows.assign(m=rows["elasticity"].abs()).sort_values("m", kind="stable")
        y = np.arange(len(rows))
        scale = rows["elasticity_fd"] / rows["fd"].where(rows["fd"] != 0)
        se = (rows["fd_sd"] / np.sqrt(n) * scale.abs()).fillna(0.0)
        colors = np.where(rows["elasticity"] >= 0, "tab:red", "tab:blue")
        ax.barh(y, rows["elasticity"], color=colors, alpha=0.75, label="autograd")
        ax.errorbar(
            rows["elasticity_fd"], y, xerr=se, fmt="D", color="black", ms=4, lw=1, label="finite difference"
        )
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, rows["parameter"], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("elasticity (d log outcome / d log parameter)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    a = frame.attrs
    fig.suptitle(
        f"{a.get('scenario', '')}: {a.get('agents', 0):,} agents, {a.get('steps')} {a.get('step_unit', 'step')}s "
        f"from {a.get('start')}, {n} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
