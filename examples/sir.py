"""A template scenario: an SIR epidemic in each borough whose residents decide weekly whether to isolate.

Copy this file to start your own; run it with ``lpm run examples/sir.py:SIR`` (``--policy llm`` asks the
local model). Everything lpm needs is declared on the class; the step reads top to bottom.
"""

import datetime as dt
from types import SimpleNamespace

import torch
from pydantic import Field

from lpm.policy import age_of, sigmoid
from lpm.scenarios import Decision, Plot, Quantity, Scenario, ScenarioConfig

S, I, R = 0, 1, 2  # noqa: E741 (health states)
ISOLATE = 0  # the first action of the isolation decision
STREAM_SEED, STREAM_STEP = 16, 17  # random streams (0-15 are the engine's)

# The archetype spec, written inline (it may also be a YAML file beside this one): who is asked what.
ISOLATION = {
    "name": "sir_isolation",
    "attributes": ["age_group"],
    "actions": ["isolate", "go out"],
    "cadence": "weekly",
    "context": {
        "infectious": {"description": "percent of residents infectious", "round": {"significant": 1}}
    },
    "prompt": {
        "system": 'An epidemic is spreading in your city. Each week you choose "isolate" or "go out". '
        "Answer with the action only.",
        "user": "{infectious}% of residents are infectious. You are aged {age_group}. Isolate or go out?",
    },
}


def isolate_rule(rows, ctx):
    """Heuristic P(isolate): rises with the percent infectious and with age."""
    return sigmoid(-1.5 + 0.5 * ctx["infectious"].astype(float).to_numpy() + 0.03 * (age_of(rows) - 40))


class SIRConfig(ScenarioConfig):
    start: dt.date = Field(dt.date(2020, 3, 1), description="date of the first day")
    beta: float = Field(0.3, gt=0, le=5, description="infections per infectious agent per day, going out")
    gamma: float = Field(0.1, gt=0, le=1, description="daily probability of recovering")
    isolation_effect: float = Field(0.8, ge=0, le=1, description="share of contacts an isolating agent cuts")
    seed_share: float = Field(0.002, gt=0, lt=1, description="share of agents infectious on day 0")


class SIR(Scenario):
    name = "sir"
    description = "SIR within each borough; residents decide weekly whether to isolate"
    step_unit = "day"
    horizon = 60
    Config = SIRConfig
    learnable = ("beta",)
    needs = ("borough", "age_group")
    quantities = (
        Quantity("infectious", "infectious agents at the start of the day"),
        Quantity("infections", "new infections during the day", total=True),
        Quantity("isolating", "agents who isolate"),
    )
    decisions = (
        Decision("isolation", ISOLATION, ("isolate", "go out"), heuristic={"isolate": isolate_rule}),
    )
    plots = (Plot("infectious.png", "infectious", "agents", also=("infections",)),)

    def setup(self, pop, device):
        borough = pop["borough"].to(torch.int32)
        residents = torch.bincount(borough, minlength=len(pop.labels("borough"))).float().clamp_min(1.0)
        kept = torch.tensor([1.0, 1.0 - self.config.isolation_effect], device=device)  # going out, isolating
        return SimpleNamespace(borough=borough, nb=len(residents), residents=residents, kept=kept)

    def init_state(self, world, sampler):
        health = (sampler.uniform(STREAM_SEED) < self.config.seed_share).to(torch.uint8)  # S or I
        return {"health": sampler.states(health, 3), "percent": 100.0 * health.float().mean()}

    def observe(self, world, state, t):
        return {"infectious": float(state["percent"])}

    def step(self, world, state, actions, params, t, sampler):
        health = state["health"]
        isolating = sampler.chose(actions["isolation"], ISOLATE)
        # 1. who is where: agents by health state x borough x isolating
        counts = sampler.tally(health, 3, world.borough, world.nb, flag=isolating)  # (3, B, 2)
        # 2. force of infection in each borough, on agents going out (column 0) and isolating (column 1)
        pressure = counts[I] @ world.kept / world.residents  # (B,) infectious contacts per resident
        p_infect = -torch.expm1(-params["beta"] * pressure[:, None] * world.kept)  # (B, 2)
        # 3. S -> I by infection, I -> R with probability gamma (R stays)
        susceptible = sampler.member(health, S)
        p_infected = sampler.pick(p_infect, world.borough, isolating)
        leave = sampler.bernoulli(
            torch.where(sampler.hard(susceptible), p_infected, self.config.gamma), STREAM_STEP
        )
        infections = sampler.count(world.borough, world.nb, susceptible * leave)
        # 4. the next state and the day's records
        percent = 100.0 * counts[I].sum().detach() / world.residents.sum()
        records = {
            "infectious": counts[I].sum(1),
            "infections": infections,
            "isolating": counts[:, :, 1].sum(0),
        }
        return {"health": sampler.advance(health, 3, leave), "percent": percent}, records
