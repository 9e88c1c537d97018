"""The scenario contract: scenarios declare themselves, plug in from outside the package, share nothing
between runs, ask each decision once per occurring archetype, and fail with errors naming file, class
and field."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import ArchetypeLLMPolicy, HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import Scenario, make_scenario, scenario_class

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = f"{ROOT / 'examples' / 'sir.py'}:SIR"
TWO_DECISIONS = f"{Path(__file__).with_name('scenarios') / 'sir_vaccination.py'}:SIRVaccination"


def lpm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def pop5k() -> Population:
    return Population.synthesize("nyc", agents=5_000, seed=1)


class CountingDecider:
    """Stand-in for lpm.decision.Decider that records every call: P(first action) = 0.3."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def decide(self, spec, rows, context):
        self.calls.append((spec.name, len(rows)))
        k = len(rows)
        return SimpleNamespace(
            probs=torch.tensor([[0.3, 0.7]] * k),
            mode=["logprobs"] * k,
            cached=[False] * k,
            prompt_tokens=0,
            completion_tokens=0,
            requests=k,
        )


# -- the template, from outside the package -------------------------------------------------------------


def test_template_runs_through_lpm_run_from_outside_the_package(tmp_path):
    """`lpm run examples/sir.py:SIR` from another folder: no edit to lpm, the folder has its plots."""
    res = lpm("run", TEMPLATE, "--agents", "5000", "--days", "21", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "sir · policy heuristic · 5,000 agents · 21 days" in res.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["scenario"] == "sir" and summary["archetypes"] == {"isolation": 10}
    assert summary["totals"]["infections"] > 0
    for name in ("infectious.png", "decisions.png", "trajectory.parquet", "report.md"):
        assert (tmp_path / "r" / name).is_file(), name
    listed = lpm("scenarios", TEMPLATE)
    assert listed.returncode == 0 and "sir_isolation" in listed.stdout and "beta" in listed.stdout


def test_builtin_scenarios_are_listed():
    res = lpm("scenarios")
    assert res.returncode == 0, res.stderr
    assert "covid" in res.stdout and "labor" in res.stdout and "path/to/file.py:ClassName" in res.stdout


@pytest.mark.integration
def test_template_with_the_llm_policy_against_the_real_server(vllm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--policy", "llm", "--llm-url", vllm_server.url, "--llm-model", vllm_server.model]
    res = lpm("run", TEMPLATE, "--agents", "5000", "--days", "14", *args, "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert 0 < summary["llm_queries"] <= 20 and summary["tokens"] > 0  # 10 archetypes x 2 weekly steps
    decisions = pd.read_parquet(tmp_path / "r" / "decisions.parquet")
    assert set(decisions["mode"]) == {"logprobs"} and len(decisions) == 2 * 10 * 2


# -- configuration apart from run state ---------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(4_000, 4_000), (3_000, 5_000)])
def test_one_scenario_shared_by_two_simulations_equals_fresh_objects(sizes):
    a, b = (Population.synthesize("nyc", agents=n, seed=i) for i, n in enumerate(sizes))
    scenario, policy = make_scenario("covid"), HeuristicPolicy()
    shared = [Simulation(scenario, pop, policy, seed=2) for pop in (a, b)]  # both built before either runs
    runs = [sim.run(14) for sim in shared]
    fresh = [Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=2).run(14) for pop in (a, b)]
    for got, want in zip(runs, fresh, strict=True):
        pd.testing.assert_frame_equal(got.trajectory, want.trajectory)
        pd.testing.assert_frame_equal(got.decisions, want.decisions)
    again = shared[0].run(14)  # a simulation can run again: its state is its own
    pd.testing.assert_frame_equal(again.trajectory, fresh[0].trajectory)


def test_scenarios_are_immutable():
    scenario = make_scenario("covid", beta=0.05)
    with pytest.raises(AttributeError, match="immutable configuration"):
        scenario.cell = torch.zeros(3)
    with pytest.raises(Exception, match="frozen"):
        scenario.config.beta = 0.1  # type: ignore[misc]


def test_differentiable_template_equals_inference_and_has_gradients(pop5k):
    sir = make_scenario(TEMPLATE)
    hard = Simulation(sir, pop5k, HeuristicPolicy(), seed=4).run(21)
    sim = Simulation(sir, pop5k, HeuristicPolicy(), seed=4, differentiable=True)
    soft = sim.run(21)
    pd.testing.assert_frame_equal(hard.trajectory, soft.trajectory)
    soft.series["infections"].sum().backward()
    assert float(sim.params["beta"].grad) > 0 and float(sim.params["offsets.isolation"].grad[:, 0].sum()) < 0


# -- several decisions per step ------------------------------------------------------------------------------


def test_two_decisions_each_asked_once_per_occurring_archetype_per_decision_step(pop5k, tmp_path):
    scenario = make_scenario(TWO_DECISIONS)
    decider = CountingDecider()
    sim = Simulation(scenario, pop5k, ArchetypeLLMPolicy(decider), seed=1)
    k = {d.name: d.k for d in sim.asked}
    assert k == {"isolation": 10, "vaccination": 20}
    result = sim.run(15)  # isolation weekly: steps 0, 7, 14; vaccination once: step 0
    assert decider.calls == [
        ("sir_isolation", 10),
        ("sir_vaccination", 20),
        ("sir_isolation", 10),
        ("sir_isolation", 10),
    ]
    assert result.decision_counters["isolation"]["llm_queries"] == 30
    assert result.decision_counters["vaccination"]["llm_queries"] == 20
    d = result.decisions.drop_duplicates(["step", "decision", "archetype"])
    assert d.groupby("decision", observed=True)["step"].unique().map(list).to_dict() == {
        "isolation": [0, 7, 14],
        "vaccination": [0],
    }
    # the vaccination choice holds: about 30 % vaccinated every day (P = 0.3), recorded by the scenario
    vaccinated = result.series["vaccinated"].sum(1)
    assert torch.all(vaccinated == vaccinated[0]) and 0.25 < float(vaccinated[0]) / len(pop5k) < 0.35
    # a policy per decision
    per = {"isolation": HeuristicPolicy(), "vaccination": ArchetypeLLMPolicy(CountingDecider())}
    mixed = Simulation(scenario, pop5k, per, seed=1).run(8)
    modes = mixed.decisions.drop_duplicates(["decision", "mode"]).set_index("decision")["mode"].astype(str)
    assert modes.to_dict() == {"isolation": "heuristic", "vaccination": "logprobs"}


def test_two_decisions_run_folder_plots_both(tmp_path):
    from lpm.run import RunConfig, run

    out = run(RunConfig.build(scenario=TWO_DECISIONS, agents=3_000, days=10), tmp_path / "r", progress=False)
    decisions = pd.read_parquet(out.folder / "decisions.parquet")
    assert set(decisions["decision"]) == {"isolation", "vaccination"}
    assert isinstance(decisions["sex"].dtype, pd.CategoricalDtype)
    assert decisions.loc[decisions["decision"] == "isolation", "sex"].isna().all()  # not an attribute there
    assert (out.folder / "decisions.png").is_file()
    assert out.summary["archetypes"] == {"isolation": 10, "vaccination": 20}


@pytest.mark.integration
def test_two_decisions_send_one_request_per_archetype_per_decision_step(vllm_server, pop5k):
    """Counted by the real server: 10 isolation archetypes at steps 0 and 7, 20 vaccination ones at step 0."""
    from lpm.backend import OpenAIBackend
    from lpm.decision import Decider
    from lpm.server import metrics

    backend = OpenAIBackend(vllm_server.url, vllm_server.model)
    policy = ArchetypeLLMPolicy(Decider(backend, None, progress=False))  # no cache: every decision is asked
    before = metrics(vllm_server.url)["completion_requests"]
    result = Simulation(make_scenario(TWO_DECISIONS), pop5k, policy, seed=1).run(10)
    sent = metrics(vllm_server.url)["completion_requests"] - before
    assert result.counters["llm_queries"] == 2 * 10 + 20
    assert sent == 2 * (2 * 10 + 20) + backend.stats.retries  # whole-action scoring: a request per action


# -- bad input: clear errors naming the file, the class and the field ---------------------------------------

HEADER = """
import datetime as dt
import torch
from types import SimpleNamespace
from lpm.scenarios import Decision, Quantity, Scenario, ScenarioConfig

class Config(ScenarioConfig):
    start: dt.date = dt.date(2020, 3, 1)

SPEC = {"name": "toy", "attributes": ["sex"], "actions": ["stay", "go"],
        "prompt": {"system": "Choose.", "user": "You are {sex}. Stay or go?"}}
"""

GOOD = """
class Toy(Scenario):
    name, step_unit, horizon, Config = "toy", "day", 5, Config
    quantities = (Quantity("going", "agents going", by="borough"),)
    decisions = (Decision("trip", SPEC, ("stay", "go"), heuristic={"go": lambda rows, ctx: 0.5 + 0 * rows.index}),)

    def setup(self, pop, device):
        return SimpleNamespace(borough=pop["borough"].to(torch.int32), nb=len(pop.labels("borough")))

    def init_state(self, world, sampler):
        return {}

    def step(self, world, state, actions, params, t, sampler):
        going = sampler.count(world.borough, world.nb, sampler.chose(actions["trip"], 1))
        return {}, {"going": going}
"""


def write(tmp_path: Path, body: str, name: str = "toy.py") -> str:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return str(path)


def test_a_good_user_scenario_runs(tmp_path, pop5k):
    path = write(tmp_path, GOOD)
    result = Simulation(make_scenario(f"{path}:Toy"), pop5k, HeuristicPolicy()).run(5)
    assert 0.45 < float(result.series["going"][0].sum()) / len(pop5k) < 0.55
    assert scenario_class(path) is scenario_class(f"{path}:Toy")  # one class per file, imported once


@pytest.mark.parametrize(
    "edit,needle",
    [
        (("quantities = (", "_quantities = ("), r"class Toy: field 'quantities': missing"),
        (('"toy", "day", 5', '"toy", "hour", 5'), r"class Toy: field 'step_unit': must be one of day, week"),
        (('("stay", "go"), heuristic', '("go", "stay"), heuristic'), r"field 'decisions\[0\].actions'"),
        (('heuristic={"go"', 'heuristic={"fly"'), r"field 'decisions\[0\].heuristic'"),
        (("def step(", "def stop("), r"class Toy: the class does not implement step"),
    ],
)
def test_bad_declarations_name_file_class_and_field(tmp_path, edit, needle):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(InputError, match=rf"toy\.py: {needle}" if "class Toy" in needle else needle) as info:
        scenario_class(f"{path}:Toy")
    assert "toy.py" in str(info.value)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (('{"going": going}', '{"going": going, "staying": going}'), "record\\(s\\) \\['staying'\\]"),
        (('{"going": going}', "{}"), "no record for declared quantity\\(ies\\) \\['going'\\]"),
        (('{"going": going}', '{"going": going.sum()}'), "record 'going' at step 0 has shape \\(\\)"),
    ],
)
def test_bad_records_name_file_class_and_field(tmp_path, pop5k, edit, needle):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(InputError, match=needle) as info:
        Simulation(make_scenario(f"{path}:Toy"), pop5k, HeuristicPolicy()).run(2)
    assert "toy.py: class Toy" in str(info.value)


