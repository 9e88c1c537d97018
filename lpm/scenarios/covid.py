"""COVID-19 in New York City: a daily stochastic model with household, school, work and community contacts,
whose agents decide weekly whether to isolate.

**Natural history** (each agent walks one chain of stages, one step a day; sources in brackets):

    S → E1 → E2 → P1 → P2 → I1 → I2 → R

* E (latent, not infectious): mean ``latent_days`` = 2.9 — the incubation period, 5.2 days [Li et al., NEJM
  2020], less the pre-symptomatic infectious period, 2.3 days [He et al., Nat Med 2020: infectiousness
  starts 2.3 days before symptom onset].
* P (pre-symptomatic, infectious): mean ``presymptomatic_days`` = 2.3 [He et al. 2020].
* I (infectious after symptom onset): mean ``symptomatic_days`` = 3.5 [Cheng et al., JAMA Intern Med 2020:
  no secondary case among contacts first exposed more than 5 days after onset; He et al.: 44 % of
  transmission before onset, here 2.3 / (2.3 + 3.5) = 40 %].
* Each stage of two is left with the daily hazard ``2 / mean`` (an Erlang-2 duration in days), so the
  generation interval comes out near 5.5 days [Ganyani et al., Eurosurveillance 2020: 5.2; Ferretti et
  al., Science 2020: 5.0].
* A share ``asymptomatic`` = 0.31 of infections never shows symptoms [Buitrago-Garcia et al., PLoS Med 2020:
  31 %, 95 % CI 26–37 %]; they are infectious in P and I with relative infectiousness ``asymptomatic_rel``
  = 0.35 [same review: secondary attack rate ratio 0.35] and are never reported. Whether an agent would be
  asymptomatic is drawn once per run.

**Transmission.** Each day a susceptible agent ``j`` is infected with probability ``1 - exp(-lambda_j)``,

    lambda_j = beta m_b(j) [ w_h (1 - q iso_j) sum_{i in household(j), i != j} x_i (1 - q iso_i)
                      + w_s L_s(t) (1 - e iso_j) sum_{i in class(j), i != j} x_i (1 - e iso_i)
                      + w_w L_w(t) (1 - e iso_j) sum_{i in workplace(j), i != j} x_i (1 - e iso_i)
                      + w_c L_c(t) (1 - e iso_j) sum_b C[a_j, b] * prevalence_b(zip, borough, city) ]

``m_b(j)`` is a learnable multiplier of transmission to the residents of ``j``'s borough
(``beta_bronx`` … ``beta_staten_island``, 1 by default: what households, schools, workplaces and the
shared community mixing do not explain, such as crowding or essential work, is left to calibration);
from ``late_from`` (2020-03-16, schools closed) on it is multiplied by ``beta_<borough>_late`` (1 by
default), since the boroughs did not change their contacts alike once the city began to distance.
``x_i`` is agent ``i``'s infectiousness (1 in P and I, ``asymptomatic_rel`` if asymptomatic, 0
otherwise), ``iso`` whether the agent isolates (the decision), ``e`` = ``isolation_effect`` the share of
school, work and community contacts an isolating agent cuts, ``q`` = ``household_isolation`` the share of
household contacts it cuts. ``beta`` = 0.048 infects a single housemate with probability 0.24 over an
infectious period (34 % of housemates in households of four, later generations included); Madewell et al.,
JAMA Netw Open 2020, pool household secondary attack rates at 16.6 % (95 % CI 14.0–19.3 %; 37.8 % between
spouses): on the high side, a modelling choice for calibration to revisit. Per-contact weights
``w_h = 1``, ``w_s = w_w = 0.2``, ``w_c = 0.1`` are
Covasim's default relative layer transmissibilities (household 3.0, school and work 0.6, community 0.3;
Kerr et al., PLoS Comput Biol 2021). ``C`` is the (10, 10) daily contact matrix between age bands
(:func:`contact_matrix`, reciprocal), ``prevalence_b`` mixes ZIP area, borough and city with shares
``share_zip``, ``share_borough`` and the rest. ``L(t)``: the level of each layer from the dated
:data:`INTERVENTIONS` (schools closed 2020-03-16, New York State on PAUSE 2020-03-22, reopening from
2020-06-08, schools partly reopened 2020-09-21); the levels under PAUSE and after reopening are
learnable. Their defaults, ``work_pause`` 0.35 and ``community_pause`` 0.3, follow the drop in New York
County's visits to workplaces (about -65 %) and to retail, recreation and transit stations (about -70 %)
in April 2020 against January-February [Google COVID-19 Community Mobility Reports]; reopening (0.6)
is a modelling choice. Because those levels already hold most of the city's behaviour change, the
decision to isolate cuts only a further ``isolation_effect`` = 0.25 of an isolating agent's outside
contacts: a hand choice among 0.75, 0.5 and 0.25 (at 0.75 with the heuristic policy the spring wave
infects 6 % of the city against 22.7 % seropositive by late April [Rosenberg et al. 2020]; at 0.25,
25 % by 2020-05-31), not a fit; calibration (issue 9) replaces it. All O(N): one ``index_add`` of
infectious agents per household, per place and per (ZIP, band)
cell, one gather of each back per agent.

**Reporting.** Symptom onsets (P2 → I1 of symptomatic agents) are diagnosed after a delay (discretised
gamma, mean ``report_delay_days`` = 3; Bi et al., Lancet Infect Dis 2020: 4.6 days from onset to
confirmation under symptom-based testing, specimen collection a day or more before), and a share
``detected(t)`` of them is reported (expected value, which keeps the series differentiable). ``detected``
rises with testing from ``detected_march`` to ``detected`` by 2020-03-22 (below; ``detection_ramp="time"``:
log-linear in time from 2020-03-01, testing scaled up by the PAUSE order), flat
to 2020-05-15, then to ``detected_summer`` by 2020-07-15. The default April level, 0.1, follows from New
York's serosurvey (22.7 % of New York City residents with antibodies by late April 2020, Rosenberg et
al., Ann Epidemiol 2020: about 1.9 million infections against about 130,000 reported cases by
mid-April, 7 % of all infections and 10 % of symptomatic ones).

With ``detection_ramp="tests"`` (the default) the March rise follows testing instead of the calendar:
log-linear in the people tested a day (7-day mean of ``tests-by-day.csv`` up to that day) from
``tests_scarce`` = 15 (the first count, 2020-03-03) to ``tests_ample`` = 6,114 (the mean on 2020-03-22), so
it rises most in the week 03-08 .. 03-15, when the people tested a day grew 20-fold. It reads no count after the day
whose share it gives, so the seeding still reads nothing on or after the start; a run through March reads
the real counts of its days, an input like the intervention dates. ``detection_ramp="tests_all"`` (an
option, not the default: the fits it gave forecast no better, see the README) lets the rest of the rise
follow the tests too: log-linear in the people tested from ``detected`` at ``tests_ample`` to
``detected_summer`` at ``tests_wide`` = 27,886 (the 7-day mean on 2020-07-15), with no flat spring
(6,114 tested a day on 03-22, 8,806 on 04-05, 15,256 on 05-15).

With ``tests_limit`` (off by default), reporting is also capped by the city's testing: of the ``D``
detected onsets of a day, ``R = D K / (D + K)`` are reported, ``K = positivity_cap × people tested``
that day (the health department's ``tests.csv``, shipped as ``populations/nyc/tests-by-day.csv``; no
cap on days without counts). In spring 2020 tests were the limit: 0.62 and 0.61 cases per person tested
in the weeks to 2020-03-28 and 04-04 (7-day means), 0.10 by 05-09. ``detected`` then means the share reported with ample
tests. The seeding undoes the cap on the cases before the start (``R K / (K - R)``, from the tests
before the start only, at most ``MAX_UNCAP`` times). A forecast reads the real test counts of its
window: an input, like the intervention dates.

**Seeding without look-ahead.** The state on the start date is estimated from the real cases reported in
the 14 days *before* it, never from the start date or later (:func:`seed_estimate`): daily infections
are back-projected as cases / detected / (1 - asymptomatic) at the report date minus the mean delay
from infection to report; the last days, not reported yet, grow at the log-linear slope of the share of
tests found positive (``seed_trend="positivity"``: cases / people tested, which takes out the growth of
testing itself; in mid-March 2020 tests grew 45-fold in 8 days and the cases with them) when at least 7 of
the 14 days have cases and tests, else ``seed_growth`` (0.23 a day, a doubling time of 3 days;
Pei et al., Nature 2021 (NYC, March 2020); Sanche et al., Emerg Infect Dis 2020: 2.3–3.3 days); the
infections of the 60 days before the start are run through the stage chain to give each borough's
expected agents per stage and the symptom onsets still waiting to be reported. While few cases have been
reported, their split over the boroughs says little (a start on 2020-03-01 sees one case, in Manhattan):
each day's cases keep their total, and their split is pulled toward the boroughs' shares of the
population with the weight of ``seed_prior_cases`` (100) pseudo-cases against the ``n`` cases reported
before the start, ``w = n / (n + 100)`` (:func:`_borough_split`; the first sequenced genomes show several
introductions spread over the boroughs by early March, Gonzalez-Reiche et al., Science 2020). A start date with no
reported case in the 14 days before it (2020-02-29 and earlier) cannot be seeded and is an error.

A day, in the order :meth:`CovidScenario.step` reads: (1) infectiousness and isolation per agent;
(2) pressure per household, place and cell (scatter) and the force on each agent (gather); (3) one step
along the chain; (4) reporting; (5) records.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lpm import nyc
from lpm.errors import InputError
from lpm.policy import age_of, sigmoid
from lpm.population import Population
from lpm.sampling import (
    Sampler,
    byte_flags,
    chain_leave,
    in_codes,
    leaving_hazard,
    prune,
    shared_gradient,
    uniform,
)
from lpm.scenarios.base import (
    Decision,
    Plot,
    Quantity,
    Scenario,
    ScenarioConfig,
    parameter,
    period_sums,
    real_frame,
)

__all__ = [
    "INTERVENTIONS",
    "CovidConfig",
    "CovidScenario",
    "Intervention",
    "contact_matrix",
    "isolation_rule",
    "seed_estimate",
]

FIRST_DATA = pd.Timestamp("2020-02-29")  # first day of the case data (the city's first reported case)
LAST_DATA = pd.Timestamp("2021-12-31")
S, E1, E2, P1, P2, I1, I2, R = range(8)
STAGES = ("S", "E1", "E2", "P1", "P2", "I1", "I2", "R")
K = len(STAGES)
ISOLATE = 0  # action index of the isolation decision
STREAM_TRANSITION, STREAM_SEED, STREAM_ASYMPTOMATIC = 16, 17, 18
STREAM_ALT_SEED, STREAM_PRUNE, STREAM_PRUNE_HOUSEHOLD = 19, 20, 21  # estimator "pruned"
SEED_WINDOW, REPORT_LAGS = 14, 21
#: "pruned" estimator: the pruning proxy of a household alternative whose differences from the run are
#: all settled (recovered or susceptible members, none exposed or infectious), per unit of weight,
#: relative to one with an infection in course. Any value keeps the estimator unbiased; measured with
#: benchmarks/gradients.py (50k agents, 8 weeks from 2020-04-01, 4 seeds), the gradient's standard error in
#: week 8 is 18 % at 1 (no distinction), 5-6 % at 0.1-0.2 and 9 % at 0.05
QUIET_EFFECT = 0.1
#: a flag's place value in the per-household sum of _alternatives: exact for households of under 1,024
#: members; in a larger one only the pruning proxy (QUIET_EFFECT or 1) could come out wrong, which any
#: positive value leaves unbiased
PENDING = 1024.0
MAX_UNCAP = 20.0  # with tests_limit, the most a day's reported cases are scaled up in the seeding
CASES_SOURCE = "NYC DOHMH cases-by-day.csv, confirmed + probable, scaled to the population"
LAYERS = ("household", "school", "work", "community")
#: Relative transmissibility per contact of each layer: Covasim's default hybrid beta_layer (h 3.0,
#: s 0.6, w 0.6, c 0.3; Kerr et al., PLoS Comput Biol 2021), divided by the household's.
LAYER_WEIGHT = {"household": 1.0, "school": 0.2, "work": 0.2, "community": 0.1}

#: The learnable multiplier of transmission to the residents of each borough (by the population's label).
BOROUGH_BETA = {
    "Bronx": "beta_bronx",
    "Brooklyn": "beta_brooklyn",
    "Manhattan": "beta_manhattan",
    "Queens": "beta_queens",
    "Staten Island": "beta_staten_island",
}
#: A second multiplier of each borough's transmission, from ``late_from`` (2020-03-16) on: the boroughs
#: did not change their contacts alike once the city began to distance (per borough and per period).
BOROUGH_BETA_LATE = {borough: f"{name}_late" for borough, name in BOROUGH_BETA.items()}

#: Mean daily contacts by age of participant, POLYMOD (Mossong et al., PLoS Med 2008, table 1, all
#: countries), averaged onto the health department's 10 age bands.
POLYMOD_CONTACTS = (10.21, 16.0, 17.9, 15.0, 13.9, 14.1, 13.5, 11.3, 8.5, 6.9)
BAND_MIDPOINTS = (2.0, 8.5, 15.0, 21.0, 29.5, 39.5, 49.5, 59.5, 69.5, 82.0)


class Intervention(BaseModel):
    """From ``date`` on, contacts of ``layer`` are at ``level`` (a share of normal, 0..1, or the name of a
    learnable parameter holding it). ``source`` says where the date comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    date: dt.date
    layer: Literal["household", "school", "work", "community"]
    level: float | str
    source: str = ""

    @field_validator("level")
    @classmethod
    def _level(cls, level: float | str) -> float | str:
        if isinstance(level, float) and not 0.0 <= level <= 1.0:
            raise ValueError(f"a level is a share of normal contacts in [0, 1], got {level}")
        return level


