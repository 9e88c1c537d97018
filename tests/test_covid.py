import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

import lpm.scenarios.covid as covid
from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario
from lpm.scenarios.covid import (
    CovidScenario,
    Intervention,
    chain_hazard,
    contact_matrix,
    report_delay,
    seed_estimate,
    weekly,
)


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.synthesize("nyc", agents=20_000, seed=0)


def _sim(pop, diff=True, offsets=None, seed=3, estimator="households", **params):
    scenario = CovidScenario({"start": "2020-03-16"} | params)
    return Simulation(
        scenario, pop, HeuristicPolicy(), seed=seed, differentiable=diff, offsets=offsets, estimator=estimator
    )


def test_params_validated():
    with pytest.raises(InputError, match="'detected'.*got 1.5"):
        CovidScenario({"detected": 1.5})
    with pytest.raises(InputError, match="unknown parameter"):
        CovidScenario({"betta": 0.1})
    with pytest.raises(InputError, match="share_zip"):
        CovidScenario({"share_zip": 0.8, "share_borough": 0.5})
    with pytest.raises(InputError, match="start must be 2020-03-01 or later"):
        CovidScenario({"start": "2020-02-29"})
    late = Intervention(date=dt.date(2023, 1, 1), layer="work", level=0.5)
    with pytest.raises(InputError, match=r"interventions\[0\]\.date 2023-01-01 lies outside"):
        CovidScenario({"interventions": (late,)})
    unknown = Intervention(date=dt.date(2020, 4, 1), layer="work", level="work_lockdown")
    with pytest.raises(InputError, match=r"interventions\[0\]\.level 'work_lockdown' names no parameter"):
        CovidScenario({"interventions": (unknown,)})
    assert make_scenario("covid", {"beta": 0.02}).config.beta == 0.02


def test_tables():
    shares = torch.tensor([0.06, 0.09, 0.06, 0.09, 0.17, 0.14, 0.12, 0.11, 0.09, 0.07])
    c = contact_matrix(shares)
    total = shares[:, None] * c  # contacts from band a to band b, per resident of the city
    assert torch.allclose(total, total.T, rtol=1e-5)  # reciprocal
    assert (
        abs(float((c.sum(1) * shares).sum()) - float((torch.tensor(covid.POLYMOD_CONTACTS) * shares).sum()))
        < 1e-3
    )
    h = chain_hazard(CovidScenario().config)
    assert float(h[covid.S]) == 0 and float(h[covid.R]) == 0  # S is set per agent, R absorbs
    assert abs(2 / float(h[covid.E1]) - 2.9) < 1e-9  # mean latent period of the two stages
    d = report_delay(3.0)
    assert abs(float(d.sum()) - 1) < 1e-12 and 2.5 < float((d * torch.arange(len(d))).sum()) < 3.5


def test_layers_follow_the_dated_interventions():
    sc = CovidScenario()  # starts 2020-03-01
    params = sc.params()
    before, closed, pause = sc.levels(params, 0), sc.levels(params, 15), sc.levels(params, 21)
    assert before == dict.fromkeys(covid.LAYERS, 1.0)
    assert closed["school"] == 0.0 and closed["work"] == 1.0
    assert float(pause["work"]) == pytest.approx(sc.config.work_pause) and pause["household"] == 1.0


def test_seeding_reads_no_data_on_or_after_the_start(pop, monkeypatch):
    """Changing every real case on or after the start date changes nothing in the state at the start."""
    state = _sim(pop, diff=False).initial_state().scenario
    real = covid._real_cases()
    changed = real.assign(cases=np.where(real["date"] >= "2020-03-16", real["cases"] * 10 + 7, real["cases"]))
    monkeypatch.setattr(covid, "_real_cases", lambda path=None: changed)
    again = _sim(pop, diff=False).initial_state().scenario
    for name in state:
        assert torch.equal(state[name], again[name]), name
    # and changing a day before the start does change it
    earlier = real.assign(cases=np.where(real["date"] == "2020-03-14", real["cases"] * 3, real["cases"]))
    monkeypatch.setattr(covid, "_real_cases", lambda path=None: earlier)
    assert not torch.equal(state["stage"], _sim(pop, diff=False).initial_state().scenario["stage"])


