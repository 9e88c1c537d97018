"""COVID-19 in New York City: a daily SEIR model whose agents decide weekly whether to isolate.

State per agent: compartment ``comp`` (uint8: 0 susceptible, 1 exposed, 2 infectious, 3 recovered) and
``days`` in it (uint8, saturating at 255); ``action`` (the engine's: 0 isolate, 1 go out).

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

Seeding: infectious agents per borough = the borough's real cases reported in the first 7 days /
detected fraction (× agents / city population): cases are reported about a week after infection
(incubation plus testing delay), so the week after the start shows who is infected at the start;
exposed = infectious × incubation / infectious period. The 14 days of real cases before the start fill
the context's case history.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.population import Population
from lpm.sampling import bernoulli_st
from lpm.scenarios import Draw, Scenario, parse_params

__all__ = ["CovidParams", "CovidScenario", "contact_matrix"]

FIRST_CASE = pd.Timestamp("2020-02-29")  # the city's first reported case
S, E, I, R = 0, 1, 2, 3  # noqa: E741 (compartment codes)
MAX_DAYS = 256
STREAM_TRANSITION, STREAM_SEED, STREAM_SEED_DAYS = 16, 17, 18

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


class CovidParams(BaseModel):
    """Parameters of the COVID scenario; one line each, with units. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
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

    @model_validator(mode="after")
    def _check(self) -> CovidParams:
        if self.share_zip + self.share_borough > 1:
            raise ValueError(
                f"share_zip + share_borough must be <= 1, got {self.share_zip} + {self.share_borough}"
            )
        if not dt.date(2020, 3, 1) <= self.start <= dt.date(2021, 12, 31):
            raise ValueError(f"start must lie in 2020-03-01 .. 2021-12-31 (the case data), got {self.start}")
        return self


