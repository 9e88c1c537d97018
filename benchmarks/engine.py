"""Throughput of the COVID daily step (heuristic policy, all contact layers) and of covasim in the same run.

Prints, in inference mode, agent-steps per second at 1 M agents and at the full city (≈ 8.34 M) (the best of
``--repeats`` timings), bytes per agent of the state, of the population, of what the run holds besides (index
tensors, broadcast indices, sampler buffers) and of a step's temporaries (measured in a child process, see
:func:`step_temporaries`); in differentiable mode (each of ``--diff-estimators``) at ``--diff-agents``, agent-steps per
second of the forward and backward pass together (the best of ``--repeats`` child processes) and the bytes
per agent the autograd graph holds per
simulated day (what bounds the horizon a calibration can backpropagate through); and covasim's people-days per
second with its household, school, work and community layers (``cv.Sim(pop_type="hybrid", …)``, timed from
``sim.run()`` after ``sim.initialize()``) at the same population and days; the last line is all figures as one
JSON object.

With ``--device cuda`` lpm runs on the GPU (the population built there, each timing between device
synchronisations) and its memory figures are the GPU's: a step's temporaries and the graph's bytes from
``torch.cuda.max_memory_allocated`` / ``memory_allocated`` instead of resident memory; covasim runs on the
CPU as always, so the ratio is then GPU against CPU.

    .venv/bin/python benchmarks/engine.py [--days 30] [--sizes 1000000 full] [--covasim-agents 1000000 8336817]
        [--diff-agents 1000000] [--diff-estimators pruned households expected] [--threads N] [--repeats 3]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from lpm.engine import Simulation
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario

#: What each side of the ratio simulates: the ratio is of throughput, not of equal models.
SEMANTICS = {
    "lpm": "lpm: daily stochastic S-E-P-I-R chain (Erlang stages, asymptomatic share), transmission inside "
    "households (ACS sizes), school classes (~25) and workplaces (~20) as whole clusters, plus community "
    "mixing within ZIP area, borough and city across 10 age bands (no individual community contacts), dated "
    "interventions, reporting delay, weekly isolation decisions of 100 archetypes (heuristic policy)",
    "covasim": "covasim: hybrid population (households, schools, workplaces, random community contacts, about "
    "20 community contacts a day), SEIR with severity states (symptomatic, severe, critical, death), no "
    "behaviour model",
}


def _bytes(tensors) -> int:
    return sum(t.element_size() * t.numel() for t in tensors if isinstance(t, torch.Tensor))


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak resident size (VmHWM) to the current one (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    """Wait for the device's queued work (a GPU's kernels run after the Python call returns)."""
    if device == "cuda":
        torch.cuda.synchronize()


def bench_lpm(agents: int | None, days: int, repeats: int = 1, device: str = "cpu") -> dict:
    """The best of ``repeats`` timings of ``days`` COVID days after two warm-up days."""
    pop = Population.synthesize("nyc", agents=agents, seed=7, device=device)
    n = len(pop)
    sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=1, device=device)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            state = sim.initial_state()
            for t in range(2):  # warm-up (allocations, first decision)
                state = sim.step(state, t)
            _sync(device)
            t0 = time.perf_counter()
            for t in range(2, 2 + days):
                state = sim.step(state, t)
            _sync(device)
            times.append(time.perf_counter() - t0)
        temporaries = _gpu_temporaries(sim, state, 2 + days) if device == "cuda" else step_temporaries(agents)
    seconds = min(times)
    per_agent = [v for v in [*state.scenario.values(), *state.actions.values()] if v.shape[:1] == (n,)]
    memory = sim.memory()
    return {
        "agents": n,
        "days": days,
        "seconds": round(seconds, 3),
        "seconds_all": [round(x, 3) for x in times],
        "agent_steps_per_s": n * days / seconds,
        "state_bytes_per_agent": _bytes(per_agent) / n,
        "population_bytes_per_agent": memory["population"],
        "index_and_buffer_bytes_per_agent": memory["world"] + memory["decisions"] + memory["sampler"],
        "step_temporaries_bytes_per_agent": temporaries,
        "device": device,
    }


def _gpu_temporaries(sim: Simulation, state, start: int, days: int = 8) -> float:
    """The GPU memory a step allocates above what the run holds before it, bytes per agent, over ``days``
    more days (a weekly decision among them)."""
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for t in range(start, start + days):
        state = sim.step(state, t)
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - held) / sim.n, 1)


def step_temporaries(agents: int | None, days: int = 8) -> float | None:
    """Peak resident memory a step takes above what the run holds before it (its temporaries), bytes per
    agent, over days 1 .. ``days`` (day 7 asks the weekly decision again); day 0 runs first, so the work
    buffers the run allocates on first use and then keeps count as held, not as temporaries. Measured in a
    child process whose malloc returns every array above 64 KiB to the system when it is freed
    (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live tensors. None off Linux."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--temporaries-of", str(agents or 0), "--days", str(days)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return None if out == "None" else float(out)


def _measure_temporaries(agents: int | None, days: int) -> None:
    pop = Population.synthesize("nyc", agents=agents, seed=7)
    sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=1)
    with torch.no_grad():
        state = sim.step(sim.initial_state(), 0)
        held = _status_kib("VmRSS") if _reset_peak() else None
        for t in range(1, days + 1):
            state = sim.step(state, t)
    if held is None:
        print("None")
        return
    print(round(((_status_kib("VmHWM") or held) - held) * 1024 / len(pop), 1))


