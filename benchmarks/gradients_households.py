"""Why linearised COVID gradients drift after 3-4 weeks, and what the "households" estimator does about it:
the estimators on households alone.

A closed test bed, not the COVID scenario: ``--households`` households of ``n`` members, one infectious
index case each (pre-symptomatic), the COVID model's stage chain and household transmission
(``beta`` per infectious housemate per day), nothing else. For each estimator it prints, per week, the
gradient of the week's new infections with respect to ``beta`` over central finite differences of the
inference run (±5 %, common random numbers, averaged over the seeds). The true derivative dies out with
the household outbreaks (every household is done within about three weeks); the linearised estimators'
("expected", "mean-field") does not: in the backward pass, housemates who escaped infection keep
"infecting" each other (B → C → B), a loop the real outbreak cannot take since C's infection in the
perturbed run already needed B's. With ``n - 1`` housemates each passing on a share
``q = 1 - exp(-beta × 5.8 days)``, the loop gain is about ``(n - 1) q``: above 1 the backward pass grows
without bound. "households" carries each consecutive household hop in its own copy of the states and
weights hop ``g`` by what the real outbreak can take (:func:`lpm.scenarios.covid.household_path_factors`),
as the COVID step does.

    .venv/bin/python benchmarks/gradients_households.py [--sizes 2 4 6] [--beta 0.048] [--seeds 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from lpm.gradcheck import GradCheck
from lpm.sampling import prune, sampler_class
from lpm.scenarios.covid import P1, CovidConfig, S, chain_hazard, household_attack, household_path_factors

WEEKS = 5


def weekly_infections(beta, n: int, households: int, seed: int, estimator: str | None) -> torch.Tensor:
    """(WEEKS,) new infections per week; differentiable in ``beta`` when ``estimator`` is given."""
    if estimator == "pruned":
        return _pruned(beta, n, households, seed)
    agents, household, codes, hazard, infectious = _bed(n, households)
    k = hazard.shape[0]
    sampler = sampler_class(estimator is not None, estimator or "expected")(agents, seed=seed)
    states = sampler.states(codes, k)
    everyone = torch.zeros(agents, dtype=torch.long)
    daily = []
    generations = sampler.household_generations if estimator else 0
    copies = [states.detach()] * generations  # "households": one copy per household hop
    q, ell = household_attack(CovidConfig(asymptomatic=0.0), float(torch.as_tensor(beta).detach()))
    factors = household_path_factors(q, ell, n - 1, generations).to(torch.float32)
    for t in range(7 * WEEKS):
        sampler.at(t)
        x = sampler.value(states, infectious)
        house = torch.zeros(households, dtype=x.dtype).index_add(0, household, x)
        home = house.index_select(0, household) - x
        p = -torch.expm1(-beta * (home if not generations else home.detach()))
        following, moves = sampler.transition(states, p, hazard, 16)
        new = moves.out(S)
        if generations:  # as CovidScenario._household_paths, on households alone
            susceptible = states.detach()[:, S]
            left = torch.zeros(households).index_add(0, household, susceptible)
            housemates = (left.index_select(0, household) - susceptible).round().long()
            reach = (1.0 - p.detach()) * float(torch.as_tensor(beta).detach())
            senders, nxt = [x, *(sampler.value(c, infectious) for c in copies)], []
            for g, copy in enumerate(copies, start=1):
                sent = (senders[g - 1] - x.detach()) * factors[housemates, g]
                pressure = torch.zeros(households).index_add(0, household, sent)
                p_g = p.detach() + reach * (pressure.index_select(0, household) - sent)
                following_g, moves_g = sampler.follow(copy, p_g, hazard, moves, following)
                nxt.append(following_g)
                out = moves_g.out(S)
                new = new + (out - out.detach())
            copies = nxt
        states = following
        daily.append(sampler.count(everyone, 1, new).sum())
    return torch.stack(daily).reshape(WEEKS, 7).sum(1)


def _bed(n: int, households: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test bed: agents, each one's household, stage codes (one pre-symptomatic index case per
    household), the stage chain's hazards and each stage's infectiousness."""
    agents = households * n
    household = torch.arange(households).repeat_interleave(n)
    codes = torch.zeros(agents, dtype=torch.uint8)
    codes[::n] = P1
    hazard = chain_hazard(CovidConfig()).to(torch.float32)
    infectious = torch.zeros(hazard.shape[0])
    infectious[P1 : hazard.shape[0] - 1] = 1.0
    return agents, household, codes, hazard, infectious


