"""Calibration: recovers known parameters from data the simulator made, lowers the loss on real data,
and refuses bad windows, parameters and data files with a message naming them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lpm.calibration import Window, calibrate
from lpm.cli import main
from lpm.engine import Simulation
from lpm.errors import InputError
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.synthesize("nyc", agents=20_000, seed=0)


def _made_by_the_simulator(pop, name, start, truth, steps, seeds=(11, 12, 13, 14)) -> pd.DataFrame:
    """The mean over seeds of the simulator's own series at known parameters, as a real-data frame."""
    frames = []
    for s in seeds:
        scenario = make_scenario(name, {"start": start, **truth}, calibrated=False)
        frames.append(Simulation(scenario, pop, HeuristicPolicy(), seed=s).run(steps).trajectory)
    keys = ["date", "borough", "quantity"]
    return pd.concat(frames).groupby(keys, observed=True)["value"].mean().reset_index()


def _fit(pop, name, train, parameters, target=None, **kw):
    return calibrate(
        lambda o: make_scenario(name, dict(o), calibrated=False),  # from the literature values
        pop,
        HeuristicPolicy(),
        train=Window.parse(train, "--train"),
        parameters=parameters,
        target=target,
        **{"epochs": 30, "lr": 0.1, "restarts": 1, "eval_seeds": 1, **kw},
    )


def test_recovers_known_covid_transmission(pop):
    """beta 0.06 generated the data; the fit starts at the default 0.048. Measured (20k agents, seeds 0
    and 1, before Polyak averaging): 0.0628 and 0.0644, i.e. within 7.5 %; the tolerance is 10 %."""
    target = _made_by_the_simulator(pop, "covid", "2020-03-16", {"beta": 0.06}, 28)
    cal = _fit(pop, "covid", "2020-03-16:2020-04-12", ["beta"], target)
    assert cal.initial["beta"] == pytest.approx(0.048)
    assert cal.parameters["beta"] == pytest.approx(0.06, rel=0.10)
    assert cal.losses[0][-1] < cal.losses[0][0] / 3


def test_recovers_known_labor_job_finding(pop):
    """job_finding 0.40 generated the data; the fit starts at 0.25. Measured: 0.401 and 0.406 (seeds 0,
    1); the tolerance is 5 %."""
    target = _made_by_the_simulator(pop, "labor", "2020-03-01", {"job_finding": 0.4}, 6)
    cal = _fit(pop, "labor", "2020-03-01:2020-08-01", ["job_finding"], target)
    assert cal.parameters["job_finding"] == pytest.approx(0.40, rel=0.05)


def test_a_prior_holds_the_fit_toward_the_starting_values(pop):
    """--prior: the same data and seed as above; with a prior the fitted job finding lies between the
    start (0.25) and the value that made the data (0.40), and the stronger the prior the nearer the
    start; the weight is recorded."""
    target = _made_by_the_simulator(pop, "labor", "2020-03-01", {"job_finding": 0.4}, 6)
    fits = {
        w: _fit(pop, "labor", "2020-03-01:2020-08-01", ["job_finding"], target, prior=w) for w in (10, 100)
    }
    found = {w: cal.parameters["job_finding"] for w, cal in fits.items()}
    # measured: 0.329 and 0.267; without a prior 0.401 and 0.406 (above)
    assert 0.25 < found[100] < found[10] < 0.39, found
    assert found[100] < 0.3, found
    assert fits[100].settings["prior"] == 100
    with pytest.raises(InputError, match="--prior must be a finite weight >= 0, got -1"):
        _fit(pop, "labor", "2020-03-01:2020-08-01", ["job_finding"], target, prior=-1)