def test_seeding_without_earlier_cases_is_a_clear_error():
    c = CovidScenario({"start": "2020-03-01"}).config
    empty = pd.DataFrame({"date": pd.to_datetime([]), "borough": [], "cases": []})
    with pytest.raises(
        InputError, match=r"cases-by-day\.csv: field 'date_of_interest': no case was reported"
    ):
        seed_estimate(c, {}, empty, ["Bronx"])


@pytest.mark.parametrize("start", ["2020-03-08", "2020-03-10", "2020-03-13", "2020-03-14"])
def test_seeding_with_fewer_days_of_data_than_its_window(start):
    """Starts 2020-03-09 .. 13 have 9 .. 13 days of data before them, fewer than the 14 of the growth
    fit's window: the fit uses the days there are (it used to fail with an IndexError)."""
    c = CovidScenario({"start": start}).config
    cases = covid._real_cases()
    before = cases[cases["date"] < pd.Timestamp(start)]
    occupancy, onsets = seed_estimate(c, {}, before, list(covid.nyc.BOROUGH_NAMES.values()))
    assert bool(torch.isfinite(occupancy).all()) and float(occupancy[:, 1:].sum()) > 0
    assert bool(torch.isfinite(onsets).all())


def test_a_seed_from_few_cases_is_spread_over_the_boroughs_by_population():
    """A start on 2020-03-01 sees one reported case, in Manhattan: the seed's split over boroughs is then
    mostly the boroughs' shares of the population (seed_prior_cases), not all in Manhattan as the reported
    split alone (prior 0) puts it; with thousands of cases before a later start the reported split rules.
    The citywide infections are the same either way."""
    boroughs = list(covid.nyc.BOROUGH_NAMES.values())
    cases = covid._real_cases()
    people = covid.nyc.borough_population()
    share = torch.tensor([float(people[code]) for code in covid.nyc.BOROUGH_NAMES], dtype=torch.float64)
    share = share / share.sum()
    for start, closest in (("2020-03-01", "population"), ("2020-04-01", "reported")):
        before = cases[cases["date"] < pd.Timestamp(start)]
        spread = seed_estimate(CovidScenario({"start": start}).config, {}, before, boroughs)[0]
        alone = seed_estimate(
            CovidScenario({"start": start, "seed_prior_cases": 0}).config, {}, before, boroughs
        )[0]
        infected, infected_alone = spread[:, 1:].sum(1), alone[:, 1:].sum(1)
        assert float(infected.sum()) == pytest.approx(float(infected_alone.sum()), rel=1e-9)
        to_population = float((infected / infected.sum() - share).abs().max())
        alone_to_population = float((infected_alone / infected_alone.sum() - share).abs().max())
        to_reported = float((infected / infected.sum() - infected_alone / infected_alone.sum()).abs().max())
        if closest == "population":
            assert float(infected_alone[boroughs.index("Manhattan")] / infected_alone.sum()) > 0.999
            assert to_population < 0.02 < 0.5 < alone_to_population
        else:
            assert to_reported < 0.01


def test_seeds_of_consecutive_starts_agree():
    """A later start can only have more people infected: over daily starts 2020-03-05 .. 06-30 the seed's
    infected residents never fall by more than 10 % from one start to the next (0.959 at worst with the
    positivity trend; with the detected-share trend a 03-22 start seeded 5.4 million, 03-23 3.2 million),
    and before 04-10 they stay under 30 % of the city (22.7 % had antibodies by late April 2020,
    Rosenberg et al., Ann Epidemiol 2020; the detected-share trend seeded 65 % by 03-22)."""
    boroughs = list(covid.nyc.BOROUGH_NAMES.values())
    cases = covid._real_cases()
    city = float(sum(covid.nyc.borough_population().values))

    def infected(start: pd.Timestamp, trend: str) -> float:
        c = CovidScenario({"start": str(start.date()), "seed_trend": trend}).config
        return float(seed_estimate(c, {}, cases[cases["date"] < start], boroughs)[0][:, 1:].sum())

    days = pd.date_range("2020-03-05", "2020-06-30")
    seeds = np.array([infected(d, "positivity") for d in days])
    assert (seeds[1:] / seeds[:-1]).min() > 0.9
    assert seeds[days < "2020-04-10"].max() < 0.3 * city
    old = np.array([infected(d, "detected") for d in days[15:22]])  # 03-20 .. 03-26
    assert (old[1:] / old[:-1]).min() < 0.7 and old.max() > 0.5 * city