def bench_differentiable(
    agents: int, days: int, estimator: str, repeats: int = 1, device: str = "cpu"
) -> dict:
    """Forward and backward of ``days`` COVID days in differentiable mode, and the bytes the autograd graph
    holds per agent per simulated day, in child processes: the times from the fastest of ``repeats`` with
    the default allocator (one right after the full-city runs ran at half speed); the memory from one
    whose allocator maps every large array on its own (``MALLOC_MMAP_THRESHOLD_``), so that resident
    memory follows the graph but every array costs fresh page faults (about twice the time)."""
    cmd = [sys.executable, __file__, "--differentiable-of", str(agents), "--days", str(days)]
    cmd += ["--diff-estimators", estimator, "--device", device]
    runs = [
        json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        for _ in range(max(1, repeats))
    ]
    timed = max(runs, key=lambda r: r["agent_steps_per_s"])
    if device == "cuda":  # the GPU's allocator counts the graph itself
        return timed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    sized = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    return {**timed, "graph_bytes_per_agent_day": sized["graph_bytes_per_agent_day"]}


def _held_bytes(device: str) -> int:
    """What the process holds: the GPU's allocated bytes, or the resident memory (0 off Linux)."""
    return torch.cuda.memory_allocated() if device == "cuda" else (_status_kib("VmRSS") or 0) * 1024


def _measure_differentiable(agents: int, days: int, estimator: str, device: str = "cpu") -> None:
    pop = Population.synthesize("nyc", agents=agents, seed=7, device=device)
    sim = Simulation(
        make_scenario("covid"),
        pop,
        HeuristicPolicy(),
        seed=1,
        differentiable=True,
        estimator=estimator,
        device=device,
    )
    state = sim.initial_state()
    state = sim.step(state, 0)  # warm-up day (first decision); its graph is part of the run's
    _sync(device)
    held = _held_bytes(device)
    t0 = time.perf_counter()
    for t in range(1, 1 + days):
        state = sim.step(state, t)
    _sync(device)
    forward = time.perf_counter() - t0
    graph = max(0, _held_bytes(device) - held)
    records = sim.recorded("reported_cases").flatten(1).sum(1)
    t0 = time.perf_counter()
    records.sum().backward()
    _sync(device)
    backward = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "estimator": estimator,
                "agents": agents,
                "days": days,
                "forward_seconds": round(forward, 3),
                "backward_seconds": round(backward, 3),
                "agent_steps_per_s": agents * days / (forward + backward),
                "graph_bytes_per_agent_day": round(graph / agents / days, 1),
                "device": device,
            }
        )
    )


