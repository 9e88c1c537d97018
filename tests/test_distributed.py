"""Sharding over processes (lpm.distributed, gloo on CPU, 2 processes): the same records as one process,
each archetype asked once in total, a dead rank fails the run with a clear error and it resumes, bad
process counts are refused; under torchrun on two (localhost) nodes without a shared folder too; the
backend and device choices of a run on GPUs (NCCL, one GPU per rank), without a GPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from lpm import distributed
from lpm.engine import Simulation
from lpm.errors import InputError, ShardError
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario

AGENTS, SEED, STEPS = 4000, 11, 12
#: A start in the spring wave with more transmission, so a few days hold hundreds of infections.
SETTINGS = {"start": "2020-03-20", "beta": 0.2}

pytestmark = pytest.mark.skipif(distributed.available_cores() < 2, reason="needs 2 CPU cores")


@dataclass(frozen=True, eq=False)
class CountingPolicy(HeuristicPolicy):
    """The heuristic policy that appends a line (process, step, archetypes) to ``log`` each time it is asked."""

    log: str = ""

    def decide(self, archetypes, context, *, step):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {step} {archetypes.k}\n")
        return super().decide(archetypes, context, step=step)


def make(rank: int, log: str | None = None):
    """What every rank builds: the scenario, the whole population, the policy."""
    policy = HeuristicPolicy() if log is None else CountingPolicy(log=log)
    return make_scenario("covid", SETTINGS), Population.synthesize("nyc", agents=AGENTS, seed=3), policy


def make_counting(rank: int):
    """Rank 0 counts the policy's calls; the others have a Follower, which raises if it is ever asked."""
    scenario, pop, policy = make(rank, os.environ["LPM_TEST_POLICY_LOG"])
    return scenario, pop, policy if rank == 0 else distributed.Follower(policy.mode)


def die_at_step_5(t: int, sim) -> None:
    """Callback: rank 1 kills itself after its 6th step (step 5) is checkpointed."""
    if sim.shard.rank == 1 and t == 5:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def single():
    scenario, pop, policy = make(0)
    return Simulation(scenario, pop, policy, seed=SEED).run(STEPS)


def assert_same_records(a, b):
    for name in a.series:
        assert torch.equal(a.series[name], b.series[name]), name
    pd.testing.assert_frame_equal(a.trajectory, b.trajectory)


def test_two_processes_give_the_records_of_one_and_ask_each_archetype_once(single, tmp_path, monkeypatch):
    log = tmp_path / "asked.txt"
    monkeypatch.setenv("LPM_TEST_POLICY_LOG", str(log))
    two = distributed.run(make_counting, STEPS, nproc=2, seed=SEED)
    assert single.series["infections"].sum() > 100  # an epidemic under way: many draws that could differ
    assert_same_records(single, two)
    pd.testing.assert_frame_equal(single.decisions, two.decisions)
    assert two.agents == AGENTS
    assert 0 < two.comm_seconds < two.step_seconds
    # weekly decisions: steps 0 and 7 (Mondays or not, the spec's cadence), each asked once, by one process
    asked = [line.split() for line in log.read_text().splitlines()]
    decided = sorted(single.decisions["step"].unique().tolist())
    assert sorted(int(s) for _, s, _ in asked) == decided
    assert len({pid for pid, _, _ in asked}) == 1
    k = len(single.archetypes["isolation"])
    assert all(int(kk) == k for _, _, kk in asked)


def test_a_seed_changes_the_records(single):
    """The equality above is not trivial: another seed gives other records."""
    other = distributed.run(make, STEPS, nproc=2, seed=SEED + 1)
    assert not torch.equal(single.series["infections"], other.series["infections"])


def test_a_killed_rank_fails_the_run_and_it_resumes(single, tmp_path):
    out = tmp_path / "run"
    began = time.monotonic()
    with pytest.raises(ShardError, match=r"rank 1 of 2 died \(killed by SIGKILL\).*resume") as err:
        distributed.run(make, STEPS, nproc=2, seed=SEED, out_dir=out, callback=die_at_step_5)
    assert time.monotonic() - began < 60
    assert str(out) in str(err.value)
    assert (out / "rank-1" / "checkpoint.pt").is_file()  # rank 1 died in its callback, after its save
    # rank 0, stopped at any moment, holds its last checkpoint or, stopped while writing the next, the one
    # before (moved aside first)
    assert (out / "rank-0" / "checkpoint.pt").is_file() or (out / "rank-0" / distributed.PREVIOUS).is_file()
    resumed = distributed.run(make, STEPS, nproc=2, seed=SEED, out_dir=out, resume=True)
    # rank 1 died after checkpointing step 5; rank 0 has done so too unless it was stopped while writing
    assert resumed.resumed_from in (5, 6)
    assert_same_records(single, resumed)
    pd.testing.assert_frame_equal(single.decisions, resumed.decisions)


