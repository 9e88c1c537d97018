"""Scale: the COVID daily step in one process against the same run sharded over processes (CPU), or on GPUs.

For each agent count (default 1 M and the full city, ≈ 8.34 M; heuristic policy, inference mode, all contact
layers) prints agent-steps per second and bytes per agent of

* one process with 1 torch thread, and with as many threads as the sharded run has processes (the same cores);
* ``--nproc`` processes (:mod:`lpm.distributed`, gloo, 1 thread each), with the share of a step spent in
  communication (time inside all-reduce and broadcast, per rank) and whether its records equal the one
  process run's bit for bit;

the ratio of the sharded run's throughput to one process's, and at the end all figures as one JSON line.

With ``--device cuda`` (e.g. ``--sizes 100000000 1000000000``): one process on one GPU per size, the day
timed after a device synchronisation, with the peak GPU memory per agent
(``torch.cuda.max_memory_allocated``) beside the bytes held; and, where the machine has ``--nproc`` GPUs,
the run sharded over them (NCCL, one GPU per rank) with its ratio and records compared. One process builds
the population where it runs (on the GPU, with the GPU's random numbers), beyond the city's size in chunks
of the city's size (:meth:`Population.synthesize`), so the host holds one chunk's temporaries at a time; a
sharded run's ranks build it on the host (about 70 bytes per agent at its peak) and keep their slice.
A rank's communication time includes waiting inside the collective for a slower rank; its bytes a day
(what it hands to all-reduce and broadcast over the timed days) do not depend on timing.
Each configuration runs in a fresh process (its memory is its own); days 0 and 1 are warm-up (allocations,
the first weekly decision) and the ``--days`` after them are timed from the simulation's step callback.
Bytes per agent: what the run holds per agent (state, population columns, index tensors, broadcast indices,
sampler buffers; :meth:`Simulation.memory`) and the peak resident size of the process per agent it holds
(a rank builds the whole population and world before it keeps its slice, so its peak counts those).

    .venv/bin/python benchmarks/scale.py [--sizes 1000000 full] [--days 6] [--nproc 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lpm import distributed
from lpm.engine import Simulation
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario

WARMUP = 2  # days before the timed ones
SEED = 1


def _peak_rss_bytes() -> int | None:
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _parts(agents: int | None, rank: int = 0, device: str = "cpu"):
    """Scenario, population and policy; the population drawn on the rank's device (as lpm run draws it)."""
    pop = Population.synthesize("nyc", agents=agents, seed=7, device=distributed.rank_device(device, rank))
    return make_scenario("covid"), pop, HeuristicPolicy()


def _probe(folder: str, last: int, marks: list, t: int, sim: Simulation) -> None:
    """Step callback: appends the clock and the communication time so far to ``marks`` after each step; after
    step ``last`` writes the timed days' figures and the run's memory to ``folder/rank-<r>.json``."""
    rank = sim.shard.rank if isinstance(sim, distributed.ShardedSimulation) else 0
    if sim.device.type == "cuda":  # the step's kernels are queued: wait for them before reading the clock
        torch.cuda.synchronize(sim.device)
    marks.append((time.perf_counter(), getattr(sim, "comm_seconds", 0.0), getattr(sim, "comm_bytes", 0)))
    if t != last:
        return
    (clock0, comm0, bytes0), (clock1, comm1, bytes1) = marks[WARMUP - 1], marks[-1]
    held = sum(sim.memory().values())
    record = {
        "rank": rank,
        "agents_here": sim.n,
        "seconds": clock1 - clock0,
        "comm_seconds": comm1 - comm0,
        "comm_bytes": bytes1 - bytes0,
        "held_bytes_per_agent": held,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_device_bytes": torch.cuda.max_memory_allocated(sim.device)
        if sim.device.type == "cuda"
        else None,
    }
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(record))


def _state_bytes_per_agent(result, n: int) -> float:
    state = result.state
    if state is None:
        return float("nan")
    values = [*state.scenario.values(), *state.actions.values()]
    return sum(v.element_size() * v.numel() for v in values if v.shape[:1] == (n,)) / n


