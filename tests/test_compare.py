"""`lpm compare`: policies with paired seeds against the real data, the granularity sweep, the shadow audit."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.audit import granularity_specs, jensen_shannon
from lpm.compare import CompareConfig, compare, parse_window, window_error
from lpm.errors import InputError
from lpm.population import Population
from lpm.scenarios import make_scenario
from lpm.server import metrics

START = dt.date(2020, 3, 16)
WINDOW = (dt.date(2020, 3, 23), dt.date(2020, 3, 29))  # the second of two weeks


def base(**values):
    return dict(scenario="covid", agents=3_000, start=START, weeks=2, test=WINDOW) | values


def check_comparison(folder, policies, seeds):
    """Every file is there, the table has a row per policy, and each figure is what its runs say."""
    result = json.loads((folder / "compare.json").read_text())
    report = (folder / "report.md").read_text()
    assert (folder / "compare-reported_cases.png").stat().st_size > 10_000
    assert "![compare-reported_cases.png](compare-reported_cases.png)" in report
    assert [r["policy"] for r in result["runs"]] == policies * len(seeds)
    scenario = make_scenario("covid", start=START)
    for r in result["runs"]:
        sub = folder / r["folder"]
        assert sub.name == f"{r['policy']}-seed{r['seed']}" and (sub / "report.md").is_file()
        # the test-window error is real_error on the window's weeks, recomputed from the run folder
        traj = pd.read_parquet(sub / "trajectory.parquet")
        real = scenario.real_data(_world(scenario, result["agents"]), pd.Timestamp(START), traj["date"].max())
        assert r["error"] == window_error(scenario, traj, real, WINDOW)
        assert r["error"]["reported_cases"]["periods"] == 1  # one full week in the window
        summary = json.loads((sub / "summary.json").read_text())
        assert r["llm_queries"] == summary["llm_queries"] and r["totals"] == summary["totals"]
    for policy in policies:
        mine = [r for r in result["runs"] if r["policy"] == policy]
        mape = [r["error"]["reported_cases"]["mape_percent"] for r in mine]
        stats = result["policies"][policy]["error"]["reported_cases"]["mape_percent"]
        assert math.isclose(stats["mean"], sum(mape) / len(mape)) and stats["min"] == min(mape)
        assert f"| {policy} | {len(seeds)} | " in report
    return result


def _world(scenario, agents):
    return scenario.setup(Population.synthesize("nyc", agents=agents, seed=0), torch.device("cpu"))


def test_compare_heuristic_and_llm_with_paired_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer() as server:
        config = CompareConfig.build(
            **base(policies=["heuristic", "llm"], seeds=[0, 1], llm_url=server.url, llm_model=server.model)
        )
        result = compare(config, tmp_path / "c", progress=False)
        sent = server.requests
    check_comparison(tmp_path / "c", ["heuristic", "llm"], [0, 1])
    runs = {(r["policy"], r["seed"]): r for r in result["runs"]}
    assert (
        runs[("heuristic", 0)]["llm_queries"] == 0 and runs[("llm", 0)]["llm_queries"] == 200
    )  # 2 weekly steps
    # the table counts the prompts that reached the server; whole-action scoring sends four HTTP requests
    # for each (a tokenization per action, two completions)
    assert 4 * sum(r["llm_queries"] for r in result["runs"]) == sent
    # paired: the same seed gives the same population and random numbers, whatever the policy
    heuristic = pd.read_parquet(tmp_path / "c" / "heuristic-seed0" / "trajectory.parquet")
    again = compare(
        config.model_copy(update={"policies": ["heuristic"], "seeds": [0]}), tmp_path / "d", progress=False
    )
    assert again["runs"][0]["totals"] == runs[("heuristic", 0)]["totals"]
    pd.testing.assert_frame_equal(
        heuristic, pd.read_parquet(tmp_path / "d" / "heuristic-seed0" / "trajectory.parquet")
    )
    assert runs[("heuristic", 0)]["totals"] != runs[("heuristic", 1)]["totals"]  # seeds differ


def test_replay_with_decisions_missing_from_the_cache_names_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "empty-cache"))
    config = CompareConfig.build(**base(policies=["heuristic", "llm"], cache="replay"))
    with pytest.raises(
        InputError, match=r"--cache replay: policy llm \(seed 0\) needs decisions the cache"
    ) as err:
        compare(config, tmp_path / "c", progress=False)
    assert "keeps the finished runs (heuristic-seed0) and no compare.json" in err.value.hint
    assert (tmp_path / "c" / "heuristic-seed0" / "report.md").is_file()
    assert not (tmp_path / "c" / "llm-seed0").exists()


def test_bad_options_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match="--test must be START:END .*got '2020-04-01'"):
        parse_window("2020-04-01")
    with pytest.raises(InputError, match="--test: the end 2020-04-01 is before the start 2020-04-02"):
        parse_window("2020-04-02:2020-04-01")
    with pytest.raises(InputError, match="compare option 'policies.1'"):
        CompareConfig.build(**base(policies=["heuristic", "oracle"]))
    with pytest.raises(InputError, match="--seeds repeats"):
        CompareConfig.build(**base(policies=["heuristic"], seeds=[1, 1]))
    with pytest.raises(InputError, match="--test 2020-05-01:2020-05-07: the window must lie within the run"):
        compare(
            CompareConfig.build(
                **base(policies=["heuristic"], test=(dt.date(2020, 5, 1), dt.date(2020, 5, 7)))
            ),
            tmp_path / "c",
        )
    with pytest.raises(InputError, match="agent-llm asks the model once per agent; 6,000"):
        compare(
            CompareConfig.build(**base(policies=["heuristic", "agent-llm"], agents=6_000)), tmp_path / "c"
        )
    assert not (tmp_path / "c").exists()


def test_jensen_shannon():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1], [0.2, 0.8]])
    q = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.6, 0.4], [0.3, 0.7]])
    bits = jensen_shannon(p, q)
    assert bits[0] == 0 and math.isclose(float(bits[1]), 1.0)  # identical: 0; disjoint: 1 bit
    assert torch.allclose(bits, jensen_shannon(q, p))
    m = (p[2] + q[2]) / 2
    kl = lambda a: float((a * (a / m).log()).sum())  # noqa: E731
    assert math.isclose(float(bits[2]), (kl(p[2]) + kl(q[2])) / 2 / math.log(2), rel_tol=1e-6)
    assert math.isclose(
        float(jensen_shannon(p, q, base=math.e)[3]), float(bits[3]) * math.log(2), rel_tol=1e-9
    )


def audit_config(server, extra):
    return CompareConfig.build(
        **base(policies=["llm"], agents=2_000, weeks=2, audit=40, audit_extra=extra),
        llm_url=server.url,
        llm_model=server.model,
    )


def test_shadow_audit_is_zero_when_the_agent_prompt_is_the_archetypes(tmp_path, monkeypatch):
    """Scripted server: every distinct prompt gets its own distribution, so a sampled agent matched with the
    wrong archetype, or a per-agent prompt that differs, shows up as a divergence."""
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer() as server:
        control = compare(audit_config(server, []), tmp_path / "control", progress=False)["audit"]
        own = compare(audit_config(server, ["age", "zip"]), tmp_path / "own", progress=False)["audit"]
    a = control["decisions"]["isolation"]
    assert a["sampled_agents"] == 40 and a["decision_steps"] == [0, 7]
    assert a["jsd_bits"] == 0.0 and a["jsd_max_bits"] == 0.0
    assert a["audit_queries_sent"] == 0 and a["audit_cache_hits"] == 80  # the archetypes' own cached answers
    assert a["archetypes"] == 100 and a["per_agent_queries"] == 2 * 2_000 and a["archetype_queries"] == 200
    assert a["fewer_calls"] == 20.0 and sum(r["sampled"] for r in a["per_archetype"]) == 40
    b = own["decisions"]["isolation"]
    assert b["extra"] == ["age", "zip"] and b["jsd_bits"] > 0.01 and b["audit_queries_sent"] > 40
    report = (tmp_path / "own" / "report.md").read_text()
    assert "anchor: JSD 0.094 at 381× fewer calls (arXiv 2605.27419" in report and "## Shadow audit" in report


def test_granularity_sweep_from_one_archetype_to_per_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    pop = Population.synthesize("nyc", agents=300, seed=0)
    specs = granularity_specs(ArchetypeSpec.load("covid_isolation"), pop)
    assert [label for label, _ in specs][:2] == ["one archetype", "age_group"] and len(specs) == 8
    assert [s.group(pop).k for _, s in specs][0] == 1
    with FakeServer() as server:
        config = CompareConfig.build(
            **base(policies=["heuristic"], granularity=True, granularity_agents=300, weeks=1, test=None),
            llm_url=server.url,
            llm_model=server.model,
        )
        rows = compare(config, tmp_path / "g", progress=False)["granularity"]
    k = [r["archetypes"] for r in rows]
    assert k[0] == 1 and k[-1] == 300 and k[-2] == max(k[:-1]) <= 100  # one, ..., full product, per agent
    assert [r["asked"] for r in rows] == k  # one decision step: one answer per archetype
    assert all("reported_cases" in r["error"] for r in rows)
    # the scripted server gives every distinct prompt its own distribution: each grouped point's answers
    # differ from the per-agent ones (whose prompts add age and ZIP), the per-agent point's not at all
    assert rows[-1]["gap_to_per_agent"] == 0.0
    assert all(0 < r["gap_to_per_agent"] <= 1 for r in rows[:-1])
    assert all(r["first_action"] == "isolate" and 0 < r["p_first"] < 1 for r in rows)
    assert (tmp_path / "g" / "granularity.png").is_file()
    assert "| per agent | 300 | 300 |" in (tmp_path / "g" / "report.md").read_text()


def test_cli_compare(tmp_path):
    out = tmp_path / "c"
    args = ["compare", "covid", "--policies", "heuristic", "--seeds", "0,1", "--agents", "2000"]
    args += ["--start", "2020-03-16", "--weeks", "2", "--test", "2020-03-23:2020-03-29", "--out", str(out)]
    res = subprocess.run([sys.executable, "-m", "lpm", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "heuristic · seed 1: wall" in res.stdout and "| heuristic | 2 | " in res.stdout
    assert (out / "report.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lpm", *args[:-2], "--out", str(tmp_path / "d"), "--test", "2020-03-23"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--test" in bad.stderr and "Traceback" not in bad.stderr


# -- against the real local vLLM server ---------------------------------------------------------------


@pytest.mark.integration
def test_compare_and_audit_against_the_real_model(vllm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    config = CompareConfig.build(
        **base(policies=["heuristic", "llm"], seeds=[0, 1], agents=2_000, audit=30, audit_extra=[]),
        llm_url=vllm_server.url,
        llm_model=vllm_server.model,
    )
    before = metrics(vllm_server.url)["completion_requests"]
    result = compare(config, tmp_path / "c", progress=False)
    check_comparison(tmp_path / "c", ["heuristic", "llm"], [0, 1])
    llm = [r for r in result["runs"] if r["policy"] == "llm"]
    assert llm[0]["llm_queries"] > 0 and all(r["archetypes"] == {"isolation": 100} for r in llm)
    # the control: the per-agent prompt carries only the archetype's attributes, so it is the archetype's
    # prompt; the real model's (cached) answers then diverge by exactly nothing
    audit = result["audit"]["decisions"]["isolation"]
    assert audit["jsd_bits"] <= 1e-6 and audit["audit_queries_sent"] == 0
    decisions = pd.read_parquet(tmp_path / "c" / "llm-seed0" / "decisions.parquet")
    spread = decisions[decisions["action"] == "isolate"].groupby("step")["probability"].agg(["min", "max"])
    assert (spread["max"] - spread["min"] > 1e-3).all()  # archetypes differ, so a mismatch would show
    sent = metrics(vllm_server.url)["completion_requests"] - before
    # whole-action scoring: one HTTP request per action (2) per query; the audit's answers came from the cache
    assert sent == 2 * sum(r["llm_queries"] for r in result["runs"])


class LocalStandIn:
    """Stands in for :class:`lpm.server.ModelServer`: a scripted server whose address is fixed at
    construction and that counts as running only once :meth:`start` is called."""

    instances: list = []

    def __init__(self, kind, model=None, served_name=None, *, api_key=None):
        from lpm.model import DEFAULT_MODEL_NAME

        self.kind, self.fake = kind, FakeServer(model=served_name or DEFAULT_MODEL_NAME).start()
        self.api_key = api_key
        self.url, self.model, self.log_path = self.fake.url, self.fake.model, "-"
        self.running, self.starts, self.stopped, self.startup_seconds = False, 0, False, None
        LocalStandIn.instances.append(self)

    def start(self):
        self.running, self.starts, self.startup_seconds = True, self.starts + 1, 0.1

    def stop(self):
        self.running, self.stopped = False, True
        self.fake.stop()


def test_one_local_server_started_at_the_first_miss_and_none_when_cached(tmp_path, monkeypatch):
    import lpm.server

    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lpm.server, "ModelServer", LocalStandIn)
    LocalStandIn.instances.clear()
    config = CompareConfig.build(**base(policies=["heuristic", "llm"], seeds=[0, 1], agents=2_000, audit=10))
    cold = compare(config, tmp_path / "cold", progress=False)
    first = LocalStandIn.instances[-1]
    assert (
        first.starts == 1 and first.stopped
    )  # one server for both LLM runs and the audit, stopped at the end
    assert [r["from_cache_alone"] for r in cold["runs"] if r["policy"] == "llm"] == [False, False]
    assert cold["server"]["local_server_started"]
    # the server lpm starts gets a random key, which every request of every run and of the audit sends
    assert len(first.api_key) >= 40
    assert {h["authorization"] for h in first.fake.headers} == {f"Bearer {first.api_key}"}
    assert first.api_key not in (tmp_path / "cold").joinpath("compare.json").read_text()
    warm = compare(config, tmp_path / "warm", progress=False)
    assert LocalStandIn.instances[-1].starts == 0 and not warm["server"]["local_server_started"]
    assert [r["from_cache_alone"] for r in warm["runs"] if r["policy"] == "llm"] == [True, True]
    assert [r["error"] for r in warm["runs"]] == [r["error"] for r in cold["runs"]]
