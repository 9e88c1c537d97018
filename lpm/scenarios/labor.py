"""New York City's labor market in the epidemic: monthly gross flows between employment, unemployment and
not in the labor force, driven by work decisions and by the case count.

**State.** Every agent aged 16 or more carries a labor status, employed ``E``, unemployed ``U`` or not in
the labor force ``N`` (a categorical state, :meth:`lpm.sampling.Sampler.states`); agents under 16 are ``N``
and never move (the CPS universe starts at 16). At the start each borough's labor-force members (the
population's ``labor_force`` column) are ``U`` with the real rate of the month before the start (BLS LAUS,
:func:`lpm.nyc.labor_force`), ``E`` otherwise; other agents of 16 or more are ``N``.

**Decision.** ``work`` (actions ``work``, ``stay home``; spec ``labor_work``) is asked monthly of the
population's labor-force members at the start (the spec's ``members``); agents who enter the labor force
later carry no action and move as those who work. An employed agent who stays home stays out of work
this month; an unemployed one stops searching (waits for a recall).

**Flows.** Each month every agent of 16 or more moves along a 3 × 3 Markov table (rows: from ``E``,
``U``, ``N``) of its borough ``b`` and action; with ``c`` the real reported cases citywide per 100,000 in
the calendar month before and ``h = exp(-c / case_scale)`` the share of hiring left:

    E → U   r_b (separation + home · layoff)          job losses; staying home adds temporary layoffs
    E → N   exit_employed + home · withdrawal         leaving the labor force
    U → E   job_finding · h · (1 - home (1 - home_search))   hiring dries up with the epidemic
    U → N   exit_unemployed + home · withdrawal
    N → E   entry_employed · h
    N → U   entry_unemployed

``home`` is 1 for an agent whose action is stay home, else 0 (in differentiable mode it carries the
gradient of the decision's probability, so alignment offsets get gradients); the diagonal keeps the
rest. ``r_b`` is the borough's 2019 mean unemployment rate over the city's (LAUS; 1.36 in the Bronx,
0.86 in Manhattan), so each borough keeps its own level of unemployment (a modelling choice: in a steady
state the unemployment rate is about ``E→U / (E→U + U→E + U→N)``, proportional to the separation rate).
The unemployment rate is ``U / (E + U)`` per borough; the labor force ``E + U`` changes with the flows to
and from ``N``.

**Sources and choices.** The base rates are the 2019 averages of the BLS Current Population Survey
*labor force status flows* (research series, https://www.bls.gov/cps/cps_flows.htm; seasonally adjusted
flows such as LNS17100000 unemployed → employed, LNS17200000 not in labor force → employed,
LNS17800000 employed → not in labor force), divided by the stock they leave, rounded: E → U 0.9 %,
E → N 2.7 %, U → E 25 %, U → N 22 %, N → E 4 %, N → U 2 %. Rounded together they give a steady state
near the US 2019 levels (unemployment 4.3 %, participation 63 %), so a run without an epidemic stays
near its start. National rates stand in for New York City's (the CPS does not publish flows by
county). ``layoff``, ``withdrawal``, ``home_search``, ``case_scale`` and the heuristic rule are
modelling choices, set by eye against the LAUS series of 2020 (see :class:`LaborConfig`) and meant to be
fitted (``learnable``). Bound: even if every agent stays home every month, ``U`` leaves at least at
``exit_unemployed + withdrawal`` a month while ``E`` loses at most ``r_b (separation + layoff)``, which
keeps the unemployment rate under about ``r_b (s + l) / (r_b (s + l) + exit_unemployed + withdrawal)``
(about 44 % in the Bronx with the defaults; 42 % measured).

Context: ``month`` ("April 2020"), ``cases`` (real reported cases citywide in the calendar month before,
:func:`lpm.nyc.cases_by_day`), ``unemployment_rate`` (the simulated rate in the archetype's borough last
month, a :class:`lpm.policy.ByAttribute`). A month, in the order :meth:`LaborScenario.step` reads:
(1) hiring from last month's cases; (2) the flow table per borough and action; (3) one Markov step;
(4) records.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.policy import ByAttribute, age_of, sigmoid
from lpm.population import Population, smallest_int_dtype
from lpm.sampling import Sampler
from lpm.scenarios.base import (
    Decision,
    Plot,
    Quantity,
    Scenario,
    ScenarioConfig,
    parameter,
    real_frame,
)

__all__ = ["LaborConfig", "LaborScenario", "flow_table", "work_rule"]

WORK, HOME = 0, 1  # action indices of the work decision
E, U, N = 0, 1, 2  # labor status codes
STATUSES = ("E", "U", "N")
WORKING_AGE = 16
STREAM_TRANSITION, STREAM_SEED = 16, 17
RATES_SOURCE = "BLS LAUS monthly unemployment rate per borough (labor-force-by-borough.csv)"
#: New York State on PAUSE (Executive Order 202.8): non-essential workplaces closed 2020-03-22 .. 2020-06-07
#: (NYC phase 1 reopening on 2020-06-08). Share of each calendar month under the order.
PAUSE = {pd.Period("2020-03", "M"): 10 / 31, pd.Period("2020-04", "M"): 1.0, pd.Period("2020-05", "M"): 1.0}
PAUSE[pd.Period("2020-06", "M")] = 7 / 30


def work_rule(rows: pd.DataFrame, ctx: pd.DataFrame) -> np.ndarray:
    """P(work): falls under New York State on PAUSE and with monthly cases per 100,000 (log scale), rises
    with the borough's unemployment rate (pressure to keep or find a job), falls with age past 50.

    rows: K archetype attributes; ctx: K resolved contexts (``month`` "April 2020", ``cases`` citywide in
    the past month, ``unemployment_rate`` percent). Returns (K,) probabilities. About 95 % with no cases,
    about 86 % at 1,000 monthly cases per 100,000 without PAUSE, about 45 % in a month under PAUSE.
    """
    per_100k = ctx["cases"].astype(float).to_numpy() / nyc.city_population() * 1e5
    unemp = (
        ctx["unemployment_rate"].astype(float).to_numpy()
        if "unemployment_rate" in ctx
        else np.full(len(ctx), 4.0)
    )
    if "month" in ctx:
        months = pd.to_datetime(ctx["month"].astype(str), format="%B %Y").dt.to_period("M")
        pause = months.map(lambda m: PAUSE.get(m, 0.0)).to_numpy(dtype=float)
    else:
        pause = np.zeros(len(ctx))
    x = (
        3.0
        - 0.17 * np.log1p(per_100k)
        - 2.9 * pause
        + 0.03 * (np.clip(unemp, 0.0, 30.0) - 4.0)
        - 0.01 * np.clip(age_of(rows) - 50, 0, None)
    )
    return sigmoid(x)


def _rate(default: float, description: str) -> Any:
    return Field(default=default, gt=0, lt=1, description=description)


class LaborConfig(ScenarioConfig):
    """Configuration of the labor scenario; one line each, monthly probabilities unless said otherwise
    (sources in the module docstring). Unknown keys are rejected."""

    start: dt.date = Field(
        default=dt.date(2020, 3, 1), description="first simulated month (its 1st day), 2019-02 .. 2021-12"
    )
    separation: float = _rate(0.009, "E -> U of agents who work (CPS flows, 2019)")
    layoff: float = _rate(0.15, "extra E -> U of employed agents who stay home (modelling choice)")
    job_finding: float = _rate(0.25, "U -> E of job seekers, no epidemic (CPS flows, 2019)")
    case_scale: float = Field(
        default=3000.0,
        gt=0,
        description="cases per 100,000 in the month before that cut hiring to 1/e (modelling choice)",
    )
    withdrawal: float = _rate(0.05, "extra E -> N and U -> N of agents who stay home (modelling choice)")
    exit_employed: float = _rate(0.027, "E -> N (CPS flows, 2019)")
    exit_unemployed: float = _rate(0.22, "U -> N (CPS flows, 2019)")
    entry_employed: float = _rate(0.04, "N -> E, no epidemic (CPS flows, 2019)")
    entry_unemployed: float = _rate(0.02, "N -> U (CPS flows, 2019)")
    home_search: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="share of U -> E kept by unemployed agents who stay home (recalls; modelling choice)",
    )

    data: str | None = Field(
        default=None,
        description="a file in the format of labor-force-by-borough.csv (BLS LAUS) replacing the shipped one",
    )

    @field_validator("start")
    @classmethod
    def _start(cls, start: dt.date) -> dt.date:
        if start.day != 1 or not dt.date(2019, 2, 1) <= start <= dt.date(2021, 12, 1):
            raise ValueError("start must be the 1st of a month in 2019-02 .. 2021-12")
        return start


def flow_table(
    c: LaborConfig, params: Mapping[str, torch.Tensor], risk: torch.Tensor, per_100k: float
) -> torch.Tensor:
    """(1 + 2B, 3, 3) monthly transition tables (rows from E, U, N): row 0 keeps agents under 16 where they
    are; row ``1 + 2b + a`` is borough ``b`` (``risk`` (B,) its relative unemployment risk) and action
    ``a`` (work, stay home). Learnable entries come from ``params`` (tensors), the rest from ``c``."""

    def value(name: str) -> torch.Tensor:
        return parameter(c, params, name)

    risk = risk.to(torch.float32)
    home = torch.tensor([0.0, 1.0], device=risk.device)[None, :]  # (1, 2): work, stay home
    hiring = torch.exp(-per_100k / value("case_scale"))
    withdrawal = value("withdrawal") * home
    ones = torch.ones(len(risk), 2, device=risk.device)
    eu = risk[:, None] * (value("separation") + value("layoff") * home)
    en = (c.exit_employed + withdrawal) * ones
    eu = torch.minimum(eu, 1.0 - en)
    ue = value("job_finding") * hiring * (1.0 - home * (1.0 - c.home_search)) * ones
    un = (c.exit_unemployed + withdrawal) * ones
    ne = c.entry_employed * hiring * ones
    nu = c.entry_unemployed * ones
    rows = torch.stack(
        [
            torch.stack([1.0 - eu - en, eu, en], -1),
            torch.stack([ue, 1.0 - ue - un, un], -1),
            torch.stack([ne, nu, 1.0 - ne - nu], -1),
        ],
        -2,
    )  # (B, 2, 3, 3)
    keep = torch.eye(3, device=risk.device)[None]
    return torch.cat([keep, rows.reshape(-1, 3, 3)])


@dataclass(frozen=True)
class LaborWorld:
    """What a labor run needs that does not change: each agent's borough (N,) int32 (``tally``, smallest dtype: B
    for agents under 16, who are left out of the counts) and flow group (N,) int32 (0 under 16, else
    ``1 + 2 borough``: the row of one who works; stay home is the next row), whether it is of working age
    (N,) bool, each borough's relative unemployment risk (B,), the real monthly rates and the city's cases
    per month."""

    boroughs: list[str]
    borough: torch.Tensor
    tally: torch.Tensor
    group: torch.Tensor
    working_age: torch.Tensor
    member: torch.Tensor
    risk: torch.Tensor
    real: pd.DataFrame
    cases: pd.Series
    source: str  # the labor-force file read

    @property
    def nb(self) -> int:
        return len(self.boroughs)

    def rate(self, month: pd.Timestamp) -> torch.Tensor:
        """(B,) float64 real unemployment rate of each borough in ``month``, percent."""
        rows = self.real[self.real["date"] == month].set_index("borough")["unemployment_rate"]
        rows = rows.reindex(self.boroughs)
        if rows.isna().any():
            raise InputError(f"{self.source}: no unemployment_rate for {month:%Y-%m}")
        return torch.tensor(rows.to_numpy(), dtype=torch.float64)

    def cases_before(self, date: pd.Timestamp) -> float:
        """Real cases citywide in the calendar month before ``date``."""
        return float(self.cases.get((date - pd.DateOffset(months=1)).to_period("M"), 0.0))


class LaborScenario(Scenario):
    """Monthly labor-force flows (E, U, N) per borough under work / stay-home decisions (spec
    ``labor_work``)."""

    name = "labor"
    description = (
        "NYC labor market in the epidemic: monthly flows between employed, unemployed and not in the "
        "labor force under work decisions; unemployment per borough"
    )
    step_unit = "month"
    horizon = 12
    Config = LaborConfig
    learnable = ("separation", "layoff", "job_finding", "case_scale", "withdrawal")
    needs = ("borough", "age", "labor_force")
    differentiable = True
    quantities = (
        Quantity(
            "unemployment_rate",
            "percent of the labor force (E + U) unemployed at the end of the month",
            real=RATES_SOURCE,
        ),
        Quantity("employed", "agents employed at the end of the month"),
        Quantity("unemployed", "agents unemployed at the end of the month"),
        Quantity("labor_force", "agents in the labor force (employed + unemployed) at the end of the month"),
        Quantity("not_in_labor_force", "agents of 16 or more not in the labor force at the end of the month"),
        Quantity("working", "agents employed at the start of the month whose action was work"),
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
        nb = len(boroughs)
        borough = pop["borough"].to(torch.int32)
        working_age = pop["age"] >= WORKING_AGE
        source = self.config.data or str(nyc.data_dir() / "labor-force-by-borough.csv")
        lf = nyc.labor_force(Path(source))
        lf = lf.assign(borough=lf["borough"].map(nyc.BOROUGH_NAMES))
        lf = lf[lf["borough"].isin(boroughs)]
        year = lf[lf["date"].dt.year == 2019]
        mean = year.groupby("borough")["unemployment_rate"].mean().reindex(boroughs)
        weight = year.groupby("borough")["labor_force"].mean().reindex(boroughs)
        if mean.isna().any():
            raise InputError(
                f"{source}: no 2019 unemployment_rate for borough(s) {list(mean[mean.isna()].index)}"
            )
        city = float((mean * weight).sum() / weight.sum())
        cases = nyc.cases_by_day()
        return LaborWorld(
            boroughs=boroughs,
            borough=borough,
            tally=torch.where(working_age, borough, nb).to(smallest_int_dtype(0, nb)),
            group=torch.where(working_age, 1 + 2 * borough, 0).to(torch.int32),
            working_age=working_age,
            member=pop["labor_force"].bool() & working_age,
            risk=torch.tensor((mean / city).to_numpy(), dtype=torch.float32, device=device),
            real=lf,
            source=source,
            cases=cases.groupby(cases["date"].dt.to_period("M"))["cases"].sum(),
        )

    def init_state(self, world: LaborWorld, sampler: Sampler) -> dict[str, torch.Tensor]:
        """Labor-force members of 16 or more are unemployed with their borough's real rate of the month
        before the start, employed otherwise; everyone else is not in the labor force."""
        rate = world.rate(pd.Timestamp(self.config.start) - pd.DateOffset(months=1))
        device = world.borough.device
        p_unemployed = (rate / 100.0).to(torch.float32).to(device).index_select(0, world.borough)
        unemployed = sampler.uniform(STREAM_SEED) < p_unemployed
        codes = torch.where(world.member, unemployed.to(torch.uint8), N).to(torch.uint8)
        return {"status": sampler.states(codes, len(STATUSES)), "rate": rate.to(device)}

    def observe(self, world: LaborWorld, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``month`` label, real ``cases`` citywide last month, simulated ``unemployment_rate`` per borough."""
        rate = state["rate"].detach().cpu().tolist()
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
        status, action = state["status"], actions["work"]
        # 1. hiring dries up with last month's cases (the flow table reads them)
        per_100k = w.cases_before(self.date(t)) / nyc.city_population() * 1e5
        # 2. the flow table of each borough and action
        table = flow_table(c, params, w.risk, per_100k)
        home = sampler.chose(action, HOME) * w.working_age
        # 3. one month of flows; the action picks the table's row (differentiably in differentiable mode)
        if sampler.differentiable:
            # the stay-home row where home is 1, plus (home - its hard value) x the difference: zero
            # forward for a sampled action (the rows are the inference run's, bit for bit), d/dhome
            # backward; the mixture of both rows for the mean-field estimator's probabilities
            work_rows, home_rows = table.index_select(0, w.group), table.index_select(0, w.group + 1)
            hard = home.detach() > 0.5
            soft = (home - hard.to(home.dtype))[:, None, None]
            per_agent = torch.where(hard[:, None, None], home_rows, work_rows) + soft * (
                home_rows - work_rows
            )
            following, _ = sampler.markov(status, per_agent, STREAM_TRANSITION)
        else:
            following, _ = sampler.markov(status, table, STREAM_TRANSITION, w.group + home)
        # 4. the month's records (agents under 16 fall in the dropped bin B)
        counts = sampler.tally(following, len(STATUSES), w.tally, w.nb + 1)[:, : w.nb]  # (3, B)
        employed, unemployed = counts[E], counts[U]
        labor_force = employed + unemployed
        rate = 100.0 * unemployed / labor_force.clamp_min(1.0)
        at_work = sampler.member(status, E) * sampler.chose(action, WORK)
        records = {
            "unemployment_rate": rate,
            "employed": employed,
            "unemployed": unemployed,
            "labor_force": labor_force,
            "not_in_labor_force": counts[N],
            "working": sampler.count(w.borough, w.nb, at_work),
        }
        return {**state, "status": following, "rate": rate.detach().to(torch.float64)}, records

    def real_data(self, world: LaborWorld, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real monthly unemployment rate per borough (percent, BLS LAUS)."""
        real = world.real[(world.real["date"] >= first) & (world.real["date"] <= last)]
        return real_frame(
            real, quantity="unemployment_rate", value="unemployment_rate", labels=world.boroughs
        )