def test_resume_takes_the_last_step_every_rank_holds(single, tmp_path):
    """Rank 0 checkpointed a step that rank 1 did not: both go back to the step before."""
    out = tmp_path / "run"
    distributed.run(make, 4, nproc=2, seed=SEED, out_dir=out)
    rank1 = out / "rank-1"
    os.replace(rank1 / distributed.PREVIOUS, rank1 / "checkpoint.pt")  # rank 1 "died" before step 3's save
    resumed = distributed.run(make, STEPS, nproc=2, seed=SEED, out_dir=out, resume=True)
    assert resumed.resumed_from == 3
    assert_same_records(single, resumed)


def test_resume_after_a_kill_while_a_checkpoint_was_written(single, tmp_path):
    """A rank killed after moving its checkpoint aside and journaling the step, before writing the new
    checkpoint, holds only the one before (and a journal line too many): the run resumes from there."""
    out = tmp_path / "run"
    distributed.run(make, 4, nproc=2, seed=SEED, out_dir=out)
    rank1 = out / "rank-1"
    (rank1 / "checkpoint.pt").unlink()  # step 3's checkpoint never written; step 2's is the previous
    resumed = distributed.run(make, STEPS, nproc=2, seed=SEED, out_dir=out, resume=True)
    assert resumed.resumed_from == 3
    assert_same_records(single, resumed)


def test_bad_process_counts_are_refused():
    with pytest.raises(InputError, match="'nproc'.*CPU core"):
        distributed.run(make, 2, nproc=distributed.available_cores() + 1)
    with pytest.raises(InputError, match="'nproc': must be >= 1"):
        distributed.run(make, 2, nproc=0)
    household = torch.tensor([0, 0, 1, 1, 1, 2])
    assert distributed.cut(household, 2) == [0, 5, 6]  # from agent 3 on to the next household
    assert distributed.cut(household, 3) == [0, 2, 5, 6]
    with pytest.raises(InputError, match="'nproc': 7 processes for 6 agents"):
        distributed.cut(household, 7)
    with pytest.raises(InputError, match="4 processes for 3 households"):
        distributed.cut(household, 4)
    with pytest.raises(InputError, match="'household': the agents of a household are not consecutive"):
        distributed.cut(torch.tensor([0, 1, 0, 1]), 2)


def test_gpu_ranks_talk_over_nccl_with_a_gpu_each(monkeypatch):
    """The choices of a run on GPUs, checked without one (the NCCL path itself has not run here): NCCL
    between GPUs and gloo between CPU processes; rank r computes on ``cuda:LOCAL_RANK`` (its index on its
    machine; the rank itself where this machine started every rank); a rank without a GPU of its own and
    more processes than a machine's GPUs are refused by name."""
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda") == "nccl"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.rank_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.rank_device("cuda", 1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 5 of a run over machines, the first on its machine
    assert distributed.rank_device("cuda", 5) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(
        InputError, match=r"rank 7 \(local rank 2 on its machine\) needs GPU 2, but torch sees 2 GPU"
    ):
        distributed.rank_device("cuda", 7)
    distributed.check_nproc(2, device="cuda")
    with pytest.raises(InputError, match="3 processes asked for on 'cuda', but this machine has 2 GPU"):
        distributed.check_nproc(3, device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InputError, match="1 processes asked for on 'cuda', but this machine has 0 GPU"):
        distributed.run(make, 2, nproc=1, device="cuda")


def test_each_rank_draws_the_population_on_its_device(monkeypatch):
    """A GPU's random numbers are not the CPU's: a sharded ``lpm run --device cuda`` draws each rank's
    population on that rank's GPU, as the one-process run draws it on its GPU, or the ranks would simulate
    other agents (measured on an H200 before this was so: 208,179 reported cases against 208,868)."""
    from lpm import run as run_module

    drawn = []
    small = Population.synthesize("nyc", agents=500, seed=1)

    def synthesize(name, **options):
        drawn.append(options.get("device"))
        return small

    monkeypatch.setattr(distributed, "rank_device", lambda device, rank: f"{device}:{rank}")
    monkeypatch.setattr(Population, "synthesize", synthesize)
    config = run_module.RunConfig(scenario="covid", agents=500, days=7, device="cuda")
    _, pop, _ = run_module._rank_parts(config, 1)
    assert pop is small and drawn == ["cuda:1"]