def test_a_day_without_decisions_reads_no_tensor_back_to_the_host(pop):
    """Issue 12's GPU path: between decision days a step reads no tensor value into Python (item, tolist,
    bool, numpy, cpu; each a device sync on a GPU). What stays: ``nonzero`` of the infectious agents (a
    size the device decides), and the context copied on decision days (14 values a week)."""
    from torch.overrides import TorchFunctionMode

    reads = {"tolist", "item", "__bool__", "numpy", "cpu", "__int__", "__float__", "__index__"}
    seen: list[str] = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in reads:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    sim = _sim(pop, diff=False)
    state = sim.initial_state()
    state = sim.step(state, 0)  # a decision day
    days = [
        t for t in range(1, 7) if not any(sim.scenario.decides_at(d.spec.cadence.value, t) for d in sim.asked)
    ]
    assert days == [1, 2, 3, 4, 5, 6]
    with Reads():
        for t in days:
            state = sim.step(state, t)
    assert seen == []
    with Reads():  # the check sees a read where there is one
        bool(state.scenario["stage"].any())
    assert seen == ["__bool__"]


def test_agents_conserved_and_seeded_sensibly(pop):
    r = _sim(pop, diff=False).run(21)
    s = r.series
    alive = s["susceptible"] + s["exposed"] + s["infectious"] + s["recovered"]
    assert torch.equal(alive.sum(1), torch.full((21,), float(len(pop))))
    infected = 1 - float(s["susceptible"][0].sum()) / len(pop)
    assert 0.001 < infected < 0.5  # a few percent of the city infected by mid-March 2020
    ctx = r.real  # the real series is there to compare with
    assert ctx["value"].sum() > 0


@pytest.mark.parametrize("estimator", ["households", "pruned"])
def test_differentiable_forward_equals_inference(pop, estimator):
    """One implementation of a day: only the sampler differs, and the forward values are the same."""
    soft = _sim(pop, estimator=estimator).run(10)
    hard = _sim(pop, diff=False).run(10)
    pd.testing.assert_frame_equal(soft.trajectory, hard.trajectory)
    pd.testing.assert_frame_equal(soft.decisions, hard.decisions)
    assert soft.series["infections"].requires_grad and not hard.series["infections"].requires_grad


def test_world_gather_gives_index_selects_values_and_gradient(pop):
    """The world's per-agent gathers (household, place, cell) read what ``index_select`` reads, and their
    backward (a ``scatter_add_`` by the int64 index) sums each entry's gradient to the same bits as
    ``index_select``'s own; the (household, place) pairs are one id per pair."""
    world = _sim(pop).world
    g = torch.randn(world.n, dtype=torch.float32)
    for by, rows in (("household", world.nh), ("place", len(world.place_school)), ("cell", world.nc)):
        table = torch.randn(rows, requires_grad=True)
        fast = world.gather(table, by)
        plain = table.index_select(0, getattr(world, by))
        assert torch.equal(fast, plain), by
        (g_fast,) = torch.autograd.grad(fast, table, g)
        (g_plain,) = torch.autograd.grad(plain, table, g)
        assert torch.equal(g_fast, g_plain), by
    pair = world.house_place.long()
    key = world.household.long() * len(world.place_school) + world.place.long()
    first = torch.full((int(pair.max()) + 1,), -1, dtype=torch.int64).scatter_reduce(0, pair, key, "amax")
    assert torch.equal(first.index_select(0, pair), key)  # a pair id names one (household, place)
    assert len(torch.unique(key)) == int(pair.max()) + 1


