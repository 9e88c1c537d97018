#!/usr/bin/env bash
# The main job (README): synthesize the NYC population and show its archetypes.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
.venv/bin/lpm population synth nyc --seed 0 --out runs/nyc.parquet
.venv/bin/lpm archetypes show covid_isolation --population runs/nyc.parquet