def test_cut_keeps_households_whole():
    pop = Population.synthesize("nyc", agents=AGENTS, seed=3)
    household = pop["household"]
    bounds = distributed.cut(household, 2)
    assert abs(bounds[1] - AGENTS // 2) < 20
    left, right = household[: bounds[1]], household[bounds[1] :]
    assert not set(left.tolist()) & set(right.tolist())


def make_labor(rank: int):
    return make_scenario("labor"), Population.synthesize("nyc", agents=AGENTS, seed=3), HeuristicPolicy()


def test_differentiable_and_unshardable_runs_are_refused():
    with pytest.raises(InputError, match="inference mode only"):
        distributed.run(make, 2, nproc=2, differentiable=True)
    with pytest.raises(ShardError, match="rank 0 of 2: the labor scenario cannot be sharded"):
        distributed.run(make_labor, 2, nproc=2)


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    out = tmp_path / "run"
    distributed.run(make, 2, nproc=2, seed=SEED, out_dir=out)
    scenario, pop, policy = make(0)
    with pytest.raises(InputError, match="different run"):
        Simulation(scenario, pop, policy, seed=SEED).run(3, out_dir=Path(out) / "rank-0", resume=True)


def lpm_cli(*args):
    return subprocess.run([sys.executable, "-m", "lpm", *args], capture_output=True, text=True, timeout=300)


def test_cli_nproc_2_writes_the_run_of_one_process(tmp_path):
    common = ["run", "covid", "--agents", str(AGENTS), "--days", "9", "--seed", "4", "--start", "2020-03-20"]
    one = lpm_cli(*common, "--set", "beta=0.2", "--out", str(tmp_path / "one"))
    two = lpm_cli(*common, "--set", "beta=0.2", "--nproc", "2", "--out", str(tmp_path / "two"))
    # the same code under torchrun, one process per rank ("--": torchrun would take --start as its --start-method)
    torchrun = Path(sys.executable).with_name("torchrun")
    three = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "lpm", "--", *common, "--set", "beta=0.2"]
        + ["--out", str(tmp_path / "three")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert three.returncode == 0, three.stderr
    for name in ("trajectory.parquet", "decisions.parquet"):
        first = pd.read_parquet(tmp_path / "one" / name)
        pd.testing.assert_frame_equal(first, pd.read_parquet(tmp_path / "two" / name))
        pd.testing.assert_frame_equal(first, pd.read_parquet(tmp_path / "three" / name))
    assert json.loads((tmp_path / "three" / "summary.json").read_text())["processes"] == 2
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["agents"] == AGENTS and summary["totals"]["infections"] > 50
    assert (tmp_path / "two" / "rank-1" / "checkpoint.pt").is_file()


def test_cli_refuses_too_many_processes(tmp_path):
    too_many = distributed.available_cores() + 1
    res = lpm_cli(
        "run",
        "covid",
        "--agents",
        "2000",
        "--days",
        "2",
        "--nproc",
        str(too_many),
        "--out",
        str(tmp_path / "x"),
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"'nproc': {too_many} processes asked for" in res.stderr
    res = lpm_cli(
        "run", "covid", "--agents", "1", "--days", "2", "--nproc", "2", "--out", str(tmp_path / "y")
    )
    assert res.returncode == 2 and "'nproc': 2 processes for 1 agents" in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resume_refuses_a_rank_without_a_checkpoint(tmp_path):
    """A lost node disk: rank 1 has no checkpoint while rank 0 has; the run does not silently start over."""
    out = tmp_path / "run"
    distributed.run(make, 4, nproc=2, seed=SEED, out_dir=out)
    shutil.rmtree(out / "rank-1")
    with pytest.raises(
        ShardError, match=r"--resume: rank 1 of 2 has no checkpoint \(.*rank-1 on the node.*rank 0 of 2 has"
    ) as err:
        distributed.run(make, STEPS, nproc=2, seed=SEED, out_dir=out, resume=True)
    assert "checkpointed 4 steps; a run cannot resume without every rank's checkpoint" in str(err.value)
    assert "put back the missing" in err.value.hint and "without --resume" in err.value.hint
    assert distributed._steps_done(out / "rank-0" / "checkpoint.pt") == 4  # rank 0's checkpoint is kept
    assert not (out / "rank-1" / "checkpoint.pt").exists()


# -- torchrun on two nodes (localhost), each in its own folder: no shared filesystem ------------------------

#: The CLI run the torchrun tests compare with; long enough that a rank can be killed mid-run.
CLI_RUN = ["run", "covid", "--agents", str(AGENTS), "--days", "150", "--seed", "4", "--start", "2020-03-20"]
CLI_RUN += ["--set", "beta=0.2"]
RECORDS = ("trajectory.parquet", "decisions.parquet")


@pytest.fixture(scope="module")
def cli_single(tmp_path_factory):
    """The run folder of CLI_RUN in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = lpm_cli(*CLI_RUN, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts its worker in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_node(launcher: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun launcher's process group and its workers' (their own sessions)."""
    workers = children(launcher.pid)
    for pid in [launcher.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    launcher.wait(timeout=10)


@pytest.fixture
def nodes(tmp_path):
    """``start(*cli_args)``: launches torchrun on nodes 0 and 1 (one rank each, static rendezvous at
    127.0.0.1), each in its own folder tmp_path/node-<n>, and returns the two launchers (their stderr is
    in the file ``launcher.err``). Any left running at the end are killed."""
    launched: list[subprocess.Popen] = []
    logs = []
    torchrun = Path(sys.executable).with_name("torchrun")

    def start(*args: str) -> list[subprocess.Popen]:
        port, pair = free_port(), []
        for node in (0, 1):
            cwd = tmp_path / f"node-{node}"
            cwd.mkdir(exist_ok=True)
            cmd = [str(torchrun), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
            cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "lpm", "--", *args]
            err = tmp_path / f"err-{len(launched)}.txt"
            logs.append(open(err, "w"))  # noqa: SIM115 (closed at the end)
            launcher = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=logs[-1],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                start_new_session=True,
            )
            launcher.err = err
            launched.append(launcher)
            pair.append(launcher)
        return pair

    yield start
    for launcher in launched:
        if launcher.poll() is None:
            kill_node(launcher)
    for log in logs:
        log.close()


def finish(launchers: list[subprocess.Popen], timeout: float = 60) -> None:
    """Wait for both nodes (at most ``timeout`` seconds each) and check that they succeeded."""
    for launcher in launchers:
        launcher.wait(timeout=timeout)
    for launcher in launchers:
        assert launcher.returncode == 0, launcher.err.read_text()


def assert_same_run(a: Path, b: Path) -> None:
    for name in RECORDS:
        pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name))