def test_missing_context_value_names_the_variable(tmp_path, pop5k):
    path = tmp_path / "toy.py"  # the spec declares a context variable that observe() never gives
    path.write_text(
        HEADER.replace('"prompt":', '"context": {"risk": {"description": "risk"}}, "prompt":') + GOOD
    )
    with pytest.raises(
        InputError, match=r"observe\(\) at step 0 gave no value for context variable\(s\) \['risk'\]"
    ):
        Simulation(make_scenario(f"{path}:Toy"), pop5k, HeuristicPolicy()).run(1)


@pytest.mark.parametrize(
    "source,ref,needle",
    [
        ("def broken(:\n", "{path}:Toy", r"toy\.py:\d+: syntax error"),
        (
            "raise RuntimeError('no data here')\n",
            "{path}:Toy",
            r"toy\.py: importing it failed: RuntimeError: no data here \(line \d+\)",
        ),
        (HEADER + GOOD, "{path}:Toi", r"toy\.py: no class 'Toi' \(scenario classes there: Toy\)"),
        (
            HEADER + GOOD + "\nclass Other:\n    pass\n",
            "{path}:Other",
            r"'Other' is not a subclass of lpm\.scenarios\.Scenario",
        ),
        (HEADER + GOOD, "{path}x:Toy", r"toy\.pyx: a scenario file is a Python file \(\.py\)"),
        (HEADER + GOOD, "nowhere/toy.py:Toy", r"nowhere/toy\.py: no such scenario file"),
        (HEADER + GOOD, "not_a_module_at_all:Toy", r"no module 'not_a_module_at_all'"),
    ],
)
def test_scenarios_that_cannot_be_loaded(tmp_path, source, ref, needle):
    path = tmp_path / "toy.py"
    path.write_text(source)
    with pytest.raises(InputError, match=needle):
        scenario_class(ref.format(path=path))


