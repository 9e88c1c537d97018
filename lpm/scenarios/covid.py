"""COVID-19 in New York City: a daily SEIR model whose agents decide weekly whether to isolate.

State per agent: compartment ``comp`` (0 susceptible, 1 exposed, 2 infectious, 3 recovered; uint8 codes in
inference mode, float one-hot rows in differentiable mode) and ``days`` in it (uint8, saturating at 255);
the decision ``isolation`` (actions ``isolate``, ``go out``; spec ``covid_isolation``) is the engine's.

Durations: time in E and in I are discretised gamma distributions; each day an agent leaves its
compartment with the hazard of its days-in-state. Means from the literature:

* incubation 5.2 days (Li et al., "Early transmission dynamics in Wuhan, China, of novel
  coronavirus-infected pneumonia", NEJM 2020; 95th percentile 12.5 d; gamma shape 3 approximates it);
* infectious period 7 days (CDC COVID-19 Pandemic Planning Scenarios, 2020: infectiousness from about
  2 days before to 10 days after symptom onset, most within the first week; He et al., Nat Med 2020).

Transmission: each day a susceptible agent of age band ``a`` in ZIP area ``z`` of borough ``B`` is
infected with probability ``1 - exp(-lambda)``,

    lambda = beta * (1 - e * iso) * sum_b C[a, b] * (w_zip * P_zb + w_borough * P_Bb + w_city * P_b)

where ``C`` is the (10, 10) daily contact matrix between age bands (:func:`contact_matrix`), ``P_zb`` the
isolation-weighted infectious fraction of band ``b`` in the agent's ZIP area (``P_Bb`` borough,
``P_b`` city), ``w`` the shares of contacts made at each level, ``e`` the isolation effectiveness and
``iso`` whether the agent isolates; an isolating infectious agent counts ``1 - e`` towards ``P``. All
O(N): one ``bincount`` of infectious agents per (ZIP × band × isolation) cell, a (Z × 10) table of
forces, and one gather per agent. Reported cases are the detected fraction of new infections (the
expected value, which keeps the series differentiable).

A day, in the order :meth:`CovidScenario.step` reads: (1) who is where: agents by compartment × cell ×
isolating; (2) the force of infection per cell; (3) leaving a compartment: infection for S, the end of the
duration for E and I; (4) reporting; (5) the next state and the day's records.

Seeding: infectious agents per borough = the borough's real cases reported in the first 7 days /
detected fraction (× agents / city population): cases are reported about a week after infection
(incubation plus testing delay), so the week after the start shows who is infected at the start;
exposed = infectious × incubation / infectious period. The 14 days of real cases before the start fill
the context's case history.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.policy import age_of, sigmoid
from lpm.population import Population
from lpm.sampling import Sampler
from lpm.scenarios.base import Decision, Plot, Quantity, Scenario, ScenarioConfig, real_frame

__all__ = ["CovidConfig", "CovidScenario", "contact_matrix", "isolation_rule"]

FIRST_CASE = pd.Timestamp("2020-02-29")  # the city's first reported case
S, E, I, R = 0, 1, 2, 3  # noqa: E741 (compartment codes)
COMPARTMENTS = 4
MAX_DAYS = 256
ISOLATE = 0  # action index of the isolation decision
STREAM_TRANSITION, STREAM_SEED, STREAM_SEED_DAYS = 16, 17, 18
CASES_SOURCE = "NYC DOHMH cases-by-day.csv, confirmed + probable, scaled to the population"

#: Mean daily contacts by age of participant, POLYMOD (Mossong et al., PLoS Med 2008, table 1, all
#: countries), averaged onto the health department's 10 age bands.
POLYMOD_CONTACTS = (10.21, 16.0, 17.9, 15.0, 13.9, 14.1, 13.5, 11.3, 8.5, 6.9)
BAND_MIDPOINTS = (2.0, 8.5, 15.0, 21.0, 29.5, 39.5, 49.5, 59.5, 69.5, 82.0)


def contact_matrix(shares: torch.Tensor) -> torch.Tensor:
    """(10, 10) mean daily contacts ``C[a, b]`` of a person of band ``a`` with people of band ``b``.

    An approximation of POLYMOD, not its fitted matrix: row totals are POLYMOD's mean contacts per age
    (:data:`POLYMOD_CONTACTS`); a row is spread over bands in proportion to the bands' population
    ``shares`` times a kernel of the age gap: assortative (``exp(-gap / 8)``), a generation apart
    (``0.25 exp(-(gap - 30)^2 / 72)``, parents and children) and a flat background (0.1).
    """
    mid = torch.tensor(BAND_MIDPOINTS, dtype=torch.float64)
    gap = (mid[:, None] - mid[None, :]).abs()
    kernel = torch.exp(-gap / 8.0) + 0.25 * torch.exp(-((gap - 30.0) ** 2) / 72.0) + 0.1
    weight = kernel * shares.to(torch.float64)[None, :]
    total = torch.tensor(POLYMOD_CONTACTS, dtype=torch.float64)
    return (total[:, None] * weight / weight.sum(dim=1, keepdim=True)).to(torch.float32)


def gamma_hazard(mean: float, shape: float, days: int = MAX_DAYS) -> torch.Tensor:
    """(days,) daily probability of leaving a state after ``d`` completed days in it, for a gamma
    distributed duration (mean days, shape); the last entry is 1."""
    d = torch.arange(days + 1, dtype=torch.float64)
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), d * shape / mean)
    survive = 1.0 - cdf[:-1]
    h = torch.where(
        survive > 1e-12, (cdf[1:] - cdf[:-1]) / survive.clamp_min(1e-300), torch.ones_like(survive)
    )
    h[-1] = 1.0
    return h.clamp(0.0, 1.0).to(torch.float32)


def isolation_rule(rows: pd.DataFrame, ctx: pd.DataFrame) -> np.ndarray:
    """P(isolate): rises with weekly cases per 100,000 (log scale), with a rising trend and with age.

    rows: K archetype attributes; ctx: K resolved contexts (``cases`` per week citywide,
    ``cases_change`` percent). Returns (K,) probabilities. About 8 % at no cases, 50 % for a 40-year-old
    at 200 weekly cases per 100,000, higher for older residents.
    """
    per_100k = ctx["cases"].astype(float).to_numpy() / nyc.city_population() * 1e5
    change = ctx["cases_change"].astype(float).to_numpy() if "cases_change" in ctx else np.zeros(len(ctx))
    x = -2.4 + 0.85 * np.log1p(per_100k) + 0.004 * np.clip(change, -100, 200) + 0.03 * (age_of(rows) - 40)
    return sigmoid(x)


class CovidConfig(ScenarioConfig):
    """Configuration of the COVID scenario; one line each, with units. Unknown keys are rejected."""

    start: dt.date = Field(
        default=dt.date(2020, 3, 16), description="first simulated day (2020-03-01 .. 2021-12-31)"
    )
    beta: float = Field(
        default=0.045, gt=0, le=1, description="infection probability per contact with an infectious person"
    )
    detected: float = Field(
        default=0.1, gt=0, le=1, description="fraction of new infections reported as cases"
    )
    isolation_effect: float = Field(
        default=0.7, ge=0, le=1, description="fraction of contacts an isolating agent cuts"
    )
    incubation_days: float = Field(
        default=5.2, gt=0, le=30, description="mean days exposed before infectious (Li 2020)"
    )
    incubation_shape: float = Field(
        default=3.0, gt=0, le=100, description="gamma shape of the incubation period"
    )
    infectious_days: float = Field(
        default=7.0, gt=0, le=30, description="mean days infectious (CDC planning scenarios)"
    )
    infectious_shape: float = Field(
        default=4.0, gt=0, le=100, description="gamma shape of the infectious period"
    )
    share_zip: float = Field(
        default=0.5, ge=0, le=1, description="share of contacts within the agent's ZIP area"
    )
    share_borough: float = Field(
        default=0.3, ge=0, le=1, description="share of contacts within the borough; rest citywide"
    )

    @field_validator("start")
    @classmethod
    def _start(cls, start: dt.date) -> dt.date:
        if not dt.date(2020, 3, 1) <= start <= dt.date(2021, 12, 31):
            raise ValueError("start must lie in 2020-03-01 .. 2021-12-31 (the case data)")
        return start

    @model_validator(mode="after")
    def _shares(self) -> CovidConfig:
        if self.share_zip + self.share_borough > 1:
            raise ValueError(
                f"share_zip + share_borough must be <= 1, got {self.share_zip} + {self.share_borough}"
            )
        return self


@dataclass(frozen=True)
class CovidWorld:
    """What a COVID run needs that does not change (owned by the simulation).

    cell: (N,) int32 (ZIP area, age band) cell of each agent; borough: (N,) int32. zip_borough: (Z,) borough
    of each ZIP area; borough_of_cell: (C,). inv_zip (Z, bands), inv_borough (B, bands), inv_city (bands,):
    1 / residents of each band at each level. contacts_t: (b, a) contact matrix, transposed.
    contact_kept: (2,) share of contacts kept going out / isolating. hazard: (4 * 256,) daily probability of
    leaving compartment c after d days, at ``c * 256 + d``. residents: (B,). scale: agents / city residents.
    """

    n: int
    boroughs: list[str]
    nb: int
    nz: int
    nc: int
    scale: float
    cell: torch.Tensor
    borough: torch.Tensor
    zip_borough: torch.Tensor
    borough_of_cell: torch.Tensor
    inv_zip: torch.Tensor
    inv_borough: torch.Tensor
    inv_city: torch.Tensor
    contacts_t: torch.Tensor
    contact_kept: torch.Tensor
    hazard: torch.Tensor
    residents: torch.Tensor

    def by_borough(self, per_cell: torch.Tensor) -> torch.Tensor:
        """(B,) sums of a (C,) per-cell vector over each borough's cells."""
        return torch.zeros(self.nb, device=per_cell.device, dtype=per_cell.dtype).index_add(
            0, self.borough_of_cell, per_cell
        )


