import pytest
import torch

from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import ByAttribute, HeuristicPolicy
from lpm.population import Population
from lpm.scenarios.labor import LaborScenario


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.synthesize("nyc", agents=10_000, seed=0)


def test_labor_runs_end_to_end(pop):
    sim = Simulation(LaborScenario(), pop, HeuristicPolicy(), seed=2)
    ctx = sim.scenario.observe(sim.world, sim.initial_state().scenario, 1)
    assert ctx["month"] == "April 2020" and ctx["cases"] > 10_000
    assert isinstance(ctx["unemployment_rate"], ByAttribute)
    r = sim.run(6)
    rate = r.series["unemployment_rate"]
    assert rate.shape == (6, 5) and bool(((rate >= 0) & (rate <= 100)).all())
    members = r.series["labor_force"]
    assert torch.equal(members, members[:1].expand_as(members))  # members conserved
    assert int(members[0].sum()) == int(pop["labor_force"].sum())
    assert float(rate[1:3].mean()) > float(rate[0].mean())  # the spring 2020 shock raises unemployment
    real = r.real
    assert set(real["quantity"]) == {"unemployment_rate"} and real["date"].nunique() == 6
    # only labor-force members decide
    assert int(r.archetypes["work"]["agents"].sum()) == int(pop["labor_force"].sum())
    again = Simulation(LaborScenario(), pop, HeuristicPolicy(), seed=2).run(6)
    assert r.trajectory.equals(again.trajectory)


def test_labor_params_and_mode(pop):
    with pytest.raises(InputError, match="labor.py: class LaborScenario: parameter 'start'"):
        LaborScenario({"start": "2020-03-15"})
    with pytest.raises(InputError, match="inference mode"):
        Simulation(LaborScenario(), pop, HeuristicPolicy(), differentiable=True)
