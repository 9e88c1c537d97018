import pandas as pd
import pytest
import torch

from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario
from lpm.scenarios.covid import CovidScenario, contact_matrix, gamma_hazard, weekly_mse


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.synthesize("nyc", agents=20_000, seed=0)


def _sim(pop, beta=0.05, diff=True, offsets=None, **params):
    scenario = CovidScenario({"beta": beta, **params})
    return Simulation(scenario, pop, HeuristicPolicy(), seed=3, differentiable=diff, offsets=offsets)


def test_params_validated():
    with pytest.raises(InputError, match="'detected'.*got 1.5"):
        CovidScenario({"detected": 1.5})
    with pytest.raises(InputError, match="unknown parameter"):
        CovidScenario({"betta": 0.1})
    with pytest.raises(InputError, match="share_zip"):
        CovidScenario({"share_zip": 0.8, "share_borough": 0.5})
    assert make_scenario("covid", {"beta": 0.02}).config.beta == 0.02
    assert make_scenario("covid", beta=0.03).config.beta == 0.03


def test_tables():
    c = contact_matrix(torch.full((10,), 0.1))
    assert c.shape == (10, 10) and torch.allclose(c.sum(1)[0], torch.tensor(10.21))
    h = gamma_hazard(5.2, 3.0)
    survive = torch.cumprod(1 - h.double(), 0)
    mean = float(1 + survive[:-1].sum())  # mean of the discrete duration (days)
    assert 5.0 < mean < 6.2 and float(h[-1]) == 1.0


def test_seeding_and_context_follow_real_cases(pop):
    sim = _sim(pop, diff=False)
    state = sim.initial_state().scenario
    infectious = int((state["comp"] == 2).sum())
    assert 50 < infectious < 2000  # real cases of 2020-03-16..22 / 0.1 × 20k / 8.34M ≈ 600
    ctx = sim.scenario.observe(sim.world, state, 0)
    assert ctx["week"] == 2 and ctx["cases"] > 1000 and ctx["cases_change"] > 0


def test_differentiable_forward_equals_inference(pop):
    """One implementation of a day: only the sampler differs, and the forward values are the same."""
    soft = _sim(pop).run(10)
    hard = _sim(pop, diff=False).run(10)
    pd.testing.assert_frame_equal(soft.trajectory, hard.trajectory)
    pd.testing.assert_frame_equal(soft.decisions, hard.decisions)
    assert soft.series["infections"].requires_grad and not hard.series["infections"].requires_grad


def test_one_step_gradient_equals_expected_value_derivative(pop):
    """Straight-through gradient of a day's infections = d/dbeta of the expected infections (exact)."""
    sim = _sim(pop)
    total = sim.run(1).series["infections"].sum()
    total.backward()
    grad = float(sim.params["beta"].grad)

    def expected(beta: float) -> float:
        s = _sim(pop, beta=beta)
        with torch.no_grad():
            start = s.initial_state()
            iso = s.step(start, 0).actions["isolation"][:, 0]  # the day's decisions (independent of beta)
            w, c, x = s.world, s.scenario.config, start.scenario["comp"]
            cell = w.cell.long()
            keep = 1 - c.isolation_effect * iso
            weighted = torch.zeros(w.nc).index_add(0, cell, x[:, 2] * keep)
            lam = s.scenario.force(w, weighted, torch.tensor(beta))
            return float((x[:, 0] * -torch.expm1(-lam[cell] * keep)).double().sum())

    h = 1e-3
    fd = (expected(0.05 + h) - expected(0.05 - h)) / (2 * h)
    assert grad > 0 and abs(grad - fd) < 2e-3 * abs(fd)


def test_multi_step_gradient_against_finite_differences(pop):
    """Over three weeks the straight-through gradient of total reported cases tracks central finite
    differences of the hard simulation with common random numbers (within 35 %)."""
    steps = 21
    sim = _sim(pop)
    sim.run(steps).series["reported_cases"].sum().backward()
    grad = float(sim.params["beta"].grad)
    with torch.no_grad():
        f = lambda b: float(_sim(pop, beta=b, diff=False).run(steps).series["reported_cases"].sum())  # noqa: E731
        h = 0.005
        fd = (f(0.05 + h) - f(0.05 - h)) / (2 * h)
    assert fd > 0 and abs(grad - fd) < 0.35 * fd


def test_offsets_and_loss_get_gradients(pop):
    sim = _sim(pop)
    r = sim.run(14)
    loss = weekly_mse(r.series["reported_cases"], r.real, pop.labels("borough"), pd.Timestamp("2020-03-16"))
    loss.backward()
    assert torch.isfinite(loss) and float(sim.params["beta"].grad) != 0
    g = sim.params["offsets.isolation"].grad
    assert g.shape == (100, 2) and float(g.abs().sum()) > 0
    # more isolation -> fewer cases: d(total cases)/d(offset of isolate) < 0 summed over archetypes
    sim2 = _sim(pop)
    sim2.run(14).series["reported_cases"].sum().backward()
    assert float(sim2.params["offsets.isolation"].grad[:, 0].sum()) < 0


def test_offset_gradient_against_finite_differences(pop):
    """d(total infections over 2 weeks)/d(common shift of the 'isolate' offset): the straight-through
    gradient summed over archetypes tracks central finite differences of the hard simulation with
    common random numbers."""
    steps = 14
    sim = _sim(pop)
    sim.run(steps).series["infections"].sum().backward()
    grad = float(sim.params["offsets.isolation"].grad[:, 0].sum())

    def f(delta: float) -> float:
        offsets = torch.zeros(100, 2)
        offsets[:, 0] = delta
        with torch.no_grad():
            return float(_sim(pop, diff=False, offsets=offsets).run(steps).series["infections"].sum())

    h = 0.3
    fd = (f(h) - f(-h)) / (2 * h)
    assert fd < 0 and grad < 0  # more isolation, fewer infections
    assert abs(grad - fd) < 0.35 * abs(fd), (grad, fd)