def test_world_derives_values_once_per_source_tensor(pop):
    """The memo behind the differentiable step's per-week keeps: the same source tensor gives the values
    made from it the first time; another tensor, even with the same numbers, makes them again."""
    world = _sim(pop).world
    calls = []

    def make(t):
        calls.append(t)
        return t * 2

    a, b = torch.ones(3), torch.ones(3)
    first = world.derived("x", a, make)
    assert world.derived("x", a, make) is first and len(calls) == 1
    assert world.derived("x", b, make) is not first and len(calls) == 2  # a new week's decisions
    assert world.derived("y", b, make) is not world.derived("x", b, make) and len(calls) == 3


def test_the_lean_graph_functions_give_their_expressions_values_and_gradients():
    """The differentiable step's own autograd functions, which keep less in the graph than the expressions
    they stand for, give those expressions' values (the same bits) and gradients (the same bits, or equal
    to float rounding where the sums into one input come in another order)."""
    from lpm.scenarios.covid import K, _Gain, _Pressure, _Scaled, _StageShift

    gen = torch.Generator().manual_seed(0)
    n, cells = 20_000, 50

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    table, index = rand(cells) * 0.1, torch.randint(0, cells, (n,), generator=gen)
    iso, home, outside, share, own = rand(n), rand(n), rand(n), rand(n) * 0.5, rand(n)
    g = torch.randn(n, generator=gen)
    for with_own in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (table, iso, home, outside, share)]
        tb, io, hm, out, sh = leaves
        beta_agent = tb.index_select(0, index)
        keep_h, keep_o = 1.0 - 0.3 * io, 1.0 - 0.8 * io
        inner = out - sh * own if with_own else out
        plain = beta_agent * (keep_h * hm + keep_o * inner)
        expected = torch.autograd.grad(plain, leaves, g, allow_unused=True)
        leaves2 = [t.clone().requires_grad_(True) for t in (table, iso, home, outside, share)]
        tb, io, hm, out, sh = leaves2
        args = (sh, own) if with_own else (None, None)
        keeps = (1.0 - 0.3 * io, 1.0 - 0.8 * io)
        lean = _Pressure.apply(tb.index_select(0, index), hm, out, *args, *keeps, (tb.detach(), index))
        assert torch.equal(lean, plain)
        got = torch.autograd.grad(lean, leaves2, g, allow_unused=True)
        for name, a, b in zip(("table", "iso", "home", "outside", "share"), expected, got, strict=True):
            if a is None:
                assert b is None or float(b.abs().max()) == 0, name
                continue
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7 * float(a.abs().max())), name
    # the candidates' gain: zero in value, 1 / (1 - p) at the candidates
    p = (rand(n) * 0.9).requires_grad_(True)
    candidate = rand(n) < 0.7
    plain = torch.where(candidate, (p - p.detach()) / (1.0 - p.detach()), 0.0)
    lean = _Gain.apply(p, candidate)
    assert torch.equal(lean, plain)
    assert torch.equal(*(torch.autograd.grad(v, p, g)[0] for v in (plain, lean)))
    # the alternatives' members move between stage counts: the scatter of the differing members' weights
    k, bins = K, 5
    alt, stage = (torch.randint(0, k, (n,), generator=gen, dtype=torch.uint8) for _ in range(2))
    stage = torch.where(rand(n) < 0.5, alt, stage)  # half agree
    has_alt, borough = rand(n) < 0.8, torch.randint(0, bins, (n,), generator=gen, dtype=torch.uint8)
    w = torch.zeros(n).requires_grad_(True)  # zero-valued weights, as the alternatives' are
    differs = torch.nonzero((alt != stage) & has_alt).view(-1)
    pair = (alt.long()[differs] * k + stage.long()[differs]) * bins + borough.long()[differs]
    pairs = torch.zeros(k * k * bins).index_add(0, pair, w.index_select(0, differs)).view(k, k, bins)
    plain = pairs.sum(1) - pairs.sum(0)
    lean = _StageShift.apply(w, alt, stage, has_alt, borough, bins)
    assert torch.equal(lean, plain)
    gk = torch.randn(k, bins, generator=gen)
    expected, got = (torch.autograd.grad(v, w, gk)[0] for v in (plain, lean))
    assert torch.equal(expected, got) and float(got.abs().sum()) > 0
    # an alternative's differences of -1, 0, 1 times its weight
    d = torch.randint(-1, 2, (n,), generator=gen).float()
    w = rand(n).requires_grad_(True)
    assert torch.equal(_Scaled.apply(w, d), w * d)
    assert torch.equal(*(torch.autograd.grad(v, w, g)[0] for v in (w * d, _Scaled.apply(w, d))))