def measure(agents: int | None, days: int, nproc: int, threads: int, out: str, device: str = "cpu") -> None:
    """One configuration, in this process: prints its figures as JSON."""
    torch.set_num_threads(threads)
    steps = WARMUP + days
    folder = tempfile.mkdtemp(prefix="lpm-scale-")
    probe = functools.partial(_probe, folder, steps - 1, [])
    if nproc == 1:
        scenario, pop, policy = _parts(agents, device=device)
        n = len(pop)
        sim = Simulation(scenario, pop, policy, seed=SEED, callback=probe, device=device)
        del pop
        result = sim.run(steps)
        state_bytes = _state_bytes_per_agent(result, n)
    else:
        result = distributed.run(
            functools.partial(_parts, agents, device=device),
            steps,
            nproc=nproc,
            seed=SEED,
            callback=probe,
            device=device,
        )
        n, state_bytes = result.agents, None
    ranks = [json.loads(Path(folder, f"rank-{r}.json").read_text()) for r in range(nproc)]
    seconds = max(r["seconds"] for r in ranks)
    Path(out).write_text(
        json.dumps(
            {
                "agents": n,
                "processes": nproc,
                "threads_per_process": threads if nproc == 1 else 1,
                "days_timed": days,
                "seconds": round(seconds, 3),
                "agent_steps_per_s": n * days / seconds,
                "comm_share": [round(r["comm_seconds"] / r["seconds"], 4) for r in ranks]
                if nproc > 1
                else None,
                "comm_bytes_per_day": [r["comm_bytes"] / days for r in ranks] if nproc > 1 else None,
                "held_bytes_per_agent": [round(r["held_bytes_per_agent"], 1) for r in ranks],
                "state_bytes_per_agent": state_bytes,
                "peak_rss_bytes_per_agent_held": [
                    round(r["peak_rss_bytes"] / r["agents_here"], 1) if r["peak_rss_bytes"] else None
                    for r in ranks
                ],
                "peak_device_bytes_per_agent_held": [
                    round(r["peak_device_bytes"] / r["agents_here"], 1) if r["peak_device_bytes"] else None
                    for r in ranks
                ],
                "device": device,
                "records": {k: v.cpu().tolist() for k, v in result.series.items()},
            }
        )
    )


def run_one(agents: int | None, days: int, nproc: int, threads: int, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, __file__, "--measure", str(agents or 0), str(nproc), str(threads), str(out)]
        subprocess.run([*cmd, "--days", str(days), "--device", device], check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1000000", "full"], help="agent counts; 'full': the city")
    ap.add_argument(
        "--days", type=int, default=6, help="days timed after 2 warm-up days (default 6: day 7 decides)"
    )
    ap.add_argument("--nproc", type=int, default=2, help="processes of the sharded run (default 2)")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (processes) or cuda (GPUs; default cpu)"
    )
    ap.add_argument("--measure", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure is not None:
        agents, nproc, threads, out = args.measure
        return measure(int(agents) or None, args.days, int(nproc), int(threads), out, args.device)
    if args.device == "cuda":
        return main_cuda(args)
    distributed.check_nproc(args.nproc)
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {distributed.available_cores()} cores "
        f"available, torch {torch.__version__}",
        "runs": [],
        "ratios": [],
    }
    for size in args.sizes:
        agents = None if size == "full" else int(size)
        runs = {
            "1 process, 1 thread": run_one(agents, args.days, 1, 1),
            f"1 process, {args.nproc} threads": run_one(agents, args.days, 1, args.nproc),
            f"{args.nproc} processes": run_one(agents, args.days, args.nproc, 1),
        }
        sharded = runs[f"{args.nproc} processes"]
        same = all(sharded["records"] == r["records"] for r in runs.values())
        for name, r in runs.items():
            shares = " / ".join(f"{100 * x:.1f}" for x in r["comm_share"] or [])
            comm = f", communication {shares} % of a step (rank 0 / 1 ..)" if shares else ""
            if r["comm_bytes_per_day"]:
                comm += f", {max(r['comm_bytes_per_day']) / 1e3:.0f} kB a day per rank"
            print(
                f"{r['agents']:,} agents, {name}: {r['seconds']:.2f} s for {r['days_timed']} days, "
                f"{r['agent_steps_per_s'] / 1e6:.2f} M agent-steps/s{comm}; held "
                f"{max(r['held_bytes_per_agent']):.1f} B/agent (per rank, of its agents), peak RSS "
                f"{max(x or 0 for x in r['peak_rss_bytes_per_agent_held']):.0f} B per agent held",
                flush=True,
            )
            r.pop("records")
            figures["runs"].append({"name": name, **r})
        ratio = {
            "agents": sharded["agents"],
            "processes": args.nproc,
            "over_1_process_1_thread": sharded["agent_steps_per_s"]
            / runs["1 process, 1 thread"]["agent_steps_per_s"],
            "over_1_process_same_threads": sharded["agent_steps_per_s"]
            / runs[f"1 process, {args.nproc} threads"]["agent_steps_per_s"],
            "records_equal": same,
        }
        figures["ratios"].append(ratio)
        print(
            f"{ratio['agents']:,} agents: {args.nproc} processes / 1 process = "
            f"{ratio['over_1_process_1_thread']:.2f}x (1 thread), {ratio['over_1_process_same_threads']:.2f}x "
            f"({args.nproc} threads); records equal to one process: {same}",
            flush=True,
        )
    print(json.dumps(figures))