#: New York City's dated events of 2020 (the defaults of ``CovidConfig.interventions``).
INTERVENTIONS = (
    Intervention(
        date=dt.date(2020, 3, 16),
        layer="school",
        level=0.0,
        source="NYC public schools closed (Mayor's announcement of 2020-03-15)",
    ),
    Intervention(
        date=dt.date(2020, 3, 22),
        layer="work",
        level="work_pause",
        source="New York State on PAUSE, Executive Order 202.8 (non-essential workplaces closed)",
    ),
    Intervention(
        date=dt.date(2020, 3, 22),
        layer="community",
        level="community_pause",
        source="New York State on PAUSE, Executive Order 202.8",
    ),
    Intervention(
        date=dt.date(2020, 6, 8),
        layer="work",
        level="work_reopened",
        source="NYC enters phase 1 of NY Forward (2020-06-08; phases 2-4 on 06-22, 07-06, 07-20)",
    ),
    Intervention(
        date=dt.date(2020, 6, 8),
        layer="community",
        level="community_reopened",
        source="NYC enters phase 1 of NY Forward",
    ),
    Intervention(
        date=dt.date(2020, 9, 21),
        layer="school",
        level=0.5,
        source="NYC public schools reopen with blended learning (2020-09-21; about half the pupils in class)",
    ),
)


def contact_matrix(shares: torch.Tensor) -> torch.Tensor:
    """(10, 10) mean daily contacts ``C[a, b]`` of a person of band ``a`` with people of band ``b``,
    reciprocal: ``shares[a] C[a, b] = shares[b] C[b, a]`` (contacts counted from either side agree).

    An approximation of POLYMOD, not its fitted matrix: a kernel of the age gap — assortative
    (``exp(-gap / 8)``), a generation apart (``0.25 exp(-(gap - 30)^2 / 72)``, parents and children) and
    a flat background (0.1) — is weighted by both bands' activity (POLYMOD's mean contacts per age,
    :data:`POLYMOD_CONTACTS`) and population ``shares``, which makes it symmetric in total contacts; it
    is scaled so that the population's mean contacts equal POLYMOD's mean.
    """
    mid = torch.tensor(BAND_MIDPOINTS, dtype=torch.float64)
    gap = (mid[:, None] - mid[None, :]).abs()
    kernel = torch.exp(-gap / 8.0) + 0.25 * torch.exp(-((gap - 30.0) ** 2) / 72.0) + 0.1
    activity = torch.tensor(POLYMOD_CONTACTS, dtype=torch.float64)
    share = shares.to(torch.float64)
    total = kernel * (activity * share)[:, None] * (activity * share)[None, :]  # symmetric contacts a<->b
    per_person = total / share.clamp_min(1e-12)[:, None]
    per_person = per_person * float((activity * share).sum() / (per_person.sum(1) * share).sum())
    return per_person.to(torch.float32)


def chain_hazard(c: CovidConfig) -> torch.Tensor:
    """(8,) daily probability of leaving each stage (S's is the force of infection, set per agent; R
    absorbs): two stages per period, each left with hazard ``2 / mean days``."""
    h = torch.zeros(K, dtype=torch.float64)
    for stages, mean in (((E1, E2), c.latent_days), ((P1, P2), c.presymptomatic_days)):
        h[list(stages)] = min(1.0, 2.0 / mean)
    h[[I1, I2]] = min(1.0, 2.0 / c.symptomatic_days)
    return h


def household_attack(c: CovidConfig, beta: float) -> tuple[float, float]:
    """``(q, l)`` for one infectious agent and a given susceptible housemate at the daily household hazard
    ``beta`` (no isolation), averaged over symptomatic and asymptomatic infectors: ``q`` the probability
    of infecting it over the whole infectious period (one minus the chance of escaping every day of P1 ..
    I2, each stage a geometric number of days), ``l`` the expected hazard summed over those days (what a
    linearised backward pass passes on per housemate; ``l > q``)."""
    h = chain_hazard(c).tolist()
    days = sum(1.0 / h[j] for j in range(P1, I2 + 1))

    def escape(x: float) -> float:
        e = float(np.exp(-beta * x))
        out = 1.0
        for j in range(P1, I2 + 1):
            out *= h[j] * e / (1.0 - (1.0 - h[j]) * e)
        return out

    a = c.asymptomatic
    q = 1.0 - ((1.0 - a) * escape(1.0) + a * escape(c.asymptomatic_rel))
    return q, beta * days * (1.0 - a + a * c.asymptomatic_rel)


def household_path_factors(q: float, ell: float, housemates: int, generations: int) -> torch.Tensor:
    """(housemates + 1, generations + 1) weight of the ``g``-th consecutive household hop of a perturbation
    (``[s, g]``, sent by an agent with ``s`` susceptible housemates) in :class:`~lpm.sampling.HouseholdSampler`'s
    backward pass.

    A perturbation that adds one infection B in a household of ``s`` other susceptible members reaches,
    in the real outbreak, ``E_g`` further members at the ``g``-th generation: the Reed–Frost chain
    binomial (each generation's infected each infect each remaining susceptible member with probability
    ``q``), computed exactly over the ``(susceptible, infected)`` states. The linearised backward pass
    passes on the expected hazard ``ell`` (> ``q``: it linearises the finite jump of one more infectious
    housemate, ``1 - exp(-hazard)``) to all ``s`` housemates, B included, and counts a member reached
    along two paths twice: ``(s ell)^g``. The weight of hop ``g`` is the ratio of the two growths,
    ``E_g / E_{g-1} / (s ell)`` (``q / ell`` at the first hop; 0 where no susceptible member is left)."""
    f = torch.zeros(housemates + 1, generations + 1, dtype=torch.float64)
    for s in range(1, housemates + 1):
        dist = {(s, 1): 1.0}  # (susceptible left, infected in this generation): probability
        expected = [1.0]
        for _ in range(generations):
            nxt: dict[tuple[int, int], float] = {}
            for (left, infected), pr in dist.items():
                reach = 1.0 - (1.0 - q) ** infected
                for k in range(left + 1):
                    pk = pr * math.comb(left, k) * reach**k * (1.0 - reach) ** (left - k)
                    if k > 0 and pk > 0:
                        nxt[(left - k, k)] = nxt.get((left - k, k), 0.0) + pk
            dist = nxt
            expected.append(sum(pr * k for (_, k), pr in dist.items()))
        for g in range(1, generations + 1):
            if expected[g - 1] > 0 and ell > 0:
                f[s, g] = expected[g] / expected[g - 1] / (s * ell)
    return f


_path_factors_cached = functools.lru_cache(maxsize=512)(household_path_factors)


def report_delay(mean: float, shape: float = 2.0, lags: int = REPORT_LAGS) -> torch.Tensor:
    """(lags,) probability that a symptom onset is diagnosed ``0 .. lags-1`` days later (a gamma
    distribution discretised to days, renormalised)."""
    d = torch.arange(lags + 1, dtype=torch.float64)
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), d * shape / mean)
    w = cdf[1:] - cdf[:-1]
    return w / w.sum()


def detection(c: CovidConfig, params: Mapping[str, torch.Tensor], date: pd.Timestamp) -> torch.Tensor:
    """Share of symptom onsets reported on ``date`` (a tensor carrying the learnable levels' gradients):
    log-linear between the knots of the module docstring."""
    knots = (
        (pd.Timestamp("2020-03-01"), "detected_march"),
        (pd.Timestamp("2020-03-22"), "detected"),
        (pd.Timestamp("2020-05-15"), "detected"),
        (pd.Timestamp("2020-07-15"), "detected_summer"),
    )

    def level(name: str) -> torch.Tensor:
        return parameter(c, params, name)

    def between(n0: str, n1: str, f: float) -> torch.Tensor:  # log-linear, f = 0 at n0 .. 1 at n1
        return torch.exp((1 - f) * torch.log(level(n0)) + f * torch.log(level(n1)))

    if c.detection_ramp == "tests_all":  # every rise follows the people tested a day
        tests = _tests_mean(date)
        if tests is None or tests <= c.tests_scarce:
            return level("detected_march")
        for (t0, n0), (t1, n1) in (
            ((c.tests_scarce, "detected_march"), (c.tests_ample, "detected")),
            ((c.tests_ample, "detected"), (c.tests_wide, "detected_summer")),
        ):
            if tests <= t1:
                return between(n0, n1, _log_position(tests, t0, t1))
        return level("detected_summer")
    if date <= knots[0][0]:
        return level(knots[0][1])
    for (d0, n0), (d1, n1) in zip(knots, knots[1:], strict=False):
        if date <= d1:
            f = (date - d0).days / (d1 - d0).days
            if c.detection_ramp == "tests" and n0 == "detected_march":
                f = _tests_ramp(c.tests_scarce, c.tests_ample, date)
            return between(n0, n1, f)
    return level(knots[-1][1])