@pytest.mark.parametrize("estimator", ["households", "pruned"])
def test_every_learnable_parameter_and_the_offsets_get_gradients(pop, estimator):
    sim = _sim(pop, start="2020-06-01", estimator=estimator)
    r = sim.run(70)  # into the reopening and past 2020-07-15 (summer detection)
    loss = weekly(r.series["reported_cases"]).log1p().sum()  # any loss of the weekly series
    loss.backward()
    assert torch.isfinite(loss)
    names = ["beta", "detected", "detected_summer", "work_reopened", "community_reopened"]
    for name in names + [n for n in sim.scenario.learnable if n.startswith("beta_")]:
        assert float(sim.params[name].grad) != 0, name
    g = sim.params["offsets.isolation"].grad
    assert g.shape == (100, 2) and float(g.abs().sum()) > 0


@pytest.mark.parametrize("calibrated", [False, True], ids=["literature", "calibrated"])
def test_default_run_rises_peaks_and_falls(calibrated):
    """The model's shape, not a fit: from 2020-03-01 with the literature values, reported cases rise, peak
    between mid-March and the end of April, and fall by the end of May; so do they with the calibrated
    defaults (fitted on 03-01 .. 04-25 only)."""
    pop = Population.synthesize("nyc", agents=300_000, seed=1)
    sc = CovidScenario(calibrated=calibrated)
    r = Simulation(sc, pop, HeuristicPolicy(), seed=1).run(92)
    weekly = covid.weekly(r.series["reported_cases"].sum(1))
    peak = int(weekly.argmax())
    assert pd.Timestamp("2020-03-15") <= sc.date(7 * peak) <= pd.Timestamp("2020-04-30")
    assert float(weekly[peak]) > 5 * float(weekly[0]) and float(weekly[-1]) < 0.5 * float(weekly[peak])


def test_calibrated_defaults_agree_with_the_serosurvey():
    """A check against data the fit never saw: New York's serosurvey found 22.7 % of the city's adults
    with antibodies (95 % CI 21.5 .. 24.0 %), sampled 2020-04-19 .. 04-28 (Rosenberg et al., Ann Epidemiol
    2020). Antibodies are found about 17 days after infection (about 5 to symptom onset, Lauer et al., Ann
    Intern Med 2020; a median of about 12 from onset to seroconversion, Borremans et al., eLife 2020), so
    the survey counts infections by 04-02 .. 04-11. With the calibrated defaults from 2020-03-01 (200,000
    agents, mean of 8 seeds) the share of residents no longer susceptible over those days must meet the
    survey's interval: measured 21.8 % by the end of 04-02 and 27.5 % by the end of 04-11 (22.8 and 28.5 %
    with the calendar detection ramp and its fit; the literature values, not fitted: 16.9 and 21.0 %, just
    under it, and this test fails on them; the comparison by 04-25 that ignored the delay read 34 %)."""
    pop = Population.synthesize("nyc", agents=200_000, seed=0)
    sc = CovidScenario(calibrated=True)
    # susceptible is counted at the start of a day: infected by the end of a date is its next day's record
    first, last = ((pd.Timestamp(d) - sc.date(0)).days + 1 for d in ("2020-04-02", "2020-04-11"))
    shares = []
    for seed in range(8):
        r = Simulation(sc, pop, HeuristicPolicy(), seed=seed).run(last + 1)
        shares.append(1.0 - r.series["susceptible"].double().sum(1) / len(pop))
    share = torch.stack(shares).mean(0)
    assert float(share[first]) <= 0.240 and float(share[last]) >= 0.215


