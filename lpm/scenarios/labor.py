"""Work decisions of New York City's labor force during the epidemic: monthly steps, unemployment per borough.

State per agent: ``employed`` (bool; meaningful for labor-force members only); the decision ``work``
(actions ``work``, ``stay home``; spec ``labor_work``, members of the labor force only) is the engine's.
Each month, after the members decided:

* employed, works: keeps the job except for the usual separations (``separation`` per month);
* employed, stays home: loses the job with probability ``layoff`` (furlough, layoff, quitting);
* unemployed, works (looks for work): finds a job with probability
  ``job_finding * exp(-cases per 100,000 last month / case_scale)`` (hiring dries up with the epidemic);
* unemployed, stays home: stays unemployed.

Start: each borough's members are unemployed with the real rate of the month before the start
(BLS LAUS, :func:`lpm.nyc.labor_force`). Context: ``month`` ("April 2020"), ``cases`` (real reported
cases citywide in the calendar month before, :func:`lpm.nyc.cases_by_day`), ``unemployment_rate``
(the simulated rate in the archetype's borough last month, a :class:`lpm.policy.ByAttribute`).
Inference mode only (no parameter here is calibrated by gradient).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.policy import ByAttribute, age_of, sigmoid
from lpm.population import Population
from lpm.sampling import Sampler
from lpm.scenarios.base import Decision, Plot, Quantity, Scenario, ScenarioConfig, real_frame

__all__ = ["LaborConfig", "LaborScenario", "work_rule"]

WORK, HOME = 0, 1
STREAM_TRANSITION, STREAM_SEED = 16, 17
RATES_SOURCE = "BLS LAUS monthly unemployment rate per borough (labor-force-by-borough.csv)"


def work_rule(rows: pd.DataFrame, ctx: pd.DataFrame) -> np.ndarray:
    """P(work): falls with monthly cases per 100,000, rises with the borough's unemployment rate.

    ``cases`` is citywide cases in the past month, ``unemployment_rate`` in percent. About 95 % with no
    cases and 4 % unemployment; about 85 % at 1,000 monthly cases per 100,000.
    """
    per_100k = ctx["cases"].astype(float).to_numpy() / nyc.city_population() * 1e5
    unemp = (
        ctx["unemployment_rate"].astype(float).to_numpy()
        if "unemployment_rate" in ctx
        else np.full(len(ctx), 4.0)
    )
    x = 2.9 - 0.0012 * per_100k + 0.08 * (unemp - 4.0) - 0.01 * np.clip(age_of(rows) - 50, 0, None)
    return sigmoid(x)


class LaborConfig(ScenarioConfig):
    """Configuration of the labor scenario; one line each, with units. Unknown keys are rejected."""

    start: dt.date = Field(
        default=dt.date(2020, 3, 1), description="first simulated month (its 1st day), 2019-02 .. 2021-12"
    )
    separation: float = Field(
        default=0.015, ge=0, le=1, description="monthly job loss of employed agents who work"
    )
    layoff: float = Field(
        default=0.35, ge=0, le=1, description="monthly job loss of employed agents who stay home"
    )
    job_finding: float = Field(
        default=0.25, ge=0, le=1, description="monthly job-finding rate of job seekers, no epidemic"
    )
    case_scale: float = Field(
        default=500.0, gt=0, description="cases per 100,000 per month that cut job finding by 1/e"
    )

    @field_validator("start")
    @classmethod
    def _start(cls, start: dt.date) -> dt.date:
        if start.day != 1 or not dt.date(2019, 2, 1) <= start <= dt.date(2021, 12, 1):
            raise ValueError("start must be the 1st of a month in 2019-02 .. 2021-12")
        return start


@dataclass(frozen=True)
class LaborWorld:
    """What a labor run needs that does not change: each agent's borough (N,) int32, labor-force members
    (N,) bool, members per borough (B,), the real monthly rates and the city's cases per month."""

    boroughs: list[str]
    borough: torch.Tensor
    member: torch.Tensor
    members: torch.Tensor
    real: pd.DataFrame
    cases: pd.Series

    @property
    def nb(self) -> int:
        return len(self.boroughs)

    def rate(self, month: pd.Timestamp) -> torch.Tensor:
        """(B,) float64 real unemployment rate of each borough in ``month``, percent."""
        rows = self.real[self.real["date"] == month].set_index("borough")["unemployment_rate"]
        rows = rows.reindex(self.boroughs)
        if rows.isna().any():
            raise InputError(
                f"{nyc.data_dir() / 'labor-force-by-borough.csv'}: no unemployment_rate for {month:%Y-%m}"
            )
        return torch.tensor(rows.to_numpy(), dtype=torch.float64)

    def cases_before(self, date: pd.Timestamp) -> float:
        """Real cases citywide in the calendar month before ``date``."""
        return float(self.cases.get((date - pd.DateOffset(months=1)).to_period("M"), 0.0))


