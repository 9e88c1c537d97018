"""Population benchmark: synthesize the full NYC population and group it, with a pandas/numpy peer.

Prints measured figures, then all of them as one JSON line. Each measurement runs in a fresh child
process so its peak resident memory (ru_maxrss) is its own.

    .venv/bin/python benchmarks/population.py [--agents N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _synth(agents, conn):
    import torch

    torch.set_num_threads(2)
    from lpm.population import Population

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    pop = Population.synthesize("nyc", agents=agents, seed=0)
    took = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    conn.send(
        {
            "seconds": took,
            "agents": len(pop),
            "peak_rss": peak,
            "rss_after_imports": base,
            "bytes_per_agent": pop.nbytes / len(pop),
        }
    )


def _group(agents, repeat, conn):
    import torch

    torch.set_num_threads(2)
    from lpm.archetype import ArchetypeSpec
    from lpm.population import Population

    pop = Population.synthesize("nyc", agents=agents, seed=0)
    spec = ArchetypeSpec.load("covid_isolation")
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        g = spec.group(pop)
        times.append(time.perf_counter() - t)
    frame = pop.to_pandas()
    peer = []
    for _ in range(repeat):
        t = time.perf_counter()
        ids = frame.groupby(spec.attribute_names, observed=True, sort=True).ngroup().to_numpy()
        peer.append(time.perf_counter() - t)
    assert (ids == g.ids.long().numpy()).all(), "lpm grouping differs from pandas"
    conn.send({"seconds": min(times), "k": g.k, "pandas_seconds": min(peer)})


def _peer_synth(agents, conn):
    """The textbook way: draw every agent's cell and ZIP with numpy's Generator.choice."""
    import numpy as np

    from lpm import nyc
    from lpm.synthesis import Recipe, cell_sizes, recipe_path

    recipe = Recipe.load(recipe_path("nyc"))
    cells = cell_sizes(recipe)
    n = round(cells.sum()) if agents is None else agents
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    cell = rng.choice(cells.size, size=n, p=cells.ravel() / cells.sum())
    borough = cell // (cells.shape[1] * cells.shape[2])
    zips = nyc.zip_areas()
    zip_code = np.empty(n, dtype=np.int64)
    for b, code in enumerate(recipe.boroughs):
        rows = np.flatnonzero(zips["borough"].to_numpy() == code)
        w = zips["population"].to_numpy()[rows]
        mask = borough == b
        zip_code[mask] = rng.choice(rows, size=int(mask.sum()), p=w / w.sum())
    took = time.perf_counter() - t
    conn.send({"seconds": took, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def child(target, *args):
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send))
    proc.start()
    out = recv.recv()
    proc.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=None, help="default: the whole city (≈ 8.34 M)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    synth = child(_synth, args.agents)
    n = synth["agents"]
    print(
        f"synthesize {n:,} agents: {synth['seconds']:.2f} s, peak RSS {synth['peak_rss'] / 2**30:.2f} GiB "
        f"({synth['rss_after_imports'] / 2**30:.2f} GiB of it imports), {synth['bytes_per_agent']:.1f} bytes/agent"
    )
    peer = child(_peer_synth, args.agents)
    print(
        f"peer (numpy Generator.choice per agent, cells and ZIPs only): {peer['seconds']:.2f} s, "
        f"peak RSS {peer['peak_rss'] / 2**30:.2f} GiB"
    )
    grp = child(_group, args.agents, args.repeat)
    print(
        f"group by age_group x sex x borough (K = {grp['k']}): {grp['seconds']:.3f} s; "
        f"pandas groupby().ngroup(): {grp['pandas_seconds']:.3f} s; "
        f"ratio {grp['pandas_seconds'] / grp['seconds']:.1f}x"
    )
    figures = {
        "agents": n,
        "synth_seconds": round(synth["seconds"], 3),
        "synth_peak_rss_gib": round(synth["peak_rss"] / 2**30, 3),
        "bytes_per_agent": synth["bytes_per_agent"],
        "peer_numpy_synth_seconds": round(peer["seconds"], 3),
        "synth_speedup_vs_peer": round(peer["seconds"] / synth["seconds"], 2),
        "group_seconds": round(grp["seconds"], 4),
        "group_k": grp["k"],
        "pandas_group_seconds": round(grp["pandas_seconds"], 4),
        "group_speedup_vs_pandas": round(grp["pandas_seconds"] / grp["seconds"], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
