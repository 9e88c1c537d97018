"""Gradient calibration against Optuna on the same loss, population, parameters and starting point.

One population, one scenario and train window, the loss :func:`lpm.calibration.calibrate` minimises (the
mean squared error of log(weekly sum + 2 % of the borough's peak) per borough for COVID cases; of the rate
in percentage points for labor), fitted to data the simulator made at known parameters (the mean over four
seeds; ``--data real``: the real series) from the scenario's configured values:

- lpm: :func:`~lpm.calibration.calibrate`, Adam through the differentiable engine, one differentiable run of
  the train window per epoch (a fresh seed each), ``--sims`` epochs; its answer after n simulations is the
  mean of the last fifth of its n iterates (what ``calibrate(epochs=n)`` returns).
- Optuna: a study over the same parameters and ranges (``Scenario.parameter_ranges()``, linear), the
  starting values enqueued as the first trial, one inference run per trial (a fresh seed each) scored by
  :func:`~lpm.calibration.run_loss`, ``--optuna-sims`` trials; its answer after n simulations is the best
  trial among the first n. Samplers: TPE and CMA-ES (from the starting values; needs ``cmaes``).

Both answers are scored every ``--every`` simulations by the same ``--eval-seeds`` fresh seeds (inference
runs, not counted in the budget or the wall time), so a loss reached is not a lucky seed. The equal-budget
comparison is each method's scored loss after ``--sims`` simulations. The target loss is 1.1 × the larger of
lpm's scored loss at the end and the truth's (below the truth's own loss a fit only matches the data's noise;
``--target-loss`` sets it); the ratios are Optuna's simulations and wall time to reach it over lpm's (a lower
bound, ``>``, when Optuna does not reach it within its budget). Wall time is each method's own: lpm's from
the call to ``calibrate`` to the end of each epoch (its setup included), Optuna's from the study's creation to
the end of each trial (its sampler included), after a warm-up of both (one-time costs of the process).
Runs use ``--threads`` torch threads (default 1: the development machine is shared). Prints a table per
repeat and, with ``--plot``, saves the scored loss against simulations and wall time; the last line is all
figures as one JSON object.

    .venv/bin/python benchmarks/calibration.py [--scenario covid|labor] [--agents 50000] [--sims 60]
        [--optuna-sims 300] [--every 5] [--eval-seeds 4] [--data simulated|real] [--parameters beta ...]
        [--truth beta=0.06 ...] [--samplers tpe cmaes] [--lr 0.1] [--repeats 1] [--seed 0]
        [--target-loss X] [--threads 1] [--plot docs/calibration-benchmark.png]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Mapping

import numpy as np
import optuna
import pandas as pd
import torch

from lpm.calibration import Window, calibrate, fit_quantity, real_target, run_loss, window_steps
from lpm.engine import Simulation
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario
from lpm.scenarios.base import compared_period, period_sums

#: Per scenario: the train window, the fitted parameters and the values that make the simulated data.
SETUPS = {
    "covid": {
        "train": "2020-03-16:2020-04-12",
        "parameters": ["beta", "detected", "community_pause"],
        "truth": {"beta": 0.06, "detected": 0.15, "community_pause": 0.45},
    },
    "labor": {
        "train": "2020-03-01:2020-08-01",
        "parameters": ["layoff", "job_finding", "withdrawal"],
        "truth": {"layoff": 0.25, "job_finding": 0.4, "withdrawal": 0.1},
    },
}
DATA_SEEDS = (11, 12, 13, 14)
TARGET = "1.1 x the larger of lpm's final scored loss and the truth's"
EVAL_SEED = 500_000
TRIAL_SEED = 10_000


class Problem:
    """The scenario, population, train window and real series both methods fit, and the shared scorer."""

    def __init__(self, name: str, pop: Population, train: Window, truth: Mapping[str, float] | None):
        self.name, self.pop, self.train = name, pop, train
        self.policy = HeuristicPolicy()
        self.base = self.scenario({})
        self.q = fit_quantity(self.base)
        self.period = compared_period(self.base, self.q)
        self.steps, _ = window_steps(self.base, train, None, self.period)
        #: the real-data frame calibrate() is given (None: the scenario's real series)
        self.target = None if truth is None else self._simulated(truth)
        labels = pop.labels(self.q.by) if self.q.by else ["all"]
        world = Simulation(self.base, pop, self.policy, seed=0).world
        real = real_target(self.base, world, self.q, labels, self.steps, self.target)
        self.real = period_sums(real, self.period)
        self._scored: dict[tuple, float] = {}

    def _simulated(self, truth: Mapping[str, float]) -> pd.DataFrame:
        """The mean over :data:`DATA_SEEDS` of the simulator's series at ``truth``, as a real-data frame."""
        frames = []
        for s in DATA_SEEDS:
            sim = Simulation(self.scenario(truth), self.pop, self.policy, seed=s)
            frames.append(sim.run(self.steps).trajectory)
        keys = [c for c in frames[0].columns if c not in ("step", "value")]
        return pd.concat(frames).groupby(keys, observed=True)["value"].mean().reset_index()

    def scenario(self, values: Mapping[str, float]):
        return make_scenario(self.name, {"start": self.train.first.date(), **values})

    def loss(self, values: Mapping[str, float], seed: int) -> float:
        """The calibration loss of one inference run of the train window at ``values`` (the step loop, not
        ``Simulation.run``, which also builds the run's frames: the peer pays no more than it needs)."""
        sim = Simulation(self.scenario(values), self.pop, self.policy, seed=seed)
        with torch.no_grad():
            state = sim.initial_state()
            for t in range(self.steps):
                state = sim.step(state, t)
        series = sim.recorded(self.q.name).double().reshape(self.steps, -1)
        return run_loss(series, self.real, self.period)

    def score(self, values: Mapping[str, float], seeds: int) -> float:
        """The mean loss over the same ``seeds`` fresh seeds for every method (cached per values)."""
        key = tuple(sorted(values.items()))
        if key not in self._scored:
            self._scored[key] = float(np.mean([self.loss(values, EVAL_SEED + s) for s in range(seeds)]))
        return self._scored[key]


