"""The GPU path on a machine without a GPU: runs under an emulated second device (tests/emulated_device.py)
must put no host tensor beside a device tensor (what CUDA refuses), and a day's step must read nothing back
to the host but the sizes its GPU operations need.

The first CUDA run (an H200, 2026-12-04, benchmarks/cuda_check.py) stopped in the COVID seeding, which
divided the real cases (a host tensor) by the detected share (on the device); the emulation finds that
mix, and finds the two household-path sums of the "households" estimator that were made on the host.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch
from emulated_device import EmulatedDevice
from fake_server import FakeServer

from lpm.calibration import Window, calibrate
from lpm.engine import Simulation
from lpm.gradcheck import check
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.run import RunConfig, run
from lpm.sampling import ESTIMATORS
from lpm.scenarios import make_scenario
from lpm.sensitivity import sensitivity

#: the only host waits a day's COVID step may have here: the bin counts (the CPU's bincount, which the
#: emulation records as a wait: a GPU's bincount reads the largest key, so on CUDA lpm counts with histc,
#: which does not) and the indices of the infectious agents (their number)
STEP_WAITS = {"_bincount", "support"}


@pytest.fixture(scope="module")
def pop() -> Population:
    return Population.synthesize("nyc", agents=3_000, seed=7)


def test_the_emulation_finds_a_mix_and_a_host_read():
    with EmulatedDevice() as emu:
        x = torch.arange(4, device="cpu")  # made for the device
        y = x * 2  # on the device too
        z = torch.ones(4)  # on the host
        _ = y + z
        _ = y + torch.tensor(1.0)  # a 0-dim host tensor is a scalar: CUDA accepts it
        _ = y.tolist()
        _ = y.cpu() + z  # on the host now
        y[1:3] = 0.0  # a fill
        y[0] = 1.0  # a copy of the number from the host
    assert sum(emu.mixes.values()) == 1 and "add" in next(iter(emu.mixes))
    assert [key.split(" ")[0] for key in emu.reads] == ["tolist", "cpu", "__setitem__"]


@pytest.mark.parametrize("scenario", ["covid", "labor"])
def test_inference_runs_mix_no_host_tensor_into_the_device(pop, scenario):
    days = {"covid": 15, "labor": 3}[scenario]
    marks: list[int] = []
    with EmulatedDevice() as emu:
        sim = Simulation(
            make_scenario(scenario),
            pop,
            HeuristicPolicy(),
            seed=1,
            callback=lambda t, sim: marks.append(len(emu.read_log)),
        )
        sim.run(days)
    assert not emu.mixes, emu.mixes
    if scenario == "covid":
        decision_days = {0, 7, 14}  # the weekly decision reads the context and checks the answers
        for t in range(1, days):
            lines = {where.split(" (")[1].rstrip(")") for where in emu.read_log[marks[t - 1] : marks[t]]}
            if t not in decision_days:
                assert lines <= STEP_WAITS, (t, lines)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_differentiable_runs_mix_no_host_tensor_into_the_device(pop, estimator):
    with EmulatedDevice() as emu:
        sim = Simulation(
            make_scenario("covid"), pop, HeuristicPolicy(), seed=1, differentiable=True, estimator=estimator
        )
        weekly = sim.run(9).series["reported_cases"].sum()
        (grad,) = torch.autograd.grad(weekly, sim.params["beta"])
    assert not emu.mixes, emu.mixes
    assert torch.isfinite(grad)


def test_the_run_command_with_an_llm_policy_and_its_resume_mix_nothing(tmp_path, monkeypatch):
    """`lpm run`'s whole path (population, model answers broadcast to the agents, checkpoint, resume,
    outputs) under the emulation, the answers from the scripted server of the unit tests."""
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer() as server, EmulatedDevice() as emu:
        config = dict(scenario="covid", policy="llm", agents=3_000, llm_url=server.url, seed=2)
        run(RunConfig.build(**config, weeks=1), tmp_path / "r", progress=False)
        resumed = run(RunConfig.build(**config, weeks=2), tmp_path / "r", resume=True, progress=False)
    assert resumed.summary["resumed_from_step"] == 7
    assert not emu.mixes, emu.mixes


def test_the_gradient_check_mixes_nothing(pop):
    """lpm.gradcheck.check (benchmarks/gradients.py --device cuda): the gradient and the finite
    differences of each week, every run on the device."""
    with EmulatedDevice() as emu:
        (beta, offsets) = check(
            lambda kw: make_scenario("covid", **kw),
            pop,
            HeuristicPolicy(),
            parameters=["beta", "offsets"],
            quantity="reported_cases",
            steps=14,
            seeds=[1],
        )
    assert not emu.mixes, emu.mixes
    assert np.isfinite(beta.grad).all() and np.isfinite(offsets.fd).all()


def test_calibration_mixes_nothing(pop):
    """lpm.calibration.calibrate (`lpm calibrate --device cuda`): the fitted variables, the real series and
    the loss on the host, the runs on the device; with a later start, fitted offsets, a test window and
    a piece recomputed segment by segment (memory_gb too small for its graph)."""
    with EmulatedDevice() as emu:
        cal = calibrate(
            lambda o: make_scenario("covid", dict(o)),
            pop,
            HeuristicPolicy(),
            train=Window.parse("2020-03-16:2020-04-12", "--train"),
            test=Window.parse("2020-04-13:2020-04-26", "--test"),
            parameters=["beta"],
            fit_offsets=True,
            also_from=[dt.date(2020, 3, 30)],
            epochs=2,
            restarts=1,
            eval_seeds=1,
            truncate=28,
            memory_gb=1e-4,
        )
    assert not emu.mixes, emu.mixes
    assert cal.settings["segment_steps"] == 7 and cal.errors["test"]["mape"] > 0


@pytest.mark.parametrize("scenario", ["covid", "labor"])
def test_sensitivity_mixes_nothing(pop, scenario):
    """lpm.sensitivity.sensitivity (`lpm sensitivity --device cuda`): autograd and finite differences, every
    run on the device, an offset among the parameters."""
    parameters = {"covid": ["beta", "offsets.isolation:isolate"], "labor": ["layoff"]}[scenario]
    with EmulatedDevice() as emu:
        table = sensitivity(
            lambda kw: make_scenario(scenario, kw),
            pop,
            steps={"covid": 14, "labor": 3}[scenario],
            seeds=[1],
            parameters=parameters,
            progress=False,
        )
    assert not emu.mixes, emu.mixes
    assert set(table["parameter"]) == set(parameters)
