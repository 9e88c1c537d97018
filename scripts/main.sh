#!/usr/bin/env bash
# The main job (README): the COVID scenario on the full synthetic NYC population (≈ 8.34 M agents),
# first with the heuristic policy, then with isolation decisions from the local LLM (SmolLM2-135M on
# the CPU build of vLLM, started and stopped by lpm). Each run writes a folder under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=$(date +%Y%m%d-%H%M%S)
.venv/bin/lpm run covid --policy heuristic --out "runs/$stamp-covid-heuristic"
.venv/bin/lpm run covid --policy llm --out "runs/$stamp-covid-llm"
echo
echo "reports: runs/$stamp-covid-heuristic/report.md and runs/$stamp-covid-llm/report.md"
