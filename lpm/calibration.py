"""Calibration: fit a scenario's learnable parameters (and the alignment offsets of LLM decisions) to a
real series by gradient descent through the differentiable engine, then forecast a held-out window.

What is fitted: the scenario's ``learnable`` parameters (or the ones named), each mapped to an
unconstrained variable through its declared range (a logistic map between two finite bounds, ``lo +
exp(z)`` above one), and, with an LLM policy, each decision's (K, A) alignment offsets (added to the
log-probabilities; an L2 penalty keeps them small). The loss is the mean over periods × labels of the
squared difference between simulated and real values of the scenario's real-series quantity: weekly sums
of a daily count on a log scale (``log(x + 2 % of the label's peak)``: a relative error, so a borough of
500 cases a week weighs as much as one of 20,000, and weeks of a handful of cases do not dominate) or the per-step value of a rate (percentage points). Adam takes one step per epoch; each epoch
runs the train window with a new seed, so the gradient is a stochastic gradient of the expected loss;
the fitted values are the mean of the last fifth of the iterates (Polyak averaging, less seed noise).

Truncated backpropagation: the train window is cut into pieces of ``truncate`` steps (by default 56 days;
the whole window for monthly scenarios); each piece's loss is backpropagated and the state is detached
before the next. The gradients of the COVID model agree with finite differences over 8 weeks
(``tests/test_gradients.py``), the default piece's length. A piece whose graph ``memory_gb`` cannot hold
(about 100 bytes per agent per simulated day with the COVID default "pruned", 165 with "households", 115
with "expected": :data:`GRAPH_BYTES_PER_AGENT_STEP`) is backpropagated whole by recomputation, one
segment's graph at a time (:func:`_recomputed_piece`: the same gradient for a second forward pass), not
truncated shorter: cut at one week, the gradient of the COVID loss loses the weeks' dependence on each
other (at 20,000 agents over 4 weeks, d loss / d beta -4.2 instead of -114, and the detected share's
derivative changes sign), and a full-city fit on it diverged. A longer window costs time, not memory.

Decisions: the heuristic policy answers every epoch from the simulated context. An LLM policy is asked
in the first epoch of each restart (and every ``refresh`` epochs), and its answers are replayed in the
other epochs (:class:`lpm.gradcheck.ReplayPolicy`), so an epoch costs no model calls; the gradient does not
follow the path from simulated cases back into decisions (the context is detached).

Windows: the run starts on the first day of the train window and is seeded from the data before it only;
the test window (later than the train window) is never read while fitting. After fitting, each restart's
parameters are run in inference mode over train and test with ``eval_seeds`` seeds and the real policy;
the band of the forecast plot is the range (min .. max) over restarts × seeds: the spread of the fit's
outcome over optimiser starts and the simulation's own randomness, not a Bayesian posterior.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm.engine import SimState, Simulation
from lpm.errors import InputError
from lpm.gradcheck import ReplayPolicy
from lpm.paths import make_folder
from lpm.policy import Policy
from lpm.population import Population
from lpm.sampling import DEFAULT_ESTIMATOR, ESTIMATORS, choose_estimator
from lpm.scenarios.base import Quantity, Scenario, compared_period, period_sums

__all__ = ["Calibration", "Window", "calibrate", "fit_quantity", "run_loss"]

#: Bytes the autograd graph of a COVID day holds per agent, by estimator: the largest weekly mean of
#: 8 weeks from 2020-03-01, through the spring peak (``benchmarks/graph_bytes.py``: 200,000 agents,
#: resident memory with every large array mapped on its own; 2026-12-04 at befac92: 51.2, 130.6 and 86.2,
#: the first week 38.4, 123.9 and 81.4), rounded up by about a tenth; an estimator not measured is counted
#: as the largest.
GRAPH_BYTES_PER_AGENT_STEP = {"pruned": 57, "households": 144, "expected": 95}
#: Days per backpropagated piece of a daily scenario: the horizon over which the COVID gradients are
#: checked against finite differences (8 weeks, ``tests/test_gradients.py``); memory is met by recomputing
#: the piece in segments, never by a shorter piece.
TRUNCATE_DAYS = 56
#: The parts of a :class:`SimState` that may carry a gradient across a recomputed segment's start.
KINDS = ("scenario", "actions")
#: Counts are compared as log(x + LOG_FLOOR × the label's largest real value in the train window).
LOG_FLOOR = 0.02


@dataclass(frozen=True)
class Window:
    """A closed date range ``first .. last`` (``START:END`` on the command line)."""

    first: pd.Timestamp
    last: pd.Timestamp

    @classmethod
    def parse(cls, text: str, option: str) -> Window:
        parts = str(text).split(":")
        if len(parts) != 2:
            raise InputError(f"{option} must be START:END (dates YYYY-MM-DD), got {text!r}")
        try:
            first, last = (pd.Timestamp(dt.date.fromisoformat(p.strip())) for p in parts)
        except ValueError:
            raise InputError(f"{option} must be START:END with dates YYYY-MM-DD, got {text!r}") from None
        if last < first:
            raise InputError(f"{option}: the end {last.date()} is before the start {first.date()}")
        return cls(first, last)

    def __str__(self) -> str:
        return f"{self.first.date()}:{self.last.date()}"


def fit_quantity(scenario: Scenario, name: str | None = None) -> Quantity:
    """The quantity a calibration fits: ``name``, or the scenario's first quantity with a real series."""
    with_real = [q for q in scenario.quantities if q.real]
    if name is None:
        if not with_real:
            raise InputError(f"the {scenario.name} scenario declares no quantity with a real series to fit")
        return with_real[0]
    for q in with_real:
        if q.name == name:
            return q
    raise InputError(
        f"--quantity {name!r}: not a quantity of {scenario.name} with a real series",
        hint=f"quantities with one: {', '.join(q.name for q in with_real) or 'none'}",
    )


