"""What fusing one part of the differentiable COVID day buys: ``alternative_moves`` eagerly against a C++ loop.

The ``pruned`` estimator's day is some 120 tensor operations over the agents, none of them above about
2.5 ms at 1 M agents (when this script was written it ran at about 8 M agent-steps/s with gradients on 2
cores; target 10 M). This script measures what a fused kernel would save on the one part of the day that carries no gradient,
:func:`lpm.scenarios.covid.alternative_moves` (each agent's move in the run and in its household's
alternative, the candidates, the moves' differences and the per-household flags): the inputs are
recorded from a real ``pruned`` run (``--agents``, ``--days`` from 2020-03-01, the last day's call), then
the eager function (the peer, lpm's own code) and a C++ loop over the agents (OpenMP, built here with
``torch.utils.cpp_extension.load_inline``; it needs a C++ compiler) compute the same outputs, checked
equal (values and dtypes), and each is timed (best of ``--repeats`` means of 20 calls).

    python benchmarks/fused_core.py [--agents 1000000] [--days 28] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import lpm.scenarios.covid as covid
from lpm.engine import Simulation
from lpm.policy import HeuristicPolicy
from lpm.population import Population
from lpm.scenarios import make_scenario

SOURCE = r"""
#include <torch/extension.h>

std::vector<torch::Tensor> moves(torch::Tensor stage, torch::Tensor alt, torch::Tensor u,
                                 torch::Tensor chain, torch::Tensor p_run, torch::Tensor p_alt,
                                 torch::Tensor has_alt, torch::Tensor household, int64_t nh,
                                 int64_t p2, int64_t e1, int64_t i2, double pending) {
  const int64_t n = stage.size(0);
  auto f32 = torch::dtype(torch::kFloat32);
  auto following = torch::empty_like(stage), alt_next = torch::empty_like(alt);
  auto candidate = torch::empty({n}, torch::dtype(torch::kBool));
  auto u8 = torch::dtype(torch::kUInt8), i8 = torch::dtype(torch::kInt8);
  auto moved = torch::empty({n}, u8), d_moved = torch::empty({n}, i8);
  auto onset = torch::empty({n}, u8), d_onset = torch::empty({n}, i8);
  auto flags = torch::zeros({nh}, f32);
  const uint8_t *s = stage.data_ptr<uint8_t>(), *a = alt.data_ptr<uint8_t>();
  const float *uu = u.data_ptr<float>(), *ch = chain.data_ptr<float>();
  const float *pr = p_run.data_ptr<float>(), *pa = p_alt.data_ptr<float>();
  const bool *ha = has_alt.data_ptr<bool>();
  const int32_t *hh = household.data_ptr<int32_t>();
  uint8_t *fo = following.data_ptr<uint8_t>(), *an = alt_next.data_ptr<uint8_t>();
  bool *ca = candidate.data_ptr<bool>();
  uint8_t *mo = moved.data_ptr<uint8_t>(), *on = onset.data_ptr<uint8_t>();
  int8_t *dm = d_moved.data_ptr<int8_t>(), *dn = d_onset.data_ptr<int8_t>();
  float *fl = flags.data_ptr<float>();
  const float pend = (float)pending;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t si = s[i], ai = a[i];
    const float ui = uu[i];
    const bool sus = si == 0, sus_a = ai == 0, h = ha[i];
    const bool leave = (ui < ch[si]) || (sus && ui < pr[i]);
    const bool leave_a = (ui < ch[ai]) || (sus_a && ui < pa[i]);
    fo[i] = (uint8_t)(si + leave);
    an[i] = h ? (uint8_t)(ai + leave_a) : fo[i];
    ca[i] = sus && !leave;
    mo[i] = sus && leave;
    dm[i] = (int8_t)(sus_a && leave_a && h) - (int8_t)mo[i];
    on[i] = si == p2 && leave;
    dn[i] = (int8_t)(ai == p2 && leave_a && h) - (int8_t)on[i];
  }
  for (int64_t i = 0; i < n; ++i) {  // per household, in agent order (index_add's order)
    const uint8_t f = fo[i], x = an[i];
    const bool differs = x != f;
    const bool course = (x >= e1 && x <= i2) || (f >= e1 && f <= i2);
    fl[hh[i]] += (differs ? 1.f : 0.f) + ((differs && course) ? pend : 0.f);
  }
  return {following, alt_next, candidate, moved, d_moved, onset, d_onset, flags};
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "lpm_fused_core",
        cpp_sources=SOURCE,
        functions=["moves"],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
    )


def recorded_inputs(agents: int, days: int) -> tuple:
    """The arguments of the last ``alternative_moves`` call of a ``pruned`` run of ``days`` days."""
    seen: list[tuple] = []
    eager = covid.alternative_moves

    def record(*args, **kwargs):
        seen[:] = [(args, kwargs)]
        return eager(*args, **kwargs)

    covid.alternative_moves = record
    try:
        pop = Population.synthesize("nyc", agents=agents, seed=7)
        scenario = make_scenario("covid", start="2020-03-01")
        sim = Simulation(scenario, pop, HeuristicPolicy(), seed=1, differentiable=True, estimator="pruned")
        with torch.no_grad():
            sim.run(days)
    finally:
        covid.alternative_moves = eager
    return seen[0]


def timed(f, repeats: int, calls: int = 20) -> float:
    """Seconds per call: the best of ``repeats`` means of ``calls`` calls."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1_000_000, help="agents of the run (default 1,000,000)")
    ap.add_argument("--days", type=int, default=28, help="days from 2020-03-01 before the call (default 28)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    args = ap.parse_args()
    (stage, alt, u, chain, p_run, p_alt, has_alt, household, nh, codes), _ = recorded_inputs(
        args.agents, args.days
    )
    t0 = time.perf_counter()
    module = build()
    compile_s = time.perf_counter() - t0

    household32 = household.int()  # the C++ loop reads int32 ids

    def eager():
        return covid.alternative_moves(stage, alt, u, chain, p_run, p_alt, has_alt, household, nh, codes)

    def fused():
        return module.moves(
            stage,
            alt,
            u,
            chain,
            p_run,
            p_alt,
            has_alt,
            household32,
            nh,
            covid.P2,
            covid.E1,
            covid.I2,
            covid.PENDING,
        )

    equal = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(eager(), fused(), strict=True))
    eager_s, fused_s = timed(eager, args.repeats), timed(fused, args.repeats)
    print(
        f"alternative_moves, {len(stage):,} agents (day {args.days} from 2020-03-01): eager {eager_s * 1e3:.2f} "
        f"ms, fused C++ {fused_s * 1e3:.2f} ms ({eager_s / fused_s:.1f}x; outputs equal: {equal}; "
        f"built in {compile_s:.0f} s)"
    )
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                "agents": len(stage),
                "day": args.days,
                "eager_ms": round(eager_s * 1e3, 3),
                "fused_ms": round(fused_s * 1e3, 3),
                "ratio": eager_s / fused_s,
                "equal": equal,
                "build_seconds": round(compile_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
