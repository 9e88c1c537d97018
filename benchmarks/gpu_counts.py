"""Ways of counting agents per bin on a GPU, each in the COVID day: seconds a day, host waits a day, peak
GPU memory, and whether the trajectory is the one ``bincount`` gives.

The step counts per borough four times a day (``HardSampler._bincount``). CUDA's ``bincount`` reads the
smallest and largest key back to the host first (a wait); ``histc`` with its range given does not. Each
variant is patched in for one run of 7 days (heuristic policy, seed 1) from one population built on the
GPU; the days timed are 4-6 (no decision, after a device synchronisation), day 3 is run under
``torch.cuda.set_sync_debug_mode("warn")`` to count its waits. The last line is all figures as JSON.

    python benchmarks/gpu_counts.py [--sizes full 1000000000] [--variants bincount histc ...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from lpm.engine import Simulation
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.sampling import HardSampler
from lpm.scenarios import make_scenario

LPM = HardSampler._bincount  # what lpm does: histc on CUDA


def _lane(sampler: HardSampler, lanes: int) -> torch.Tensor:
    return (torch.arange(sampler.n, device=sampler.device, dtype=torch.int32) % lanes).to(torch.uint8)


def bincount_lanes(self, key, size):
    """The CPU's way: consecutive agents into ``lanes`` copies of the bins, one bincount, summed."""
    lanes = next(k for k in (8, 4, 2, 1) if key.dtype != torch.uint8 or size * k <= 256)
    key.mul_(lanes).add_(_lane(self, lanes))
    return torch.bincount(key, minlength=size * lanes).view(size, lanes).sum(1)


def histc_lanes(self, key, size):
    lanes = next(k for k in (8, 4, 2, 1) if key.dtype != torch.uint8 or size * k <= 256)
    key.mul_(lanes).add_(_lane(self, lanes))
    counts = torch.histc(key.to(torch.int32), bins=size * lanes, min=0, max=size * lanes)
    return counts.view(size, lanes).sum(1, dtype=torch.int64)


def index_add_lanes8(self, key, size):
    k = key.to(torch.int32).mul_(8).add_(_lane(self, 8))
    one = torch.ones((), dtype=torch.int64, device=key.device).expand(k.shape[0])
    counts = torch.zeros(size * 8, dtype=torch.int64, device=key.device).index_add_(0, k, one)
    return counts.view(size, 8).sum(1)


VARIANTS = {
    "bincount": bincount_lanes,
    "histc": LPM,
    "histc_lanes": histc_lanes,
    "index_add_lanes8": index_add_lanes8,
}


def measure(pop: Population, name: str) -> tuple[dict, object]:
    HardSampler._bincount = VARIANTS[name]
    marks: list[float] = []

    def mark(t: int, sim: Simulation) -> None:
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        torch.cuda.set_sync_debug_mode("warn" if t == 2 else 0)  # day 3 only

    torch.cuda.reset_peak_memory_stats()
    sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=1, device="cuda", callback=mark)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = sim.run(7)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            HardSampler._bincount = LPM
    days = [b - a for a, b in zip(marks[3:-1], marks[4:], strict=True)]
    return {
        "agents": len(pop),
        "variant": name,
        "seconds_a_day": min(days),
        "host_waits_day_3": sum("synchroniz" in str(w.message) for w in caught),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
    }, result.trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["full", "1000000000"], help="agents; 'full': the city")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_counts.py: torch sees no CUDA GPU on this machine")
    figures = []
    for size in args.sizes:
        pop = Population.synthesize(
            "nyc", agents=None if size == "full" else int(size), seed=7, device="cuda"
        )
        reference = None
        for name in args.variants:
            row, trajectory = measure(pop, name)
            reference = trajectory if reference is None else reference
            row["same_trajectory_as_first"] = bool(trajectory.equals(reference))
            figures.append(row)
            print(
                f"{row['agents']:,} agents, {name}: {row['seconds_a_day'] * 1e3:.1f} ms a day, "
                f"{row['host_waits_day_3']} host waits on day 3, peak {row['peak_gpu_gb']:.1f} GB, "
                f"trajectory as {args.variants[0]}'s: {row['same_trajectory_as_first']}",
                flush=True,
            )
            torch.cuda.empty_cache()
        del pop
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": figures}))


if __name__ == "__main__":
    main()