def _tests_mean(date: pd.Timestamp) -> float | None:
    """People tested a day: the mean of tests-by-day.csv over the 7 days ending on ``date``, days without
    counts left out; None when none of them has one. Reads no count after ``date``."""
    week = nyc.tests_by_day()[date - pd.Timedelta(days=6) : date]
    week = week[week > 0]
    return None if week.empty else float(week.mean())


def _tests_ramp(scarce: float, ample: float, date: pd.Timestamp) -> float:
    """Where the people tested a day up to ``date`` (the 7-day mean of tests-by-day.csv ending that day,
    days without counts left out) lie between ``scarce`` and ``ample`` on a log scale: 0 at or below
    ``scarce``, 1 at or above ``ample``; 0 before the first count. Reads no count after ``date``."""
    mean = _tests_mean(date)
    if mean is None:  # no count in those days (before the first)
        return 0.0
    return _log_position(mean, scarce, ample)


def _log_position(x: float, low: float, high: float) -> float:
    """Where ``x`` lies between ``low`` and ``high`` on a log scale: 0 at or below ``low``, 1 at or above
    ``high``."""
    return min(1.0, max(0.0, float(np.log(x / low) / np.log(high / low))))


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


def _share(description: str, default: float) -> Any:
    return Field(default=default, gt=0, le=1, description=description)


class CovidConfig(ScenarioConfig):
    """Configuration of the COVID scenario; one line each, with units and sources (module docstring).
    Unknown keys are rejected."""

    start: dt.date = Field(
        default=dt.date(2020, 3, 1),
        description="first simulated day (from 2020-03-01; seeded from the cases of the 14 days before)",
    )
    beta: float = Field(
        default=0.048,
        gt=0,
        le=1,
        description="daily infection hazard from one infectious household member (other layers: × weight)",
    )
    detected_march: float = _share(
        "share of symptom onsets reported while tests were scarce (early March 2020)", 0.01
    )
    detected: float = _share("share of symptom onsets reported 2020-03-22 .. 05-15 (serosurvey)", 0.1)
    detected_summer: float = _share("share of symptom onsets reported from 2020-07-15 (wider testing)", 0.3)
    work_pause: float = _share("share of workplace contacts kept under PAUSE (essential workers)", 0.35)
    community_pause: float = _share("share of community contacts kept under PAUSE", 0.3)
    work_reopened: float = _share("share of workplace contacts kept after reopening (2020-06-08)", 0.6)
    community_reopened: float = _share("share of community contacts kept after reopening", 0.6)
    beta_bronx: float = Field(default=1.0, gt=0, le=5, description="transmission × in the Bronx (1: none)")
    beta_brooklyn: float = Field(default=1.0, gt=0, le=5, description="transmission × in Brooklyn")
    beta_manhattan: float = Field(default=1.0, gt=0, le=5, description="transmission × in Manhattan")
    beta_queens: float = Field(default=1.0, gt=0, le=5, description="transmission × in Queens")
    beta_staten_island: float = Field(default=1.0, gt=0, le=5, description="transmission × in Staten Island")
    beta_bronx_late: float = Field(
        default=1.0, gt=0, le=5, description="transmission × in the Bronx from late_from on, times beta_bronx"
    )
    beta_brooklyn_late: float = Field(default=1.0, gt=0, le=5, description="the same in Brooklyn")
    beta_manhattan_late: float = Field(default=1.0, gt=0, le=5, description="the same in Manhattan")
    beta_queens_late: float = Field(default=1.0, gt=0, le=5, description="the same in Queens")
    beta_staten_island_late: float = Field(default=1.0, gt=0, le=5, description="the same in Staten Island")
    late_from: dt.date = Field(
        default=dt.date(2020, 3, 16),
        description="first day of the beta_<borough>_late multipliers (2020-03-16: schools closed, the city "
        "began to distance)",
    )
    isolation_effect: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="share of school, work and community contacts isolation cuts (beyond the PAUSE levels)",
    )
    household_isolation: float = Field(
        default=0.25, ge=0, le=1, description="share of household contacts isolation cuts"
    )
    latent_days: float = Field(default=2.9, ge=1, le=20, description="mean days infected, not infectious")
    presymptomatic_days: float = Field(
        default=2.3, ge=1, le=20, description="mean days infectious before symptom onset"
    )
    symptomatic_days: float = Field(default=3.5, ge=1, le=20, description="mean days infectious after onset")
    asymptomatic: float = Field(default=0.31, ge=0, lt=1, description="share of infections without symptoms")
    asymptomatic_rel: float = Field(
        default=0.35, ge=0, le=1, description="infectiousness of an asymptomatic agent, relative"
    )
    report_delay_days: float = Field(
        default=3.0, gt=0, le=14, description="mean days from symptom onset to diagnosis"
    )
    seed_growth: float = Field(
        default=0.23, ge=-0.5, le=1, description="daily growth of infections before the start (few data)"
    )
    seed_trend: Literal["positivity", "detected"] = Field(
        default="positivity",
        description="growth of the infections not yet reported at the start: the trend of the share of tests "
        "found positive (positivity) or of the cases divided by the detected share (detected)",
    )
    seed_prior_cases: float = Field(
        default=100.0,
        ge=0,
        description="pseudo-cases that pull the seed's split over boroughs toward their populations while few "
        "cases were reported (0: the reported split alone)",
    )
    community_weight: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="transmissibility of a community contact relative to a household one",
    )
    share_zip: float = Field(
        default=0.5, ge=0, le=1, description="share of community contacts within the agent's ZIP area"
    )
    share_borough: float = Field(
        default=0.3, ge=0, le=1, description="share of community contacts within the borough; rest citywide"
    )
    data: str | None = Field(
        default=None,
        description="a case file in the format of the health department's cases-by-day.csv replacing the "
        "shipped one (seeding and the real series)",
    )
    tests_limit: bool = Field(
        default=False,
        description="cap reported cases by the day's tests (tests-by-day.csv): reported = D K / (D + K), D "
        "the detected onsets, K = positivity_cap x people tested citywide; off by default",
    )
    positivity_cap: float = _share(
        "with tests_limit, the share of a day's people tested that can be cases", 1.0
    )
    detection_ramp: Literal["time", "tests", "tests_all"] = Field(
        default="tests",
        description="how the detected share rises from detected_march to detected in March 2020: log-linear "
        "in time from 03-01 to 03-22, or log-linear in the people tested a day (7-day mean, "
        "tests-by-day.csv) from tests_scarce to tests_ample; tests_all: the rise to detected_summer "
        "follows the people tested too, from tests_ample to tests_wide, with no flat spring",
    )
    tests_scarce: float = Field(
        default=15.0,
        gt=0,
        description="with detection_ramp=tests, people tested a day at which detected_march holds (the "
        "city's first count, 2020-03-03)",
    )
    tests_ample: float = Field(
        default=6114.0,
        gt=0,
        description="with detection_ramp=tests, people tested a day from which detected holds (the city's "
        "7-day mean on 2020-03-22)",
    )
    tests_wide: float = Field(
        default=27886.0,
        gt=0,
        description="with detection_ramp=tests_all, people tested a day from which detected_summer holds "
        "(the city's 7-day mean on 2020-07-15)",
    )
    interventions: tuple[Intervention, ...] = Field(
        default=INTERVENTIONS, description="dated changes of contacts per layer (see INTERVENTIONS)"
    )

    @field_validator("start")
    @classmethod
    def _start(cls, start: dt.date) -> dt.date:
        if start < dt.date(2020, 3, 1):
            raise ValueError(
                "start must be 2020-03-01 or later: the state on the start date is estimated "
                "from the cases reported before it, and the case data begin on 2020-02-29"
            )
        return start

    @model_validator(mode="after")
    def _checks(self) -> CovidConfig:
        if self.share_zip + self.share_borough > 1:
            raise ValueError(
                f"share_zip + share_borough must be <= 1, got {self.share_zip} + {self.share_borough}"
            )
        if not self.tests_scarce < self.tests_ample < self.tests_wide:
            raise ValueError(
                "tests_scarce < tests_ample < tests_wide must hold, got "
                f"{self.tests_scarce}, {self.tests_ample} and {self.tests_wide}"
            )
        if not FIRST_DATA.date() <= self.late_from <= LAST_DATA.date():
            raise ValueError(
                f"late_from {self.late_from} lies outside the period the scenario simulates "
                f"({FIRST_DATA.date()} .. {LAST_DATA.date()})"
            )
        names = set(type(self).model_fields)
        for i, event in enumerate(self.interventions):
            if not FIRST_DATA.date() <= event.date <= LAST_DATA.date():
                raise ValueError(
                    f"interventions[{i}].date {event.date} lies outside the period the scenario simulates "
                    f"({FIRST_DATA.date()} .. {LAST_DATA.date()})"
                )
            if isinstance(event.level, str) and event.level not in names:
                raise ValueError(
                    f"interventions[{i}].level {event.level!r} names no parameter of the covid scenario"
                )
        return self


