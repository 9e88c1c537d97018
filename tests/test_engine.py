from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import (
    AgentLLMPolicy,
    ArchetypeLLMPolicy,
    ByAttribute,
    HeuristicPolicy,
    Policy,
    resolve_context,
)
from lpm.population import Population
from lpm.scenarios.covid import CovidScenario


@pytest.fixture(scope="module")
def pop10k() -> Population:
    return Population.synthesize("nyc", agents=10_000, seed=0)


@pytest.fixture(scope="module")
def pop3k() -> Population:
    return Population.synthesize("nyc", agents=3_000, seed=0)


class ScriptedDecider:
    """Stand-in for lpm.decision.Decider: P(first action) = 0.2 + 0.01 * row index, every other row cached."""

    def __init__(self):
        self.calls = []

    def decide(self, spec, rows, context):
        self.calls.append((len(rows), dict(context)))
        k = len(rows)
        p0 = torch.tensor([0.2 + 0.01 * (i % 50) for i in range(k)])
        return SimpleNamespace(
            probs=torch.stack([p0, 1 - p0], 1),
            mode=["logprobs"] * k,
            cached=[i % 2 == 0 for i in range(k)],
            prompt_tokens=10 * k,
            completion_tokens=k,
            requests=k - (k + 1) // 2,
        )


def _run(pop, steps=15, **kw):
    kw.setdefault("seed", 5)
    return Simulation(CovidScenario(), pop, kw.pop("policy", HeuristicPolicy()), **kw).run(steps)


def test_agents_conserved_every_step(pop10k):
    result = _run(pop10k)
    comps = ["susceptible", "exposed", "infectious", "recovered"]
    total = sum(result.series[q] for q in comps).sum(dim=1)
    assert torch.equal(total, torch.full_like(total, len(pop10k)))
    assert result.series["infections"].sum() > 0


def test_same_seed_same_trajectory_other_seed_differs(pop10k):
    a, b, c = _run(pop10k), _run(pop10k), _run(pop10k, seed=6)
    pd.testing.assert_frame_equal(a.trajectory, b.trajectory)
    pd.testing.assert_frame_equal(a.decisions, b.decisions)
    assert not a.trajectory["value"].equals(c.trajectory["value"])


def test_frames_shapes(pop10k):
    r = _run(pop10k, steps=8)
    assert list(r.trajectory.columns) == ["step", "date", "borough", "quantity", "value"]
    assert len(r.trajectory) == 8 * 5 * len(CovidScenario.quantities)
    # weekly decisions: steps 0 and 7, 100 archetypes, 2 actions
    assert len(r.decisions) == 2 * 100 * 2 and set(r.decisions["decision"]) == {"isolation"}
    assert set(r.decisions["mode"]) == {"heuristic"}
    assert {"age_group", "sex", "borough", "action", "probability", "cached"} <= set(r.decisions.columns)
    assert set(r.real["quantity"]) == {"reported_cases"} and r.real["date"].nunique() == 8
    assert r.step_seconds > 0 and r.counters["llm_queries"] == 0


class Abort(Exception):
    pass


def test_resume_equals_uninterrupted_run(pop10k, tmp_path):
    steps = 12
    whole = _run(pop10k, steps=steps)

    def stop(t, sim):
        if t == 8:
            raise Abort

    with pytest.raises(Abort):
        Simulation(CovidScenario(), pop10k, HeuristicPolicy(), seed=5, callback=stop).run(
            steps, out_dir=tmp_path
        )
    resumed = Simulation(CovidScenario(), pop10k, HeuristicPolicy(), seed=5).run(
        steps, out_dir=tmp_path, resume=True
    )
    assert resumed.resumed_from == 9
    pd.testing.assert_frame_equal(whole.trajectory, resumed.trajectory)
    pd.testing.assert_frame_equal(whole.decisions, resumed.decisions)
    for key in whole.state.scenario:
        assert torch.equal(whole.state.scenario[key], resumed.state.scenario[key]), key
    assert torch.equal(whole.state.actions["isolation"], resumed.state.actions["isolation"])
    # a checkpoint of another run is refused
    with pytest.raises(InputError, match="different run"):
        Simulation(CovidScenario(), pop10k, HeuristicPolicy(), seed=6).run(
            steps, out_dir=tmp_path, resume=True
        )