def test_torchrun_on_two_nodes_without_a_shared_folder(cli_single, nodes, tmp_path):
    finish(nodes(*CLI_RUN, "--out", "run"))  # at most 60 s a node: a hang fails the test
    node0, node1 = tmp_path / "node-0" / "run", tmp_path / "node-1" / "run"
    assert_same_run(cli_single, node0)
    assert json.loads((node0 / "summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in node0.glob("rank-*")) == ["rank-0"]
    # node 1 holds its rank's checkpoints and nothing else
    assert [p.name for p in node1.iterdir()] == ["rank-1"]
    assert (node1 / "rank-1" / "checkpoint.pt").is_file()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's worker in /proc")
def test_torchrun_a_killed_node_fails_the_other_clearly_and_it_resumes(cli_single, nodes, tmp_path):
    node0, node1 = nodes(*CLI_RUN, "--out", "run")
    journal = tmp_path / "node-1" / "run" / "rank-1" / "checkpoint-steps.jsonl"
    began = time.monotonic()
    while not (journal.is_file() and journal.read_text().count("\n") >= 2):  # rank 1 checkpointed step 1
        assert node0.poll() is None and node1.poll() is None, "a node ended before rank 1's checkpoint"
        assert time.monotonic() - began < 60, "rank 1 wrote no checkpoint within 60 s"
        time.sleep(0.01)
    kill_node(node1)
    node0.wait(timeout=60)  # the bound on noticing a dead peer (measured about 1 s), never a hang
    err = node0.err.read_text()
    assert node0.returncode != 0
    assert "error: rank 0 of 2: a peer rank failed" in err, err
    assert "--resume and the same --out run" in err
    # rank 1 holds a checkpoint: the last one, or the one before it when the kill landed while the next was
    # written (a rank moves its checkpoint aside, appends the step to its journal, then writes the new one;
    # seen in CI: killed after the journal's second line, before checkpoint.pt was back)
    rank1 = tmp_path / "node-1" / "run" / "rank-1"
    assert (rank1 / "checkpoint.pt").is_file() or (rank1 / distributed.PREVIOUS).is_file()
    # both nodes again, with --resume: the records of one process
    finish(nodes(*CLI_RUN, "--out", "run", "--resume"))
    assert_same_run(cli_single, tmp_path / "node-0" / "run")
    summary = json.loads((tmp_path / "node-0" / "run" / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 150


def test_torchrun_needs_out(tmp_path):
    """Under torchrun each process would name the default folder from its own clock: --out is required."""
    res = subprocess.run(
        [sys.executable, "-m", "lpm", "run", "covid", "--agents", "2000", "--days", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"},  # what torchrun sets
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--out: a run under torchrun needs its run folder named" in res.stderr
    assert not (tmp_path / "runs").exists()