@dataclass(frozen=True)
class CovidWorld:
    """What a COVID run needs that does not change (owned by the simulation).

    Per agent: household (N,) int32 and place (N,) int32 ids (0: no place; 1..S school classes, S+1..S+W
    workplaces), cell (N,) int32 (ZIP area, age band) and borough (N,) uint8. place_school: (1+S+W,) bool,
    whether a place is a school class. zip_borough (Z,) and borough_of_cell (C,) int64; inv_zip (Z, bands),
    inv_borough (B, bands), inv_city (bands,): 1 / residents of each band at each level. contacts_t (b, a):
    the contact matrix, transposed. hazard (8,): daily probability of leaving each stage. delay
    (lags,): onset-to-diagnosis distribution. residents (B,), scale: agents / city residents.
    """

    n: int
    boroughs: list[str]
    nb: int
    nz: int
    nc: int
    nh: int
    scale: float
    household: torch.Tensor
    place: torch.Tensor
    place_school: torch.Tensor
    cell: torch.Tensor
    borough: torch.Tensor
    zip_borough: torch.Tensor
    borough_of_cell: torch.Tensor
    inv_zip: torch.Tensor
    inv_borough: torch.Tensor
    inv_city: torch.Tensor
    contacts_t: torch.Tensor
    hazard: torch.Tensor
    delay: torch.Tensor
    residents: torch.Tensor
    #: per-run values the differentiable step derives from a tensor that changes weekly or never (the
    #: keeps of the isolation decisions, the asymptomatic agents' factors): ``name -> (source, values)``,
    #: reused while the step is given that same source tensor (:meth:`derived`)
    memo: dict[str, tuple[torch.Tensor, Any]] = field(default_factory=dict, repr=False, compare=False)

    def derived(self, name: str, source: torch.Tensor, make: Any) -> Any:
        """``make(source)``, computed once per ``source`` tensor (the same object: the decisions of a week,
        the asymptomatic agents of a run) and kept in :attr:`memo` with it until another replaces it."""
        held = self.memo.get(name)
        if held is None or held[0] is not source:
            held = self.memo[name] = (source, make(source))
        return held[1]

    @functools.cached_property
    def agent_index(self) -> torch.Tensor:
        """int64 (N,) ``0 .. N - 1`` (:func:`~lpm.sampling.prune`'s race), made on first use."""
        return torch.arange(self.n, dtype=torch.int64, device=self.household.device)

    @functools.cached_property
    def race_scratch(self) -> torch.Tensor:
        """int64 (N,) buffer for :func:`~lpm.sampling.prune`'s race, made on first use (the ``pruned``
        estimator), 8 bytes per agent: its daily packed keys then reuse pages already mapped."""
        return torch.empty(self.n, dtype=torch.int64, device=self.household.device)

    @functools.cached_property
    def wide(self) -> dict[str, torch.Tensor]:
        """``household``, ``place`` and ``cell`` as int64 (N,), for :meth:`gather` (``index_select`` reads an
        int64 index faster than an int32 one on the CPU, and ``scatter_add_`` takes no other); made on first
        use (differentiable mode), 24 bytes per agent."""
        return {k: getattr(self, k).long() for k in ("household", "place", "cell")}

    def gather(self, table: torch.Tensor, by: str) -> torch.Tensor:
        """(N,) ``table[index]`` for the per-agent index ``by`` (``household``, ``place`` or ``cell``),
        with :class:`_Gather`'s faster backward."""
        return _Gather.apply(table, self.wide[by])

    @functools.cached_property
    def household_runs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int64 ``(starts, sizes)`` (H,) where each household's agents are one run of consecutive indices in
        the order of the household ids (as :meth:`lpm.population.Population.synthesize` makes them), else
        None; found on first use (the ``pruned`` estimator's :meth:`CovidScenario._own_outside`)."""
        h = self.household
        if self.n == 0 or not bool((h[1:] >= h[:-1]).all()):
            return None
        sizes = torch.bincount(h, minlength=self.nh)
        return torch.cumsum(sizes, 0) - sizes, sizes

    @functools.cached_property
    def own_scratch(self) -> torch.Tensor:
        """float32 (N,) zeros for :meth:`CovidScenario._own_outside`, which leaves them zero again: its
        daily per-agent differences and pair sums then reuse pages already mapped (4 bytes per agent)."""
        return torch.zeros(self.n, dtype=torch.float32, device=self.household.device)

    @functools.cached_property
    def house_place(self) -> torch.Tensor:
        """int32 (N,) id of each agent's (household, place) pair, 0 .. pairs - 1: housemates who share a
        school class or workplace (or share none: place 0) have one id. Found on first use (the
        ``pruned`` estimator's :meth:`CovidScenario._own_outside`), once per run: the pairs never change."""
        key = self.household.long() * len(self.place_school) + self.place.long()
        return torch.unique(key, return_inverse=True)[1].to(torch.int32)

    def by_borough(self, per_cell: torch.Tensor) -> torch.Tensor:
        """(B,) sums of a (C,) per-cell vector over each borough's cells."""
        return torch.zeros(self.nb, device=per_cell.device, dtype=per_cell.dtype).index_add(
            0, self.borough_of_cell, per_cell
        )


def uncapped(reported: pd.Series, tests: pd.Series, cap: float) -> pd.Series:
    """Per day, the factor ``K / (K - R)`` that undoes the testing cap ``R = D K / (D + K)`` on the
    reported cases ``R`` (``K = cap × tests``); 1 on days without test counts, at most ``MAX_UNCAP``."""
    k = cap * tests.reindex(reported.index).fillna(0.0)
    room = (k - reported).clip(lower=k / MAX_UNCAP)
    return (k / room).where(k > 0, 1.0)


def seed_estimate(
    c: CovidConfig, params: Mapping[str, torch.Tensor], before: pd.DataFrame, boroughs: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each borough's expected residents per stage on the start date, and the symptom onsets of the
    ``REPORT_LAGS`` days before it (oldest first), from the real cases reported before the start only.

    before: real cases (``date``, ``borough`` label, ``cases``) of every day before the start (from 2020-02-29). Daily
    infections are back-projected: the cases reported on day ``d`` / detected(d) / (1 - asymptomatic)
    were infected ``lag`` days earlier (the mean latent, pre-symptomatic and diagnosis delays). The last
    ``lag`` days before the start are not reported yet: they continue the mean of the 7 days before them
    at the growth rate of the last ``SEED_WINDOW`` days' share of tests found positive (``seed_trend``
    "positivity"; "detected": of the cases divided by the detected share) by a log-linear fit when at
    least 7 of those days have it, else ``seed_growth``; kept within -0.2 .. 0.3 a day, doubling no
    faster than every 2.3 days. The infections are run through the stage chain to the start date.
    Returns ((B, 8), (lags, B)) float64 tensors that carry the gradients of the detection parameters.
    """
    start = pd.Timestamp(c.start)
    days = pd.date_range(FIRST_DATA, start - pd.Timedelta(days=1))
    wide = before.pivot_table(index="date", columns="borough", values="cases", aggfunc="sum", observed=False)
    wide = wide.reindex(index=days, columns=boroughs).fillna(0.0)
    reported = wide.sum(axis=1)  # the city's reported cases per day
    tested = nyc.tests_by_day().reindex(days)  # people tested, before the start only
    if c.tests_limit:  # the cases ample testing would have found: R K / (K - R)
        wide = wide.mul(uncapped(reported, tested, c.positivity_cap), axis=0)
    city = wide.sum(axis=1).to_numpy()
    if city[-SEED_WINDOW:].sum() <= 0:
        raise InputError(
            f"{c.data or nyc.data_dir() / 'cases-by-day.csv'}: field 'date_of_interest': no case was reported in the "
            f"{SEED_WINDOW} days before the start {start.date()}, so the state on the start date cannot be "
            "estimated without reading later data",
            hint="start on 2020-03-01 or later",
        )
    det = torch.stack([torch.as_tensor(detection(c, params, d)) for d in days]).to(torch.float64)  # (H,)
    symptomatic = 1.0 - c.asymptomatic
    lag = round(c.latent_days + c.presymptomatic_days + c.report_delay_days)
    cases = torch.tensor(wide.to_numpy(), dtype=torch.float64)  # (H, B)
    cases = _borough_split(cases, boroughs, c.seed_prior_cases)
    behind = cases / det[:, None] / symptomatic  # infections dated `lag` days before each report
    if c.seed_trend == "positivity":  # the share of tests found positive: testing's own growth taken out
        positivity = (reported / tested.where(tested > 0)).fillna(0.0).to_numpy()[-SEED_WINDOW:]
        window = torch.tensor(positivity, dtype=torch.float64)
    else:
        window = (torch.tensor(city, dtype=torch.float64) / det)[-SEED_WINDOW:]
    seen = window.detach() > 0
    if int(seen.sum()) >= 7:  # least-squares slope of log(window) on the day
        day = torch.arange(len(window), dtype=torch.float64)[seen]  # fewer than SEED_WINDOW days early on
        log_cases = torch.log(window[seen])
        growth = ((day - day.mean()) * (log_cases - log_cases.mean())).sum() / ((day - day.mean()) ** 2).sum()
    else:
        growth = torch.tensor(c.seed_growth, dtype=torch.float64)
    growth = growth.clamp(-0.2, 0.3)
    known = behind  # infections of the days FIRST_DATA - lag .. start - lag - 1
    recent = known[-7:].mean(0)  # (B,)
    ahead = recent[None, :] * torch.exp(growth * torch.arange(4, 4 + lag, dtype=torch.float64))[:, None]
    incidence = torch.cat([known, ahead])  # (days + lag, B): infections of each day before the start
    h = chain_hazard(c)
    occ = torch.zeros(len(boroughs), K, dtype=torch.float64)
    onsets = []
    for day in range(incidence.shape[0]):
        flow = occ * h
        onsets.append(flow[:, P2] * symptomatic)
        occ = occ - flow + torch.nn.functional.pad(flow[:, :-1], (1, 0))
        occ = occ + torch.nn.functional.pad(incidence[day][:, None], (E1, K - E1 - 1))
    onsets = torch.stack(onsets[-REPORT_LAGS:])
    return occ, torch.nn.functional.pad(onsets, (0, 0, REPORT_LAGS - onsets.shape[0], 0))


def _borough_split(cases: torch.Tensor, boroughs: list[str], prior: float) -> torch.Tensor:
    """(H, B) daily cases with each day's total kept and its split over boroughs pulled toward the
    boroughs' shares of the population: ``total_d · (w · split_d + (1 − w) · share)``, ``w = n / (n +
    prior)`` with ``n`` the cases reported before the start. One case on 2020-02-29, in Manhattan, would
    otherwise put the whole seed of a start on 2020-03-01 in one borough, while the first sequenced
    genomes show several introductions spread over the boroughs by early March (Gonzalez-Reiche et al.,
    Science 2020), and early tests favoured some neighbourhoods (Borjas, NBER w26952, 2020)."""
    seen = float(cases.sum())
    if prior <= 0 or seen <= 0:
        return cases
    people = nyc.borough_population()
    codes = {name: code for code, name in nyc.BOROUGH_NAMES.items()}
    share = torch.tensor([float(people[codes[b]]) for b in boroughs], dtype=torch.float64)
    share = share / share.sum()
    total = cases.sum(1, keepdim=True)
    split = torch.where(total > 0, cases / total.clamp_min(1e-12), share[None, :])
    w = seen / (seen + prior)
    return total * (w * split + (1.0 - w) * share[None, :])


class CovidScenario(Scenario):
    """Daily epidemic in NYC, household/school/work/community contacts, weekly isolation decisions (spec
    ``covid_isolation``)."""

    name = "covid"
    description = (
        "COVID-19 in New York City: daily stochastic model with household, school, work and community "
        "contacts, dated interventions, reporting delay; weekly isolation decisions"
    )
    step_unit = "day"
    horizon = 92
    Config = CovidConfig
    pruned = True  # its step carries the "pruned" estimator's household alternatives
    shardable = True  # households stay on one rank; places and cells are summed with sampler.total
    learnable = (
        "beta",
        "detected_march",
        "detected",
        "detected_summer",
        "work_pause",
        "community_pause",
        "work_reopened",
        "community_reopened",
        *BOROUGH_BETA.values(),
        *BOROUGH_BETA_LATE.values(),
    )
    #: Defaults of the fitted parameters: ``lpm calibrate`` on 2020-03-01 .. 04-11 (its command inside).
    calibration = "calibration/covid/calibration.json"
    needs = ("borough", "zip", "age_group", "household", "school", "workplace")
    quantities = (
        Quantity("infections", "new infections per day", total=True),
        Quantity(
            "reported_cases",
            "new reported cases per day (detected share of symptom onsets, after the diagnosis delay)",
            total=True,
            real=CASES_SOURCE,
        ),
        Quantity("onsets", "symptom onsets per day", total=True),
        Quantity("susceptible", "susceptible agents at the start of the day"),
        Quantity("exposed", "latent (infected, not yet infectious) agents at the start of the day"),
        Quantity("infectious", "infectious agents (pre-symptomatic, symptomatic, asymptomatic)"),
        Quantity("recovered", "recovered (removed) agents at the start of the day"),
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
        unknown = [b for b in boroughs if b not in BOROUGH_BETA]
        if unknown:
            raise InputError(
                f"the covid scenario models the five NYC boroughs; the population's borough labels "
                f"{unknown} are not among {list(BOROUGH_BETA)}"
            )
        zip_, band = pop["zip"].to(torch.int32), pop["age_group"].to(torch.int32)
        borough = pop["borough"].to(torch.int32)
        cell = zip_ * bands + band
        n_cell = torch.bincount(cell, minlength=nz * bands).to(torch.float32)
        zb = torch.bincount(zip_ * nb + borough, minlength=nz * nb).view(nz, nb)
        zip_borough = zb.argmax(dim=1)
        n_zb = n_cell.view(nz, bands)
        n_bb = torch.zeros(nb, bands, device=device).index_add_(0, zip_borough, n_zb)
        n_b = n_zb.sum(0)
        school, work = pop["school"].to(torch.int32), pop["workplace"].to(torch.int32)
        n_school = int(school.max()) if n else 0
        place = torch.where(school > 0, school, torch.where(work > 0, work + n_school, 0))
        n_place = 1 + n_school + (int(work.max()) if n else 0)
        place_school = torch.arange(n_place, device=device) <= n_school
        place_school[0] = False
        household = pop["household"].to(torch.int32)
        return CovidWorld(
            n=n,
            boroughs=boroughs,
            nb=nb,
            nz=nz,
            nc=nz * bands,
            nh=int(household.max()) + 1 if n else 0,
            scale=float(pop.meta.get("scale", n / nyc.city_population())),
            household=household,
            place=place.to(torch.int32),
            place_school=place_school,
            cell=cell.to(torch.int32),
            borough=pop["borough"].to(torch.uint8),
            zip_borough=zip_borough,
            borough_of_cell=zip_borough.repeat_interleave(bands),
            inv_zip=1.0 / n_zb.clamp_min(1.0),
            inv_borough=1.0 / n_bb.clamp_min(1.0),
            inv_city=1.0 / n_b.clamp_min(1.0),
            contacts_t=contact_matrix((n_b / n_b.sum()).cpu()).to(device).T.contiguous(),
            hazard=chain_hazard(c).to(torch.float32).to(device),
            delay=report_delay(c.report_delay_days).to(device),
            residents=torch.bincount(borough, minlength=nb).to(torch.float32),
        )

    def community(self, w: CovidWorld, infectious: torch.Tensor) -> torch.Tensor:
        """(C,) community pressure on each (ZIP, band) cell from the (C,) isolation-weighted infectiousness
        per cell: contacts × prevalence mixed over ZIP area, borough and city."""
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
        return (prevalence.unsqueeze(2) * w.contacts_t).sum(1).reshape(-1)  # (Z, a)

    def infection(
        self,
        w: CovidWorld,
        params: Mapping[str, torch.Tensor],
        level: Mapping[str, torch.Tensor | float],
        isolating: torch.Tensor,
        infectious: tuple[torch.Tensor | None, torch.Tensor],
        sampler: Sampler,
        home_x: torch.Tensor | None = None,
        alt_home_x: torch.Tensor | None = None,
        alt_share: torch.Tensor | None = None,
        senders: torch.Tensor | None = None,
        x_senders: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(N,) each agent's probability of infection today, ``1 - exp(-lambda)`` (module docstring).

        infectious: ``(who, x)``, the indices (M,) of the infectious agents and their infectiousness
        (M,), or None and every agent's (N,). With indices (inference mode) only those agents are
        scattered and the per-agent arithmetic runs in place in the sampler's work buffers; without
        (differentiable mode) it runs out of place, as autograd needs. home_x: the infectiousness the
        household layer reads, if not ``x`` (the same values; :meth:`_household_paths` passes them
        without the senders' gradient). alt_home_x: (N,) the infectiousness of each household's
        alternative (:meth:`_alternatives`), and alt_share (N,) the weight of each agent's household's
        alternative; then also returns each agent's probability in its household's alternative (no
        gradient): the run's outside pressure plus what the alternative's own differences add to it in the
        places and the community its members share (:meth:`_own_outside`), and the alternative's household
        pressure. That addition belongs to the alternative's run, so the run's probability ``p`` leaves
        its gradient out (``- alt_share × own``, zero in value): a housemate's infection caused by it is
        one where the alternative's member is infected too, not one relative to the run.

        senders: with every agent's ``x`` (differentiable mode), the indices (M,) of the agents whose
        infectiousness may be non-zero in value or gradient (here or in ``alt_home_x``); the others are
        zero in both, so the sums read only these (the same numbers and gradients, M agents scattered
        instead of N); needed with ``alt_home_x``. x_senders: ``x`` at the senders (M,), if the caller
        has it there (its gradient then stays M entries long; ``x`` is read only at the senders).
        """
        c = self.config
        who, x = infectious
        dtype = x.dtype
        if who is None:  # differentiable mode: once per week's decisions (a view of them: keyed by its base)
            keep_h, keep_o = w.derived(
                f"keeps {dtype}",
                isolating if isolating._base is None else isolating._base,
                lambda _: (
                    _keep(isolating, c.household_isolation, dtype),
                    _keep(isolating, c.isolation_effect, dtype),
                ),
            )
        else:
            keep_h = _keep(_at(isolating, who), c.household_isolation, dtype)  # (M,)
            keep_o = _keep(_at(isolating, who), c.isolation_effect, dtype)
        # the senders' own entries: all of them, or in differentiable mode those ``senders`` names
        src = who if senders is None else senders
        keep_hs, keep_os = _at(keep_h, senders), _at(keep_o, senders)
        x_hs = _at(x if home_x is None else home_x, senders) * keep_hs
        x_os = (_at(x, senders) if x_senders is None else x_senders) * keep_os
        house = torch.zeros(w.nh, device=x.device, dtype=dtype).index_add(0, _at(w.household, src), x_hs)
        # places and cells are summed in float64, where these sums are exact: the same numbers in any
        # order and over any shards of a sharded run (sampler.total adds the other shards' agents)
        x_o64 = x_os.to(torch.float64)
        places = torch.zeros(len(w.place_school), device=x.device, dtype=torch.float64)
        places = sampler.total(places.index_add(0, _at(w.place, src), x_o64), w.place).to(dtype)
        cells = torch.zeros(w.nc, device=x.device, dtype=torch.float64).index_add(0, _at(w.cell, src), x_o64)
        cells = sampler.total(cells).to(dtype)
        school = LAYER_WEIGHT["school"] * level["school"]
        work = LAYER_WEIGHT["work"] * level["work"]
        place_weight = torch.where(w.place_school, school, work)
        place_weight = place_weight * (torch.arange(len(place_weight), device=x.device) > 0)
        community, community_weight = self.community(w, cells), c.community_weight * level["community"]
        home_weight = LAYER_WEIGHT["household"] * level["household"]
        beta = self._cell_beta(w, params).to(dtype)  # (C,)
        # the pressure each agent meets, less its own infectiousness (an agent is not its own contact)
        own_o = place_weight.index_select(0, _at(w.place, src)) * x_os
        if who is None:
            # in place on the fresh gathers (their backward keeps only the index)
            if senders is None:
                home = w.gather(house, "household").sub_(x_hs)
                outside = w.gather(place_weight * places, "place").sub_(own_o)
            else:
                home = w.gather(house, "household").index_add_(0, senders, x_hs, alpha=-1)
                outside = w.gather(place_weight * places, "place").index_add_(0, senders, own_o, alpha=-1)
            if not (isinstance(home_weight, float) and home_weight == 1.0):  # × 1.0: the same numbers
                home = home_weight * home
            # the weight times the (C,) table, then gathered: the same numbers, and its gradient's graph
            # keeps the table, not an (N,) gather
            outside.add_(w.gather(community_weight * community, "cell"))
            beta_agent = w.gather(beta, "cell")
            regather = (beta, w.wide["cell"])
            if alt_home_x is None:
                return _Escape.apply(
                    _Pressure.apply(beta_agent, home, outside, None, None, keep_h, keep_o, regather)
                )
            if alt_share is None or senders is None:
                raise ValueError("alt_home_x needs alt_share and senders")
            with torch.no_grad():  # at the senders only: elsewhere both are 0
                base_xs = (x if home_x is None else home_x).index_select(0, senders)
                d_s = (alt_home_x.index_select(0, senders) - base_xs) * keep_os.detach()
                own = self._own_outside(w, place_weight, community_weight, senders, d_s)
            lam = _Pressure.apply(beta_agent, home, outside, alt_share, own, keep_h, keep_o, regather)
            with torch.no_grad():
                x_alt = alt_home_x.index_select(0, senders) * keep_hs.detach()
                house_alt = torch.zeros(w.nh, device=x.device, dtype=dtype)
                house_alt = house_alt.index_add(0, w.household.index_select(0, senders), x_alt)
                home_alt = house_alt.index_select(0, w.wide["household"]).index_add_(
                    0, senders, x_alt, alpha=-1
                )
                home_alt.mul_(home_weight)
                # lam_alt = beta_agent * (keep_h * home_alt + keep_o * (outside + own)), in place
                # (own: saved by lam's graph, so not overwritten)
                lam_alt = torch.add(outside, own).mul_(keep_o).add_(home_alt.mul_(keep_h)).mul_(beta_agent)
            return _Escape.apply(lam), lam_alt.neg_().expm1_().neg_()
        home = torch.index_select(house, 0, w.household, out=sampler.work("covid.home", dtype))
        outside = torch.index_select(
            place_weight * places, 0, w.place, out=sampler.work("covid.outside", dtype)
        )
        factor = sampler.work("covid.factor", dtype)  # a per-agent factor of one term, then the next
        home.index_add_(0, who, x_hs, alpha=-1).mul_(home_weight)
        home.mul_(_keep(isolating, c.household_isolation, dtype, out=factor))
        outside.index_add_(0, who, own_o, alpha=-1)
        outside.add_(torch.index_select(community_weight * community, 0, w.cell, out=factor))
        outside.mul_(_keep(isolating, c.isolation_effect, dtype, out=factor))
        lam = home.add_(outside).mul_(torch.index_select(beta, 0, w.cell, out=factor))
        return lam.neg_().expm1_().neg_()

    def _own_outside(
        self,
        w: CovidWorld,
        place_weight: torch.Tensor,
        community_weight: torch.Tensor | float,
        candidates: torch.Tensor,
        d_candidates: torch.Tensor,
    ) -> torch.Tensor:
        """(N,) the outside pressure each agent meets from its own housemates' ``d``: their infectiousness
        in the household's alternative less the run's, after isolation, given at the agents
        ``candidates`` (M,) as ``d_candidates`` (M,) and zero elsewhere; zero for most agents. In the
        places they share (less the agent's own) and in the community of their ZIP area (housemates live
        in one), with the weights of :meth:`infection`. O(M + agents of the households whose alternative
        differs in infectiousness), plus O(N) fills of zeros (the result, ``d`` and the sums per
        (household, place) pair: :attr:`CovidWorld.house_place`, found once per run)."""
        c = self.config
        out = torch.zeros(w.n, dtype=d_candidates.dtype, device=d_candidates.device)
        differ = torch.nonzero(d_candidates).view(-1)
        if len(differ) == 0:
            return out
        senders, ds = candidates.index_select(0, differ), d_candidates.index_select(0, differ)
        # (N,), read at the senders' housemates below: zeros the world keeps (float32 only), zero again on
        # return
        scratch = w.own_scratch if out.dtype == torch.float32 else torch.zeros_like(out)
        d = scratch.index_copy_(0, senders, ds)
        household = w.household
        hs = household.index_select(0, senders)
        flag = torch.zeros(w.nh, dtype=torch.bool, device=d.device)
        flag[hs] = True
        # the households with senders, numbered 0 .. F - 1: the tables below are F rows, not H
        compact = torch.cumsum(flag, 0) - 1
        hs = compact.index_select(0, hs)
        runs = w.household_runs
        if runs is None:
            members = torch.nonzero(flag.index_select(0, household)).view(-1)
            hm = compact.index_select(0, household.index_select(0, members))
        else:  # the same members in the same order, from the flagged households' runs: O(F + members)
            flagged = torch.nonzero(flag).view(-1)
            starts, sizes = runs[0].index_select(0, flagged), runs[1].index_select(0, flagged)
            ends = torch.cumsum(sizes, 0)
            total = int(ends[-1])
            members = torch.arange(total, device=d.device) + torch.repeat_interleave(
                starts - ends + sizes, sizes, output_size=total
            )
            hm = torch.repeat_interleave(
                torch.arange(len(flagged), device=d.device), sizes, output_size=total
            )
        bands = w.contacts_t.shape[0]
        # community: per household and age band, d × its weight in the prevalence of its ZIP area
        share_city = 1.0 - c.share_zip - c.share_borough
        mix = (
            c.share_zip * w.inv_zip
            + c.share_borough * w.inv_borough.index_select(0, w.zip_borough)
            + share_city * w.inv_city
        ).view(-1)  # (Z * bands,): indexed by cell
        cell_s = w.cell.index_select(0, senders).long()
        households = int(compact[-1]) + 1
        per = torch.zeros(households * bands, dtype=d.dtype, device=d.device)
        per = per.index_add(0, hs * bands + cell_s % bands, ds * mix.index_select(0, cell_s).to(d.dtype))
        band_m = w.cell.index_select(0, members).long() % bands
        # (F, bands): per household, what its d adds to the community pressure on each age band
        per = per.view(households, bands) @ w.contacts_t.to(d.dtype)
        out.index_copy_(0, members, community_weight * per.view(-1).index_select(0, hm * bands + band_m))
        # places: the housemates' d summed per (household, place) pair, less the agent's own; place 0
        # (none) has weight 0, so a member without a place gains 0
        pair = w.house_place
        d_members = d.index_select(0, members)
        # d's buffer, zero again once its senders are cleared, holds the sums per pair (ids < N)
        pair_s = pair.index_select(0, senders).long()
        shared = d.index_fill_(0, senders, 0.0).index_add_(0, pair_s, ds)
        shared = shared.index_select(0, pair.index_select(0, members)).sub_(d_members)
        d.index_fill_(0, pair_s, 0.0)  # zeros again
        weight = place_weight.index_select(0, w.place.index_select(0, members)).to(d.dtype)
        return out.index_add_(0, members, weight * shared)

    def levels(self, params: Mapping[str, torch.Tensor], t: int) -> dict[str, torch.Tensor | float]:
        """Each layer's share of normal contacts on day ``t`` (the latest intervention in force)."""
        date = self.date(t).date()
        out: dict[str, torch.Tensor | float] = dict.fromkeys(LAYERS, 1.0)
        for event in sorted(self.config.interventions, key=lambda e: e.date):
            if event.date <= date:
                level = event.level
                out[event.layer] = (
                    params[level] if isinstance(level, str) and level in params else self._level(level)
                )
        return out

    def _level(self, level: float | str) -> float:
        return float(getattr(self.config, level)) if isinstance(level, str) else float(level)

    def init_state(
        self, world: CovidWorld, sampler: Sampler, params: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Seeding from the cases reported before the start (:func:`seed_estimate`); ``onsets``: the
        expected symptom onsets of the last ``REPORT_LAGS`` days (lags, B), ``recent``: real reported cases
        of the 14 days before the start (the decisions' context)."""
        c, w = self.config, world
        start = pd.Timestamp(c.start)
        cases = _real_cases(self.config.data)
        before = cases[cases["date"] < start]
        # a few hundred numbers, computed on the host (on a GPU the same numbers as on the CPU); .cpu()
        # keeps the gradients of the parameters
        host = {k: v.cpu() for k, v in (params or {}).items()}
        occupancy, onsets = seed_estimate(c, host, before, w.boroughs)
        device = w.household.device
        residents = (w.residents.to(torch.float64) / w.scale).clamp_min(1.0).to(device)
        share = occupancy.to(device) / residents[:, None]
        infected = share[:, 1:].sum(1, keepdim=True)
        share = torch.cat([1.0 - infected, share[:, 1:]], 1) / infected.clamp_min(1.0)
        share = share.to(torch.float32)
        stage = sampler.categorical(share, w.borough.to(torch.int64), STREAM_SEED)
        if not sampler.differentiable:
            stage = stage.to(torch.uint8)
        alternatives = {}
        if getattr(sampler, "pruned", False):
            stage, alternatives = self._seed_alternatives(w, share, stage, sampler)
            _ = w.house_place  # the steps' (household, place) pairs, found once here rather than in a step
        asymptomatic = sampler.bernoulli(
            torch.full((w.n,), c.asymptomatic, device=device), STREAM_ASYMPTOMATIC
        )
        recent_days = before[before["date"] >= start - pd.Timedelta(days=14)]
        daily = (
            recent_days.groupby("date")["cases"]
            .sum()
            .reindex(pd.date_range(start - pd.Timedelta(days=14), periods=14))
        )
        recent = torch.tensor(daily.fillna(0.0).to_numpy() * w.scale, dtype=torch.float64, device=device)
        state = {
            "stage": stage,
            "asymptomatic": asymptomatic,
            "onsets": (onsets * w.scale).to(torch.float32).to(device),
            "recent": recent,
            **alternatives,
        }
        if sampler.differentiable and sampler.household_generations > 0:
            # the copies of the household hops start with the stages and no gradient of their own
            for g in range(1, sampler.household_generations + 1):
                state[f"stage_hop{g}"] = stage.detach()
        return state

    def observe(self, world: CovidWorld, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """``week`` since 2020-02-29, ``cases`` citywide in the simulated past 7 days (on the city's scale),
        ``cases_change`` percent versus the 7 days before."""
        recent = state["recent"].detach().cpu().double()
        last, prev = float(recent[7:].sum()) / world.scale, float(recent[:7].sum()) / world.scale
        change = 100.0 * (last - prev) / prev if prev > 0 else 0.0
        return {"week": (self.date(t) - FIRST_DATA).days // 7, "cases": last, "cases_change": change}

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
        stage, asym = state["stage"], state["asymptomatic"]
        isolating = sampler.chose(actions["isolation"], ISOLATE)
        level = self.levels(params, t)
        if self.date(t).date() >= c.late_from:  # each borough's multiplier, times its late one
            params = {
                **params,
                **{m: params[m] * params[BOROUGH_BETA_LATE[b]] for b, m in BOROUGH_BETA.items()},
            }
        # 1. infectiousness of the infectious agents (who: their indices; None: every agent)
        infectious_stage = torch.zeros(K, device=w.hazard.device)
        infectious_stage[P1 : I2 + 1] = 1.0
        paths = [state[f"stage_hop{g}"] for g in range(1, sampler.household_generations + 1)]
        kept: dict[str, torch.Tensor] = {}
        if getattr(sampler, "pruned", False):  # estimator "pruned": one alternative run per household
            following, kept, infected, onset, counts = self._alternatives(
                w, state, params, level, isolating, sampler
            )
        else:
            who, x = sampler.support(stage, infectious_stage, codes=(P1, I2))  # no read-back to the host
            x = x * (1.0 - (1.0 - c.asymptomatic_rel) * _at(asym, who).to(x.dtype))
            if paths and sampler.differentiable:  # estimator "households": one copy per household hop
                following, paths, infected, onset, counts = self._household_paths(
                    w, state, paths, x, params, level, isolating, infectious_stage, sampler
                )
            else:
                # 2. isolation, pressure per household, place and cell (scatter), force per agent (gather)
                p_infect = self.infection(w, params, level, isolating, (who, x), sampler)
                # 3. one step along the chain
                following, moves = sampler.transition(stage, p_infect, w.hazard, STREAM_TRANSITION)
                infected, onset = moves.out(S), moves.out(P2)
                counts = sampler.tally(stage, K, w.borough, w.nb)  # (K, B)
            onset = onset * (1.0 - asym.to(onset.dtype)) if sampler.differentiable else onset & ~asym
        infections = sampler.count(w.borough, w.nb, infected)
        onsets_today = sampler.count(w.borough, w.nb, onset)
        # 4. reporting: the detected share of onsets, after the diagnosis delay
        onsets = torch.cat([state["onsets"][1:], onsets_today[None]])
        delay = w.delay.to(onsets.dtype).flip(0)
        reported = detection(c, params, self.date(t)).to(onsets.dtype) * (delay[:, None] * onsets).sum(0)
        if c.tests_limit:  # no more cases than the day's tests can find: D K / (D + K)
            tests = nyc.tests_by_day().get(self.date(t))  # read once per process (cached)
            if tests is not None and tests > 0:
                k = c.positivity_cap * float(tests) * w.scale
                reported = reported * (k / (reported.sum() + k))
        # 5. records
        records = {
            "infections": infections,
            "reported_cases": reported,
            "onsets": onsets_today,
            "susceptible": counts[S],
            "exposed": counts[E1] + counts[E2],
            "infectious": counts[P1:R].sum(0),
            "recovered": counts[R],
            "isolating": sampler.count(w.borough, w.nb, isolating),
        }
        following = {
            "stage": following,
            "asymptomatic": asym,
            "onsets": onsets,
            "recent": torch.cat([state["recent"][1:], reported.detach().sum().to(torch.float64)[None]]),
        }
        for g, copy in enumerate(paths, start=1):
            following[f"stage_hop{g}"] = copy
        following.update(kept)
        return following, records

    def _alternatives(
        self,
        w: CovidWorld,
        state: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        level: Mapping[str, torch.Tensor | float],
        isolating: torch.Tensor,
        sampler: Sampler,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 2 and 3 in differentiable mode with :class:`~lpm.sampling.PrunedSampler`: the hard run,
        and per household one alternative run (``alt_stage``: its members' stages; ``alt_weight``: its
        zero-valued weight, which carries the gradient; ``alt_rate``: its pruning proxy).

        The alternatives move on with the run's uniforms, each agent under its household's alternative
        pressure and the run's outside pressure plus what its own differences add to the places and the
        community its members share (:meth:`_own_outside`). What an alternative changes in schools,
        workplaces and the community (its members' infectiousness less the run's, × its weight) enters
        every other household's agents' probability of infection. Each agent that stayed susceptible today is a candidate alternative
        ("infected today", weight ``p' / (1 - p)``, proxy its hazard); :func:`~lpm.sampling.prune` keeps
        one per household; an alternative that has rejoined the run is dropped. Returns the next stages,
        the next alternatives, the infections and onsets (their values the run's, their gradients the
        candidates' and the alternatives' differences) and the (K, B) counts per stage and borough."""
        c = self.config
        stage, asym, alt = state["stage"], state["asymptomatic"], state["alt_stage"]
        weight, rate = state["alt_weight"], state["alt_rate"]
        household = w.wide["household"]  # int64: index_select and scatter_add_ read it faster than int32
        stage32, alt32 = stage.int(), alt.int()
        # each agent's infectiousness relative to a symptomatic one's, and whether it shows symptoms (1, 0)
        relative, symptomatic = w.derived(
            "asymptomatic",
            asym,
            lambda a: (1.0 - (1.0 - c.asymptomatic_rel) * a.to(torch.float32), (a == 0).view(torch.uint8)),
        )
        infectious, infectious_alt = in_codes(stage, P1, I2), in_codes(alt, P1, I2)  # uint8 0/1
        x = infectious.to(torch.float32).mul_(relative)  # 1 in P1 .. I2, 0 elsewhere, × relative
        x_alt = infectious_alt.to(torch.float32).mul_(relative)
        share = w.gather(weight, "household")  # each agent's household alternative's weight
        # infectious in the run or the alternative (x or x_alt non-zero; an asymptomatic agent's x is 0
        # where asymptomatic_rel is)
        sending = infectious | infectious_alt if c.asymptomatic_rel > 0 else (x != 0) | (x_alt != 0)
        senders = torch.nonzero(sending).view(-1)
        # the senders' infectiousness, the run's plus the alternative's difference × its weight (the
        # others' is 0 in value and gradient)
        x_s = x.index_select(0, senders)
        mixed = x_s + share.index_select(0, senders) * (x_alt.index_select(0, senders) - x_s)
        p, p_alt = self.infection(
            w,
            params,
            level,
            isolating,
            (None, x),
            sampler,
            home_x=x,
            alt_home_x=x_alt,
            alt_share=share,
            senders=senders,
            x_senders=mixed,
        )
        p_run = p.detach()
        u = sampler.uniform(STREAM_TRANSITION)  # used before the next draw overwrites it
        has_alt = (rate > 0).index_select(0, household)
        following, alt_next, candidate, moved, d_moved, onset, d_onset, flags = alternative_moves(
            stage, alt, u, leaving_hazard(w.hazard), p_run, p_alt, has_alt, household, w.nh, (stage32, alt32)
        )
        # today: the run's moves, each candidate's infection (+1) and each alternative's differences;
        # onsets of the symptomatic only
        gain = _Gain.apply(p, candidate)
        # (in place on _Scaled's fresh product, which its graph does not keep)
        infected = _Scaled.apply(share, d_moved).add_(moved).add_(gain)
        onset = _Scaled.apply(share, d_onset.mul_(symptomatic.view(torch.int8))).add_(onset.mul_(symptomatic))
        # each member of an alternative enters the count of its stage there and leaves its run's stage's
        # count, by its weight: zero in value
        shift = _StageShift.apply(share, alt, stage, has_alt, w.borough, w.nb)
        counts = sampler.tally(stage, K, w.borough, w.nb) + shift
        # the future: drop alternatives that rejoined the run (flags 0), then one per household among it
        # and today's
        apart = flags > 0
        weight, rate = weight * apart, rate * apart  # finite: the numbers of torch.where(apart, ., 0), faster
        # -log(1 - p) at the candidates, 0 elsewhere: of p × candidate (a p of 1 is never a candidate's), the
        # numbers of torch.where(candidate, -log1p(-p), 0) without its slow loop over a mask
        on = candidate.view(torch.uint8).to(p_run.dtype)
        hazard_today = torch.mul(p_run, on).neg_().log1p_().neg_()
        u_house = uniform(sampler.seed, sampler.t, STREAM_PRUNE_HOUSEHOLD, w.nh, u.device)
        effect = torch.where(flags >= PENDING, 1.0, QUIET_EFFECT)
        weight, rate, winner, replaced = prune(
            weight,
            rate,
            household,
            gain,
            hazard_today,
            sampler.uniform(STREAM_PRUNE),
            u_house,
            effect,
            w.agent_index,
            w.race_scratch,
        )
        # a replaced household's new alternative: the run, but its winner infected today (E1); in uint8
        # arithmetic (a + flag × (b - a), wrapping: exact), as torch.where and masked_fill_ with these
        # masks take some ten times as long on the CPU
        into_run = replaced.view(torch.uint8).index_select(0, household)
        alt_next = torch.sub(following, alt_next).mul_(into_run).add_(alt_next)
        alt_next = torch.sub(E1, alt_next).mul_(winner.view(torch.uint8)).add_(alt_next)
        kept = {"alt_stage": alt_next, "alt_weight": weight, "alt_rate": rate}
        return following, kept, infected, onset, counts

    def _seed_alternatives(
        self, w: CovidWorld, share: torch.Tensor, onehot: torch.Tensor, sampler: Sampler
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The seeding's stages as codes, and its derivative as alternatives (estimator "pruned"): each
        agent draws a second stage ``Y`` from its borough's row of ``share`` (B, K); where it differs, the
        alternative "stage Y" has weight ``share_Y' / share_Y`` (unbiased: the rows sum to one); one kept
        per household (:func:`~lpm.sampling.prune`, proxy 1)."""
        stage = onehot.detach().argmax(1).to(torch.uint8)
        borough = w.borough.long()
        other = sampler._inverse_cdf(sampler.uniform(STREAM_ALT_SEED), share.detach(), borough).long()
        row = share.view(-1).index_select(0, borough * K + other)
        candidate = other != stage.long()
        gain = torch.where(candidate, (row - row.detach()) / row.detach().clamp_min(1e-12), 0.0)
        household = w.household.long()
        weight, rate, winner, replaced = prune(
            torch.zeros(w.nh, dtype=torch.float32, device=stage.device),
            torch.zeros(w.nh, dtype=torch.float64, device=stage.device),
            household,
            gain,
            candidate.to(torch.float64),
            sampler.uniform(STREAM_PRUNE),
            uniform(sampler.seed, sampler.t, STREAM_PRUNE_HOUSEHOLD, w.nh, stage.device),
        )
        alt = torch.where(winner, other.to(torch.uint8), stage)
        return stage, {"alt_stage": alt, "alt_weight": weight, "alt_rate": rate}

    def _household_paths(
        self,
        w: CovidWorld,
        state: Mapping[str, torch.Tensor],
        paths: list[torch.Tensor],
        x: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        level: Mapping[str, torch.Tensor | float],
        isolating: torch.Tensor,
        infectious_stage: torch.Tensor,
        sampler: Sampler,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 2 and 3 in differentiable mode with :class:`~lpm.sampling.HouseholdSampler`: the same
        forward values as :meth:`infection` and one transition, with the gradient carried by generation.

        ``stage`` (copy 0) holds the perturbations that have not just crossed a household: those of
        the parameters themselves and those arriving through school, work and community. Copy ``g``
        (``stage_hop{g}``) holds those that have taken ``g`` consecutive household hops; a hop from
        copy ``g - 1`` into copy ``g`` is weighted by :func:`household_path_factors` (the share of it the
        real household outbreak can take, given the sender's susceptible housemates); copy ``G`` sends
        no further household hop. School, work and community pressure read every copy's perturbation.
        paths: the copies ``stage_hop1 ..``; x: copy 0's (N,) infectiousness. Returns the next stage, the
        next copies, the infections and onsets (moves out of S and P2) and the (K, B) counts per stage and
        borough, each with every copy's gradient."""
        c = self.config
        stage, asym = state["stage"], state["asymptomatic"]
        factor_x = 1.0 - (1.0 - c.asymptomatic_rel) * asym.to(stage.dtype)
        copies = [stage, *paths]
        xs = [x, *(sampler.value(copy, infectious_stage) * factor_x for copy in paths)]
        x_hard = xs[0].detach()
        x_all = shared_gradient(xs[0], *xs[1:])  # copy 0's value, every copy's perturbation
        p = self.infection(w, params, level, isolating, (None, x_all), sampler, home_x=x_hard)
        following, moves = sampler.transition(stage, p, w.hazard, STREAM_TRANSITION)
        # the household hops: the same pressure, its gradient only through the senders of copy g - 1
        susceptible = stage.detach()[:, S]
        housemates = torch.zeros(w.nh, dtype=stage.dtype, device=stage.device).index_add(
            0, w.household, susceptible
        )
        housemates = (housemates.index_select(0, w.household) - susceptible).round().long()
        keep_h = _keep(isolating.detach(), c.household_isolation, stage.dtype)
        home_weight = LAYER_WEIGHT["household"] * level["household"]
        home_weight = home_weight.detach() if isinstance(home_weight, torch.Tensor) else home_weight
        isolating_share = sampler.count(w.borough, w.nb, isolating.detach()) / w.residents.clamp_min(1.0)
        most = int(housemates.max()) if w.n else 0
        factors = self._path_factors(params, w, len(paths), most, isolating_share, float(home_weight))
        row = w.borough.long() * factors.shape[1] + housemates
        hop_factor = factors.view(-1, factors.shape[-1]).index_select(0, row)  # (N, G + 1)
        reach = (1.0 - p.detach()) * keep_h * home_weight  # d p / d (household pressure) ÷ beta
        reach = reach * self._cell_beta(w, params).detach().to(stage.dtype).index_select(0, w.cell)
        # the sums read copy 0's values and every copy's gradient: the states, the expected flows out of S
        # and out of P2 (the P2 column × its hazard)
        nxt, flows = [], []
        for g, copy in enumerate(copies[1:], start=1):
            sent = (xs[g - 1] - x_hard) * (hop_factor[:, g] * keep_h)
            house = torch.zeros(w.nh, dtype=stage.dtype, device=stage.device).index_add(0, w.household, sent)
            p_g = p.detach() + reach * (house.index_select(0, w.household) - sent)
            nxt.append(sampler.follow(copy, p_g, w.hazard, moves, following)[0])
            flows.append(copy[:, S] * p_g)
        h_onset = w.hazard[P2].to(stage.dtype)
        infected = shared_gradient(moves.out(S), *flows)
        onset = shared_gradient(moves.out(P2), *(copy[:, P2] * h_onset for copy in copies[1:]))
        counts = sampler.tally(shared_gradient(stage, *copies[1:]), K, w.borough, w.nb)
        return following, nxt, infected, onset, counts

    @staticmethod
    def _cell_beta(w: CovidWorld, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(C,) transmission rate of each (ZIP, band) cell: ``beta`` × its borough's multiplier."""
        borough_beta = params["beta"] * torch.stack([params[BOROUGH_BETA[b]] for b in w.boroughs])
        return borough_beta.index_select(0, w.borough_of_cell)

    def _path_factors(
        self,
        params: Mapping[str, torch.Tensor],
        w: CovidWorld,
        generations: int,
        housemates: int,
        isolating: torch.Tensor,
        home_weight: float,
    ) -> torch.Tensor:
        """(B, housemates + 1, G + 1) :func:`household_path_factors` of each borough's household attack
        rate at today's parameters, household weight and (B,) share of residents isolating (a pair of
        housemates keeps ``(1 - household_isolation × share)^2`` of its contact on average; cached by
        rounded rate)."""
        base = float(params["beta"].detach())
        tables = []
        for i, b in enumerate(w.boroughs):
            keep = (1.0 - self.config.household_isolation * float(isolating[i])) ** 2
            hazard = base * float(params[BOROUGH_BETA[b]].detach()) * keep * home_weight
            q, ell = household_attack(self.config, hazard)
            tables.append(_path_factors_cached(round(q, 3), round(ell, 3), housemates, generations))
        return torch.stack(tables).to(torch.float32).to(w.household.device)

    # -- real data -----------------------------------------------------------------------------------
    def real_data(self, world: CovidWorld, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """Real daily reported cases per borough (confirmed + probable), × agents / city population."""
        cases = _real_cases(self.config.data)
        cases = cases[(cases["date"] >= first) & (cases["date"] <= last)]
        return real_frame(
            cases, quantity="reported_cases", value="cases", labels=world.boroughs, scale=world.scale
        )


class _Gather(torch.autograd.Function):
    """``table.index_select(0, index)`` of a (T,) table by an int64 (N,) index; backward the gradient summed
    per entry by ``scatter_add_``: the sums of ``index_select``'s own backward (``index_add_``), in the same
    order, in about 0.6 of its time on the CPU (measured alone: 0.6-0.9 ms against 1.1-1.3 for 1 M
    agents)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows).scatter_add_(0, index, g), None


class _Pressure(torch.autograd.Function):
    """The force of infection of :meth:`CovidScenario.infection` in differentiable mode, ``beta_agent ×
    (keep_h × home + keep_o × (outside − share × own))`` (share, own: None for no alternative's term).
    Forward: the expression's numbers. Its graph keeps ``home``, ``outside − share × own`` and ``own``
    (and the keeps, made once per week's decisions: :meth:`CovidWorld.derived`) where the expression's
    keeps seven (N,) tensors; ``beta_agent`` is gathered again from its (C,) table in backward
    (``regather``: ``(table, index)``, ``beta_agent = table[index]``). The gradients are the
    expression's."""

    @staticmethod
    def forward(ctx, beta_agent, home, outside, share, own, keep_h, keep_o, regather):
        inner = outside if own is None else outside - share * own
        lam = (keep_h * home).add_(keep_o * inner).mul_(beta_agent)
        ctx.save_for_backward(home, inner, own, keep_h, keep_o)
        ctx.regather = regather
        return lam

    @staticmethod
    def backward(ctx, g):
        home, inner, own, keep_h, keep_o = ctx.saved_tensors
        table, index = ctx.regather
        need = ctx.needs_input_grad
        d_beta = (keep_h * home).add_(keep_o * inner).mul_(g) if need[0] else None
        g = table.index_select(0, index).mul_(g)  # d/d(keep_h × home + keep_o × inner)
        d_home = g * keep_h if need[1] else None
        d_inner = g * keep_o if need[2] or need[3] else None
        d_share = torch.mul(d_inner, own).neg_() if need[3] else None
        d_keep_h = g * home if need[5] else None
        d_keep_o = g.mul_(inner) if need[6] else None  # the last use of g
        return d_beta, d_home, d_inner if need[2] else None, d_share, None, d_keep_h, d_keep_o, None


class _StageShift(torch.autograd.Function):
    """(K, bins) per stage and borough, the alternatives' members' weights ``share`` (N,) summed by their
    stage in the alternative (``alt``) less by their stage in the run (``stage``), for the members of the
    households that hold an alternative (``has_alt``): zero in value (the weights are), so forward gives
    zeros and backward gives each agent ``g[alt, borough] - g[stage, borough]`` (0 where the stages
    agree). Its graph keeps the day's two uint8 stage codes and the bool ``has_alt`` (3 bytes per agent)
    where a scatter of the differing members' weights kept their int64 indices and pair codes."""

    @staticmethod
    def forward(ctx, share, alt, stage, has_alt, borough, bins):
        ctx.save_for_backward(alt, stage, has_alt, borough)
        ctx.bins = bins
        return torch.zeros(K, bins, dtype=share.dtype, device=share.device)

    @staticmethod
    def backward(ctx, g):
        alt, stage, has_alt, borough = ctx.saved_tensors
        flat, bins, b = g.reshape(-1), ctx.bins, borough.int()
        enter = flat.index_select(0, alt.int().mul_(bins).add_(b))
        leave = flat.index_select(0, stage.int().mul_(bins).add_(b))
        return torch.where(has_alt, enter.sub_(leave), 0.0), None, None, None, None, None


class _Gain(torch.autograd.Function):
    """``where(candidate, (p − p.detach()) / (1 − p.detach()), 0)``: zero in value, with gradient ``1 / (1 −
    p)`` at the candidates (:meth:`CovidScenario._alternatives`). Its graph keeps the bool candidates and
    ``p`` (which ``_Escape``'s keeps already) where the expression's keeps ``1 − p`` too; the same
    numbers both ways."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, candidate)
        return torch.zeros_like(p)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        p, candidate = ctx.saved_tensors
        return torch.where(candidate, g / (1.0 - p), 0.0), None


class _Scaled(torch.autograd.Function):
    """``share × d`` for an (N,) ``d`` of -1, 0 and 1 (an alternative's difference from the run; int8 or
    float): the product's numbers and gradient (``g × d`` for ``share``), with ``d`` kept as int8 (1 byte per
    agent in the graph instead of 4; an int8 ``d`` itself, which the caller must not change)."""

    @staticmethod
    def forward(ctx, share: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d.to(torch.int8))
        return share * d

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (d,) = ctx.saved_tensors
        return g * d.to(g.dtype), None


class _Escape(torch.autograd.Function):
    """``1 - exp(-lam)``, computed as ``-expm1(-lam)`` in one fresh tensor (three passes in place instead
    of three tensors); backward ``g * exp(-lam)``, as ``g * (1 - p)`` from the result: the numbers of
    ``-torch.expm1(-lam)`` and its autograd, in both directions."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor) -> torch.Tensor:
        p = torch.neg(lam).expm1_().neg_()
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        return g * (1.0 - p)


def alternative_moves(
    stage: torch.Tensor,
    alt: torch.Tensor,
    u: torch.Tensor,
    chain: torch.Tensor,
    p_run: torch.Tensor,
    p_alt: torch.Tensor,
    has_alt: torch.Tensor,
    household: torch.Tensor,
    nh: int,
    codes: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """The part of a ``pruned`` step that carries no gradient, per agent: one move along the chain in the
    run and in its household's alternative, with the same uniforms ``u`` (``chain``: each stage's leaving
    probability, 0 for S, which leaves by ``p_run`` / ``p_alt``); ``has_alt``: whether the agent's
    household holds an alternative. Returns the run's next stages, the alternative's next stages (the
    run's where none), the candidates (susceptible and still so in the run), the run's infections today
    (uint8 0/1) and the alternative's less the run's (int8 -1/0/1), the same for onsets (P2 → I1), and
    per household (``nh``, by the int64 ``household``) the members whose next stages differ + ``PENDING``
    × those whose difference is still in course (exposed or infectious in either run; exact in float32,
    households < 2^10).
    codes: ``stage`` and ``alt`` as int32 (the caller has them).

    Its own function as the unit a fused kernel would replace (``benchmarks/fused_core.py`` measures a
    C++ one against it)."""
    stage32, alt32 = codes
    # 0/1 flags as uint8, not bool (sampling.byte_flags): the same numbers, some ten times faster
    susceptible, susceptible_alt = byte_flags(torch.eq, stage, S), byte_flags(torch.eq, alt, S)
    leave = chain_leave(u, chain.index_select(0, stage32), susceptible, p_run).view(torch.uint8)
    leave_alt = chain_leave(u, chain.index_select(0, alt32), susceptible_alt, p_alt).view(torch.uint8)
    has = has_alt.view(torch.uint8)
    following = stage + leave
    # the alternative's next stage where the household holds one, else the run's: f + has × (a - f), in
    # uint8 (wrapping, so exact)
    alt_next = torch.add(alt, leave_alt).sub_(following).mul_(has).add_(following)
    candidate = (susceptible & (leave ^ 1)).view(torch.bool)
    # the moves as 0/1 bytes and their differences as -1/0/1 bytes: a quarter of float32's memory, and
    # the int8 differences are what _Scaled keeps
    moved = susceptible & leave
    d_moved = (susceptible_alt & leave_alt & has).view(torch.int8).sub_(moved.view(torch.int8))
    onset = byte_flags(torch.eq, stage, P2) & leave
    d_onset = (byte_flags(torch.eq, alt, P2) & leave_alt & has).view(torch.int8).sub_(onset.view(torch.int8))
    differs_next = byte_flags(torch.ne, alt_next, following)
    pending = differs_next & (in_codes(alt_next, E1, I2) | in_codes(following, E1, I2))  # in course
    flags = pending.to(torch.float32).mul_(PENDING).add_(differs_next)  # integers: exact in float32
    flags = torch.zeros(nh, dtype=torch.float32, device=stage.device).scatter_add_(0, household, flags)
    return following, alt_next, candidate, moved, d_moved, onset, d_onset, flags


def _at(per_agent: torch.Tensor, who: torch.Tensor | None) -> torch.Tensor:
    """The entries of an (N, ...) per-agent tensor at the agents ``who`` (M,), or all of them (None)."""
    return per_agent if who is None else per_agent.index_select(0, who)


def _keep(
    isolating: torch.Tensor, share: float, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per agent, the share of its contacts an agent keeps, ``1 - share * iso``, from the bool (inference)
    or float (differentiable) isolation decisions; into ``out`` if given."""
    if isolating.dtype == torch.bool:  # as bytes: bool to float converts some 4x slower on the CPU
        isolating = isolating.view(torch.uint8)
    if out is None:  # 1 - share * iso, with one fresh tensor
        return isolating.to(dtype).mul(-share).add_(1.0)
    return out.copy_(isolating).mul_(-share).add_(1.0)  # the same numbers, in place


def _real_cases(path: str | None = None) -> pd.DataFrame:
    frame = nyc.cases_by_day(None if path is None else Path(path)).copy()
    frame["borough"] = frame["borough"].map(nyc.BOROUGH_NAMES)
    return frame


def weekly(series: torch.Tensor, days: int = 7) -> torch.Tensor:
    """Sum a (T, ...) daily series over consecutive weeks: (T // days, ...); a trailing part week is dropped."""
    return period_sums(series, days)