class CovidScenario(Scenario):
    """Daily SEIR epidemic in NYC with weekly isolation decisions (spec ``covid_isolation``).

    Recorded per borough each day: ``infections`` (new), ``reported_cases`` (detected × infections),
    ``susceptible``, ``exposed``, ``infectious``, ``recovered`` (at the start of the day) and
    ``isolating`` (agents whose current action is isolate).
    """

    name: ClassVar[str] = "covid"
    spec_name: ClassVar[str] = "covid_isolation"
    step_unit: ClassVar[str] = "day"
    actions: ClassVar[tuple[str, ...]] = ("isolate", "go out")
    needs: ClassVar[tuple[str, ...]] = ("borough", "zip", "age_group")
    quantities: ClassVar[tuple[str, ...]] = (
        "infections",
        "reported_cases",
        "susceptible",
        "exposed",
        "infectious",
        "recovered",
        "isolating",
    )

    def __init__(self, params: Mapping[str, Any] | CovidParams | None = None):
        self.params: CovidParams = parse_params(CovidParams, params, "covid scenario")

    def config(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def date(self, t: int) -> pd.Timestamp:
        return pd.Timestamp(self.params.start) + pd.Timedelta(days=t)

    def parameters(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"beta": torch.tensor(self.params.beta, dtype=torch.float32, device=device)}

    # -- precomputation -----------------------------------------------------------------------------
    def setup(self, pop: Population, *, device: torch.device, differentiable: bool) -> None:
        p = self.params
        self.device, self.differentiable, self.n = device, differentiable, len(pop)
        self.boroughs = pop.labels("borough")
        self.nb, self.nz = len(self.boroughs), len(pop.labels("zip"))
        bands = len(pop.labels("age_group"))
        if bands != len(POLYMOD_CONTACTS):
            raise InputError(f"the covid scenario needs the 10 NYC age bands; the population has {bands}")
        self.nc = self.nz * bands  # cells: ZIP area × age band
        self.scale = float(pop.meta.get("scale", self.n / nyc.city_population()))
        zip_, band, borough = pop["zip"].to(torch.int32), pop["age_group"].to(torch.int32), pop["borough"]
        cell = zip_ * bands + band
        self.cell = cell  # (N,) int32
        self.cell2 = cell * 2  # (N,) int32: index of (cell, isolating)
        self.borough = borough.to(torch.int32)
        n_cell = torch.bincount(cell, minlength=self.nc).to(torch.float32)
        # each ZIP area's borough, read off its agents (ZIPs without agents: borough 0, no weight)
        zb = torch.bincount(zip_ * self.nb + self.borough, minlength=self.nz * self.nb).view(self.nz, self.nb)
        self.zip_borough = zb.argmax(dim=1)  # (Z,) int64
        n_zb = n_cell.view(self.nz, bands)
        n_bb = torch.zeros(self.nb, bands, device=device).index_add_(0, self.zip_borough, n_zb)
        n_b = n_zb.sum(0)
        self.inv_zip = 1.0 / n_zb.clamp_min(1.0)
        self.inv_borough = 1.0 / n_bb.clamp_min(1.0)
        self.inv_city = 1.0 / n_b.clamp_min(1.0)
        self.contacts_t = contact_matrix((n_b / n_b.sum()).cpu()).to(device).T.contiguous()  # (b, a)
        hazard = torch.zeros(4, MAX_DAYS)
        hazard[E] = gamma_hazard(p.incubation_days, p.incubation_shape)
        hazard[I] = gamma_hazard(p.infectious_days, p.infectious_shape)
        self.hazard = hazard.reshape(-1).to(device)  # (4 * 256,) by comp * 256 + days
        self.residents = torch.bincount(self.borough, minlength=self.nb).to(torch.float32)
        self.borough_of_cell = self.zip_borough.repeat_interleave(bands)  # (C,)
        if not differentiable:  # work buffers, reused every step
            self._idx = torch.empty(self.n, dtype=torch.int32, device=device)
            self._tmp = torch.empty(self.n, dtype=torch.int32, device=device)
            self._p = torch.empty(self.n, dtype=torch.float32, device=device)
            self._q = torch.empty(self.n, dtype=torch.float32, device=device)
            self._leave = torch.empty(self.n, dtype=torch.bool, device=device)
            self._is_s = torch.empty(self.n, dtype=torch.bool, device=device)
            self._nc_scalar = torch.tensor(self.nc, dtype=torch.int32, device=device)
            self._ones = torch.ones(self.n, dtype=torch.float32, device=device)  # counts by index_add_

    def force(self, infectious: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """(C,) daily force of infection on a non-isolating susceptible of each (ZIP, band) cell, from the
        (C,) isolation-weighted count of infectious agents per cell."""
        p = self.params
        i_zb = infectious.view(self.nz, -1)
        i_bb = torch.zeros(self.nb, i_zb.shape[1], device=i_zb.device, dtype=i_zb.dtype).index_add(
            0, self.zip_borough, i_zb
        )
        share_city = 1.0 - p.share_zip - p.share_borough
        prevalence = (
            p.share_zip * i_zb * self.inv_zip
            + p.share_borough * (i_bb * self.inv_borough)[self.zip_borough]
            + share_city * (i_zb.sum(0) * self.inv_city)
        )  # (Z, b)
        return (beta * (prevalence.unsqueeze(2) * self.contacts_t).sum(1)).reshape(-1)  # (Z, a)

    # -- state ---------------------------------------------------------------------------------------
    def _real_cases(self) -> pd.DataFrame:
        frame = nyc.cases_by_day().copy()
        frame["borough"] = frame["borough"].map(nyc.BOROUGH_NAMES)
        return frame

    def init_state(self, seed: int, uniforms: Any) -> dict[str, torch.Tensor]:
        p = self.params
        start = pd.Timestamp(p.start)
        cases = self._real_cases()
        before = cases[(cases["date"] >= start - pd.Timedelta(days=14)) & (cases["date"] < start)]
        ahead = cases[(cases["date"] >= start) & (cases["date"] < start + pd.Timedelta(days=7))]
        week = ahead.groupby("borough")["cases"].sum()
        week = week.reindex(self.boroughs).fillna(0.0).to_numpy()
        infectious = torch.tensor(week / p.detected * self.scale, dtype=torch.float32, device=self.device)
        exposed = infectious * (p.incubation_days / p.infectious_days)
        residents = self.residents.clamp_min(1.0)
        p_i, p_ie = infectious / residents, (infectious + exposed) / residents  # (B,)
        u = uniforms.draw(seed, 0, STREAM_SEED)
        b = self.borough
        comp = torch.where(u < p_i.index_select(0, b), I, torch.where(u < p_ie.index_select(0, b), E, S))
        comp = comp.to(torch.uint8)
        d = uniforms.draw(seed, 0, STREAM_SEED_DAYS)
        mean = torch.tensor([0.0, p.incubation_days, p.infectious_days, 0.0], device=self.device)
        days = (d * mean.index_select(0, comp.long())).to(torch.uint8)
        daily = (
            before.groupby("date")["cases"]
            .sum()
            .reindex(pd.date_range(start - pd.Timedelta(days=14), periods=14))
        )
        recent = torch.tensor(
            daily.fillna(0.0).to_numpy() * self.scale, dtype=torch.float64, device=self.device
        )
        state = {"days": days, "recent": recent, "isolating": torch.zeros(self.nb, device=self.device)}
        if self.differentiable:
            state["x"] = torch.nn.functional.one_hot(comp.long(), 4).to(torch.float32)
        else:
            state["comp"] = comp
        return state

    def observe(self, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``week`` since 2020-02-29, ``cases`` citywide in the simulated past 7 days (scaled to the city),
        ``cases_change`` percent versus the 7 days before."""
        recent = state["recent"].detach().cpu().double()
        last, prev = float(recent[7:].sum()) / self.scale, float(recent[:7].sum()) / self.scale
        change = 100.0 * (last - prev) / prev if prev > 0 else 0.0
        return {"week": (self.date(t) - FIRST_CASE).days // 7, "cases": last, "cases_change": change}

    # -- one day ---------------------------------------------------------------------------------------
    def transition(
        self, state: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], t: int, draw: Draw
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.differentiable:
            return self._soft_transition(state, params, t, draw)
        p, nc = self.params, self.nc
        comp, days, action = state["comp"], state["days"], state["action"]
        idx, tmp, prob, q, leave, is_s = self._idx, self._tmp, self._p, self._q, self._leave, self._is_s
        # (cell, isolating) of every agent, and counts per (cell, isolating, compartment) at the start
        torch.eq(action, 0, out=leave)  # isolating (reusing the bool buffer)
        torch.add(self.cell2, leave, out=idx)
        tmp.copy_(comp).mul_(2 * nc).add_(idx)
        counts = torch.zeros(8 * nc, device=self.device).index_add_(0, tmp, self._ones).view(4, nc, 2)
        weighted = counts[I, :, 0] + (1.0 - p.isolation_effect) * counts[I, :, 1]
        lam = self.force(weighted, params["beta"])
        p_inf = -torch.expm1(
            -lam[:, None] * torch.tensor([1.0, 1.0 - p.isolation_effect], device=self.device)
        )
        # leave the compartment: infection for S (by cell), the duration hazard for E and I
        torch.index_select(p_inf.reshape(-1), 0, idx, out=prob)
        tmp.copy_(comp).mul_(MAX_DAYS).add_(days)
        torch.index_select(self.hazard, 0, tmp, out=q)
        torch.eq(comp, S, out=is_s)
        torch.where(is_s, prob, q, out=prob)
        u = draw(STREAM_TRANSITION)
        torch.lt(u, prob, out=leave)
        comp = comp + leave  # S -> E -> I -> R; a fresh tensor, so earlier states stay intact
        days = days + torch.lt(days, MAX_DAYS - 1, out=is_s)
        days.masked_fill_(leave, 0)
        torch.eq(comp, E, out=is_s).logical_and_(leave)  # new infections: entered E today
        torch.where(is_s, self.cell, self._nc_scalar, out=tmp)
        new = torch.zeros(nc + 1, device=self.device).index_add_(0, tmp, self._ones)[:nc]
        # record (B, Q)
        by_borough = torch.zeros(self.nb, 4 + 1 + 1, device=self.device)
        by_borough.index_add_(
            0,
            self.borough_of_cell,
            torch.cat([counts.sum(2).T, counts[:, :, 1].sum(0, keepdim=True).T, new[:, None]], 1),
        )
        infections = by_borough[:, 5]
        record = torch.stack(
            [infections, p.detected * infections, *by_borough[:, :4].T, by_borough[:, 4]], dim=1
        )
        recent = torch.cat([state["recent"][1:], (p.detected * infections.sum()).to(torch.float64)[None]])
        return {**state, "comp": comp, "days": days, "recent": recent}, record

    def _soft_transition(
        self, state: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], t: int, draw: Draw
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The same day with float one-hot compartments ``x`` (N, 4): straight-through infection draws,
        so the recorded series are differentiable w.r.t. beta and the decision offsets."""
        p, nc = self.params, self.nc
        x, days, action = state["x"], state["days"], state["action"]
        iso = action[:, 0]
        keep = 1.0 - p.isolation_effect * iso  # (N,) contact factor
        cell = self.cell.long()
        weighted = torch.zeros(nc, device=self.device).index_add(0, cell, x[:, I] * keep)
        lam = self.force(weighted, params["beta"])
        p_inf = -torch.expm1(-lam[cell] * keep)
        comp = x.detach().argmax(dim=1)
        q = self.hazard[comp * MAX_DAYS + days.long()]
        u = draw(STREAM_TRANSITION)
        infect = x[:, S] * bernoulli_st(p_inf, u)
        hard = (u < q).to(x.dtype)
        progress, recover = x[:, E] * hard, x[:, I] * hard
        step = torch.stack([-infect, infect - progress, progress - recover, recover], dim=1)
        x_new = x + step
        left = (comp == S) & (u < p_inf.detach()) | (comp != S) & (u < q)
        days = torch.where(left, 0, days + (days < MAX_DAYS - 1)).to(torch.uint8)
        bor = self.borough.long()
        per_b = torch.zeros(self.nb, 6, device=self.device).index_add(
            0, bor, torch.cat([x, iso[:, None], infect[:, None]], dim=1)
        )
        infections = per_b[:, 5]
        record = torch.stack([infections, p.detected * infections, *per_b[:, :4].T, per_b[:, 4]], dim=1)
        recent = torch.cat(
            [state["recent"][1:], (p.detected * infections.detach().sum()).to(torch.float64)[None]]
        )
        return {**state, "x": x_new, "days": days, "recent": recent}, record

    # -- real data -----------------------------------------------------------------------------------
    def real_data(self, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real daily reported cases per borough (confirmed + probable), × agents / city population."""
        cases = self._real_cases()
        cases = cases[(cases["date"] >= first) & (cases["date"] <= last)]
        out = pd.DataFrame(
            {
                "date": cases["date"].to_numpy(),
                "borough": pd.Categorical(cases["borough"], categories=self.boroughs),
                "quantity": "reported_cases",
                "value": cases["cases"].to_numpy(dtype=np.float64) * self.scale,
            }
        )
        return out.sort_values(["date", "borough"]).reset_index(drop=True)


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
