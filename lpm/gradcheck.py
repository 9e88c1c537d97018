"""Gradients against finite differences: per week, per parameter, per estimator (common random numbers).

For a scenario and a window, :func:`check` compares the gradient of each week's citywide total of a
recorded quantity with respect to each parameter — the scenario's learnable parameters and a common
shift of one action's alignment offsets — with central finite differences of the *inference* run (the
stochastic model itself) at ``theta ± h`` with the same seeds (common random numbers). Both are averaged
over the seeds; the ratio gradient / finite difference is reported per week. Decisions come from a
policy that does not read the simulated series (``policy``; by default the scenario's heuristic), so
the comparison isolates the estimator. With a policy that does read the simulated series (the default
heuristic) the same comparison measures what detaching the decisions' context costs: the gradient leaves
out the path from simulated cases to the next decisions, the finite difference keeps it
(``benchmarks/gradients.py --policy heuristic``).

``benchmarks/gradients.py`` prints these tables for the three estimators; ``tests/test_gradients.py``
and ``tests/test_labor.py`` assert what holds (``period``: steps per reported period, 7 for weeks of
daily steps, 1 for monthly steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lpm.engine import Simulation
from lpm.policy import Archetypes, Policy, PolicyDecision
from lpm.population import Population
from lpm.sampling import DEFAULT_ESTIMATOR, choose_estimator
from lpm.scenarios.base import Scenario, period_sums

__all__ = ["GradCheck", "check", "weekly_totals"]


def weekly_totals(series: torch.Tensor, days: int = 7) -> torch.Tensor:
    """(weeks,) sums of a (T, ...) daily series over consecutive weeks and every other dimension."""
    return period_sums(series.reshape(series.shape[0], -1).sum(1), days)


@dataclass
class GradCheck:
    """Per-week gradient (mean over seeds), finite difference (mean over seeds) and their spread."""

    parameter: str
    estimator: str
    grad: np.ndarray  # (weeks,)
    fd: np.ndarray  # (weeks,)
    grad_sd: np.ndarray  # (weeks,) standard deviation over seeds
    fd_sd: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.fd != 0, self.grad / self.fd, np.nan)


class ReplayPolicy(Policy):
    """Answers every decision step with the probabilities ``inner`` gave at that step of the first run it
    served: with it, a finite difference holds the decisions fixed at the base run's, as the gradient
    (whose decision context is detached) does. A measuring tool, not a policy for runs."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.table: dict[tuple[str, int], torch.Tensor] = {}

    def setup(self, decision, spec, pop, grouping) -> Archetypes:
        return self.inner.setup(decision, spec, pop, grouping)

    @property
    def mode(self) -> str:
        return "replay"

    def decide(self, archetypes: Archetypes, context, *, step: int) -> PolicyDecision:
        key = (archetypes.decision, step)
        if key not in self.table:
            answer = self.inner.decide(archetypes, context, step=step)
            self.table[key] = answer.probs.detach().clone()
            return answer
        probs = self.table[key]
        k = probs.shape[0]
        return PolicyDecision(probs, self._records(archetypes, probs, ["replay"] * k, [False] * k))


def _offset_shift(sim: Simulation, decision: str, action: int, delta: float) -> torch.Tensor:
    off = sim.params[f"offsets.{decision}"]
    shift = torch.zeros_like(off)
    shift[:, action] = delta
    return shift


def check(
    make_scenario: Callable[[dict[str, float]], Scenario],
    pop: Population,
    policy: Policy,
    *,
    parameters: Sequence[str],
    quantity: str,
    steps: int,
    seeds: Sequence[int],
    estimator: str = DEFAULT_ESTIMATOR,
    rel_step: float = 0.05,
    offset_step: float | Sequence[float] = 0.2,
    decision: str | None = None,
    action: int = 0,
    period: int = 7,
    replay: bool = False,
    device: str | torch.device = "cpu",
) -> list[GradCheck]:
    """Gradient vs finite differences per week for each of ``parameters`` (learnable names, or
    ``"offsets"`` for a common shift of ``action``'s alignment offsets of ``decision``).

    make_scenario: config overrides -> scenario. Finite differences: central, step ``rel_step`` × the
    parameter's value (``offset_step`` for offsets: one step, or several whose central differences are
    averaged per seed: each step moves the decisions of the agents whose draw lies within it, a finite
    sample whose noise a single small step does not average out), inference mode, the same seeds.
    ``replay``: the
    finite differences replay the decisions of the base inference run of each seed (:class:`ReplayPolicy`),
    so that they hold the decisions fixed as the gradient does; without it they keep the policy's
    reaction to the perturbed series. ``device``: where every run computes.
    """
    base = make_scenario({})
    estimator = choose_estimator(estimator, base.pruned)  # "auto": the name the results report
    decision = decision or base.decisions[0].name

    def finite_difference(policy: Policy, seed: int, p: str) -> np.ndarray:
        """(periods,) central finite difference of the inference run with respect to ``p``."""

        def totals(scenario: Scenario, offsets: torch.Tensor | None = None) -> np.ndarray:
            sim = Simulation(
                scenario,
                pop,
                policy,
                seed=seed,
                offsets=None if offsets is None else {decision: offsets},
                device=device,
            )
            with torch.no_grad():
                return weekly_totals(sim.run(steps).series[quantity], period).cpu().double().numpy()

        if p == "offsets":
            probe = Simulation(base, pop, policy, seed=seed, device=device)
            differences = []
            for h in [offset_step] if isinstance(offset_step, (int, float)) else offset_step:
                plus = totals(base, _offset_shift(probe, decision, action, h))
                minus = totals(base, _offset_shift(probe, decision, action, -h))
                differences.append((plus - minus) / (2 * h))
            return np.mean(differences, axis=0)
        value = float(getattr(base.config, p))
        h = rel_step * value
        return (totals(make_scenario({p: value + h})) - totals(make_scenario({p: value - h}))) / (2 * h)

    grads: dict[str, list[np.ndarray]] = {p: [] for p in parameters}
    fds: dict[str, list[np.ndarray]] = {p: [] for p in parameters}
    for seed in seeds:
        sim = Simulation(
            base, pop, policy, seed=seed, differentiable=True, estimator=estimator, device=device
        )
        weekly = weekly_totals(sim.run(steps).series[quantity], period)
        inputs = [sim.params[f"offsets.{decision}"] if p == "offsets" else sim.params[p] for p in parameters]
        rows = []
        for w in range(len(weekly)):
            g = torch.autograd.grad(weekly[w], inputs, retain_graph=True, allow_unused=True)
            rows.append(
                [
                    0.0 if gi is None else float(gi[:, action].sum() if p == "offsets" else gi)
                    for p, gi in zip(parameters, g, strict=True)
                ]
            )
        table = np.array(rows)  # (weeks, parameters)
        fd_policy = policy
        if replay:
            fd_policy = ReplayPolicy(policy)
            with torch.no_grad():  # records the base run's decisions
                Simulation(base, pop, fd_policy, seed=seed, device=device).run(steps)
        for j, p in enumerate(parameters):
            grads[p].append(table[:, j])
            fds[p].append(finite_difference(fd_policy, seed, p))
    out = []
    for p in parameters:
        g, f = np.array(grads[p]), np.array(fds[p])
        out.append(GradCheck(p, estimator, g.mean(0), f.mean(0), g.std(0), f.std(0)))
    return out
