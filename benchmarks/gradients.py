"""Gradient estimators against finite differences of the stochastic COVID model, per week.

For each estimator (``pruned``, the default; ``households``, ``expected``, ``bernoulli``, ``mean-field``) and
parameter, prints the ratio of the gradient of each week's citywide reported cases to central finite
differences of the inference run (common random numbers, the same seeds; both averaged over the seeds),
and the relative standard errors
over the seeds of the finite differences (their noise) and of the gradient. Decisions come from a rule that
does not read the simulated cases (isolation by age only), so the numbers isolate the estimator. The last
line is all figures as one JSON object.

    .venv/bin/python benchmarks/gradients.py [--agents 50000] [--weeks 8] [--seeds 1 2 3 4]
        [--start 2020-04-01] [--estimators pruned households expected bernoulli mean-field]
        [--parameters beta ...] [--policy fixed|heuristic] [--replay] [--literature]
        [--rel-step 0.05] [--offset-step 0.2 [0.4 ...]] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lpm.gradcheck import check
from lpm.policy import HeuristicPolicy, age_of, sigmoid
from lpm.population import Population
from lpm.scenarios.covid import CovidScenario


def fixed_isolation(rows, ctx):
    """P(isolate) by age only: about 27 % at 40, not reading the simulated cases."""
    return sigmoid(-1.0 + 0.03 * (age_of(rows) - 40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50_000)
    ap.add_argument("--weeks", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--start", default="2020-04-01")
    ap.add_argument(
        "--estimators", nargs="+", default=["pruned", "households", "expected", "bernoulli", "mean-field"]
    )
    ap.add_argument("--parameters", nargs="+", default=["beta", "community_pause", "detected", "offsets"])
    ap.add_argument(
        "--policy",
        choices=["fixed", "heuristic"],
        default="fixed",
        help="fixed: isolation by age only (isolates the estimator); heuristic: the default rule, which reads "
        "the simulated cases (the gradient leaves that path out, the finite difference keeps it: what "
        "detaching the decisions' context costs)",
    )
    ap.add_argument(
        "--replay",
        action="store_true",
        help="finite differences replay each seed's base-run decisions (held fixed, as in the gradient); "
        "with --policy heuristic, replay/react of the finite differences is what the reaction adds",
    )
    ap.add_argument(
        "--literature",
        action="store_true",
        help="the parameter values from the literature (calibrated=False; the tests' setting) instead of the "
        "calibrated defaults",
    )
    ap.add_argument(
        "--rel-step", type=float, default=0.05, help="finite-difference step, relative (default 0.05)"
    )
    ap.add_argument(
        "--offset-step",
        type=float,
        nargs="+",
        default=[0.2],
        help="finite-difference step(s) of an offset; several: their central differences averaged per seed "
        "(default 0.2)",
    )
    ap.add_argument("--device", default="cpu", help="where the runs compute: cpu or cuda (default cpu)")
    args = ap.parse_args()
    pop = Population.synthesize("nyc", agents=args.agents, seed=0)
    policy = (
        HeuristicPolicy(rules={"isolate": fixed_isolation}) if args.policy == "fixed" else HeuristicPolicy()
    )
    figures: dict = {
        "agents": args.agents,
        "start": args.start,
        "seeds": args.seeds,
        "policy": args.policy,
        "replay": args.replay,
        "calibrated": not args.literature,
        "rel_step": args.rel_step,
        "offset_step": args.offset_step,
        "device": args.device,
        "results": [],
    }
    for estimator in args.estimators:
        t0 = time.perf_counter()
        results = check(
            lambda kw: CovidScenario({"start": args.start, **kw}, calibrated=not args.literature),
            pop,
            policy,
            parameters=args.parameters,
            quantity="reported_cases",
            steps=7 * args.weeks,
            seeds=args.seeds,
            estimator=estimator,
            replay=args.replay,
            rel_step=args.rel_step,
            offset_step=args.offset_step,
            device=args.device,
        )
        for r in results:
            with np.errstate(divide="ignore", invalid="ignore"):  # nan where the parameter does not act yet
                se = r.fd_sd / np.sqrt(len(args.seeds)) / np.abs(r.fd)
                grad_se = r.grad_sd / np.sqrt(len(args.seeds)) / np.abs(r.grad)
            print(
                f"{estimator:>10} {r.parameter:>16}  gradient / finite difference per week: "
                + " ".join(f"{x:5.2f}" for x in r.ratio)
                + "   (finite-difference standard error: "
                + " ".join(f"{x:4.0%}" for x in se)
                + "; gradient's: "
                + " ".join(f"{x:4.0%}" for x in grad_se)
                + ")",
                flush=True,
            )
            figures["results"].append(
                {
                    "estimator": estimator,
                    "parameter": r.parameter,
                    "ratio": [round(float(x), 4) for x in r.ratio],
                    "fd_relative_se": [round(float(x), 4) for x in se],
                    "grad_relative_se": [round(float(x), 4) for x in grad_se],
                    "grad": [round(float(x), 3) for x in r.grad],
                    "fd": [round(float(x), 3) for x in r.fd],
                }
            )
        print(f"{estimator}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
