"""LLM decision throughput: archetype decisions per second cold and warm, and per-agent vs per-archetype.

Usage::

    python benchmarks/llm.py                       # starts a local vLLM server (CPU build without a GPU)
    python benchmarks/llm.py --llm-url http://127.0.0.1:8000/v1 --llm-model SmolLM2-135M-Instruct

1. cold: every covid_isolation archetype of a synthetic population (K = 100 at 20,000 agents) decided with
   a fresh, empty response cache; warm: the same call again, answered from that cache.
2. on one 1,000-agent population, with the cache off: one request per agent (each agent's own prompt from its
   own attributes, no deduplication: what a naive agent-based LLM simulation sends) versus one request per
   archetype (the peer measured in the same run). Requests sent, wall seconds and their ratios.

The last line of output is every figure as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time

from lpm.archetype import ArchetypeSpec
from lpm.backend import OpenAIBackend
from lpm.cache import ResponseCache
from lpm.decision import Decider
from lpm.decoding import MODES, Decoding
from lpm.endpoint import running_server
from lpm.population import Population

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}


async def per_agent(
    backend: OpenAIBackend, messages: list[list[dict[str, str]]], actions: list[str], mode: str
) -> int:
    """One request per agent, all in flight up to the backend's bound; returns requests sent."""
    decoding = Decoding(mode=mode)
    try:
        answers = await asyncio.gather(*(backend.choose(m, actions, decoding) for m in messages))
    finally:
        await backend.aclose()
    return sum(a.attempts for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: start a local vLLM server)")
    parser.add_argument("--llm-model", help="served model name")
    parser.add_argument("--archetype-agents", type=int, default=20_000, help="population size for part 1")
    parser.add_argument("--agents", type=int, default=1_000, help="population size for part 2")
    parser.add_argument("--mode", default="logprobs", choices=MODES)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    spec = ArchetypeSpec.load("covid_isolation")
    results: dict[str, object] = {
        "machine": platform.machine(),
        "mode": args.mode,
        "concurrency": args.concurrency,
    }
    with running_server(args.llm_url, args.llm_model) as (url, model, startup_s):
        if startup_s is not None:
            results["server_startup_s"] = round(startup_s, 1)
            print(f"started {model} at {url} in {startup_s:.0f} s")
        results.update(url=url, model=model)

        def make_backend() -> OpenAIBackend:
            return OpenAIBackend(url, model, max_concurrency=args.concurrency)

        # warm the server (grammar compilation of the first request takes seconds)
        warm_rows = spec.group(Population.synthesize("nyc", agents=1_000, seed=1)).rows()[:2]
        Decider(make_backend(), mode=args.mode, progress=False).decide(
            spec, warm_rows, {**CONTEXT, "week": 99}
        )

        # 1. cold and warm archetype decisions
        rows = spec.group(Population.synthesize("nyc", agents=args.archetype_agents, seed=0)).rows()
        with tempfile.TemporaryDirectory() as tmp:
            decider = Decider(make_backend(), ResponseCache(tmp), mode=args.mode, progress=False)
            t0 = time.perf_counter()
            cold = decider.decide(spec, rows, CONTEXT)
            cold_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = decider.decide(spec, rows, CONTEXT)
            warm_s = time.perf_counter() - t0
        assert all(warm.cached) and warm.requests == 0
        results.update(
            archetypes=len(rows),
            cold_s=round(cold_s, 3),
            cold_requests=cold.requests,
            cold_decisions_per_s=round(len(rows) / cold_s, 2),
            warm_s=round(warm_s, 4),
            warm_requests=warm.requests,
            warm_decisions_per_s=round(len(rows) / warm_s, 1),
            cold_modes=sorted(set(cold.mode)),
        )
        print(
            f"{len(rows)} archetypes: cold {cold_s:.2f} s ({len(rows) / cold_s:.1f}/s, {cold.requests} requests); "
            f"warm {warm_s * 1000:.1f} ms ({len(rows) / warm_s:,.0f}/s, {warm.requests} requests)"
        )

        # 2. one request per agent versus one per archetype, same population, cache off
        pop = Population.synthesize("nyc", agents=args.agents, seed=0)
        grouping = spec.group(pop)
        table = pop.to_pandas()
        agent_rows = table[spec.attribute_names].astype(str).to_dict("records")
        prompt = Decider(make_backend(), progress=False).prompt(spec)
        messages = [prompt.render(r, CONTEXT) for r in agent_rows]
        t0 = time.perf_counter()
        agent_requests = asyncio.run(per_agent(make_backend(), messages, list(spec.actions), args.mode))
        agent_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        arch = Decider(make_backend(), ResponseCache(mode="off"), mode=args.mode, progress=False).decide(
            spec, grouping.rows(), CONTEXT
        )
        arch_s = time.perf_counter() - t0
        results.update(
            agents=len(pop),
            per_agent_requests=agent_requests,
            per_agent_s=round(agent_s, 2),
            per_archetype_k=grouping.k,
            per_archetype_requests=arch.requests + arch.retries,
            per_archetype_s=round(arch_s, 2),
            request_ratio=round(agent_requests / max(arch.requests, 1), 1),
            time_ratio=round(agent_s / arch_s, 1),
        )
        print(
            f"{len(pop):,} agents: per agent {agent_requests} requests in {agent_s:.1f} s; per archetype "
            f"{arch.requests} requests in {arch_s:.1f} s ({agent_s / arch_s:.1f}x faster)"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
