"""The CLI as a user runs it: exit codes and messages, no tracebacks."""

import subprocess
import sys

import pytest


def lpm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def pop_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pop") / "nyc.parquet"
    res = lpm("population", "synth", "nyc", "--agents", "30000", "--seed", "2", "--out", str(path))
    assert res.returncode == 0, res.stderr
    assert "Brooklyn" in res.stdout and "30,000" in res.stdout
    return path


def test_show_population(pop_file):
    res = lpm("population", "show", str(pop_file))
    assert res.returncode == 0, res.stderr
    assert (
        "Staten Island" in res.stdout and "11.0 bytes per agent" in res.stdout
    )  # + household, school, workplace


def test_archetypes_show(pop_file):
    res = lpm("archetypes", "show", "covid_isolation", "--population", str(pop_file))
    assert res.returncode == 0, res.stderr
    assert "K = 100 archetypes" in res.stdout


def test_errors_are_clear_without_traceback(tmp_path, pop_file):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    cases = [
        (["population", "show", str(bad)], "bad.parquet"),
        (["archetypes", "show", "nope", "--population", str(pop_file)], "no such archetype spec"),
        (["population", "synth", "mars", "--out", str(tmp_path / "x.parquet")], "unknown population recipe"),
    ]
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nprompt: covid_isolation.yaml\nattributes: [shoe_size]\nactions: [a, b]\n")
    cases.append((["archetypes", "show", str(spec), "--population", str(pop_file)], "field 'attributes[0]'"))
    for args, needle in cases:
        res = lpm(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert needle in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_usage_error_exit_code():
    res = lpm("population", "synth", "nyc")  # --out missing
    assert res.returncode == 2
    assert "--out" in res.stderr