def main_cuda(args: argparse.Namespace) -> None:
    """``--device cuda``: per size one process on one GPU, and the run over ``--nproc`` GPUs where the
    machine has them (NCCL); the figures as in :func:`main`, with the peak GPU memory per agent."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU on this machine")
    gpus = torch.cuda.device_count()
    figures: dict = {
        "machine": f"{torch.cuda.get_device_name(0)} ({gpus} GPU(s)), torch {torch.__version__}",
        "runs": [],
        "ratios": [],
    }
    print(figures["machine"], flush=True)
    for size in args.sizes:
        agents = None if size == "full" else int(size)
        runs = {"1 GPU": run_one(agents, args.days, 1, 1, "cuda")}
        if args.nproc > 1 and gpus >= args.nproc:
            runs[f"{args.nproc} GPUs"] = run_one(agents, args.days, args.nproc, 1, "cuda")
        for name, r in runs.items():
            shares = " / ".join(f"{100 * x:.1f}" for x in r["comm_share"] or [])
            comm = f", communication {shares} % of a step (rank 0 / 1 ..)" if shares else ""
            print(
                f"{r['agents']:,} agents, {name}: {r['seconds']:.2f} s for {r['days_timed']} days "
                f"({r['seconds'] / r['days_timed']:.3f} s a day), {r['agent_steps_per_s'] / 1e6:.1f} M "
                f"agent-steps/s{comm}; held {max(r['held_bytes_per_agent']):.1f} B/agent, peak GPU memory "
                f"{max(x or 0 for x in r['peak_device_bytes_per_agent_held']):.0f} B per agent held, peak host "
                f"RSS {max(x or 0 for x in r['peak_rss_bytes_per_agent_held']):.0f} B per agent",
                flush=True,
            )
        if len(runs) > 1:
            one, sharded = runs["1 GPU"], runs[f"{args.nproc} GPUs"]
            ratio = {
                "agents": one["agents"],
                "processes": args.nproc,
                "over_1_gpu": sharded["agent_steps_per_s"] / one["agent_steps_per_s"],
                "records_equal": sharded["records"] == one["records"],
            }
            figures["ratios"].append(ratio)
            print(
                f"{ratio['agents']:,} agents: {args.nproc} GPUs / 1 GPU = {ratio['over_1_gpu']:.2f}x; records "
                f"equal: {ratio['records_equal']}",
                flush=True,
            )
        elif args.nproc > 1:
            print(
                f"({args.nproc} GPUs asked for the sharded run, {gpus} on this machine: not run)", flush=True
            )
        for name, r in runs.items():
            r.pop("records")
            figures["runs"].append({"name": name, **r})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
