"""The CUDA path checked against the CPU path: what a GPU run gives, and where a GPU step waits on the host.

Four checks, each printed as it ends, then all figures as one JSON line:

1. **Trajectory**: one population built on the CPU (``--agents``, seed 7), the COVID scenario (all contact
   layers, heuristic policy, inference mode) run ``--days`` days with seed 1 on the CPU and on ``--device``;
   per quantity, whether the series are equal and their largest difference against the CPU's largest value.
   The random draws are integer hashes (the same bits on any device); sums of floats may be added in
   another order on a GPU, which can move an agent whose draw lies within rounding of its probability.
2. **Gradient**: the same in differentiable mode (``--grad-agents``, 21 days): the gradient of each week's
   reported cases with respect to ``beta`` on both devices.
3. **Synthesis**: a population of ``--synth-agents`` built on the device (with the device's random numbers,
   so other agents than the CPU's, and in chunks when ``--chunk`` is given) against one built on the CPU:
   columns and dtypes, households, schools and workplaces, and each column's mean.
4. **Host round-trips**: a run on the device with ``torch.cuda.set_sync_debug_mode("warn")``: the
   operations that made the device wait for the host, per step, by the line of lpm that asked for them.
5. **Sharded**: the run of check 1 over ``--nproc`` processes on the device (:func:`lpm.distributed.run`:
   NCCL between GPUs, gloo between CPU processes), each rank drawing the population on its device,
   against one process on the device: whether the records are equal. One process (the default where the
   machine has one GPU) still runs the whole NCCL path: the process group, the all-reduces of a day's
   sums and the broadcast of each decision, all on the GPU.

    python benchmarks/cuda_check.py [--device cuda] [--agents 200000] [--days 28] [--nproc P]

``--device cpu`` runs the same comparisons CPU against CPU (the checks' own test; no sync count).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
import warnings

import torch

from lpm import distributed
from lpm.engine import Simulation
from lpm.gradcheck import weekly_totals
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario

SEED = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trajectory(pop: Population, days: int, device: str) -> dict:
    """Check 1: the run on the CPU and on ``device`` from the same population and seed."""
    series, seconds = {}, {}
    for where in ("cpu", device):
        sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=SEED, device=where)
        _sync(sim.device)
        t0 = time.perf_counter()
        result = sim.run(days)
        _sync(sim.device)
        seconds[where] = time.perf_counter() - t0
        series[where] = {k: v.detach().cpu().double() for k, v in result.series.items()}
    quantities = {}
    for name, cpu in series["cpu"].items():
        other = series[device][name]
        scale = float(cpu.abs().max()) or 1.0
        quantities[name] = {
            "equal": bool(torch.equal(cpu, other)),
            "max_abs_diff": float((cpu - other).abs().max()),
            "relative_to_max": float((cpu - other).abs().max()) / scale,
            "total_cpu": float(cpu.sum()),
            "total_device": float(other.sum()),
        }
    return {"agents": len(pop), "days": days, "seconds": seconds, "quantities": quantities}


def gradient(pop: Population, days: int, device: str) -> dict:
    """Check 2: d(weekly reported cases)/d beta on the CPU and on ``device``, same population and seed."""
    rows = {}
    for where in ("cpu", device):
        sim = Simulation(
            make_scenario("covid"), pop, HeuristicPolicy(), seed=SEED, device=where, differentiable=True
        )
        weekly = weekly_totals(sim.run(days).series["reported_cases"])
        beta = sim.params["beta"]
        rows[where] = [
            float(torch.autograd.grad(weekly[w], beta, retain_graph=True)[0]) for w in range(len(weekly))
        ]
        rows[f"{where}_weekly"] = weekly.detach().cpu().tolist()
    ratio = [d / c if c else float("nan") for c, d in zip(rows["cpu"], rows[device], strict=True)]
    return {
        "agents": len(pop),
        "days": days,
        "grad_cpu": rows["cpu"],
        "grad_device": rows[device],
        "ratio": ratio,
    }


def synthesis(agents: int, device: str, chunk: int | None) -> dict:
    """Check 3: a population built on ``device`` against one built on the CPU."""
    built, seconds = {}, {}
    for where in ("cpu", device):
        t0 = time.perf_counter()
        built[where] = Population.synthesize("nyc", agents=agents, seed=7, device=where, chunk_agents=chunk)
        _sync(torch.device(where))
        seconds[where] = time.perf_counter() - t0
    cpu, other = built["cpu"], built[device]
    columns = {}
    for name in cpu.columns:
        a, b = cpu[name], other[name]
        columns[name] = {
            "dtype_cpu": str(a.dtype),
            "dtype_device": str(b.dtype),
            "on_device": b.device.type == torch.device(device).type,
            "mean_cpu": float(a.double().mean()),
            "mean_device": float(b.cpu().double().mean()),
        }
    household = other["household"].cpu().long()
    return {
        "agents": [len(cpu), len(other)],
        "seconds": seconds,
        "chunk_agents": chunk,
        "meta_cpu": {k: v for k, v in cpu.meta.items() if isinstance(v, int | float)},
        "meta_device": {k: v for k, v in other.meta.items() if isinstance(v, int | float)},
        "households_contiguous": bool((household[1:] >= household[:-1]).all()),
        "columns": columns,
    }


def host_waits(pop: Population, days: int, device: str) -> dict:
    """Check 4: the device's waits on the host during a run, per step, by the lpm line that caused them."""
    where = collections.Counter()
    caught: list = []
    marks: list[int] = []  # the waits caught by the end of each step

    def count(t: int, sim: Simulation) -> None:
        marks.append(sum("synchroniz" in str(w.message) for w in caught))

    sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=SEED, device=device, callback=count)
    with warnings.catch_warnings(record=True) as record:
        caught = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sim.run(days)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename.rsplit('/lpm/', 1)[-1]}:{w.lineno}"] += 1
    per_step = [b - a for a, b in zip([0, *marks[:-1]], marks, strict=True)]
    return {
        "agents": len(pop),
        "days": days,
        "waits": dict(where.most_common()),
        "per_step": per_step,
        "total": sum(where.values()),
    }


