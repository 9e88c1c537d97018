"""Shared fixtures. The real model server is started once per session (tests/fixtures_server.py)."""

from __future__ import annotations

import pytest
from fixtures_server import llamacpp_server, vllm_server  # noqa: F401  (session fixtures: one server each)

from lpm.population import Population


@pytest.fixture(scope="session")
def small_pop() -> Population:
    """20,000 synthetic New Yorkers (every one of the 100 covid archetypes occurs)."""
    return Population.synthesize("nyc", agents=20_000, seed=0)


@pytest.fixture(scope="session")
def city() -> Population:
    """The full synthetic city (≈ 8.34 M agents, ≈ 50 MB); built once per session."""
    return Population.synthesize("nyc", seed=7)
