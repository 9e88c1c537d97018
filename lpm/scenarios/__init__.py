"""Scenarios: the contract a scenario declares (:mod:`lpm.scenarios.base`), how lpm finds them
(:mod:`lpm.scenarios.registry`), and the shipped ones.

Shipped: ``covid`` (:mod:`lpm.scenarios.covid`, daily SEIR in NYC with weekly isolation decisions) and
``labor`` (:mod:`lpm.scenarios.labor`, monthly work decisions and unemployment per borough). A scenario of
your own is a class in your own file, run with ``lpm run path/to/file.py:ClassName``; ``lpm scenarios``
lists what is available.
"""

from __future__ import annotations

from lpm.scenarios.base import Decision, Plot, Quantity, Scenario, ScenarioConfig, StepUnit
from lpm.scenarios.registry import available_scenarios, make_scenario, scenario_class

__all__ = [
    "Decision",
    "Plot",
    "Quantity",
    "Scenario",
    "ScenarioConfig",
    "StepUnit",
    "available_scenarios",
    "make_scenario",
    "scenario_class",
]
