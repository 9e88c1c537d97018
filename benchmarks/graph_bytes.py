"""Bytes per agent per simulated day that a differentiable COVID run's autograd graph holds, week by week.

What ``lpm calibrate``'s memory plan counts (``lpm.calibration.GRAPH_BYTES_PER_AGENT_STEP``): the graph grows
as more agents become infectious, so the plan takes the largest weekly mean through the spring 2020 peak
(default: 8 weeks from 2020-03-01, the heuristic policy, 200,000 agents). Each estimator runs in a child
process whose allocator maps every large array on its own (``MALLOC_MMAP_THRESHOLD_=65536``), so that its
resident memory follows the graph; the growth of resident memory over each week, per agent and day, is
the figure. Prints a table and, last, all figures as one JSON line.

    python benchmarks/graph_bytes.py [--agents 200000] [--weeks 8] [--estimators pruned households expected]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from lpm.calibration import GRAPH_BYTES_PER_AGENT_STEP


def _rss_kib() -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _child(estimator: str, agents: int, weeks: int, start: str) -> None:
    from lpm.engine import Simulation
    from lpm.policy import HeuristicPolicy
    from lpm.population import Population
    from lpm.scenarios import make_scenario

    pop = Population.synthesize("nyc", agents=agents, seed=7)
    sim = Simulation(
        make_scenario("covid", start=start),
        pop,
        HeuristicPolicy(),
        seed=1,
        differentiable=True,
        estimator=estimator,
    )
    state = sim.step(sim.initial_state(), 0)  # the first decision day, before the weeks measured
    before, t, weekly = _rss_kib(), 1, []
    t0 = time.perf_counter()
    for _ in range(weeks):
        for _ in range(7):
            state = sim.step(state, t)
            t += 1
        now = _rss_kib()
        weekly.append(round((now - before) * 1024 / agents / 7, 1))
        before = now
    seconds = time.perf_counter() - t0
    print(json.dumps({"estimator": estimator, "weekly": weekly, "forward_seconds": round(seconds, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200_000, help="agents (default 200,000)")
    ap.add_argument("--weeks", type=int, default=8, help="weeks measured after the first day (default 8)")
    ap.add_argument("--start", default="2020-03-01", help="start date (default 2020-03-01)")
    ap.add_argument(
        "--estimators",
        nargs="+",
        default=list(GRAPH_BYTES_PER_AGENT_STEP),
        help="gradient estimators (default: those the memory plan counts)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.agents, args.weeks, args.start)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for estimator in args.estimators:
        cmd = [sys.executable, __file__, "--child", estimator, "--agents", str(args.agents)]
        cmd += ["--weeks", str(args.weeks), "--start", args.start]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["largest_week"] = max(row["weekly"])
        row["plan"] = GRAPH_BYTES_PER_AGENT_STEP.get(estimator)
        rows.append(row)
        weeks = " ".join(f"{b:6.1f}" for b in row["weekly"])
        print(
            f"{estimator:>10}: bytes per agent per day, weeks 1-{args.weeks}: {weeks}; largest "
            f"{row['largest_week']}; the plan counts {row['plan']}"
        )
    print(json.dumps({"agents": args.agents, "start": args.start, "weeks": args.weeks, "estimators": rows}))


if __name__ == "__main__":
    main()