def _parts(agents: int, device: str, rank: int):
    """Rank ``rank``'s scenario, population (drawn on its device) and policy."""
    pop = Population.synthesize("nyc", agents=agents, seed=7, device=distributed.rank_device(device, rank))
    return make_scenario("covid"), pop, HeuristicPolicy()


def sharded(agents: int, days: int, device: str, nproc: int) -> dict:
    """Check 5: the run over ``nproc`` processes on ``device`` against one process there."""
    scenario, pop, policy = _parts(agents, device, 0)
    t0 = time.perf_counter()
    one = Simulation(scenario, pop, policy, seed=SEED, device=device).run(days)
    seconds = {"one_process": time.perf_counter() - t0}
    t0 = time.perf_counter()
    result = distributed.run(
        functools.partial(_parts, agents, device), days, nproc=nproc, seed=SEED, device=device
    )
    seconds[f"{nproc}_processes_with_start"] = time.perf_counter() - t0
    return {
        "agents": agents,
        "days": days,
        "processes": nproc,
        "backend": distributed.backend_for(device),
        "records_equal": bool(one.trajectory.equals(result.trajectory)),
        "totals_one": {k: float(v.sum()) for k, v in one.series.items()},
        "totals_sharded": {k: float(v.sum()) for k, v in result.series.items()},
        "comm_seconds": float(result.comm_seconds),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    ap.add_argument("--agents", type=int, default=200_000, help="agents of checks 1 and 4")
    ap.add_argument("--days", type=int, default=28, help="days of check 1 (and 4)")
    ap.add_argument("--grad-agents", type=int, default=50_000, help="agents of check 2")
    ap.add_argument("--synth-agents", type=int, default=1_000_000, help="agents of check 3")
    ap.add_argument("--chunk", type=int, default=None, help="chunk size of check 3's device synthesis")
    ap.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes of check 5 (default: the GPUs, at most 2; on the CPU 2)",
    )
    args = ap.parse_args()
    nproc = args.nproc or (min(torch.cuda.device_count(), 2) if args.device.startswith("cuda") else 2)
    figures: dict = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps({k: v for k, v in figures.items()}), flush=True)
    pop = Population.synthesize("nyc", agents=args.agents, seed=7)
    checks = {
        "trajectory": lambda: trajectory(pop, args.days, args.device),
        "gradient": lambda: gradient(
            Population.synthesize("nyc", agents=args.grad_agents, seed=7), 21, args.device
        ),
        "synthesis": lambda: synthesis(args.synth_agents, args.device, args.chunk),
    }
    checks["sharded"] = lambda: sharded(args.agents, args.days, args.device, nproc)
    if args.device.startswith("cuda"):
        checks["host_waits"] = lambda: host_waits(pop, min(args.days, 9), args.device)
    for name, check in checks.items():
        try:
            figures[name] = check()
        except Exception as exc:  # noqa: BLE001 - a failed check is a figure too; the others still run
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
            import traceback

            traceback.print_exc()
        print(name, json.dumps(figures[name]), flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