def run_lpm(problem: Problem, names: list[str], sims: int, lr: float, seed: int) -> dict:
    """calibrate() for ``sims`` epochs; the iterates, each epoch's loss and the wall time at its end."""
    ends: list[float] = []
    started = time.perf_counter()

    def progress(phase: str, done: int, total: int, loss: float | None) -> None:
        if phase == "fit":
            ends.append(time.perf_counter() - started)

    cal = calibrate(
        lambda o: make_scenario(problem.name, dict(o)),
        problem.pop,
        problem.policy,
        train=problem.train,
        parameters=names,
        epochs=sims,
        lr=lr,
        restarts=1,
        seed=seed,
        eval_seeds=1,
        target=problem.target,
        progress=progress,
    )
    iterates = cal.iterates[0]

    def answer(n: int) -> dict[str, float]:  # calibrate(epochs=n)'s fit: the mean of the last fifth
        tail = iterates[n - max(1, n // 5) : n]
        return {p: float(np.mean([it[p] for it in tail])) for p in names}

    assert all(math.isclose(answer(sims)[p], cal.parameters[p], rel_tol=1e-9) for p in names)
    return {"answer": answer, "values": cal.losses[0], "wall": ends, "initial": cal.initial}


def run_optuna(
    problem: Problem, names: list[str], initial: dict[str, float], sims: int, sampler: str, seed: int
) -> dict:
    """An Optuna study of ``sims`` trials from ``initial``; the trials, their losses and wall times."""
    ranges = type(problem.base).parameter_ranges()
    bounds = {}
    for p in names:
        lo, hi = ranges[p]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SystemExit(f"--parameters: {p} has the open range {lo} .. {hi}; Optuna needs finite bounds")
        eps = 1e-6 * (hi - lo)  # the open ends (gt=0, lt=1) are excluded, as lpm's logistic map does
        bounds[p] = (lo + eps, hi - eps)
    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed)
    else:
        with warnings.catch_warnings():  # x0 is deprecated since Optuna 4.9 and still honoured (5.0)
            warnings.filterwarnings("ignore", message=".*x0", category=FutureWarning)
            chosen = optuna.samplers.CmaEsSampler(x0=dict(initial), seed=seed)
    ends: list[float] = []
    started = time.perf_counter()
    study = optuna.create_study(direction="minimize", sampler=chosen)
    study.enqueue_trial(dict(initial))

    def objective(trial: optuna.Trial) -> float:
        values = {p: trial.suggest_float(p, *bounds[p]) for p in names}
        return problem.loss(values, TRIAL_SEED + 1000 * seed + trial.number)

    study.optimize(
        objective, n_trials=sims, callbacks=[lambda study, trial: ends.append(time.perf_counter() - started)]
    )
    trials = study.trials

    def answer(n: int) -> dict[str, float]:  # the best of the first n trials (study.best_params at n)
        return dict(min(trials[:n], key=lambda t: t.value).params)

    return {"answer": answer, "values": [t.value for t in trials], "wall": ends}


def reached(curve: list[tuple[int, float]], wall: list[float], target: float) -> dict:
    """The first checkpoint whose scored loss is at most ``target``: its simulations and wall time."""
    for n, loss in curve:
        if n and loss <= target:
            return {"sims": n, "wall_s": round(wall[n - 1], 2)}
    return {"sims": None, "wall_s": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SETUPS), default="covid")
    ap.add_argument("--agents", type=int, default=50_000)
    ap.add_argument("--sims", type=int, default=60, help="simulations per method (lpm epochs, Optuna trials)")
    ap.add_argument(
        "--optuna-sims",
        type=int,
        default=300,
        help="Optuna's budget (its loss at --sims is the equal-budget comparison; the rest is to see when it "
        "reaches the target)",
    )
    ap.add_argument("--every", type=int, default=5, help="score both answers every this many simulations")
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--data", choices=["simulated", "real"], default="simulated")
    ap.add_argument("--parameters", nargs="+", help="default: per scenario (SETUPS)")
    ap.add_argument("--truth", nargs="+", metavar="NAME=VALUE", help="the values that make the data")
    ap.add_argument("--samplers", nargs="+", choices=["tpe", "cmaes"], default=["tpe", "cmaes"])
    ap.add_argument("--lr", type=float, default=0.1, help="lpm's Adam step (unconstrained space)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats with other seeds (both methods)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-loss", type=float, help=f"default: {TARGET} (real data: lpm's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", help="save the scored loss against simulations and wall time (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = SETUPS[args.scenario]
    if "cmaes" in args.samplers:
        try:
            import cmaes  # noqa: F401  (Optuna's CmaEsSampler imports it lazily)
        except ImportError:
            print(
                "the cmaes package is not installed: leaving out Optuna's CMA-ES sampler (pip install cmaes)"
            )
            args.samplers = [x for x in args.samplers if x != "cmaes"]
    names = args.parameters or setup["parameters"]
    truth = dict(setup["truth"])
    for item in args.truth or []:
        key, _, value = item.partition("=")
        truth[key] = float(value)
    truth = {p: truth[p] for p in names if p in truth} if args.data == "simulated" else {}
    if args.data == "simulated" and set(truth) != set(names):
        raise SystemExit(f"--truth: give a value for each of {names} (have {sorted(truth)})")

    t0 = time.perf_counter()
    pop = Population.synthesize("nyc", agents=args.agents, seed=0)
    train = Window.parse(setup["train"], "--train")
    problem = Problem(args.scenario, pop, train, truth if args.data == "simulated" else None)
    rule = TARGET if args.data == "simulated" else "1.1 x lpm's final scored loss"
    print(
        f"{args.scenario}, {len(pop):,} agents, train {train} ({problem.steps} {problem.base.step_unit}s), "
        f"data: {args.data}" + (f" at {truth}" if args.data == "simulated" else "") + f"; fitting {names}; "
        f"budget {args.sims} simulations each, scored every {args.every} by {args.eval_seeds} fresh seeds; "
        f"{args.threads} thread(s); setup {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    # warm-up: one-time costs of the process (first reads, first backward pass) are neither side's
    configured = problem.base.config.model_dump(include=set(names))
    problem.loss(configured, seed=0)
    run_lpm(problem, names, 1, args.lr, seed=999_999)
    for sampler in args.samplers:
        run_optuna(problem, names, configured, 2, sampler, seed=999_999)

    def checkpoints(budget: int) -> list[int]:
        return sorted({0, *range(args.every, budget, args.every), args.sims, budget})

    optuna_sims = max(args.optuna_sims, args.sims)
    repeats = []
    for r in range(args.repeats):
        seed = args.seed + 1000 * r  # calibrate() seeds epoch e of seed s with s + 1000 + e
        methods = {"lpm": run_lpm(problem, names, args.sims, args.lr, seed)}
        initial = methods["lpm"]["initial"]
        for sampler in args.samplers:
            methods[f"optuna-{sampler}"] = run_optuna(problem, names, initial, optuna_sims, sampler, seed)
        for m in methods.values():
            m["curve"] = [
                (n, problem.score(m["answer"](n) if n else initial, args.eval_seeds))
                for n in checkpoints(len(m["wall"]))
            ]
        truth_loss = problem.score(truth, args.eval_seeds) if args.data == "simulated" else None
        # below the truth's own loss a fit only matches the data's noise: the target is not set under it
        target_loss = args.target_loss or 1.1 * max(methods["lpm"]["curve"][-1][1], truth_loss or 0.0)
        rows = {}
        print(
            f"\nrepeat {r} (seed {seed}): start scores {methods['lpm']['curve'][0][1]:.4f}"
            + (f", the truth scores {truth_loss:.4f}" if truth_loss is not None else "")
            + f"; target loss {target_loss:.4f} ("
            + ("given" if args.target_loss else rule)
            + ")"
        )
        print(
            f"{'method':>13} {'sims':>5} {f'loss@{args.sims}':>9} {'loss@end':>9} {'sims→target':>11} "
            f"{'wall→target':>11} {'wall total':>10} "
            f"{'s/sim':>6}  final parameters (relative error)"
        )
        for key, m in methods.items():
            budget = len(m["wall"])
            final = m["answer"](budget)
            at_budget = dict(m["curve"])[args.sims]
            per_sim = float(np.median(np.diff([0.0, *m["wall"]])[1:]))
            errors = {p: abs(final[p] - truth[p]) / truth[p] for p in truth}
            hit = reached(m["curve"], m["wall"], target_loss)
            rows[key] = {
                "sims": budget,
                f"loss_at_{args.sims}": round(at_budget, 5),
                "loss_end": round(m["curve"][-1][1], 5),
                "to_target": hit,
                "wall_total_s": round(m["wall"][-1], 2),
                "seconds_per_sim": round(per_sim, 3),
                "parameters": {p: round(v, 5) for p, v in final.items()},
                "relative_error": {p: round(v, 4) for p, v in errors.items()},
                "mean_relative_error": round(float(np.mean(list(errors.values()))), 4) if errors else None,
                "curve": [[n, round(v, 5)] for n, v in m["curve"]],
                "values": [round(float(v), 5) for v in m["values"]],
                "wall": [round(w, 2) for w in m["wall"]],
            }
            fit = ", ".join(
                f"{p} {v:.4g}" + (f" ({errors[p]:.0%})" if p in errors else "") for p, v in final.items()
            )
            to_target = f"{hit['sims']}" if hit["sims"] else f">{budget}"
            wall_to = f"{hit['wall_s']:.1f} s" if hit["sims"] else f">{m['wall'][-1]:.0f} s"
            print(
                f"{key:>13} {budget:5d} {at_budget:9.4f} {m['curve'][-1][1]:9.4f} {to_target:>11} {wall_to:>11} "
                f"{m['wall'][-1]:8.1f} s {per_sim:6.2f}  {fit}"
            )
        lpm_hit = rows["lpm"]["to_target"]
        for key in rows:
            if key == "lpm":
                continue
            hit = rows[key]["to_target"]
            bound = hit["sims"] is None
            sims = hit["sims"] or rows[key]["sims"]
            wall = hit["wall_s"] or rows[key]["wall_total_s"]
            if lpm_hit["sims"] is None:  # a given --target-loss lpm did not reach either
                rows[key]["ratio"] = {"sims": None, "wall": None, "lower_bound": None}
                print(f"lpm did not reach {target_loss:.4f}: no ratio")
                continue
            rows[key]["ratio"] = {
                "sims": round(sims / lpm_hit["sims"], 2),
                "wall": round(wall / lpm_hit["wall_s"], 2),
                "lower_bound": bound,
            }
            sign = ">" if bound else ""
            print(
                f"ratio {key} / lpm to reach {target_loss:.4f}: simulations {sign}{sims / lpm_hit['sims']:.2f}x, "
                f"wall time {sign}{wall / lpm_hit['wall_s']:.2f}x"
                + (" (not reached within the budget: a lower bound)" if bound else "")
            )
        diff_cost = rows["lpm"]["seconds_per_sim"]
        for key in rows:
            if key != "lpm":
                print(
                    f"a differentiable run (forward + backward) costs {diff_cost / rows[key]['seconds_per_sim']:.1f}x "
                    f"an inference run + {key}'s sampler ({diff_cost:.2f} s vs {rows[key]['seconds_per_sim']:.2f} s)"
                )
        repeats.append(
            {
                "seed": seed,
                "target_loss": round(target_loss, 5),
                "start_loss": round(methods["lpm"]["curve"][0][1], 5),
                "truth_loss": None if truth_loss is None else round(truth_loss, 5),
                "methods": rows,
            }
        )

    summary = {}
    for key in repeats[0]["methods"]:
        if key == "lpm":
            continue
        at_budget = [
            rep["methods"][key][f"loss_at_{args.sims}"] / rep["methods"]["lpm"][f"loss_at_{args.sims}"]
            for rep in repeats
        ]
        ratios = [x for x in (rep["methods"][key]["ratio"] for rep in repeats) if x["sims"] is not None]
        summary[key] = {
            f"loss_at_{args.sims}_ratio_median": round(float(np.median(at_budget)), 2),
            "reached": sum(not x["lower_bound"] for x in ratios),
            "repeats": len(repeats),
            # a lower bound when a repeat's figure is (Optuna did not reach the target within its budget)
            "sims_ratio_median": float(np.median([x["sims"] for x in ratios])) if ratios else None,
            "wall_ratio_median": float(np.median([x["wall"] for x in ratios])) if ratios else None,
            "any_lower_bound": any(x["lower_bound"] for x in ratios),
        }
    for key, s in summary.items():
        line = (
            f"{key} / lpm, median over {len(repeats)} repeat(s): scored loss after {args.sims} simulations "
            f"{s[f'loss_at_{args.sims}_ratio_median']:.1f}x; reached the target in {s['reached']} of "
            f"{len(repeats)}"
        )
        if s["sims_ratio_median"] is not None:
            sign = ">=" if s["any_lower_bound"] else ""
            line += (
                f"; to reach it: simulations {sign}{s['sims_ratio_median']:.2f}x, wall time "
                f"{sign}{s['wall_ratio_median']:.2f}x"
                + (" (>=: lower bounds enter the median)" if s["any_lower_bound"] else "")
            )
        print(line)
    if args.plot:
        plot(repeats, args, names)
        print(f"saved {args.plot}")
    figures = {
        "scenario": args.scenario,
        "agents": len(pop),
        "train": str(train),
        "data": args.data,
        "truth": truth if args.data == "simulated" else None,
        "parameters": names,
        "sims": args.sims,
        "optuna_sims": optuna_sims,
        "every": args.every,
        "eval_seeds": args.eval_seeds,
        "lr": args.lr,
        "threads": args.threads,
        "target": f"given {args.target_loss}" if args.target_loss else rule,
        "optuna": optuna.__version__,
        "torch": torch.__version__,
        "repeats": repeats,
        "summary": summary,
    }
    print(json.dumps(figures))


def plot(repeats: list[dict], args: argparse.Namespace, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    colors: dict[str, str] = {}
    for rep in repeats:
        for key, row in rep["methods"].items():
            color = colors.setdefault(key, f"C{len(colors)}")
            sims = [n for n, _ in row["curve"]]
            loss = [v for _, v in row["curve"]]
            wall = [0.0 if n == 0 else row["wall"][n - 1] for n in sims]
            first = rep is repeats[0]
            axes[0].plot(sims, loss, color=color, marker=".", label=key if first else None)
            axes[1].plot(wall, loss, color=color, marker=".")
        for ax in axes:
            ax.axhline(rep["target_loss"], color="grey", ls=":", lw=0.8)
            if rep["truth_loss"] is not None:
                ax.axhline(rep["truth_loss"], color="k", ls="--", lw=0.8)
    axes[0].set_xlabel("simulations (lpm: differentiable runs; Optuna: inference runs)")
    axes[1].set_xlabel("wall seconds")
    axes[0].set_ylabel(f"loss, mean of {args.eval_seeds} fresh seeds")
    axes[0].set_yscale("log")
    axes[0].plot([], [], color="grey", ls=":", label="target")
    if repeats[0]["truth_loss"] is not None:
        axes[0].plot([], [], color="k", ls="--", label="the truth's loss")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{args.scenario}, {args.agents:,} agents, fitting {', '.join(names)} to {args.data} data", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(args.plot, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
