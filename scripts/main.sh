#!/usr/bin/env bash
# The main job (README): the COVID scenario on the full synthetic NYC population (≈ 8.34 M agents) with its
# calibrated defaults, under the heuristic policy and under isolation decisions from the local LLM
# (SmolLM2-135M on the CPU build of vLLM, started and stopped by lpm), with paired seeds, against the real
# reported cases: one comparison folder with report.md, compare.json and the overlay plot.
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/$(date +%Y%m%d-%H%M%S)-covid-compare"
.venv/bin/lpm compare covid --policies heuristic,llm --seeds 0 --test 2020-04-26:2020-05-23 --out "$out"
echo
echo "report: $out/report.md"
