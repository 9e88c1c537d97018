"""Which way of asking makes the model's answers most informative: the probe (:mod:`lpm.probe`) under each
elicitation method, on one model server.

Methods (every one in ``logprobs`` mode, so a prompt always gets the same answer):

``first-token``   the spec's prompt, the actions under the choice constraint, the first token's
                  log-probabilities (lpm's default);
``whole-action``  the same prompt, each whole action scored from the prompt log-probabilities;
``yes-no``        the question "Would you choose A rather than B? Answer yes or no." appended; P(A) = P(yes);
``scale``         "How likely ... from 0 (certainly B) to 10 (certainly A)?" appended; P(A) = E[k] / 10.

For each method and spec the script prints the largest range of an action's probability over any probed
variable (the probe's informativeness: below 0.05 the answers are near-constant) and over the context
variables alone (the situation, which drives a scenario's dynamics), the range per variable, the first
action's probability, the prompts, the HTTP requests they took and the seconds. The last line is every figure
as one JSON object.

Usage::

    python benchmarks/elicitation.py                    # starts a local vLLM server (the default model)
    python benchmarks/elicitation.py --llm-url http://127.0.0.1:8000/v1 --llm-model NAME
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from lpm.archetype import ArchetypeSpec
from lpm.backend import OpenAIBackend
from lpm.cache import ResponseCache
from lpm.decision import Decider
from lpm.endpoint import running_server
from lpm.population import Population
from lpm.probe import probe

METHODS = {
    "first-token": {"elicitation": "choice", "scoring": "first-token"},
    "whole-action": {"elicitation": "choice", "scoring": "sequence"},
    "yes-no": {"elicitation": "yes-no", "scoring": "first-token"},
    "scale": {"elicitation": "scale", "scoring": "first-token"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", default=None, help="a running server (default: start a local one)")
    parser.add_argument("--llm-model", default=None, help="served model name")
    parser.add_argument("--specs", default="covid_isolation,labor_work", help="archetype specs to probe")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to compare")
    args = parser.parse_args()
    pop = Population.synthesize("nyc", agents=10_000, seed=0)
    figures: dict[str, dict[str, dict]] = {}
    with (
        running_server(args.llm_url, args.llm_model) as (url, model, startup_s),
        tempfile.TemporaryDirectory() as tmp,
    ):
        print(f"model {model} at {url}" + (f" (started in {startup_s:.0f} s)" if startup_s else ""))
        for name in args.specs.split(","):
            spec = ArchetypeSpec.load(name)
            figures[name] = {}
            for method in args.methods.split(","):
                backend = OpenAIBackend(url, model)
                decider = Decider(
                    backend,
                    ResponseCache(tmp),
                    mode="logprobs",
                    progress=False,
                    **METHODS[method],
                )
                start = time.perf_counter()
                result = probe(spec, decider, population=pop, progress=False)
                seconds = time.perf_counter() - start
                ranges = result.ranges()
                first = spec.actions[0]
                per_variable = (
                    ranges[ranges["action"] == first].set_index("variable")["range"].round(4).to_dict()
                )
                p_first = result.table[result.table["action"] == first]["probability"]
                largest, variable, _ = result.largest
                context = {k: v for k, v in per_variable.items() if k in spec.context}
                figures[name][method] = {
                    "largest_range": round(largest, 4),
                    "most_responsive": variable,
                    "largest_context_range": max(context.values()),
                    "range_by_variable": per_variable,
                    f"mean_p_{first}": round(float(p_first.mean()), 4),
                    f"min_p_{first}": round(float(p_first.min()), 4),
                    f"max_p_{first}": round(float(p_first.max()), 4),
                    "prompts": result.requests,
                    "http_requests": backend.stats.requests,
                    "seconds": round(seconds, 1),
                }
                f = figures[name][method]
                print(
                    f"{name:16s} {method:13s} largest range {f['largest_range']:.3f} ({variable}), over "
                    f"context {f['largest_context_range']:.3f}; P({first}) {f[f'min_p_{first}']:.3f}.."
                    f"{f[f'max_p_{first}']:.3f} mean {f[f'mean_p_{first}']:.3f}; {result.requests} prompts, "
                    f"{backend.stats.requests} requests, {seconds:.0f} s"
                )
                print("    by variable: " + ", ".join(f"{k} {v:.3f}" for k, v in per_variable.items()))
    print(json.dumps({"model": model, "python": platform.python_version(), "figures": figures}))


if __name__ == "__main__":
    main()