class CovidScenario(Scenario):
    """Daily SEIR epidemic in NYC with weekly isolation decisions (spec ``covid_isolation``)."""

    name = "covid"
    description = (
        "COVID-19 in New York City: daily SEIR with ZIP/borough/city mixing, weekly isolation decisions"
    )
    step_unit = "day"
    horizon = 56
    Config = CovidConfig
    learnable = ("beta",)
    needs = ("borough", "zip", "age_group")
    quantities = (
        Quantity("infections", "new infections per day", total=True),
        Quantity(
            "reported_cases",
            "new reported cases per day (detected × infections)",
            total=True,
            real=CASES_SOURCE,
        ),
        Quantity("susceptible", "susceptible agents at the start of the day"),
        Quantity("exposed", "exposed (infected, not yet infectious) agents at the start of the day"),
        Quantity("infectious", "infectious agents at the start of the day"),
        Quantity("recovered", "recovered agents at the start of the day"),
        Quantity("isolating", "agents whose current action is isolate"),
    )
    decisions = (
        Decision(
            "isolation",
            spec="covid_isolation",
            actions=("isolate", "go out"),
            heuristic={"isolate": isolation_rule},
            plot="isolate",
        ),
    )
    plots = (
        Plot(
            "cases.png",
            "reported_cases",
            "reported cases per day",
            also=("infections",),
            title="simulated against real reported cases (real scaled to the population)",
        ),
    )

    config: CovidConfig

    # -- one run ------------------------------------------------------------------------------------
    def setup(self, pop: Population, device: torch.device) -> CovidWorld:
        c = self.config
        n = len(pop)
        boroughs = pop.labels("borough")
        nb, nz = len(boroughs), len(pop.labels("zip"))
        bands = len(pop.labels("age_group"))
        if bands != len(POLYMOD_CONTACTS):
            raise InputError(f"the covid scenario needs the 10 NYC age bands; the population has {bands}")
        zip_, band = pop["zip"].to(torch.int32), pop["age_group"].to(torch.int32)
        borough = pop["borough"].to(torch.int32)
        cell = zip_ * bands + band
        n_cell = torch.bincount(cell, minlength=nz * bands).to(torch.float32)
        # each ZIP area's borough, read off its agents (ZIPs without agents: borough 0, no weight)
        zb = torch.bincount(zip_ * nb + borough, minlength=nz * nb).view(nz, nb)
        zip_borough = zb.argmax(dim=1)
        n_zb = n_cell.view(nz, bands)
        n_bb = torch.zeros(nb, bands, device=device).index_add_(0, zip_borough, n_zb)
        n_b = n_zb.sum(0)
        hazard = torch.zeros(COMPARTMENTS, MAX_DAYS)
        hazard[E] = gamma_hazard(c.incubation_days, c.incubation_shape)
        hazard[I] = gamma_hazard(c.infectious_days, c.infectious_shape)
        return CovidWorld(
            n=n,
            boroughs=boroughs,
            nb=nb,
            nz=nz,
            nc=nz * bands,
            scale=float(pop.meta.get("scale", n / nyc.city_population())),
            cell=cell,
            borough=borough,
            zip_borough=zip_borough,
            borough_of_cell=zip_borough.repeat_interleave(bands),
            inv_zip=1.0 / n_zb.clamp_min(1.0),
            inv_borough=1.0 / n_bb.clamp_min(1.0),
            inv_city=1.0 / n_b.clamp_min(1.0),
            contacts_t=contact_matrix((n_b / n_b.sum()).cpu()).to(device).T.contiguous(),
            contact_kept=torch.tensor([1.0, 1.0 - c.isolation_effect], device=device),
            hazard=hazard.reshape(-1).to(device),
            residents=torch.bincount(borough, minlength=nb).to(torch.float32),
        )

    def force(self, w: CovidWorld, infectious: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """(C,) daily force of infection on a non-isolating susceptible of each (ZIP, band) cell, from the
        (C,) isolation-weighted count of infectious agents per cell."""
        c = self.config
        i_zb = infectious.view(w.nz, -1)
        i_bb = torch.zeros(w.nb, i_zb.shape[1], device=i_zb.device, dtype=i_zb.dtype).index_add(
            0, w.zip_borough, i_zb
        )
        share_city = 1.0 - c.share_zip - c.share_borough
        prevalence = (
            c.share_zip * i_zb * w.inv_zip
            + c.share_borough * (i_bb * w.inv_borough)[w.zip_borough]
            + share_city * (i_zb.sum(0) * w.inv_city)
        )  # (Z, b)
        return (beta * (prevalence.unsqueeze(2) * w.contacts_t).sum(1)).reshape(-1)  # (Z, a)

    def init_state(self, world: CovidWorld, sampler: Sampler) -> dict[str, torch.Tensor]:
        """Seeding: infectious agents per borough = real cases of the 7 days from the start / detected
        fraction (on the population's scale); exposed = infectious × incubation / infectious period; days
        already spent uniform in the mean duration. ``recent``: the 14 days of real cases before the start."""
        c, w = self.config, world
        start = pd.Timestamp(c.start)
        cases = _real_cases()
        before = cases[(cases["date"] >= start - pd.Timedelta(days=14)) & (cases["date"] < start)]
        ahead = cases[(cases["date"] >= start) & (cases["date"] < start + pd.Timedelta(days=7))]
        week = ahead.groupby("borough")["cases"].sum().reindex(w.boroughs).fillna(0.0).to_numpy()
        device = w.cell.device
        infectious = torch.tensor(week / c.detected * w.scale, dtype=torch.float32, device=device)
        exposed = infectious * (c.incubation_days / c.infectious_days)
        residents = w.residents.clamp_min(1.0)
        p_i, p_ie = infectious / residents, (infectious + exposed) / residents  # (B,)
        u = sampler.uniform(STREAM_SEED)
        b = w.borough
        comp = torch.where(u < p_i.index_select(0, b), I, torch.where(u < p_ie.index_select(0, b), E, S))
        comp = comp.to(torch.uint8)
        mean = torch.tensor([0.0, c.incubation_days, c.infectious_days, 0.0], device=device)
        days = (sampler.uniform(STREAM_SEED_DAYS) * mean.index_select(0, comp.long())).to(torch.uint8)
        daily = (
            before.groupby("date")["cases"]
            .sum()
            .reindex(pd.date_range(start - pd.Timedelta(days=14), periods=14))
        )
        recent = torch.tensor(daily.fillna(0.0).to_numpy() * w.scale, dtype=torch.float64, device=device)
        return {"comp": sampler.states(comp, COMPARTMENTS), "days": days, "recent": recent}

    def observe(self, world: CovidWorld, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``week`` since 2020-02-29, ``cases`` citywide in the simulated past 7 days (on the city's scale),
        ``cases_change`` percent versus the 7 days before."""
        recent = state["recent"].detach().cpu().double()
        last, prev = float(recent[7:].sum()) / world.scale, float(recent[:7].sum()) / world.scale
        change = 100.0 * (last - prev) / prev if prev > 0 else 0.0
        return {"week": (self.date(t) - FIRST_CASE).days // 7, "cases": last, "cases_change": change}

    def step(
        self,
        world: CovidWorld,
        state: Mapping[str, torch.Tensor],
        actions: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        t: int,
        sampler: Sampler,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c, w = self.config, world
        comp, days = state["comp"], state["days"]
        isolating = sampler.chose(actions["isolation"], ISOLATE)
        # 1. who is where: agents by compartment × (ZIP, age band) cell × isolating, at the start of the day
        occupancy = sampler.tally(comp, COMPARTMENTS, w.cell, w.nc, flag=isolating)  # (4, C, 2)
        # 2. force of infection on a susceptible of each cell, going out (column 0) or isolating (column 1)
        infectious = occupancy[I, :, 0] + (1.0 - c.isolation_effect) * occupancy[I, :, 1]  # (C,)
        lam = self.force(w, infectious, params["beta"])
        p_infect = -torch.expm1(-lam[:, None] * w.contact_kept)  # (C, 2)
        # 3. leave the compartment: S by infection, E and I when their gamma-distributed duration ends
        susceptible = sampler.member(comp, S)
        code = sampler.codes(comp).to(torch.int32)
        p_end = w.hazard.index_select(0, code.mul_(MAX_DAYS).add_(days))
        p_leave = torch.where(sampler.hard(susceptible), sampler.pick(p_infect, w.cell, isolating), p_end)
        leave = sampler.bernoulli(p_leave, STREAM_TRANSITION)
        # 4. reporting: a detected fraction of the day's new infections (the expected value)
        infections = w.by_borough(sampler.count(w.cell, w.nc, susceptible * leave))  # (B,)
        reported = c.detected * infections
        # 5. the next state and the day's records
        left = sampler.hard(leave)
        following = {
            "comp": sampler.advance(comp, COMPARTMENTS, leave),
            "days": torch.where(left, 0, days + (days < MAX_DAYS - 1)).to(torch.uint8),
            "recent": torch.cat([state["recent"][1:], reported.detach().sum().to(torch.float64)[None]]),
        }
        counts = torch.zeros(
            w.nb, COMPARTMENTS + 1, device=occupancy.device, dtype=occupancy.dtype
        ).index_add(
            0, w.borough_of_cell, torch.cat([occupancy.sum(2).T, occupancy[:, :, 1].sum(0)[:, None]], dim=1)
        )  # (B, 4 compartments + isolating)
        records = {
            "infections": infections,
            "reported_cases": reported,
            "susceptible": counts[:, S],
            "exposed": counts[:, E],
            "infectious": counts[:, I],
            "recovered": counts[:, R],
            "isolating": counts[:, COMPARTMENTS],
        }
        return following, records

    # -- real data -----------------------------------------------------------------------------------
    def real_data(self, world: CovidWorld, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real daily reported cases per borough (confirmed + probable), × agents / city population."""
        cases = _real_cases()
        cases = cases[(cases["date"] >= first) & (cases["date"] <= last)]
        return real_frame(
            cases, quantity="reported_cases", value="cases", labels=world.boroughs, scale=world.scale
        )


def _real_cases() -> pd.DataFrame:
    frame = nyc.cases_by_day().copy()
    frame["borough"] = frame["borough"].map(nyc.BOROUGH_NAMES)
    return frame


def weekly(series: torch.Tensor, days: int = 7) -> torch.Tensor:
    """Sum a (T, ...) daily series over consecutive weeks: (T // days, ...); a trailing part week is dropped."""
    t = series.shape[0] // days * days
    return series[:t].reshape(t // days, days, *series.shape[1:]).sum(1)


def weekly_mse(
    result_series: torch.Tensor, real: pd.DataFrame, boroughs: list[str], first: pd.Timestamp
) -> torch.Tensor:
    """Mean squared error of simulated vs real weekly reported cases per borough (a calibration loss).

    result_series: (T, B) simulated daily reported cases; real: :meth:`CovidScenario.real_data` frame.
    """
    t = result_series.shape[0]
    wide = real.pivot_table(index="date", columns="borough", values="value", observed=False).reindex(
        columns=boroughs
    )
    wide = wide.reindex(pd.date_range(first, periods=t)).fillna(0.0)
    target = torch.tensor(wide.to_numpy(), dtype=result_series.dtype, device=result_series.device)
    return torch.mean((weekly(result_series) - weekly(target)) ** 2)