def test_a_borough_multiplier_acts_on_its_residents(pop):
    """beta_manhattan scales the force of infection on Manhattan's residents: their infections rise (same
    seed), and the gradient of Manhattan's infections with respect to it is positive."""
    manhattan = pop.labels("borough").index("Manhattan")
    base = _sim(pop, diff=False).run(21).series["infections"].sum(0)
    more = _sim(pop, diff=False, beta_manhattan=2.0).run(21).series["infections"].sum(0)
    assert float(more[manhattan]) > 1.3 * float(base[manhattan])
    sim = _sim(pop)
    sim.run(21).series["infections"][:, manhattan].sum().backward()
    assert float(sim.params["beta_manhattan"].grad) > 0


# -- reporting capped by the day's tests (tests_limit) ---------------------------------------------------
def test_uncapped_inverts_the_testing_cap():
    days = pd.date_range("2020-03-20", periods=3)
    detected, tests = (
        pd.Series([500.0, 3000.0, 9000.0], index=days),
        pd.Series([6000.0, 6000.0, 9000.0], index=days),
    )
    reported = detected * tests / (detected + tests)
    np.testing.assert_allclose(reported * covid.uncapped(reported, tests, 1.0), detected, rtol=1e-12)
    # days without test counts are left as reported; a day at the cap is scaled up at most MAX_UNCAP times
    assert covid.uncapped(reported, tests.iloc[:1], 1.0).tolist()[1:] == [1.0, 1.0]
    at_cap = covid.uncapped(pd.Series([6000.0], index=days[:1]), tests, 1.0)
    assert at_cap.iloc[0] == covid.MAX_UNCAP


def test_tests_limit_caps_each_days_reported_cases(pop):
    """With a cap of 0.2 % of the people tested, every day's reported cases stay under it, and near it
    while the detected onsets are many times more; tests_limit=False is the default's run."""
    cap = 0.002
    run = Simulation(
        CovidScenario({"start": "2020-03-16", "tests_limit": True, "positivity_cap": cap}),
        pop,
        HeuristicPolicy(),
        seed=3,
    ).run(21)
    reported = run.series["reported_cases"].sum(1).double().numpy()
    scale = len(pop) / covid.nyc.city_population()
    tests = covid.nyc.tests_by_day().reindex(pd.date_range("2020-03-16", periods=21)).to_numpy()
    k = cap * tests * scale
    # the seeding scales the cases before the start up to MAX_UNCAP times, so the first days' onsets
    # are many times the cap (measured: reported / K = 1.00 for 8 days, 0.92 on day 14, 0.01 on day 21)
    assert (reported < k).all() and (reported > 0.9 * k)[:10].all(), (reported / k).round(2)
    plain = Simulation(CovidScenario({"start": "2020-03-16"}), pop, HeuristicPolicy(), seed=3).run(21)
    off = Simulation(
        CovidScenario({"start": "2020-03-16", "tests_limit": False}), pop, HeuristicPolicy(), seed=3
    ).run(21)
    assert plain.trajectory.equals(off.trajectory)


@pytest.mark.parametrize(("tests_limit", "ramp"), [(True, "time"), (False, "time"), (False, "tests")])
def test_seeding_reads_no_tests_on_or_after_the_start(pop, monkeypatch, tests_limit, ramp):
    """The test counts (the cap with tests_limit, the detected share's March rise with detection_ramp=tests,
    and the positivity trend of the not yet reported days either way) are read only before the start."""

    def state():
        config = {"start": "2020-03-16", "tests_limit": tests_limit, "detection_ramp": ramp}
        sim = Simulation(CovidScenario(config), pop, HeuristicPolicy(), seed=3)
        return sim.initial_state().scenario

    real = covid.nyc.tests_by_day()
    before = state()
    later = real.where(real.index < "2020-03-16", real * 10)
    monkeypatch.setattr(covid.nyc, "tests_by_day", lambda path=None: later)
    again = state()
    for name in before:
        assert torch.equal(before[name], again[name]), name
    # and fewer tests on a day before the start (more cases per test) does change it
    earlier = real.where(real.index != pd.Timestamp("2020-03-14"), real / 3)
    monkeypatch.setattr(covid.nyc, "tests_by_day", lambda path=None: earlier)
    assert not torch.equal(before["stage"], state()["stage"])


