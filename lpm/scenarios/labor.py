"""Work decisions of New York City's labor force during the epidemic: monthly steps, unemployment per borough.

State per agent: ``employed`` (bool; meaningful for labor-force members only) and the engine's ``action``
(0 work, 1 stay home, -1 not in the labor force). Each month, after the members decided (spec
``labor_work``):

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
from typing import Any, ClassVar

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.policy import ByAttribute
from lpm.population import Population
from lpm.scenarios import Draw, Scenario, parse_params

__all__ = ["LaborParams", "LaborScenario"]

WORK, HOME = 0, 1
STREAM_TRANSITION, STREAM_SEED = 16, 17


class LaborParams(BaseModel):
    """Parameters of the labor scenario; one line each, with units. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
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

    @model_validator(mode="after")
    def _check(self) -> LaborParams:
        if self.start.day != 1 or not dt.date(2019, 2, 1) <= self.start <= dt.date(2021, 12, 1):
            raise ValueError(f"start must be the 1st of a month in 2019-02 .. 2021-12, got {self.start}")
        return self


class LaborScenario(Scenario):
    """Monthly work / stay-home decisions and unemployment per borough (spec ``labor_work``).

    Recorded per borough each month (at its end): ``unemployment_rate`` (percent of members),
    ``employed``, ``labor_force`` (members) and ``working`` (members whose action was work).
    """

    name: ClassVar[str] = "labor"
    spec_name: ClassVar[str] = "labor_work"
    step_unit: ClassVar[str] = "month"
    actions: ClassVar[tuple[str, ...]] = ("work", "stay home")
    quantities: ClassVar[tuple[str, ...]] = ("unemployment_rate", "employed", "labor_force", "working")
    needs: ClassVar[tuple[str, ...]] = ("borough", "labor_force")

    def __init__(self, params: Mapping[str, Any] | LaborParams | None = None):
        self.params: LaborParams = parse_params(LaborParams, params, "labor scenario")

    def config(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def date(self, t: int) -> pd.Timestamp:
        return pd.Timestamp(self.params.start) + pd.DateOffset(months=t)

    def setup(self, pop: Population, *, device: torch.device, differentiable: bool) -> None:
        if differentiable:
            raise InputError(
                "the labor scenario runs in inference mode only", hint="drop differentiable=True"
            )
        self.device, self.n = device, len(pop)
        self.boroughs = pop.labels("borough")
        self.nb = len(self.boroughs)
        self.borough = pop["borough"].to(torch.int32)
        self.member = pop["labor_force"].bool()
        self.members = torch.bincount(self.borough[self.member], minlength=self.nb).to(torch.float64)
        lf = nyc.labor_force()
        lf = lf.assign(borough=lf["borough"].map(nyc.BOROUGH_NAMES))
        self._real = lf[lf["borough"].isin(self.boroughs)]
        cases = nyc.cases_by_day()
        self._cases = cases.groupby(cases["date"].dt.to_period("M"))["cases"].sum()

    def _rate(self, month: pd.Timestamp) -> torch.Tensor:
        rows = (
            self._real[self._real["date"] == month]
            .set_index("borough")["unemployment_rate"]
            .reindex(self.boroughs)
        )
        if rows.isna().any():
            raise InputError(
                f"{nyc.data_dir() / 'labor-force-by-borough.csv'}: no unemployment_rate for {month:%Y-%m}"
            )
        return torch.tensor(rows.to_numpy(), dtype=torch.float64)

    def init_state(self, seed: int, uniforms: Any) -> dict[str, torch.Tensor]:
        before = pd.Timestamp(self.params.start) - pd.DateOffset(months=1)
        rate = self._rate(before)
        u = uniforms.draw(seed, 0, STREAM_SEED)
        p_unemp = (rate / 100.0).to(torch.float32).to(self.device).index_select(0, self.borough)
        employed = self.member & (u >= p_unemp)
        return {"employed": employed, "rate": rate.to(self.device)}

    def _cases_last_month(self, t: int) -> float:
        month = (self.date(t) - pd.DateOffset(months=1)).to_period("M")
        return float(self._cases.get(month, 0.0))

    def observe(self, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``month`` label, real ``cases`` citywide last month, simulated ``unemployment_rate`` per borough."""
        rate = state["rate"].cpu().tolist()
        return {
            "month": f"{self.date(t):%B %Y}",
            "cases": self._cases_last_month(t),
            "unemployment_rate": ByAttribute("borough", dict(zip(self.boroughs, rate, strict=True))),
        }

    def transition(
        self, state: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], t: int, draw: Draw
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        p = self.params
        employed, action = state["employed"], state["action"]
        per_100k = self._cases_last_month(t) / nyc.city_population() * 1e5
        finding = p.job_finding * math.exp(-per_100k / p.case_scale)
        # probability of switching employment status by (employed, stays home)
        table = torch.tensor([finding, 0.0, p.separation, p.layoff], dtype=torch.float32, device=self.device)
        home = action == HOME
        index = employed.to(torch.int32) * 2 + home
        switch = (draw(STREAM_TRANSITION) < table.index_select(0, index)) & self.member
        employed = employed ^ switch
        emp = torch.bincount(self.borough, weights=employed.to(torch.float64), minlength=self.nb)
        working = torch.bincount(self.borough, weights=(action == WORK).to(torch.float64), minlength=self.nb)
        rate = 100.0 * (1.0 - emp / self.members.clamp_min(1.0))
        record = torch.stack([rate, emp, self.members, working], dim=1).to(torch.float32)
        return {**state, "employed": employed, "rate": rate}, record

    def real_data(self, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real monthly unemployment rate per borough (percent, BLS LAUS)."""
        real = self._real[(self._real["date"] >= first) & (self._real["date"] <= last)]
        out = pd.DataFrame(
            {
                "date": real["date"].to_numpy(),
                "borough": pd.Categorical(real["borough"], categories=self.boroughs),
                "quantity": "unemployment_rate",
                "value": real["unemployment_rate"].to_numpy(dtype=float),
            }
        )
        return out.sort_values(["date", "borough"]).reset_index(drop=True)