class LaborScenario(Scenario):
    """Monthly work / stay-home decisions and unemployment per borough (spec ``labor_work``)."""

    name = "labor"
    description = "NYC labor force in the epidemic: monthly work decisions, unemployment per borough"
    step_unit = "month"
    horizon = 12
    Config = LaborConfig
    needs = ("borough", "labor_force")
    differentiable = False
    quantities = (
        Quantity("unemployment_rate", "percent of labor-force members without a job", real=RATES_SOURCE),
        Quantity("employed", "labor-force members with a job at the end of the month"),
        Quantity("labor_force", "labor-force members"),
        Quantity("working", "labor-force members whose action was work"),
    )
    decisions = (
        Decision(
            "work",
            spec="labor_work",
            actions=("work", "stay home"),
            heuristic={"work": work_rule},
            plot="stay home",
        ),
    )
    plots = (Plot("unemployment.png", "unemployment_rate", "unemployment rate, %"),)

    config: LaborConfig

    def setup(self, pop: Population, device: torch.device) -> LaborWorld:
        boroughs = pop.labels("borough")
        borough = pop["borough"].to(torch.int32)
        member = pop["labor_force"].bool()
        lf = nyc.labor_force()
        lf = lf.assign(borough=lf["borough"].map(nyc.BOROUGH_NAMES))
        cases = nyc.cases_by_day()
        return LaborWorld(
            boroughs=boroughs,
            borough=borough,
            member=member,
            members=torch.bincount(borough[member], minlength=len(boroughs)).to(torch.float64),
            real=lf[lf["borough"].isin(boroughs)],
            cases=cases.groupby(cases["date"].dt.to_period("M"))["cases"].sum(),
        )

    def init_state(self, world: LaborWorld, sampler: Sampler) -> dict[str, torch.Tensor]:
        """Each borough's members are unemployed with the real rate of the month before the start."""
        rate = world.rate(pd.Timestamp(self.config.start) - pd.DateOffset(months=1))
        device = world.borough.device
        p_unemployed = (rate / 100.0).to(torch.float32).to(device).index_select(0, world.borough)
        employed = world.member & (sampler.uniform(STREAM_SEED) >= p_unemployed)
        return {"employed": employed, "rate": rate.to(device)}

    def observe(self, world: LaborWorld, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``month`` label, real ``cases`` citywide last month, simulated ``unemployment_rate`` per borough."""
        rate = state["rate"].cpu().tolist()
        return {
            "month": f"{self.date(t):%B %Y}",
            "cases": world.cases_before(self.date(t)),
            "unemployment_rate": ByAttribute("borough", dict(zip(world.boroughs, rate, strict=True))),
        }

    def step(
        self,
        world: LaborWorld,
        state: Mapping[str, torch.Tensor],
        actions: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        t: int,
        sampler: Sampler,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c, w = self.config, world
        employed, action = state["employed"], actions["work"]
        # 1. hiring dries up with last month's cases
        per_100k = w.cases_before(self.date(t)) / nyc.city_population() * 1e5
        finding = c.job_finding * math.exp(-per_100k / c.case_scale)
        # 2. probability of switching employment status, by (employed, stays home)
        table = torch.tensor(
            [finding, 0.0, c.separation, c.layoff], dtype=torch.float32, device=w.borough.device
        )
        home = sampler.chose(action, HOME)
        p_switch = table.index_select(0, employed.to(torch.int32) * 2 + home)
        switch = sampler.bernoulli(p_switch, STREAM_TRANSITION) & w.member
        employed = employed ^ switch
        # 3. the month's records
        emp = torch.bincount(w.borough, weights=employed.to(torch.float64), minlength=w.nb)
        working = torch.bincount(
            w.borough, weights=sampler.chose(action, WORK).to(torch.float64), minlength=w.nb
        )
        rate = 100.0 * (1.0 - emp / w.members.clamp_min(1.0))
        records = {
            "unemployment_rate": rate.to(torch.float32),
            "employed": emp.to(torch.float32),
            "labor_force": w.members.to(torch.float32),
            "working": working.to(torch.float32),
        }
        return {**state, "employed": employed, "rate": rate}, records

    def real_data(self, world: LaborWorld, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real monthly unemployment rate per borough (percent, BLS LAUS)."""
        real = world.real[(world.real["date"] >= first) & (world.real["date"] <= last)]
        return real_frame(
            real, quantity="unemployment_rate", value="unemployment_rate", labels=world.boroughs
        )