def bench_covasim(agents: int, days: int) -> dict:
    import covasim as cv

    sim = cv.Sim(pop_size=agents, n_days=days, pop_type="hybrid", verbose=0, rand_seed=1)
    t0 = time.perf_counter()
    sim.initialize()
    init = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim.run()
    seconds = time.perf_counter() - t0
    return {
        "agents": agents,
        "days": days,
        "init_seconds": round(init, 3),
        "seconds": round(seconds, 3),
        "people_days_per_s": agents * days / seconds,
        "covasim_version": cv.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=30, help="simulated days timed (default 30)")
    ap.add_argument(
        "--sizes", nargs="+", default=["1000000", "full"], help="agent counts; 'full' is the whole city"
    )
    ap.add_argument(
        "--covasim-agents",
        type=int,
        nargs="*",
        default=[1_000_000, 8_336_817],
        help="covasim pop_size(s); the default matches --sizes (the full city takes covasim ~2 min and ~5 GB)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per size; the best is reported (default 3)"
    )
    ap.add_argument(
        "--diff-agents", type=int, default=1_000_000, help="agents of the differentiable run (0: skip)"
    )
    ap.add_argument("--diff-days", type=int, default=7, help="days of the differentiable run (default 7)")
    ap.add_argument(
        "--diff-estimators",
        nargs="+",
        default=["pruned", "households", "expected"],
        help="gradient estimators of the differentiable run (default: pruned households expected)",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where lpm runs (default cpu; covasim: the CPU)",
    )
    ap.add_argument("--temporaries-of", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--differentiable-of", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.temporaries_of is not None:
        return _measure_temporaries(args.temporaries_of or None, args.days)
    if args.differentiable_of is not None:
        return _measure_differentiable(
            args.differentiable_of, args.days, args.diff_estimators[0], args.device
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "lpm": [],
        "covasim": [],
        "differentiable": [],
    }
    where = f" on {figures['device']}" if args.device == "cuda" else ""
    for size in args.sizes:
        res = bench_lpm(None if size == "full" else int(size), args.days, args.repeats, args.device)
        figures["lpm"].append(res)
        print(
            f"lpm covid step{where}, {res['agents']:,} agents x {res['days']} days: {res['seconds']:.2f} s, "
            f"{res['agent_steps_per_s'] / 1e6:.1f} M agent-steps/s; state {res['state_bytes_per_agent']:.1f} B/agent, "
            f"population {res['population_bytes_per_agent']:.1f} B/agent, "
            f"index tensors + buffers {res['index_and_buffer_bytes_per_agent']:.1f} B/agent, "
            f"temporaries of a step {res['step_temporaries_bytes_per_agent']} B/agent",
            flush=True,
        )
    for estimator in args.diff_estimators if args.diff_agents else []:
        res = bench_differentiable(args.diff_agents, args.diff_days, estimator, args.repeats, args.device)
        figures["differentiable"].append(res)
        print(
            f"lpm covid step{where}, differentiable (estimator '{estimator}'), {res['agents']:,} agents x {res['days']} "
            f"days: forward {res['forward_seconds']:.2f} s + backward {res['backward_seconds']:.2f} s, "
            f"{res['agent_steps_per_s'] / 1e6:.1f} M agent-steps/s with gradients; the graph holds "
            f"{res['graph_bytes_per_agent_day']} B per agent per simulated day",
            flush=True,
        )
    for agents in args.covasim_agents:
        res = bench_covasim(agents, args.days)
        figures["covasim"].append(res)
        print(
            f"covasim {res['covasim_version']}, {agents:,} people x {args.days} days: run {res['seconds']:.2f} s "
            f"(initialize {res['init_seconds']:.1f} s), {res['people_days_per_s'] / 1e6:.2f} M people-days/s",
            flush=True,
        )
    same = [
        (lp, cv_)
        for lp in figures["lpm"]
        for cv_ in figures["covasim"]
        if lp["agents"] == cv_["agents"] and lp["days"] == cv_["days"]
    ]
    figures["ratio_same_size"] = [
        {"agents": lp["agents"], "lpm_over_covasim": lp["agent_steps_per_s"] / cv_["people_days_per_s"]}
        for lp, cv_ in same
    ]
    if figures["covasim"] and figures["lpm"]:
        big = figures["lpm"][-1]
        figures["ratio_full_vs_largest_covasim"] = (
            big["agent_steps_per_s"] / figures["covasim"][-1]["people_days_per_s"]
        )
    figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    figures["semantics"] = SEMANTICS
    print(f"what each side models: {SEMANTICS['lpm']}; {SEMANTICS['covasim']}")
    for r in figures["ratio_same_size"]:
        print(f"ratio at {r['agents']:,} agents: lpm / covasim = {r['lpm_over_covasim']:.1f}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