def test_cli_reports_a_bad_scenario_without_a_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("quantities = (", "_quantities = ("))
    res = lpm("run", f"{path}:Toy", "--agents", "1000", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "class Toy: field 'quantities': missing" in res.stderr and "hint:" in res.stderr
    assert not (tmp_path / "r").exists()


def test_the_base_class_is_the_contract():
    assert {"setup", "init_state", "step"} <= Scenario.__abstractmethods__
    covid = scenario_class("covid")
    assert covid.parameter_ranges() == dict.fromkeys(
        [
            "beta",
            "detected_march",
            "detected",
            "detected_summer",
            "work_pause",
            "community_pause",
            "work_reopened",
            "community_reopened",
        ],
        (0.0, 1.0),
    ) | dict.fromkeys(
        ["beta_bronx", "beta_brooklyn", "beta_manhattan", "beta_queens", "beta_staten_island"], (0.0, 5.0)
    ) | dict.fromkeys(
        [
            "beta_bronx_late",
            "beta_brooklyn_late",
            "beta_manhattan_late",
            "beta_queens_late",
            "beta_staten_island_late",
        ],
        (0.0, 5.0),
    )
    assert [q.name for q in covid.quantities if q.real] == ["reported_cases"]


def test_installed_plugins_go_through_the_same_registry(tmp_path, monkeypatch):
    """A package declaring an entry point in the group ``lpm.scenarios`` is found by its name."""
    import importlib.metadata

    from lpm.scenarios import available_scenarios

    write(tmp_path, GOOD, name="toy_plugin.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint("toy", "toy_plugin:Toy", "lpm.scenarios")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda **kw: [point] if kw.get("group") == "lpm.scenarios" else real(**kw),
    )
    assert available_scenarios()["toy"] == "toy_plugin:Toy"
    assert scenario_class("toy").name == "toy" and scenario_class("toy_plugin:Toy") is scenario_class("toy")


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    from lpm.run import RunConfig, run

    path = write(tmp_path, GOOD.replace('{"going": going}', '{"going": going, "staying": going}'))
    with pytest.raises(InputError, match=r"returned the record\(s\) \['staying'\] at step 0"):
        run(RunConfig.build(scenario=f"{path}:Toy", agents=1_000), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_decision_can_be_asked_under_another_spec(pop5k):
    """Coarser or finer archetypes for the same decision (what a granularity sweep needs)."""
    coarse = {
        "name": "covid_isolation_by_age",
        "attributes": ["age_group"],
        "actions": ["isolate", "go out"],
        "prompt": {
            "system": "Isolate or go out?",
            "user": "{cases} cases this week. You are aged {age_group}.",
        },
        "context": {"cases": {"description": "cases"}, "cases_change": {"description": "change"}},
    }
    sim = Simulation(make_scenario("covid"), pop5k, HeuristicPolicy(), specs={"isolation": coarse})
    assert sim.asked[0].k == 10 and set(sim.run(8).archetypes["isolation"].columns) == {"age_group", "agents"}
    with pytest.raises(InputError, match=r"reads the actions \['isolate', 'go out'\], the spec has"):
        Simulation(
            make_scenario("covid"),
            pop5k,
            HeuristicPolicy(),
            specs={"isolation": {**coarse, "actions": ["a", "b"]}},
        )
    with pytest.raises(InputError, match=r"specs for unknown decision\(s\) \['work'\]"):
        Simulation(make_scenario("covid"), pop5k, HeuristicPolicy(), specs={"work": coarse})
