"""Faults of the model server, each a clear error and nothing left running: a server that never answers, a
plain web server where a model server should be, and lpm dying while its own server starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.decision import Decider
from lpm.endpoint import Endpoint
from lpm.errors import InputError, ServerError
from lpm.population import Population

CONTEXT = ["--context", "week=10", "--context", "cases=2345", "--context", "cases_change=12"]


def lpm_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


# -- a server that takes requests and never answers ------------------------------------------------------


def test_a_decision_step_against_a_silent_server_takes_one_timeout():
    """Before: every archetype batch waited retries x 60 s (about four minutes each), then said "raise the
    timeout", which no command could set. Now the first request without an answer stops the step."""
    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(Population.synthesize("nyc", agents=2000, seed=0)).rows()
    with FakeServer(default="hang") as server:
        endpoint = Endpoint.resolve(server.url, server.model, timeout=1.0, max_concurrency=4)
        decider = Decider(endpoint.backend(), None, progress=False)
        began = time.monotonic()
        with pytest.raises(ServerError) as info:
            decider.decide(spec, rows, {"week": 10, "cases": 2345, "cases_change": 12})
        took = time.monotonic() - began
        assert server.requests <= 4  # the first turn only: the others were never sent
    assert took < 4, took
    assert f"the model server at {server.url} did not answer a request within 1 s (--llm-timeout)" in str(
        info.value
    )
    assert "--llm-timeout SECONDS" in info.value.hint


def test_lpm_decide_with_llm_timeout_names_the_url_and_the_timeout(tmp_path):
    pop = Population.synthesize("nyc", agents=2000, seed=0).save(tmp_path / "pop.parquet")
    env = {"LPM_CACHE_DIR": str(tmp_path / "cache")}
    with FakeServer(default="hang") as server:
        began = time.monotonic()
        res = lpm_cli(
            "decide", "covid_isolation", "-p", str(pop), *CONTEXT,
            "--llm-url", server.url, "--llm-model", server.model, "--llm-timeout", "1",
            env=env,
        )  # fmt: skip
        took = time.monotonic() - began
    assert res.returncode == 2, res.stderr
    assert f"error: the model server at {server.url} did not answer a request within 1 s" in res.stderr
    assert "hint:" in res.stderr and "--llm-timeout SECONDS" in res.stderr
    assert "Traceback" not in res.stderr
    assert took < 60, took  # start-up of the CLI included; the step itself takes about one second


def test_llm_timeout_is_checked_and_leaves_the_resume_fingerprint_alone():
    from lpm.run import RunConfig

    with pytest.raises(InputError, match="--llm-timeout must be > 0 seconds, got -1"):
        Endpoint.resolve("http://127.0.0.1:9/v1", "m", timeout=-1)
    with pytest.raises(InputError, match="llm_timeout"):
        RunConfig.build(scenario="covid", policy="llm", llm_timeout=0)
    quick = RunConfig.build(scenario="covid", policy="llm", llm_timeout=5)
    assert quick.fingerprint() == RunConfig.build(scenario="covid", policy="llm").fingerprint()


def test_every_command_that_asks_a_model_takes_llm_timeout():
    for command in ("decide", "probe", "run", "compare", "calibrate"):
        res = lpm_cli(command, "--help", timeout=120)
        assert "--llm-timeout" in res.stdout, command
