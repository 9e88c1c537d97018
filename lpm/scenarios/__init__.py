"""Scenarios: what agents' state is and how it moves, on top of the engine (:mod:`lpm.engine`).

A scenario plugs in through :class:`Scenario` (checked at construction: every abstract method must be
implemented). The engine calls, in this order each step: ``observe`` (the policy's context),
``transition`` (after the agents sampled their actions); ``setup`` and ``init_state`` once per run.

Shipped: ``covid`` (:class:`lpm.scenarios.covid.CovidScenario`, daily SEIR with isolation decisions) and
``labor`` (:class:`lpm.scenarios.labor.LaborScenario`, monthly work decisions and unemployment).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pandas as pd
import torch
from pydantic import BaseModel, ValidationError

from lpm.errors import InputError, validation_message
from lpm.population import Population

__all__ = ["SCENARIOS", "Scenario", "make_scenario", "parse_params"]

#: Uniform draws of this step for a stream id: ``draw(stream) -> (N,) float32`` (a reused buffer).
Draw = Callable[[int], torch.Tensor]


class Scenario(ABC):
    """Base of scenarios.

    Class attributes: ``name``; ``spec_name`` (the archetype spec agents decide under); ``step_unit``
    (``"day"`` or ``"month"``); ``actions`` (the spec's actions, in the order the transition reads
    them); ``quantities`` (what is recorded per borough each step).
    """

    name: ClassVar[str]
    spec_name: ClassVar[str]
    step_unit: ClassVar[str]
    actions: ClassVar[tuple[str, ...]]
    quantities: ClassVar[tuple[str, ...]]
    #: Population columns the scenario reads (checked by the engine before the run starts).
    needs: ClassVar[tuple[str, ...]] = ()

    def steps_per(self, cadence: str) -> int:
        """Steps between two decisions for a spec cadence (``daily``, ``weekly``, ``monthly``)."""
        table = {
            "day": {"daily": 1, "weekly": 7, "monthly": 30},
            "month": {"daily": 1, "weekly": 1, "monthly": 1},
        }
        return table[self.step_unit][cadence]

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Plain-data configuration (start date and parameters), saved with the run."""

    @abstractmethod
    def date(self, t: int) -> pd.Timestamp:
        """Calendar date of step ``t``."""

    @abstractmethod
    def setup(self, pop: Population, *, device: torch.device, differentiable: bool) -> None:
        """Precompute per-agent index tensors and tables once per run."""

    def parameters(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Parameters that get gradients in differentiable mode (name -> scalar tensor)."""
        return {}

    @abstractmethod
    def init_state(self, seed: int, uniforms: Any) -> dict[str, torch.Tensor]:
        """The state at step 0: a dict of named tensors."""

    @abstractmethod
    def observe(self, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """The context of step ``t`` for the policy (the spec's context variables)."""

    @abstractmethod
    def transition(
        self, state: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], t: int, draw: Draw
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Move every agent one step; return the new state and this step's (B, Q) record."""

    @abstractmethod
    def real_data(self, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real series to compare with (``date, borough, quantity, value``), scaled to the population."""


def parse_params(model: type[BaseModel], params: Mapping[str, Any] | BaseModel | None, where: str) -> Any:
    """Validate ``params`` into ``model``; errors name the field, the bad value and the allowed range."""
    if isinstance(params, model):
        return params
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        message = validation_message(exc, noun="parameter", unknown="unknown parameter", top="(parameters)")
        raise InputError(f"{where} {message}", hint=f"parameters: {', '.join(model.model_fields)}") from None


def make_scenario(name: str, params: Mapping[str, Any] | None = None, **options: Any) -> Scenario:
    """A shipped scenario by name (``covid``, ``labor``) with parameters given as a dict."""
    if name not in SCENARIOS:
        raise InputError(f"unknown scenario {name!r}", hint=f"scenarios: {', '.join(SCENARIOS)}")
    module, cls = SCENARIOS[name]
    import importlib

    return getattr(importlib.import_module(module), cls)(params, **options)


#: Shipped scenarios: name -> (module, class).
SCENARIOS = {
    "covid": ("lpm.scenarios.covid", "CovidScenario"),
    "labor": ("lpm.scenarios.labor", "LaborScenario"),
}