def test_policy_base_is_checked():
    class Incomplete(Policy):
        pass

    with pytest.raises(TypeError):
        Incomplete()
    with pytest.raises(TypeError, match="decide"):
        ArchetypeLLMPolicy(object())


def test_archetype_llm_policy_with_scripted_decider(pop10k):
    decider = ScriptedDecider()
    r = _run(pop10k, steps=8, policy=ArchetypeLLMPolicy(decider))
    assert len(decider.calls) == 2 and decider.calls[0][0] == 100
    assert set(decider.calls[0][1]) == {"week", "cases", "cases_change"}
    assert r.counters["cache_hits"] == 2 * 50 and r.counters["llm_queries"] == 2 * 50
    assert r.counters["tokens"] == 2 * 1100
    first = r.decisions[(r.decisions.step == 0) & (r.decisions.action == "isolate")]
    assert first["probability"].round(6).tolist()[:3] == [0.2, 0.21, 0.22]


def test_context_by_attribute_splits_requests(pop3k):
    from lpm.archetype import ArchetypeSpec
    from lpm.scenarios.labor import LaborScenario

    spec = ArchetypeSpec.load("labor_work")
    decider = ScriptedDecider()
    policy = ArchetypeLLMPolicy(decider)
    archetypes = policy.setup(LaborScenario.decisions[0], spec, pop3k, spec.group(pop3k))
    rates = {b: float(i) for i, b in enumerate(pop3k.labels("borough"))}
    d = policy.decide(
        archetypes,
        {"month": "April 2020", "cases": 1.0, "unemployment_rate": ByAttribute("borough", rates)},
        step=0,
    )
    assert len(decider.calls) == 5 and d.probs.shape == (archetypes.k, 2)
    assert sorted(c[1]["unemployment_rate"] for c in decider.calls) == [0.0, 1.0, 2.0, 3.0, 4.0]
    resolved = resolve_context(archetypes.rows, {"x": ByAttribute("borough", rates), "y": 2})
    assert all(
        r["x"] == rates[row["borough"]] and r["y"] == 2
        for r, row in zip(resolved, archetypes.rows, strict=True)
    )


def test_agent_llm_policy_one_row_per_agent(pop3k, pop10k):
    decider = ScriptedDecider()
    r = _run(pop3k, steps=2, policy=AgentLLMPolicy(decider))
    assert decider.calls[0][0] == len(pop3k)
    table = r.archetypes["isolation"]
    assert {"age", "zip"} <= set(table.columns) and len(table) == len(pop3k)
    with pytest.raises(InputError, match="5,000"):
        Simulation(CovidScenario(), pop10k, AgentLLMPolicy(ScriptedDecider()))


def test_offsets_shift_decisions(pop10k):
    k = 100
    offsets = torch.zeros(k, 2)
    offsets[:, 0] = 3.0  # strongly towards isolating
    base, shifted = _run(pop10k, steps=1), _run(pop10k, steps=1, offsets=offsets)
    iso = lambda r: float(r.series["isolating"].sum())  # noqa: E731
    assert iso(shifted) > iso(base) + 0.1 * len(pop10k)
    with pytest.raises(InputError, match="offsets"):
        Simulation(CovidScenario(), pop10k, HeuristicPolicy(), offsets=torch.zeros(3, 2))
    with pytest.raises(InputError, match="unknown decision"):
        Simulation(CovidScenario(), pop10k, HeuristicPolicy(), offsets={"vaccination": torch.zeros(100, 2)})


def test_population_missing_an_attribute_is_a_clear_error(pop10k):
    from lpm.scenarios import make_scenario

    cols = {c: pop10k[c] for c in pop10k.columns if c != "zip"}
    labels = {c: pop10k.labels(c) for c in cols if pop10k.is_categorical(c)}
    with pytest.raises(InputError, match=r"covid scenario needs population attribute\(s\) \['zip'\]"):
        Simulation(make_scenario("covid"), Population(cols, labels), HeuristicPolicy())
    cols.pop("sex")
    labels.pop("sex")
    with pytest.raises(
        InputError, match=r"covid_isolation\.yaml: field 'attributes\[1\]'.*no attribute 'sex'"
    ):
        Simulation(
            make_scenario("covid"),
            Population({**cols, "zip": pop10k["zip"]}, {**labels, "zip": pop10k.labels("zip")}),
            HeuristicPolicy(),
        )
