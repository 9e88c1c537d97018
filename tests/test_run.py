"""`lpm run`: the run folder, bad input, resume, fallbacks; LLM policies against the real local server."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_server import FakeServer

from lpm.errors import CacheMissError, InputError, LLMError
from lpm.population import Population
from lpm.run import SUMMARY_KEYS, RunConfig, run
from lpm.scenarios import available_scenarios, scenario_class
from lpm.server import metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

FILES = (
    "config.json",
    "trajectory.parquet",
    "decisions.parquet",
    "summary.json",
    "report.md",
    "decisions.png",
)
#: Every built-in scenario (found by scanning lpm.scenarios), and the template outside the package.
SCENARIOS = [*available_scenarios(), str(EXAMPLES / "sir.py") + ":SIR"]


def check_folder(folder, scenario_ref):
    """The run folder has every file, and every Parquet file opens in pandas with its labels."""
    cls = scenario_class(scenario_ref)
    for name in FILES + tuple(p.file for p in cls.plots):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    traj = pd.read_parquet(folder / "trajectory.parquet")
    bys = list(dict.fromkeys(q.by for q in cls.quantities if q.by))
    assert list(traj.columns) == ["step", "date", *bys, "quantity", "value"]
    assert traj["step"].nunique() == summary["steps"]
    assert set(traj["quantity"]) == {q.name for q in cls.quantities}
    decisions = pd.read_parquet(folder / "decisions.parquet")
    per_row = decisions.groupby(["step", "decision", "archetype"], observed=True)["probability"].sum()
    assert ((per_row - 1).abs() < 1e-5).all()
    assert set(decisions["decision"]) == {d.name for d in cls.decisions}
    for frame, categorical in ((traj, [*bys, "quantity"]), (decisions, ["decision", "action", "mode"])):
        for col in categorical:
            assert isinstance(frame[col].dtype, pd.CategoricalDtype), col
    for spec in cls.specs().values():
        for attr in spec.attribute_names:
            assert isinstance(decisions[attr].dtype, pd.CategoricalDtype), attr
    report = (folder / "report.md").read_text()
    assert all(f"![{p.file}]" in report for p in cls.plots)
    return summary, traj, decisions


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_heuristic_runs_write_every_file(tmp_path, scenario):
    steps = {"day": 14, "week": 2, "month": 3}[scenario_class(scenario).step_unit]
    out = run(RunConfig.build(scenario=scenario, agents=20_000, steps=steps), tmp_path / "r", progress=False)
    summary, traj, decisions = check_folder(out.folder, scenario)
    assert summary["agents"] == 20_000 and summary["llm_queries"] == 0 and summary["steps"] == steps
    assert set(decisions["mode"]) == {"heuristic"}
    cls = scenario_class(scenario)
    assert set(summary["real_error"]) == {q.name for q in cls.quantities if q.real}
    for error in summary["real_error"].values():
        assert error["periods"] >= 2 and error["mape_percent"] >= 0 and error["real"] > 0
    population = tmp_path / "pop.parquet"
    Population.synthesize("nyc", agents=1_000, seed=1).save(population)
    labels = pd.read_parquet(population)
    assert labels["borough"].iloc[0] == "Bronx" and isinstance(labels["zip"].dtype, pd.CategoricalDtype)


def test_existing_folder_is_never_overwritten(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty; nothing was overwritten"):
        run(RunConfig.build(scenario="covid", agents=5_000, weeks=1), folder, progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_resume_of_another_config_is_refused(tmp_path):
    folder = tmp_path / "r"
    run(RunConfig.build(scenario="covid", agents=5_000, weeks=1, seed=1), folder, progress=False)
    before = (folder / "summary.json").read_text()
    with pytest.raises(InputError, match=r"another configuration \(seed: 1 there, 2 here\)"):
        run(
            RunConfig.build(scenario="covid", agents=5_000, weeks=1, seed=2),
            folder,
            resume=True,
            progress=False,
        )
    assert (folder / "summary.json").read_text() == before
    with pytest.raises(InputError, match="nothing to resume"):
        run(
            RunConfig.build(scenario="covid", agents=5_000, weeks=1),
            tmp_path / "empty",
            resume=True,
            progress=False,
        )


def test_resume_extends_a_finished_run_exactly(tmp_path):
    whole = run(
        RunConfig.build(scenario="covid", agents=10_000, weeks=2, seed=3), tmp_path / "a", progress=False
    )
    run(RunConfig.build(scenario="covid", agents=10_000, weeks=1, seed=3), tmp_path / "b", progress=False)
    resumed = run(
        RunConfig.build(scenario="covid", agents=10_000, weeks=2, seed=3),
        tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert resumed.summary["resumed_from_step"] == 7
    pd.testing.assert_frame_equal(whole.result.trajectory, resumed.result.trajectory)
    pd.testing.assert_frame_equal(whole.result.decisions, resumed.result.decisions)


@pytest.mark.parametrize(
    "values,needle",
    [
        ({"scenario": "covid", "policy": "magic"}, "'policy'"),
        ({"scenario": "covid", "device": "tpu"}, "'device'"),
        ({"scenario": "covid", "weeks": 0}, "'weeks'"),
        ({"scenario": "covid", "weeks": 2, "days": 3}, "give one horizon, not --days and --weeks"),
        ({"scenario": "covid", "llm_url": "http://x"}, "need --policy llm"),
    ],
)
def test_bad_options(values, needle):
    with pytest.raises(InputError, match=needle):
        RunConfig.build(**values)


@pytest.mark.parametrize(
    "values,needle",
    [
        ({"scenario": "flu"}, "unknown scenario 'flu'"),
        ({"scenario": "labor", "weeks": 2}, "steps in months: 2 weeks is not a whole number of steps"),
        ({"scenario": "covid", "scenario_config": {"betta": 1}}, "class CovidScenario: parameter 'betta'"),
        ({"scenario": "covid", "scenario_config": {"beta": -1}}, "parameter 'beta': Input should be greater"),
    ],
)
def test_bad_scenario_options_write_nothing(tmp_path, values, needle):
    with pytest.raises(InputError, match=needle):
        run(RunConfig.build(agents=1000, **values), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_error_against_the_real_series():
    """Weekly sums for daily totals (full weeks only), per step otherwise; MAPE over periods x labels."""
    from lpm.report import real_error

    covid, labor = scenario_class("covid")(), scenario_class("labor")()
    dates = pd.date_range("2020-03-16", periods=15)
    sim = pd.DataFrame(
        {
            "step": range(15),
            "date": dates,
            "borough": pd.Categorical(["Bronx"] * 15),
            "quantity": "reported_cases",
            "value": 2.0,
        }
    )
    real = sim.drop(columns="step").assign(value=1.0)
    e = real_error(covid, sim, real)["reported_cases"]
    assert e["compared"] == "weekly sums" and e["periods"] == 2  # day 15 is not a full week
    assert e["mape_percent"] == 100.0 and e["simulated"] == 28.0 and e["real"] == 14.0 and e["rmse"] == 7.0
    rate = sim.assign(quantity="unemployment_rate", value=[10.0, 20.0] * 7 + [10.0])
    e = real_error(labor, rate, rate.drop(columns="step").assign(value=10.0))["unemployment_rate"]
    assert e["compared"] == "per month" and e["mape_percent"] == round(700 / 15, 1) and e["over"] == "mean"


def test_horizons_in_calendar_units():
    covid, labor = RunConfig.build(scenario="covid"), RunConfig.build(scenario="labor")
    assert covid.steps_for(covid.make_scenario()) == 92 and labor.steps_for(labor.make_scenario()) == 12
    config = RunConfig.build(scenario="covid", months=1, start="2020-03-16")
    assert config.steps_for(config.make_scenario()) == 31  # 2020-03-16 .. 2020-04-15
    config = RunConfig.build(scenario="labor", months=3)
    assert config.steps_for(config.make_scenario()) == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_writes_nothing(tmp_path):
    with pytest.raises(InputError, match="no CUDA GPU"):
        run(
            RunConfig.build(scenario="covid", device="cuda", weeks=1, agents=1000),
            tmp_path / "r",
            progress=False,
        )
    assert not (tmp_path / "r").exists()


def test_start_outside_the_data_writes_nothing(tmp_path):
    import datetime as dt

    with pytest.raises(InputError, match="start must be 2020-03-01 or later"):
        run(
            RunConfig.build(scenario="covid", start=dt.date(2019, 5, 1), weeks=1, agents=1000),
            tmp_path / "r",
            progress=False,
        )
    assert not (tmp_path / "r").exists()
    # after the shipped data end: nothing to seed from
    with pytest.raises(
        InputError, match=r"cases-by-day\.csv: field 'date_of_interest': no case was reported"
    ):
        run(
            RunConfig.build(scenario="covid", start=dt.date(2023, 5, 1), weeks=1, agents=1000),
            tmp_path / "r",
            progress=False,
        )
    assert not (tmp_path / "r").exists()


def test_resume_with_another_model_is_refused(tmp_path, monkeypatch):
    """--llm-model omitted twice, but the server at the URL now serves another model: resume refuses."""
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer(model="model-a") as server:
        config = RunConfig.build(scenario="covid", policy="llm", agents=5_000, weeks=1, llm_url=server.url)
        run(config, tmp_path / "r", progress=False)
        url = server.url
    with FakeServer(model="model-b") as server:
        longer = config.model_copy(update={"llm_url": server.url, "weeks": 2})
        with pytest.raises(InputError, match="--resume with another model.*'model-a'.*'model-b'"):
            run(longer, tmp_path / "r", resume=True, progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["identity"]["model"] == "model-a" and url.startswith("http://127.0.0.1")


def test_the_servers_own_figures_reach_the_summary_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer(metrics=True) as server:
        server.bodies.extend([{}] * 7)  # requests before this run: not counted
        out = run(
            RunConfig.build(scenario="covid", policy="llm", agents=5_000, weeks=2, llm_url=server.url),
            tmp_path / "r",
            progress=False,
        )
        sent = server.requests - 7
    figures = out.summary["llm"]["server_figures"]
    # whole-action scoring: a tokenization per action (2) and two completions per prompt
    assert sent == 4 * out.summary["llm_queries"] > 0
    assert out.summary["llm"]["requests"] == sent and out.summary["llm"]["retries"] == 0
    assert figures["prompt_tokens"] == 50 * sent and figures["generation_tokens"] == 3 * sent
    assert figures["prefix_cache_hit_rate"] == 0.8
    assert figures["tokens_per_second"] == pytest.approx(53 * sent / out.summary["decide_seconds"], rel=0.01)
    assert "80.0% of prompt tokens served from its prefix cache" in (out.folder / "report.md").read_text()


def test_a_url_with_credentials_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer() as server:
        plain_url = server.url
        secret_url = plain_url.replace("http://", "http://alice:s3cret@")
        out = run(
            RunConfig.build(scenario="covid", policy="llm", agents=5_000, weeks=1, llm_url=secret_url),
            tmp_path / "r",
            progress=False,
        )
    assert server.requests > 0
    for path in out.folder.iterdir():
        if path.suffix in (".json", ".md"):
            assert "s3cret" not in path.read_text(), path.name
    assert json.loads((out.folder / "config.json").read_text())["run"]["llm_url"] == plain_url


def test_failed_model_calls_stop_the_run_or_fall_back_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))

    def script(body, index):  # every request about the Bronx fails
        return "error500" if any("Bronx" in m["content"] for m in body.get("messages", [])) else "good"

    with FakeServer(script) as server:
        base = dict(
            scenario="covid", policy="llm", agents=20_000, weeks=1, llm_url=server.url, llm_model=server.model
        )
        with pytest.raises(LLMError, match="Bronx"):
            run(RunConfig.build(**base), tmp_path / "stop", progress=False)
        out = run(RunConfig.build(**base, on_llm_failure="heuristic"), tmp_path / "fallback", progress=False)
    summary, _, decisions = check_folder(out.folder, "covid")
    modes = decisions.drop_duplicates(["step", "archetype"]).set_index("archetype")["mode"].astype(str)
    bronx = decisions.drop_duplicates("archetype").set_index("archetype")["borough"] == "Bronx"
    assert summary["fallbacks"] == int(bronx.sum()) == 20  # 10 age groups x 2 sexes
    assert (modes[bronx] == "fallback-heuristic").all() and (modes[~bronx] != "fallback-heuristic").all()


# -- against the real local vLLM server ---------------------------------------------------------------


@pytest.mark.integration
def test_llm_covid_run_then_rerun_from_cache(vllm_server, tmp_path, monkeypatch):
    """The fixture's server serves the default weights, as the server lpm starts would: runs through it are
    keyed by those weights' fingerprint, so a later run without --llm-url is answered from the cache and
    starts no server."""
    from lpm.endpoint import Endpoint
    from lpm.model import weights_fingerprint
    from lpm.server_kind import server_kind

    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    fixture = Endpoint(None, vllm_server.model, server_kind("vllm"), weights_fingerprint(), local=vllm_server)
    config = RunConfig.build(scenario="covid", policy="llm", agents=20_000, weeks=2)
    first = run(config, tmp_path / "first", progress=False, endpoint=fixture)
    summary, traj, decisions = check_folder(first.folder, "covid")
    k = summary["archetypes"]["isolation"]
    assert k == 100
    assert 0 < summary["llm_queries"] <= 2 * k  # two weekly decisions; identical prompts are asked once
    assert summary["tokens"] > 0
    assert set(decisions["mode"]) == {"logprobs"} and set(decisions["scoring"]) == {"sequence"}
    figures = summary["llm"]["server_figures"]  # the server's own counters, read before and after
    assert figures["prompt_tokens"] >= summary["prompt_tokens"] > 0
    assert 0 <= figures["prefix_cache_hit_rate"] <= 1 and figures["tokens_per_second"] > 0
    before = metrics(vllm_server.url)["completion_requests"]
    second = run(config, tmp_path / "second", progress=False, endpoint=fixture)
    assert second.summary["llm_queries"] == 0 and second.summary["cache_hits"] == 2 * k
    assert metrics(vllm_server.url)["completion_requests"] == before  # nothing reached the server
    pd.testing.assert_frame_equal(first.result.trajectory, second.result.trajectory)
    # without --llm-url lpm would start its own server, but only at the first cache miss: none here
    local = run(config, tmp_path / "third", progress=False)
    assert local.summary["llm_queries"] == 0 and local.summary["cache_hits"] == 2 * k
    llm = json.loads((tmp_path / "third" / "config.json").read_text())["llm"]
    assert llm["local_server"] and "server_started_seconds" not in llm
    assert llm["weights"] == weights_fingerprint()
    pd.testing.assert_frame_equal(first.result.trajectory, local.result.trajectory)
    # the same server reached by its URL is another identity (lpm cannot see its weights): not the same keys
    by_url = config.model_copy(update={"llm_url": vllm_server.url, "cache": "replay"})
    with pytest.raises(CacheMissError):
        run(by_url, tmp_path / "fourth", progress=False)


@pytest.mark.integration
def test_llm_labor_run(vllm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    config = RunConfig.build(
        scenario="labor",
        policy="llm",
        agents=20_000,
        months=3,
        llm_url=vllm_server.url,
        llm_model=vllm_server.model,
    )
    summary, traj, decisions = check_folder(run(config, tmp_path / "r", progress=False).folder, "labor")
    assert summary["llm_queries"] > 0 and set(decisions["action"]) == {"work", "stay home"}


@pytest.mark.integration
def test_agent_llm_policy_asks_per_agent(vllm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    config = RunConfig.build(
        scenario="covid",
        policy="agent-llm",
        agents=300,
        weeks=1,
        llm_url=vllm_server.url,
        llm_model=vllm_server.model,
    )
    summary, _, decisions = check_folder(run(config, tmp_path / "r", progress=False).folder, "covid")
    assert summary["archetypes"] == {"isolation": 300}
    assert summary["llm_queries"] > 250  # one prompt per agent (a few agents share age, ZIP and group)


def test_agent_llm_over_its_limit_writes_nothing(tmp_path):
    config = RunConfig.build(scenario="covid", policy="agent-llm", agents=6_000, weeks=1, cache="replay")
    with pytest.raises(InputError, match="once per agent; 6,000 agents decide"):
        run(config, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
