"""Noise of a live vLLM server: how much one prompt's choice distribution moves between identical requests.

The CPU build of vLLM computes in bfloat16, so a request's numbers may depend on what else the server does
at the time. This script asks the same ``logprobs`` question of the first ``--targets`` covid_isolation
prompts many times and reports, per condition, the largest difference of the first action's probability
from the reference (the first answer of that prompt sent alone); with two actions the other probability
moves by the same amount. Each condition runs with both readings (``SCORINGS``): the first token alone
(one request a prompt) and whole actions (the default: the prompt's shared prefix alone, then every later
position in one request of several prompts, whose batch layout depends on when they reach the server),
and prints how many rounds moved at all:

``alone``       one request in flight at a time;
``together``    the target prompts all at once, as :class:`lpm.decision.Decider` sends them;
``batched``     the targets among ``--others`` different prompts, all at once, in a shuffled order;
``staggered``   each target sent 0-150 ms after ``--others`` sampling requests, so its prefill shares
                steps with their decoding;
``langchain``   the targets one at a time through :class:`lpm.backend.LangChainBackend` (``ChatOpenAI``;
                first-token reading only);
``cold``        per round and target, a context never sent before (a new week): the first request
                computes the whole prompt, the second reads the shared prefix from vLLM's prefix cache;
                the difference of those two answers.

Usage::

    python benchmarks/llm_noise.py                     # starts a local vLLM server (about 40 s on 2 cores)
    python benchmarks/llm_noise.py --llm-url http://127.0.0.1:8000/v1 --llm-model SmolLM2-135M-Instruct

The last line of output is every figure as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from collections.abc import Sequence

from lpm.archetype import ArchetypeSpec
from lpm.backend import Backend, LangChainBackend, OpenAIBackend
from lpm.decoding import Decoding
from lpm.endpoint import running_server
from lpm.population import Population
from lpm.prompt import PromptTemplate

SCORINGS = ["first-token", "sequence"]
"""Both readings: the first token (one request a prompt; what LangChain can read) and whole actions (the
default: the shared prefix alone, then every later position in one request)."""

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}
"""The context of tests/test_llm_integration.py, so the figures apply to its prompts."""

Messages = list[dict[str, str]]


async def first_probs(
    backend: Backend, prompts: Sequence[Messages], actions: list[str], decoding: Decoding
) -> list[float]:
    """The first action's probability for each prompt, all sent at once (the backend bounds requests)."""
    try:
        answers = await asyncio.gather(*(backend.choose(m, actions, decoding) for m in prompts))
    finally:
        await backend.aclose()
    return [a.probs[0] for a in answers]


async def staggered(
    backend: Backend,
    target: Messages,
    others: Sequence[Messages],
    actions: list[str],
    delay_s: float,
    decoding: Decoding,
) -> float:
    """The target's first-action probability, sent ``delay_s`` after sampling requests for ``others``."""
    busy = Decoding(mode="sample", n_samples=8)
    try:
        load = asyncio.gather(*(backend.choose(m, actions, busy) for m in others))
        await asyncio.sleep(delay_s)
        answer = await backend.choose(target, actions, decoding)
        await load
    finally:
        await backend.aclose()
    return answer.probs[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llm-url", help="OpenAI-compatible base URL (default: start a local vLLM server)")
    parser.add_argument("--llm-model", help="served model name")
    parser.add_argument("--targets", type=int, default=3, help="prompts measured (the test compares 3)")
    parser.add_argument("--others", type=int, default=15, help="different prompts sent beside the targets")
    parser.add_argument("--repeats", type=int, default=30, help="rounds of every condition")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order and the delays")
    args = parser.parse_args()

    from langchain_openai import ChatOpenAI

    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(Population.synthesize("nyc", agents=20_000, seed=0)).rows()
    template = PromptTemplate.load(spec)
    prompts = [template.render(r, CONTEXT) for r in rows[: args.targets + args.others]]
    targets, others = prompts[: args.targets], prompts[args.targets :]
    actions = list(spec.actions)
    rng = random.Random(args.seed)
    results: dict[str, object] = {
        "machine": platform.machine(),
        "targets": args.targets,
        "others": args.others,
        "repeats": args.repeats,
    }
    with running_server(args.llm_url, args.llm_model) as (url, model, startup_s):
        if startup_s is not None:
            print(f"started {model} at {url} in {startup_s:.0f} s")
        results.update(url=url, model=model)
        chat = ChatOpenAI(
            base_url=url,
            api_key="EMPTY",
            model=model,
            temperature=0,
            logprobs=True,
            top_logprobs=20,
            max_tokens=8,
            max_retries=0,
        )

        def direct(concurrency: int) -> OpenAIBackend:
            return OpenAIBackend(url, model, max_concurrency=concurrency)

        for pass_, scoring in enumerate(SCORINGS):
            logprobs = Decoding(mode="logprobs", scoring=scoring)

            def ask(
                backend: Backend, batch: Sequence[Messages], logprobs: Decoding = logprobs
            ) -> list[float]:
                return asyncio.run(first_probs(backend, batch, actions, logprobs))

            ask(direct(16), prompts)  # warm up: grammar compilation, prefix cache of CONTEXT
            started = time.perf_counter()
            seen: dict[str, list[list[float]]] = {"alone": [], "together": [], "batched": [], "staggered": []}
            if scoring == "first-token":  # LangChain reads the first token only
                seen["langchain"] = []
            cold: list[float] = []
            for r in range(args.repeats):
                seen["alone"].append(ask(direct(1), targets))
                seen["together"].append(ask(direct(16), targets))
                if "langchain" in seen:
                    seen["langchain"].append(ask(LangChainBackend(chat, max_concurrency=1), targets))
                order = list(range(len(prompts)))
                rng.shuffle(order)
                by_prompt = dict(
                    zip(order, ask(direct(len(prompts)), [prompts[i] for i in order]), strict=True)
                )
                seen["batched"].append([by_prompt[t] for t in range(args.targets)])
                seen["staggered"].append(
                    [
                        asyncio.run(
                            staggered(direct(64), t, others, actions, rng.uniform(0.0, 0.15), logprobs)
                        )
                        for t in targets
                    ]
                )
                for t, row in enumerate(rows[: args.targets]):
                    week = 1000 + (r + args.repeats * pass_) * args.targets + t
                    fresh = template.render(row, {**CONTEXT, "week": week})
                    first, second = ask(direct(1), [fresh, fresh])
                    cold.append(abs(first - second))
            results[f"{scoring}.seconds"] = round(time.perf_counter() - started, 1)

            reference = seen["alone"][0]
            print(f"scoring {scoring}:")
            for name, runs in seen.items():
                worst = [max(abs(run[t] - reference[t]) for run in runs) for t in range(args.targets)]
                moved = sum(any(abs(run[t] - reference[t]) > 0 for t in range(args.targets)) for run in runs)
                shown = ", ".join(f"{w:.2e}" for w in worst)
                print(
                    f"{name:>10}: max |p - p_alone| per target prompt over {len(runs)} rounds: {shown} "
                    f"({moved} rounds moved)"
                )
                results[f"{scoring}.{name}_max"] = max(worst)
                results[f"{scoring}.{name}_rounds_moved"] = moved
            print(f"{'cold':>10}: max |p_first - p_repeat| over {len(cold)} fresh prompts: {max(cold):.2e}")
            results[f"{scoring}.cold_max"] = max(cold)
            results[f"{scoring}.cold_nonzero"] = sum(d > 0 for d in cold)
            results[f"{scoring}.p_first_alone"] = [round(p, 6) for p in reference]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
