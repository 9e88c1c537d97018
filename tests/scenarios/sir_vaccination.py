"""A scenario with two decisions, for the tests: the template SIR (examples/sir.py) extended from outside
the package with a one-time vaccination choice (cadence ``once``) beside the weekly isolation decision."""

from pathlib import Path

import numpy as np
import torch

from lpm.scenarios import Decision, Quantity, scenario_class

SIR = scenario_class(f"{Path(__file__).resolve().parents[2] / 'examples' / 'sir.py'}:SIR")
VACCINATE = 0

VACCINATION = {
    "name": "sir_vaccination",
    "attributes": ["age_group", "sex"],
    "actions": ["vaccinate", "wait"],
    "cadence": "once",
    "prompt": {
        "system": 'A vaccine against the epidemic is offered once. Choose "vaccinate" or "wait". '
        "Answer with the action only.",
        "user": "You are {sex}, aged {age_group}. Do you vaccinate or wait?",
    },
}


def vaccinate_rule(rows, ctx):
    """Heuristic P(vaccinate): 40 %, whoever asks."""
    return np.full(len(rows), 0.4)


class SIRVaccination(SIR):
    name = "sir_vaccination"
    description = "the template SIR plus a one-time vaccination choice (vaccinated agents are protected)"
    differentiable = False  # the step edits hard action codes
    quantities = (*SIR.quantities, Quantity("vaccinated", "agents who chose to vaccinate"))
    decisions = (
        *SIR.decisions,
        Decision("vaccination", VACCINATION, ("vaccinate", "wait"), heuristic={"vaccinate": vaccinate_rule}),
    )

    def step(self, world, state, actions, params, t, sampler):
        vaccinated = sampler.chose(actions["vaccination"], VACCINATE)
        isolation = torch.where(vaccinated, 0, actions["isolation"]).to(
            torch.int8
        )  # protected as if isolating
        following, records = super().step(
            world, state, {**actions, "isolation": isolation}, params, t, sampler
        )
        return following, {**records, "vaccinated": sampler.count(world.borough, world.nb, vaccinated)}
