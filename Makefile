# The two commands of the README:
#   make run    set up (once), then the main job: an LLM-driven COVID run on the NYC population
#   make test   set up (once), then the test suite (what CI runs through .ci/run)
.PHONY: run test setup lint bench

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/main.sh

test: setup
	.venv/bin/python -m pytest -q -ra

lint: setup
	.venv/bin/ruff check lpm tests benchmarks examples docs
	.venv/bin/ruff format --check lpm tests benchmarks examples docs

bench: setup
	.venv/bin/python benchmarks/population.py