def test_detection_ramp_follows_the_tests():
    """detection_ramp=tests: detected_march up to the first counts at tests_scarce, detected once the 7-day
    mean of people tested reaches tests_ample (2020-03-22), log-linear in that mean between (rising most in
    the week 03-08 .. 03-15, when testing grew 20-fold), with the levels' gradients; the calendar ramp is
    unchanged."""
    params = {"detected_march": torch.tensor(0.01, requires_grad=True), "detected": torch.tensor(0.1)}
    tests = CovidScenario({"detection_ramp": "tests"}).config
    time = CovidScenario({"detection_ramp": "time"}).config
    days = pd.date_range("2020-03-01", "2020-03-25")
    share = torch.stack([covid.detection(tests, params, d) for d in days])
    # 03-03: 15 tested, the first count
    assert float(share[0].detach()) == float(share[2].detach()) == pytest.approx(0.01)
    assert share[21:].detach().numpy() == pytest.approx(0.1)  # from 03-22 (7-day mean 6,114)
    assert bool((share[1:] >= share[:-1] - 1e-9).all())
    mean = covid.nyc.tests_by_day()["2020-03-03":"2020-03-10"].rolling(7, min_periods=1).mean()
    f = np.log(mean["2020-03-10"] / 15) / np.log(6114 / 15)
    assert float(share[9].detach()) == pytest.approx(0.01 * (0.1 / 0.01) ** f, rel=1e-5)
    # the rise over 03-01 -> 08, 08 -> 15 and 15 -> 22
    week = [float(share[i + 7].detach() / share[i].detach()) for i in (0, 7, 14)]
    assert week[1] > max(week[0], week[2]), week  # most of the rise in the week testing grew 20-fold
    share[10].backward()
    assert float(params["detected_march"].grad) > 0
    linear = [float(covid.detection(time, params, d).detach()) for d in days]
    f_time = np.arange(22) / 21
    assert linear[:22] == pytest.approx(list(0.01 * (0.1 / 0.01) ** f_time), rel=1e-5)
    with pytest.raises(InputError, match="tests_scarce < tests_ample < tests_wide must hold, got 15.0, 10.0"):
        CovidScenario({"detection_ramp": "tests", "tests_ample": 10})


def test_detection_ramp_tests_all_follows_the_tests_into_the_summer():
    """detection_ramp=tests_all: as the tests ramp up to tests_ample, then log-linear in the people tested
    from detected at tests_ample to detected_summer at tests_wide (2020-07-15) instead of flat through the
    spring and a calendar ramp after 05-15; the gradient reaches all three levels."""
    levels = {"detected_march": 0.01, "detected": 0.1, "detected_summer": 0.3}
    params = {k: torch.tensor(v, requires_grad=True) for k, v in levels.items()}
    all_ = CovidScenario({"detection_ramp": "tests_all"}).config
    tests = CovidScenario({"detection_ramp": "tests"}).config
    march = pd.date_range("2020-03-01", "2020-03-21")
    for d in march:  # the same March rise
        assert torch.equal(covid.detection(all_, params, d), covid.detection(tests, params, d)), d
    per_day = covid.nyc.tests_by_day()
    for day in ("2020-04-05", "2020-05-01", "2020-06-15"):
        mean = per_day[pd.Timestamp(day) - pd.Timedelta(days=6) : day].mean()
        f = np.log(mean / 6114) / np.log(27886 / 6114)
        share = covid.detection(all_, params, pd.Timestamp(day))
        assert 0 < f < 1, day
        assert float(share.detach()) == pytest.approx(0.1 * 3**f, rel=1e-6), day
    assert float(covid.detection(tests, params, pd.Timestamp("2020-05-01")).detach()) == pytest.approx(0.1)
    assert float(covid.detection(all_, params, pd.Timestamp("2020-10-01")).detach()) == pytest.approx(0.3)
    covid.detection(all_, params, pd.Timestamp("2020-04-05")).backward()
    assert float(params["detected"].grad) > 0 and float(params["detected_summer"].grad) > 0
    assert params["detected_march"].grad is None or float(params["detected_march"].grad) == 0
    with pytest.raises(InputError, match="tests_scarce < tests_ample < tests_wide"):
        CovidScenario({"detection_ramp": "tests_all", "tests_wide": 5000})