def test_real_labor_data_lowers_the_loss_and_reports_the_test_error(pop):
    cal = calibrate(
        lambda o: make_scenario("labor", dict(o)),
        pop,
        HeuristicPolicy(),
        train=Window.parse("2020-03-01:2020-08-01", "--train"),
        test=Window.parse("2020-09-01:2020-12-01", "--test"),
        parameters=["layoff", "job_finding", "case_scale"],
        epochs=20,
        lr=0.1,
        restarts=2,
        eval_seeds=1,
    )
    for history in cal.losses:
        assert sum(history[-4:]) / 4 < history[0]
    assert cal.errors["train"]["mape"] < cal.errors["train"]["before"]["mape"]
    assert cal.errors["test"]["periods"] == 4 and cal.errors["test"]["mape"] > 0
    forecast = cal.forecast
    assert set(forecast["window"]) == {"train", "test"}
    assert (forecast["low"] <= forecast["median"]).all() and (forecast["median"] <= forecast["high"]).all()
    assert len(cal.restarts) == 2


def test_later_starts_share_the_loss_and_report_their_errors(pop, monkeypatch):
    """also_from: each epoch runs the train window from its first day and from each later start to its
    end, each seeded from the data before its own start, and the loss is their mean; each later start's
    train and test errors are reported, at the fit and at the starting values."""
    import lpm.calibration as calibration

    calls = []
    real_epoch = calibration._train_epoch

    def recorded(sim, bind, q, steps, *args, **kw):
        loss = real_epoch(sim, bind, q, steps, *args, **kw)
        calls.append((str(sim.scenario.config.start), steps, loss))
        return loss

    monkeypatch.setattr(calibration, "_train_epoch", recorded)
    cal = _fit(
        pop,
        "covid",
        "2020-03-16:2020-04-12",
        ["beta"],
        test=Window.parse("2020-04-13:2020-04-26", "--test"),
        also_from=[pd.Timestamp("2020-03-30").date()],
        epochs=2,
    )
    assert [(c[0], c[1]) for c in calls] == [("2020-03-16", 28), ("2020-03-30", 14)] * 2
    for e in range(2):
        assert cal.losses[0][e] == pytest.approx((calls[2 * e][2] + calls[2 * e + 1][2]) / 2)
    assert cal.settings["also_from"] == ["2020-03-30"]
    later = cal.to_json()["also_from"]["2020-03-30"]
    assert later["train"]["periods"] == 2 and later["test"]["periods"] == 2
    assert {"rmse", "mape", "before"} <= set(later["train"]) and later["test"]["before"]["mape"] > 0


