"""The public API: every name in lpm.__all__ resolves, and a seeded run matches its recorded baseline."""

import json
from pathlib import Path

import pytest

import lpm

BASELINE = Path(__file__).with_name("baseline.json")


def test_public_names_resolve():
    for name in lpm.__all__:
        assert getattr(lpm, name) is not None, name
    with pytest.raises(AttributeError):
        lpm.no_such_name  # noqa: B018


def baseline_figures() -> dict:
    """Totals of a small seeded COVID and labor run with the heuristic policy (inference mode)."""
    pop = lpm.Population.synthesize("nyc", agents=30_000, seed=5)
    out = {}
    for scenario, steps in (("covid", 28), ("labor", 6)):
        result = lpm.Simulation(lpm.make_scenario(scenario), pop, lpm.HeuristicPolicy(), seed=5).run(steps)
        last = result.trajectory[result.trajectory["step"] == steps - 1]
        totals = result.trajectory.groupby("quantity", observed=True)["value"].sum()
        out[scenario] = {
            "totals": {str(k): round(float(v), 4) for k, v in totals.items()},
            "last_step": {
                str(k): round(float(v), 4)
                for k, v in last.groupby("quantity", observed=True)["value"].sum().items()
            },
        }
    return out


def test_seeded_run_matches_baseline():
    """A silent behaviour change (synthesis, sampling, transitions) shows up here. After an intended
    change, regenerate the baseline and review its diff:

        cd tests && ../.venv/bin/python -c "import json, test_api; json.dump(test_api.baseline_figures(),
            open('baseline.json', 'w'), indent=1, sort_keys=True)"
    """
    assert baseline_figures() == json.loads(BASELINE.read_text())