class _Transform:
    """Maps a parameter with range (lo, hi) to an unconstrained variable and back."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def to_z(self, x: float) -> float:
        lo, hi = self.lo, self.hi
        if math.isfinite(lo) and math.isfinite(hi):
            u = min(max((x - lo) / (hi - lo), 1e-6), 1 - 1e-6)
            return math.log(u / (1 - u))
        if math.isfinite(lo):
            return math.log(max(x - lo, 1e-12))
        return x

    def to_x(self, z: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if math.isfinite(lo) and math.isfinite(hi):
            return lo + (hi - lo) * torch.sigmoid(z)
        if math.isfinite(lo):
            return lo + torch.exp(z)
        return z


@dataclass
class Calibration:
    """What :func:`calibrate` found; :meth:`to_json` is ``calibration.json``."""

    scenario: str
    policy: str
    quantity: str
    agents: int
    train: Window
    test: Window | None
    parameters: dict[str, float]
    initial: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    errors: dict[str, dict[str, float]]
    restarts: list[dict[str, Any]]
    losses: list[list[float]]  # per restart, per epoch
    iterates: list[list[dict[str, float]]]  # per restart, per epoch: the parameters after its step
    forecast: pd.DataFrame  # date, label, real, median, low, high, window
    settings: dict[str, Any]
    offsets: dict[str, list[list[float]]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    command: str = ""
    also: dict[str, dict[str, Any]] = field(default_factory=dict)  # per later start (also_from): its errors

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "quantity": self.quantity,
            "agents": self.agents,
            "command": self.command,
            "parameters": {k: round(v, 6) for k, v in self.parameters.items()},
            "train": {"window": str(self.train), **self.errors["train"]},
            "test": None if self.test is None else {"window": str(self.test), **self.errors["test"]},
            "initial": self.initial,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "restarts": self.restarts,
            "band": "min .. max over restarts × evaluation seeds (optimiser starts and simulation noise; "
            "not a posterior)",
            "settings": self.settings,
            "also_from": self.also,
            "offsets": self.offsets,
            "model_calls": self.counters,
            "wall_seconds": round(self.wall_seconds, 1),
        }


ProgressFn = Callable[[str, int, int, float | None], None]


def _check_settings(*, epochs: int, lr: float, restarts: int, eval_seeds: int, memory_gb: float) -> None:
    """Refuse optimiser settings that cannot run, naming the option and its range."""
    bad = [
        f"--epochs must be >= 1, got {epochs}" if epochs < 1 else None,
        f"--restarts must be >= 1, got {restarts}" if restarts < 1 else None,
        f"--eval-seeds must be >= 1, got {eval_seeds}" if eval_seeds < 1 else None,
        f"--lr must be a finite number > 0, got {lr}" if not (math.isfinite(lr) and lr > 0) else None,
        f"--memory-gb must be a finite number > 0, got {memory_gb}"
        if not (math.isfinite(memory_gb) and memory_gb > 0)
        else None,
    ]
    if any(bad):
        raise InputError("; ".join(b for b in bad if b))


def calibrate(
    make_scenario: Callable[[Mapping[str, Any]], Scenario],
    pop: Population,
    policy: Policy,
    *,
    train: Window,
    test: Window | None = None,
    parameters: Sequence[str] | None = None,
    fit_offsets: bool | None = None,
    quantity: str | None = None,
    epochs: int = 40,
    lr: float = 0.05,
    restarts: int = 3,
    seed: int = 0,
    eval_seeds: int = 2,
    truncate: int | None = None,
    memory_gb: float = 12.0,
    offset_l2: float = 0.1,
    prior: float = 0.0,
    refresh: int = 0,
    jitter: float = 0.25,
    target: pd.DataFrame | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    also_from: Sequence[dt.date] = (),
    progress: ProgressFn | None = None,
    device: str | torch.device = "cpu",
) -> Calibration:
    """Fit ``parameters`` (default: all of the scenario's learnable ones) on ``train``; forecast ``test``.

    make_scenario: config overrides -> scenario (the start date is set to ``train.first`` here).
    policy: the decisions' policy (an LLM policy is replayed between refreshes, see the module docstring).
    fit_offsets: fit the decisions' alignment offsets (default: when the policy is not the heuristic).
    restarts: fits from the configured values jittered by ``jitter`` (in the unconstrained space; restart
    0 starts at the configured values), each with its own seeds. truncate: steps per backpropagated piece
    (default: :data:`TRUNCATE_DAYS` for a day scenario, the whole window otherwise); a piece whose graph
    ``memory_gb`` cannot hold is recomputed in segments (:func:`_recomputed_piece`). target: a real
    series frame (``date``, breakdown, ``quantity``, ``value`` on the population's scale) replacing the
    scenario's (e.g. data generated by the simulator itself). also_from: later start dates inside the
    train window: each epoch also runs from each of them to the window's end (seeded from the data before
    its own start) and the loss is the mean over the runs, so the fitted values serve those starts too;
    each start's train and test errors are reported in ``also``. prior: weight of a penalty that keeps the
    parameters near their starting values, ``prior`` × the mean over parameters of the squared distance
    in the unconstrained space (a Gaussian prior around the configured values with standard deviation
    ``1 / sqrt(2 prior × len(parameters))``, so the fit is a maximum a posteriori estimate); 0, the
    default, is none. The jittered restarts keep the configured values as the prior's centre. progress:
    ``f(phase, done, total, loss)``.
    device: where the runs compute (the fitted variables, the real series and the loss stay on the host).
    """
    started = time.perf_counter()
    _check_settings(epochs=epochs, lr=lr, restarts=restarts, eval_seeds=eval_seeds, memory_gb=memory_gb)
    if estimator != "auto" and estimator not in ESTIMATORS:
        raise InputError(f"--estimator must be one of auto, {', '.join(ESTIMATORS)}, got {estimator!r}")
    base = make_scenario({"start": train.first.date()})
    estimator = choose_estimator(estimator, base.pruned)
    q = fit_quantity(base, quantity)
    period = compared_period(base, q)
    names = list(base.learnable if parameters is None else parameters)
    unknown = [p for p in names if p not in base.learnable]
    if unknown:
        raise InputError(
            f"--parameters: {', '.join(map(repr, unknown))} not learnable in {base.name}",
            hint=f"learnable: {', '.join(base.learnable)}",
        )
    if fit_offsets is None:
        fit_offsets = policy.mode != "heuristic"
    if prior < 0 or not math.isfinite(prior):
        raise InputError(f"--prior must be a finite weight >= 0, got {prior}")
    if not names and not fit_offsets:
        raise InputError("nothing to fit: give --parameters or fit the offsets of an LLM policy")
    train_steps, test_steps = window_steps(base, train, test, period)
    ranges = type(base).parameter_ranges()
    transforms = {p: _Transform(*ranges[p]) for p in names}
    initial = {p: float(getattr(base.config, p)) for p in names}
    centre = {p: transforms[p].to_z(initial[p]) for p in names}  # the starting values, unconstrained
    if truncate is None:
        truncate = TRUNCATE_DAYS if base.step_unit == "day" else train_steps
    if truncate < 1 or truncate % period:
        raise InputError(f"--truncate must be a positive multiple of {period} steps, got {truncate}")
    segment = truncate  # steps whose graph is held at once: a piece that memory cannot hold is recomputed
    if base.step_unit == "day":
        per_step = GRAPH_BYTES_PER_AGENT_STEP.get(estimator, max(GRAPH_BYTES_PER_AGENT_STEP.values()))
        by_memory = int(memory_gb * 1e9 / (per_step * len(pop)))
        segment = max(period, min(truncate, by_memory) // period * period)

    probe = Simulation(base, pop, policy, seed=seed, device=device)
    labels = pop.labels(q.by) if q.by else ["all"]
    real_all = real_target(base, probe.world, q, labels, train_steps + test_steps, target)
    real_train = period_sums(real_all[:train_steps], period)
    if torch.isnan(real_train).all():
        raise InputError(
            f"no real {q.name} in the train window {train}", hint="choose a window the data cover"
        )
    scale = float(getattr(probe.world, "scale", 1.0)) if q.total else 1.0
    extra = _later_starts(
        make_scenario,
        pop,
        policy,
        q,
        labels,
        train,
        test,
        test_steps,
        also_from,
        period,
        target,
        seed,
        device,
    )

    losses: list[list[float]] = []
    trajectories: list[list[dict[str, float]]] = []
    fits: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    total = restarts * epochs
    if progress is not None:
        progress("fit", 0, total, None)  # the bar from the start: an epoch of the full city takes minutes
    for r in range(restarts):
        gen = torch.Generator().manual_seed(seed * 7919 + r)
        z = {
            p: torch.tensor(
                centre[p] + (jitter * float(torch.randn((), generator=gen)) if r else 0.0),
                dtype=torch.float64,
                requires_grad=True,
            )
            for p in names
        }
        offsets = {
            f"offsets.{d.name}": torch.zeros_like(probe.params[f"offsets.{d.name}"], requires_grad=True)
            for d in probe.asked
        }
        trained = list(z.values()) + (list(offsets.values()) if fit_offsets else [])
        opt = torch.optim.Adam(trained, lr=lr)
        history: list[float] = []
        iterates: list[dict[str, float]] = []
        runs = [(base, train_steps, real_train)] + [
            (b, n, period_sums(real[:n], period)) for _, b, n, real in extra
        ]
        replays: list[ReplayPolicy | None] = [None] * len(runs)  # one per start: it replays by step
        for epoch in range(epochs):
            opt.zero_grad()
            loss = 0.0
            for k, (scenario_k, steps_k, real_k) in enumerate(runs):
                if policy.mode != "heuristic" and (replays[k] is None or (refresh and epoch % refresh == 0)):
                    replays[k] = ReplayPolicy(policy)
                sim = Simulation(
                    scenario_k,
                    pop,
                    replays[k] or policy,
                    seed=seed + 1000 * (r + 1) + epoch + 100_003 * k,
                    differentiable=True,
                    estimator=estimator,
                    device=device,
                )

                def bind(sim: Simulation = sim, z: dict = z, offsets: dict = offsets) -> None:
                    """Fresh graph nodes from the fitted variables (on the host; copies on the run's
                    device, through which the gradients flow back), for each backpropagated piece."""
                    for p in names:
                        sim.params[p] = transforms[p].to_x(z[p]).to(sim.device, torch.float32)
                    if fit_offsets:
                        sim.params.update({k: v.to(sim.device) for k, v in offsets.items()})

                loss += _train_epoch(
                    sim, bind, q, steps_k, truncate, period, real_k, offsets, offset_l2, segment
                ) / len(runs)
                for name, value in sim.counters.items():
                    counters[name] = counters.get(name, 0) + value
            if len(runs) > 1:  # the gradient of the mean loss over the starts
                for t in trained:
                    if t.grad is not None:
                        t.grad /= len(runs)
            if prior and names:  # toward the configured values, whatever the restart's jittered start
                penalty = prior * sum((z[p] - centre[p]) ** 2 for p in names) / len(names)
                penalty.backward()
                loss += float(penalty.detach())
            opt.step()
            history.append(loss)
            iterates.append({p: float(transforms[p].to_x(z[p].detach())) for p in names})
            if progress is not None:
                progress("fit", r * epochs + epoch + 1, total, loss)
        losses.append(history)
        trajectories.append(iterates)
        tail = max(1, epochs // 5)  # the fit: the mean of the last fifth of the iterates (Polyak averaging)
        fits.append(
            {
                "restart": r,
                "parameters": {p: float(np.mean([it[p] for it in iterates[-tail:]])) for p in names},
                "offsets": {k: v.detach().clone() for k, v in offsets.items()} if fit_offsets else {},
                "train_loss": float(np.mean(history[-tail:])),
            }
        )

    # forecast: every restart's parameters, eval_seeds seeds each, the real policy, inference mode; and
    # the starting values, for comparison
    steps = train_steps + test_steps
    done, todo = 0, (len(fits) + 1 + 2 * len(extra)) * eval_seeds

    def forecast(
        values: Mapping[str, float],
        offs: Mapping[str, torch.Tensor],
        start: pd.Timestamp = train.first,
        steps: int = steps,
    ) -> list[torch.Tensor]:
        nonlocal done
        scenario = make_scenario({"start": start.date(), **values})
        out = []
        given = {k.removeprefix("offsets."): v for k, v in offs.items()} or None
        for s in range(eval_seeds):
            sim = Simulation(scenario, pop, policy, seed=seed + 100_000 + s, offsets=given, device=device)
            with torch.no_grad():
                result = sim.run(steps)
            out.append(period_sums(result.series[q.name].cpu().double().reshape(steps, -1), period))
            for name, value in sim.counters.items():
                counters[name] = counters.get(name, 0) + value
            done += 1
            if progress is not None:
                progress("forecast", done, todo, None)
        return out

    stacked = torch.stack([x for fit in fits for x in forecast(fit["parameters"], fit["offsets"])])
    before = torch.stack(forecast(initial, {}))  # (S, P, L) at the starting values
    real_periods = period_sums(real_all, period)
    p_train = train_steps // period
    errors = _window_errors(stacked, before, real_periods, p_train, scale)
    best = min(fits, key=lambda f: f["train_loss"])
    also = {}
    for first, _, n, real in extra:  # each later start: the best fit and the starting values
        fitted = torch.stack(forecast(best["parameters"], best["offsets"], first, n + test_steps))
        start_values = torch.stack(forecast(initial, {}, first, n + test_steps))
        also[str(first.date())] = _window_errors(
            fitted, start_values, period_sums(real, period), n // period, scale
        )
    forecast = _forecast_frame(base, stacked, real_periods, labels, period, p_train, scale)
    for f in fits:
        f["offsets"] = {k: v.tolist() for k, v in f["offsets"].items()}
    return Calibration(
        scenario=base.name,
        policy=policy.mode,
        quantity=q.name,
        agents=len(pop),
        train=train,
        test=test,
        parameters=best["parameters"],
        initial=initial,
        ranges={p: ranges[p] for p in names},
        errors=errors,
        restarts=[{k: v for k, v in f.items() if k != "offsets"} for f in fits],
        losses=losses,
        iterates=trajectories,
        forecast=forecast,
        settings={
            "epochs": epochs,
            "lr": lr,
            "restarts": restarts,
            "seed": seed,
            "eval_seeds": eval_seeds,
            "truncate_steps": truncate,
            "segment_steps": segment,
            "period_steps": period,
            "loss": (
                f"mean squared error of log(weekly sum + {LOG_FLOOR} × the label's train peak)"
                if period > 1
                else "mean squared error"
            ),
            "offset_l2": offset_l2 if fit_offsets else None,
            "prior": prior,
            "refresh": refresh,
            "jitter": jitter,
            "estimator": estimator,
            "fit_offsets": bool(fit_offsets),
            "also_from": [str(first.date()) for first, *_ in extra],
        },
        also=also,
        offsets=best["offsets"],
        counters=counters,
        wall_seconds=time.perf_counter() - started,
    )


def _later_starts(
    make_scenario: Callable[[Mapping[str, Any]], Scenario],
    pop: Population,
    policy: Policy,
    q: Quantity,
    labels: list[str],
    train: Window,
    test: Window | None,
    test_steps: int,
    also_from: Sequence[dt.date],
    period: int,
    target: pd.DataFrame | None,
    seed: int,
    device: str | torch.device = "cpu",
) -> list[tuple[pd.Timestamp, Scenario, int, torch.Tensor]]:
    """For each start of ``also_from``: (start, its scenario, its train steps to the train window's end,
    its real series over train and test), checked: inside the train window, whole periods to its end."""
    out = []
    for day in also_from:
        first = pd.Timestamp(day)
        if not train.first < first <= train.last:
            raise InputError(
                f"--also-from {first.date()}: not inside --train {train} (after its first day)",
                hint="give later starts inside the train window, e.g. two weeks after it begins",
            )
        scenario = make_scenario({"start": first.date()})
        try:  # its test window is --test: both train windows end on the same day
            steps, _ = window_steps(scenario, Window(first, train.last), test, period)
        except InputError as exc:
            raise InputError(
                f"--also-from {first.date()}: {exc}",
                hint="a later start must be a whole number of periods before the train window's end",
            ) from None
        world = Simulation(scenario, pop, policy, seed=seed, device=device).world
        out.append(
            (first, scenario, steps, real_target(scenario, world, q, labels, steps + test_steps, target))
        )
    return out


def _window_errors(
    fitted: torch.Tensor, before: torch.Tensor, real: torch.Tensor, p_train: int, scale: float
) -> dict[str, dict[str, Any]]:
    """``train`` (the first ``p_train`` periods) and, where there are more, ``test`` errors of the fitted
    runs (S, P, L) against ``real`` (P, L), each with ``before``: the same at the starting values."""
    out = {}
    for window, cut in (("train", slice(None, p_train)), ("test", slice(p_train, None))):
        if window == "train" or real.shape[0] > p_train:
            out[window] = {
                **_errors(fitted[:, cut], real[cut], scale),
                "before": _errors(before[:, cut], real[cut], scale),
            }
    return out


def window_steps(base: Scenario, train: Window, test: Window | None, period: int) -> tuple[int, int]:
    """Steps of the train window and of the test window after it (0 without one), checked."""

    def steps_until(last: pd.Timestamp) -> int:
        n = 0
        while base.date(n) <= last:
            n += 1
        return n

    if base.date(0) != train.first:
        raise InputError(f"--train: {train.first.date()} is not a step date of {base.name}")
    train_steps = steps_until(train.last)
    if train_steps < period or train_steps % period:
        unit = "weeks" if period == 7 else f"{base.step_unit}s"
        raise InputError(
            f"--train {train}: {train_steps} steps, not a whole number of {unit} (the loss compares {unit})",
            hint=f"end the window {period * max(1, train_steps // period) - 1} days after its start",
        )
    if test is None:
        return train_steps, 0
    if test.first <= train.last:
        raise InputError(
            f"--test {test} overlaps --train {train}: the test window must begin after the train window",
            hint="e.g. --train 2020-03-16:2020-04-12 --test 2020-04-13:2020-05-10",
        )
    if test.first != base.date(train_steps):
        raise InputError(
            f"--test must begin the step after the train window ends ({base.date(train_steps).date()}), "
            f"got {test.first.date()}"
        )
    total = steps_until(test.last)
    if (total - train_steps) % period:
        raise InputError(f"--test {test}: not a whole number of periods of {period} steps")
    return train_steps, total - train_steps


def real_target(
    scenario: Scenario, world: Any, q: Quantity, labels: list[str], steps: int, target: pd.DataFrame | None
) -> torch.Tensor:
    """(steps, labels) real values of ``q`` at each step from the scenario's start (from ``target``, else
    the scenario's real data); an error naming the first step the data do not cover."""
    dates = [scenario.date(t) for t in range(steps)]
    frame = scenario.real_data(world, dates[0], dates[-1]) if target is None else target
    frame = frame[frame["quantity"].astype(str) == q.name]
    if q.by is None:
        wide = frame.groupby("date")["value"].sum().reindex(dates).to_frame()
    else:
        wide = frame.pivot_table(index="date", columns=q.by, values="value", observed=False, aggfunc="sum")
        wide = wide.reindex(index=dates, columns=labels)
    table = torch.tensor(wide.to_numpy(dtype=float), dtype=torch.float64)
    last = scenario.date(steps - 1)
    missing = torch.isnan(table).all(1)
    if bool(missing.any()):
        first_missing = scenario.date(int(missing.nonzero()[0]))
        raise InputError(
            f"the real {q.name} series has no value on {first_missing.date()} (windows up to {last.date()})",
            hint="choose windows the data cover (or give --data with the period)",
        )
    return table


def _loss(sim_p: torch.Tensor, real_p: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """Sum over the finite entries of the squared difference; for counts on a log scale,
    ``log(x + floor)`` with ``floor`` (per label) a small share of the label's peak, so that weeks of a
    handful of cases (noise at the agents' granularity) do not dominate the fit."""
    ok = ~torch.isnan(real_p)
    a, b = sim_p.double(), torch.nan_to_num(real_p)
    if floor is not None:
        a, b = torch.log(a.clamp_min(0) + floor), torch.log(b + floor)
    return (((a - b) ** 2) * ok).sum()


def _floor_and_count(real: torch.Tensor, period: int) -> tuple[torch.Tensor | None, float]:
    """The per-label floor of the log scale (counts compared per period; None for rates) and the number
    of finite real values the loss is the mean over."""
    floor = LOG_FLOOR * torch.nan_to_num(real).amax(0).clamp_min(1.0) if period > 1 else None
    return floor, float((~torch.isnan(real)).sum())


def run_loss(series: torch.Tensor, real: torch.Tensor, period: int) -> float:
    """The loss :func:`calibrate` minimises, of one run: ``series`` (steps, labels) simulated per step
    against ``real`` (steps // period, labels) real values per period (NaN where missing); e.g. to score
    an inference run at given parameter values, or to compare with another optimiser on the same loss."""
    floor, count = _floor_and_count(real, period)
    return float(_loss(period_sums(series, period), real, floor) / count)


def _detached(state: SimState) -> SimState:
    return SimState(
        {k: v.detach() for k, v in state.scenario.items()}, {k: v.detach() for k, v in state.actions.items()}
    )


def _train_epoch(
    sim: Simulation,
    bind: Callable[[], None],
    q: Quantity,
    steps: int,
    truncate: int,
    period: int,
    real: torch.Tensor,
    offsets: Mapping[str, torch.Tensor],
    offset_l2: float,
    segment: int | None = None,
) -> float:
    """One pass over the train window, backpropagated piece by piece (``truncate`` steps, the state
    detached between pieces); a piece longer than ``segment`` steps is backpropagated whole by
    recomputation (:func:`_recomputed_piece`). Returns the epoch's loss."""
    floor, count = _floor_and_count(real, period)
    segment = segment or truncate

    def piece_loss(series: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """The loss of steps ``t0 .. t1-1`` from their (steps, ...) series of the fitted quantity."""
        series = series.reshape(t1 - t0, -1).cpu()  # a few numbers: the loss is computed on the host
        loss = _loss(period_sums(series, period), real[t0 // period : t1 // period], floor) / count
        if t0 == 0 and offset_l2 and offsets and any(o.requires_grad for o in offsets.values()):
            loss = loss + offset_l2 * sum((o.double() ** 2).mean() for o in offsets.values())
        return loss

    sim._reset()
    total = 0.0
    state: SimState | None = None
    with torch.enable_grad():
        for t0 in range(0, steps, truncate):
            t1 = min(steps, t0 + truncate)
            if t1 - t0 > segment:
                loss, state = _recomputed_piece(sim, bind, q.name, state, t0, t1, segment, piece_loss)
                total += loss
                continue
            state = _advance(sim, bind, state, t0, t1)
            piece = piece_loss(sim.recorded(q.name, t0, t1), t0, t1)
            if piece.requires_grad:
                piece.backward()
            total += float(piece.detach())
            state = _detached(state)
            sim.detach_records(t0, t1)
    return total


def _advance(sim: Simulation, bind: Callable[[], None], state: SimState | None, t0: int, t1: int) -> SimState:
    """Steps ``t0 .. t1-1`` of the run from ``state`` (None: the initial state) with fresh parameter nodes
    and their graph; records and counters are the run's."""
    bind()
    if state is None:
        state = sim.initial_state()
    for t in range(t0, t1):
        state = sim.step(state, t)
    return state


def _recomputed_piece(
    sim: Simulation,
    bind: Callable[[], None],
    name: str,
    state: SimState | None,
    t0: int,
    t1: int,
    segment: int,
    piece_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> tuple[float, SimState]:
    """Backpropagate steps ``t0 .. t1-1`` whole while holding the graph of ``segment`` steps at a time
    (checkpointing): a first pass keeps only the state at each segment's start; then, from the last
    segment to the first, the segment is run again from its start state with its graph
    (:meth:`Simulation.rerun`), and its loss plus the later segments' gradient with respect to its end
    state is backpropagated, which gives the gradient with respect to its start state. The gradients
    equal those of one graph over the piece; the cost is a second forward pass. Returns the piece's
    loss and its detached end state."""
    bounds = [*range(t0, t1, segment), t1]
    starts: list[SimState | None] = []
    carried: list[set[tuple[str, str]]] = []  # the start state's tensors that carry a gradient
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # the run's own pass: records and counters
        starts.append(state)
        state = _advance(sim, bind, state, a, b)
        carried.append(
            {(kind, k) for kind in KINDS for k, v in getattr(state, kind).items() if v.requires_grad}
        )
        state = _detached(state)
        sim.detach_records(a, b)
    carried = [set(), *carried[:-1]]  # the tensors carrying a gradient at each segment's start
    total = 0.0
    later: dict[tuple[str, str], torch.Tensor] = {}  # d(later segments' loss) / d(this segment's end state)
    for i in reversed(range(len(starts))):
        a, b = bounds[i], bounds[i + 1]
        start, leaves = starts[i], {}
        if start is not None:
            parts = {kind: dict(getattr(start, kind)) for kind in KINDS}
            for kind, k in carried[i]:
                leaves[(kind, k)] = parts[kind][k] = parts[kind][k].detach().requires_grad_(True)
            start = SimState(parts["scenario"], parts["actions"])
        bind()
        end, records = sim.rerun(start, a, b)
        loss = piece_loss(torch.stack([r[name] for r in records]), a, b)
        pairs = [(loss, torch.ones_like(loss))] + [
            (getattr(end, kind)[k], g) for (kind, k), g in later.items()
        ]
        pairs = [(o, g) for o, g in pairs if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        later = {key: leaf.grad for key, leaf in leaves.items() if leaf.grad is not None}
        total += float(loss.detach())
        # before the next segment's graph: the backward freed only what leads to its outputs, and the
        # other records and end-state tensors would keep the rest of this one alive
        del end, records, loss, pairs, start, leaves
    return total, state


def _errors(sim: torch.Tensor, real: torch.Tensor, scale: float) -> dict[str, float]:
    """RMSE (on the city's scale for counts) and MAPE (%) of the median forecast over periods × labels."""
    median = sim.median(0).values
    ok = ~torch.isnan(real)
    diff = (median - real)[ok] / scale
    positive = ok & (real > 0)
    mape = ((median - real).abs()[positive] / real[positive]).mean() * 100
    return {
        "rmse": round(float((diff**2).mean().sqrt()), 3),
        "mape": round(float(mape), 1),
        "periods": int(real.shape[0]),
    }


def _forecast_frame(
    scenario: Scenario,
    sim: torch.Tensor,
    real: torch.Tensor,
    labels: list[str],
    period: int,
    p_train: int,
    scale: float,
) -> pd.DataFrame:
    rows = []
    for p in range(real.shape[0]):
        date = scenario.date(p * period + period - 1)
        for j, label in enumerate(labels):
            values = sim[:, p, j] / scale
            rows.append(
                {
                    "date": date,
                    "label": label,
                    "real": float(real[p, j]) / scale,
                    "median": float(values.median()),
                    "low": float(values.min()),
                    "high": float(values.max()),
                    "window": "train" if p < p_train else "test",
                }
            )
    return pd.DataFrame(rows)


# -- writing the folder ----------------------------------------------------------------------------------


def write(cal: Calibration, folder: Path) -> list[str]:
    """``calibration.json``, ``forecast.csv``, ``loss.png`` and ``fit.png`` into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    make_folder(folder, field="--out")
    (folder / "calibration.json").write_text(json.dumps(cal.to_json(), indent=2) + "\n")
    cal.forecast.to_csv(folder / "forecast.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r, history in enumerate(cal.losses):
        ax.plot(range(1, len(history) + 1), history, label=f"restart {r}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title(f"{cal.scenario}: {cal.settings['loss']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)

    labels = list(dict.fromkeys(cal.forecast["label"]))
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        part = cal.forecast[cal.forecast["label"] == label]
        ax.fill_between(part["date"], part["low"], part["high"], color="C0", alpha=0.25, label="band")
        ax.plot(part["date"], part["median"], color="C0", label="simulated (median)")
        ax.plot(part["date"], part["real"], "k--", marker=".", label="real")
        if cal.test is not None:
            ax.axvline(cal.test.first, color="grey", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    test = cal.errors.get("test")
    fig.suptitle(
        f"{cal.scenario} {cal.quantity}: fit {cal.train} (MAPE {cal.errors['train']['mape']}%)"
        + (f", forecast {cal.test} (MAPE {test['mape']}%)" if test else "")
        + f"; band: min..max over {len(cal.restarts)} restarts × {cal.settings['eval_seeds']} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(folder / "fit.png", dpi=110)
    plt.close(fig)
    return ["calibration.json", "forecast.csv", "loss.png", "fit.png"]
