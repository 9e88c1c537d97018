"""lpm: Large Population Models — tensor agents whose decisions come from a locally served LLM.

The public API is what ``__all__`` lists; everything else is internal. The LLM-side names (backends,
cache, decider, server) are imported on first use, so ``import lpm`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from lpm.archetype import ArchetypeSpec as ArchetypeSpec
from lpm.archetype import Grouping as Grouping
from lpm.errors import LpmError as LpmError
from lpm.population import Population as Population

__version__ = "0.1.0"

#: name -> module of the names imported on first use.
_LAZY = {
    "Simulation": "lpm.engine",
    "RunResult": "lpm.engine",
    "HeuristicPolicy": "lpm.policy",
    "ArchetypeLLMPolicy": "lpm.policy",
    "AgentLLMPolicy": "lpm.policy",
    "make_scenario": "lpm.scenarios",
    "scenario_class": "lpm.scenarios",
    "Scenario": "lpm.scenarios",
    "RunConfig": "lpm.run",
    "calibrate": "lpm.calibration",
    "Window": "lpm.calibration",
    "compare": "lpm.compare",
    "CompareConfig": "lpm.compare",
    "sensitivity": "lpm.sensitivity",
    "probe": "lpm.probe",
    "Endpoint": "lpm.endpoint",
    "PromptTemplate": "lpm.prompt",
    "OpenAIBackend": "lpm.backend",
    "LangChainBackend": "lpm.backend",
    "ResponseCache": "lpm.cache",
    "Decider": "lpm.decision",
    "ModelServer": "lpm.server",
}

__all__ = ["ArchetypeSpec", "Grouping", "LpmError", "Population", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lpm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