def test_a_bad_tests_file_names_the_file_and_field(tmp_path):
    path = tmp_path / "tests.csv"
    path.write_text("DATE,TOTAL_TESTS\n03/03/2020,15\n03/04/2020,-4\n")
    with pytest.raises(InputError, match=r"tests\.csv: field 'TOTAL_TESTS' is negative"):
        covid.nyc.tests_by_day(path)
    path.write_text("DAY,TOTAL_TESTS\n03/03/2020,15\n")
    with pytest.raises(InputError, match=r"tests\.csv.*DATE"):
        covid.nyc.tests_by_day(path)


def test_own_outside_is_the_housemates_share_of_outside_pressure(pop):
    """CovidScenario._own_outside, per household, equals the school, work and community pressure its
    members meet from their own housemates' infectiousness alone (computed the long way: the
    scenario's own community mixing over the cells, one household at a time)."""
    sim = Simulation(CovidScenario({"start": "2020-03-16"}), pop, HeuristicPolicy(), seed=3)
    scenario, w = sim.scenario, sim.world
    gen = torch.Generator().manual_seed(0)
    place_weight = torch.rand(len(w.place_school), generator=gen) + 0.5
    place_weight[0] = 0.0
    household = w.household.long()
    chosen = torch.unique(household[torch.randint(len(household), (40,), generator=gen)])
    d = torch.where(torch.isin(household, chosen), torch.rand(len(household), generator=gen) - 0.3, 0.0)
    d[d.abs() < 0.2] = 0.0  # some members send nothing
    # given at some agents (the step's senders: a superset of those with a difference), zero elsewhere
    given = torch.nonzero(torch.isin(household, chosen) | (torch.rand(len(d), generator=gen) < 0.01)).view(-1)
    own = scenario._own_outside(w, place_weight, 0.7, given, d[given])
    expected = torch.zeros_like(d)
    for h in chosen.tolist():
        members = torch.nonzero(household == h).view(-1)
        mine = torch.where(household == h, d, 0.0)
        places = torch.zeros(len(place_weight)).index_add(0, w.place.long(), mine)
        cells = torch.zeros(w.nc).index_add(0, w.cell.long(), mine)
        community = scenario.community(w, cells)
        place = w.place.long()[members]
        expected[members] = (
            place_weight[place] * (places[place] - d[members]) + 0.7 * community[w.cell.long()[members]]
        )
    torch.testing.assert_close(own, expected, rtol=1e-5, atol=1e-9)
    assert (own[~torch.isin(household, chosen)] == 0).all() and own.abs().sum() > 0
    # the synthesized households are runs of agents, which the members are read from; without the runs
    # (households in any order) the same numbers, and the kept zeros are zeros again either way
    assert w.household_runs is not None and torch.equal(w.own_scratch, torch.zeros(w.n))
    w.__dict__["household_runs"] = None
    assert torch.equal(scenario._own_outside(w, place_weight, 0.7, given, d[given]), own)
    assert torch.equal(w.own_scratch, torch.zeros(w.n))


def test_late_borough_multipliers_act_from_late_from_only(pop):
    """beta_<borough>_late multiplies the borough's transmission from late_from (2020-03-16) on: with the
    same random numbers a run with Manhattan's at 0.5 has the same infections up to 03-15 and fewer
    Manhattan infections after; a late_from outside the data is refused."""
    boroughs = pop.labels("borough")

    def infections(**params):
        scenario = CovidScenario({"start": "2020-03-01", **params}, calibrated=False)
        result = Simulation(scenario, pop, HeuristicPolicy(), seed=2).run(35)
        return result.series["infections"].reshape(35, len(boroughs))

    base, late = infections(), infections(beta_manhattan_late=0.5)
    assert torch.equal(base[:15], late[:15])  # 03-01 .. 03-15
    m = boroughs.index("Manhattan")
    assert float(late[15:, m].sum()) < 0.85 * float(base[15:, m].sum())
    moved = infections(beta_manhattan_late=0.5, late_from="2020-03-23")
    assert torch.equal(base[:22], moved[:22]) and not torch.equal(base[22:], moved[22:])
    with pytest.raises(InputError, match="late_from 2019-06-01 lies outside"):
        CovidScenario({"late_from": "2019-06-01"})