def _pruned(beta, n: int, households: int, seed: int) -> torch.Tensor:
    """:func:`weekly_infections` with the "pruned" estimator: the hard run, one alternative per household."""
    agents, household, codes, hazard, infectious = _bed(n, households)
    k = hazard.shape[0]
    sampler = sampler_class(True, "pruned")(agents, seed=seed)
    alt = codes.clone()
    weight = torch.zeros(households)
    rate = torch.zeros(households, dtype=torch.float64)
    chain = hazard.clone()
    daily = []
    for t in range(7 * WEEKS):
        sampler.at(t)
        x, x_alt = infectious[codes.long()], infectious[alt.long()]
        home = torch.zeros(households).index_add(0, household, x).index_select(0, household) - x
        home_alt = torch.zeros(households).index_add(0, household, x_alt).index_select(0, household) - x_alt
        p = -torch.expm1(-beta * home)
        p_alt = -torch.expm1(-float(torch.as_tensor(beta).detach()) * home_alt)
        u = sampler.uniform(16).clone()
        leave = u < torch.where(codes == S, p.detach(), chain[codes.long()])
        leave_alt = u < torch.where(alt == S, p_alt, chain[alt.long()])
        new, new_alt = (codes == S) & leave, (alt == S) & leave_alt
        codes_next = (codes + leave).clamp_max(k - 1).to(torch.uint8)
        alt_next = (alt + leave_alt).clamp_max(k - 1).to(torch.uint8)
        candidate = (codes == S) & ~leave
        w = torch.where(candidate, (p - p.detach()) / (1.0 - p.detach()), 0.0)
        # today's infections: the run's, each candidate's (+1), each alternative's difference
        diff = (new_alt.float() - new.float()) * weight.index_select(0, household)
        daily.append(new.float().sum() + w.sum() + diff.sum())
        same = torch.zeros(households).index_add(0, household, (alt_next != codes_next).float()) == 0
        weight = torch.where(same, torch.zeros_like(weight), weight)
        rate = torch.where(same, torch.zeros_like(rate), rate)
        cand_rate = torch.where(candidate, -torch.log1p(-p.detach()), 0.0)
        u_h = sampler.uniform(19)[:households].clone()
        weight, rate, winner, replaced = prune(
            weight, rate, household, w, cand_rate, sampler.uniform(20), u_h
        )
        fresh = torch.where(winner, torch.tensor(1, dtype=torch.uint8), codes_next)
        alt = torch.where(replaced.index_select(0, household), fresh, alt_next)
        codes = codes_next
    return torch.stack(daily).reshape(WEEKS, 7).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--beta", type=float, default=0.048)
    ap.add_argument("--households", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--estimators", nargs="+", default=["pruned", "households", "expected", "mean-field"])
    args = ap.parse_args()
    figures = {"beta": args.beta, "households": args.households, "seeds": args.seeds, "results": []}
    h = 0.05 * args.beta
    for n in args.sizes:
        fd = []
        for seed in args.seeds:
            with torch.no_grad():
                plus = weekly_infections(args.beta + h, n, args.households, seed, None)
                minus = weekly_infections(args.beta - h, n, args.households, seed, None)
            fd.append(((plus - minus) / (2 * h)).double().numpy())
        fd, fd_sd = np.mean(fd, 0), np.std(fd, 0)
        for estimator in args.estimators:
            grads = []
            for seed in args.seeds:
                beta = torch.tensor(args.beta, requires_grad=True)
                weekly = weekly_infections(beta, n, args.households, seed, estimator)
                grads.append(
                    [float(torch.autograd.grad(weekly[w], beta, retain_graph=True)[0]) for w in range(WEEKS)]
                )
            ratio = GradCheck("beta", estimator, np.mean(grads, 0), fd, np.std(grads, 0), fd_sd).ratio
            print(
                f"households of {n}, {estimator:>10}: gradient / finite difference per week "
                + " ".join(f"{r:7.2f}" for r in ratio)
                + "   (finite difference per week: "
                + " ".join(f"{f:9.0f}" for f in fd)
                + ")",
                flush=True,
            )
            figures["results"].append(
                {
                    "size": n,
                    "estimator": estimator,
                    "ratio": [round(float(r), 3) for r in ratio],
                    "fd": fd.round(1).tolist(),
                }
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