def test_cli_writes_calibration_json_and_plots(tmp_path, capsys):
    out = tmp_path / "cal"
    code = main(
        ["calibrate", "covid", "--train", "2020-03-16:2020-03-29", "--test", "2020-03-30:2020-04-05"]
        + ["--agents", "5000", "--epochs", "2", "--restarts", "1", "--eval-seeds", "1"]
        + ["--parameters", "beta,work_pause", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    # not a terminal: the progress as lines, from the start of the fit to the end of the forecast
    assert "covid · heuristic · 5,000 agents · fit: 0/2 [" in printed
    assert "· fit: 2/2 loss " in printed and "· forecast: 2/2 [" in printed
    saved = json.loads((out / "calibration.json").read_text())
    assert set(saved["parameters"]) == {"beta", "work_pause"}
    assert saved["agents"] == 5000 and saved["train"]["window"] == "2020-03-16:2020-03-29"
    for window in ("train", "test"):
        assert {"rmse", "mape", "periods", "before"} <= set(saved[window])
    assert saved["command"].startswith("lpm calibrate covid --train 2020-03-16:2020-03-29")
    # the defaults it used are recorded, so the command reproduces under other defaults
    assert "--estimator pruned" in saved["command"] and "--truncate 56" in saved["command"]
    assert "band" in saved and saved["settings"]["truncate_steps"] == 56
    for name in ("loss.png", "fit.png", "forecast.csv"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train", "2020-03-16:2020-04-12", "--test", "2020-04-01:2020-04-28"], "overlaps --train"),
        (["--train", "2020-03-16:2020-04-10"], "not a whole number of weeks"),
        (["--train", "2020-04-12:2020-03-16"], "before the start"),
        (["--train", "2020-03-16"], "must be START:END"),
        (["--train", "2021-12-01:2021-12-28", "--test", "2021-12-29:2022-01-25"], "no value on 2022-01-01"),
        (["--train", "2020-03-16:2020-04-12", "--parameters", "beta,betta"], "'betta' not learnable"),
        (["--train", "2020-03-16:2020-04-12", "--policy", "random"], "--policy"),
        (["--train", "2020-03-16:2020-04-12", "--estimator", "exact"], "--estimator must be one of"),
        (["--train", "2020-03-16:2020-04-12", "--also-from", "2020-03-25"], "not a whole number of weeks"),
        (["--train", "2020-03-16:2020-04-12", "--also-from", "2020-03-16"], "not inside --train"),
        (["--train", "2020-03-16:2020-04-12", "--also-from", "2020-04-19"], "not inside --train"),
        (["--train", "2020-03-16:2020-04-12", "--also-from", "March"], "--also-from must be dates"),
        (["--train", "2020-03-16:2020-04-12", "--device", "tpu"], "'device'"),
        pytest.param(
            ["--train", "2020-03-16:2020-04-12", "--device", "cuda"],
            "torch sees no CUDA GPU",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs no GPU"),
        ),
    ],
)
def test_bad_windows_and_parameters_are_clear_errors(args, message, tmp_path, capsys):
    code = main(
        ["calibrate", "covid", *args, "--agents", "2000", "--epochs", "1", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _cases_file(path, mutate=None):
    frame = pd.read_csv("populations/nyc/cases-by-day.csv")
    if mutate:
        frame = mutate(frame)
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["MN_CASE_COUNT"]), "missing column(s) MN_CASE_COUNT"),
        (lambda f: f.rename(columns={"date_of_interest": "date"}), "missing column(s) date_of_interest"),
        (
            lambda f: f.assign(BX_CASE_COUNT=f["BX_CASE_COUNT"].where(f.index != 30, -4)),
            "'BX_CASE_COUNT' is negative",
        ),
        (lambda f: f.assign(QN_PROBABLE_CASE_COUNT="many"), "'QN_PROBABLE_CASE_COUNT' is not a number"),
        (lambda f: f.assign(date_of_interest="2020-03-01"), "is not a date MM/DD/YYYY"),
    ],
)
def test_bad_data_files_name_the_file_and_field(mutate, message, tmp_path, capsys):
    data = _cases_file(tmp_path / "mine.csv", mutate)
    code = main(
        ["calibrate", "covid", "--train", "2020-03-16:2020-04-12", "--data", str(data)]
        + ["--agents", "2000", "--epochs", "1", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "mine.csv" in err and message in err


def test_own_data_file_is_what_the_fit_reads(pop, tmp_path):
    """A user's case file (here: the shipped one with every count doubled) is the series fitted and the
    seeding's source: the forecast's real series doubles."""
    doubled = _cases_file(
        tmp_path / "doubled.csv",
        lambda f: f.assign(**{c: f[c] * 2 for c in f.columns if c.endswith("CASE_COUNT")}),
    )
    kw = {
        "epochs": 1,
        "restarts": 1,
        "eval_seeds": 1,
        "parameters": ["beta"],
        "train": Window.parse("2020-03-16:2020-03-29", "--train"),
    }
    shipped = calibrate(lambda o: make_scenario("covid", dict(o)), pop, HeuristicPolicy(), **kw)
    mine = calibrate(
        lambda o: make_scenario("covid", {"data": str(doubled), **dict(o)}), pop, HeuristicPolicy(), **kw
    )
    assert mine.forecast["real"].sum() == pytest.approx(2 * shipped.forecast["real"].sum())


def test_missing_data_file_and_replay_without_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "empty-cache"))
    code = main(
        ["calibrate", "covid", "--train", "2020-03-16:2020-04-12", "--data", str(tmp_path / "none.csv")]
    )
    assert code == 2 and "none.csv: no such file" in capsys.readouterr().err
    code = main(
        ["calibrate", "covid", "--train", "2020-03-16:2020-03-29", "--policy", "llm", "--cache", "replay"]
        + ["--agents", "2000", "--epochs", "1", "--restarts", "1", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--cache replay: policy llm needs decisions" in err, err


@pytest.mark.integration
def test_llm_policy_is_asked_once_then_replayed_and_its_offsets_fitted(vllm_server, pop, tmp_path):
    """With the real model: the first epoch asks the server (through the cache), later epochs replay those
    answers (no request), and the alignment offsets of the isolation decision move from zero."""
    from lpm.backend import OpenAIBackend
    from lpm.cache import ResponseCache
    from lpm.decision import Decider
    from lpm.policy import ArchetypeLLMPolicy
    from lpm.server import metrics

    decider = Decider(
        OpenAIBackend(vllm_server.url, vllm_server.model),
        ResponseCache(tmp_path),
        mode="auto",
        progress=False,
    )
    before = float(metrics(vllm_server.url)["completion_requests"])
    asked: list[float] = []
    cal = calibrate(
        lambda o: make_scenario("covid", dict(o)),
        pop,
        ArchetypeLLMPolicy(decider),
        train=Window.parse("2020-03-16:2020-03-29", "--train"),
        parameters=["beta"],
        epochs=3,
        restarts=1,
        eval_seeds=1,
        progress=lambda phase, done, total, loss: asked.append(
            float(metrics(vllm_server.url)["completion_requests"])
        ),
    )
    start, first, second, third = asked[:4]  # before the first epoch (the bar's start), after each epoch
    assert start == before and first > before and second == first and third == first
    assert cal.settings["fit_offsets"] and cal.policy == "llm-archetype"
    moved = torch.tensor(cal.offsets["offsets.isolation"])
    assert moved.shape == (100, 2) and float(moved.abs().max()) > 0


@pytest.mark.parametrize("estimator", ["pruned", "expected"])
def test_a_piece_recomputed_segment_by_segment_has_the_gradient_of_one_graph(pop, estimator):
    """Checkpointing: 4 weeks backpropagated as one graph, and as four 1-week segments run twice (the
    graph of one held at a time), give the same loss and the same gradient of every fitted parameter
    (the seeding's included); truncating at one week instead cuts the weeks' dependence and changes it."""
    import datetime as dt

    from lpm.calibration import _train_epoch, fit_quantity

    scenario = make_scenario("covid", {"start": dt.date(2020, 3, 9)}, calibrated=False)
    q = fit_quantity(scenario, None)
    real = torch.linspace(20.0, 400.0, 4)[:, None] * torch.tensor(
        [1.0, 1.5, 0.8, 1.2, 0.3]
    )  # (weeks, boroughs)
    names = ["beta", "detected_march", "community_pause"]

    def gradient(truncate: int, segment: int | None) -> tuple[float, list[float]]:
        sim = Simulation(scenario, pop, HeuristicPolicy(), seed=5, differentiable=True, estimator=estimator)
        leaves = {p: torch.tensor(float(getattr(scenario.config, p)), requires_grad=True) for p in names}

        def bind() -> None:
            for p in names:
                sim.params[p] = leaves[p] * 1.0  # a fresh graph node per piece, as calibrate binds them

        loss = _train_epoch(sim, bind, q, 28, truncate, 7, real, {}, 0.0, segment)
        return loss, [float(leaves[p].grad) for p in names]

    whole_loss, whole = gradient(28, None)
    loss, recomputed = gradient(28, 7)
    assert loss == pytest.approx(whole_loss, rel=1e-9)
    assert recomputed == pytest.approx(whole, rel=1e-4)
    assert all(g != 0 for g in whole)
    _, truncated = gradient(7, None)
    assert truncated[0] != pytest.approx(whole[0], rel=0.05)  # the dependence the segments keep
