"""The tensor engine: runs a scenario's agents step by step under a policy.

The order of one step, the only place it is written down (:meth:`Simulation.step`):

1. **observe** — the scenario reads this step's context from the state (cases, trend, rates, date).
2. **group** — agents' archetype ids, computed once at construction (``spec.group`` / ``policy.setup``).
3. **decide** — at the spec's cadence only: the policy answers (K, A) action probabilities; per-archetype
   alignment offsets (K, A), zero by default, are added to their logs.
4. **broadcast** — ``probs[group_ids]``: each agent gets its archetype's row (non-members get none).
5. **sample** — each agent draws its own action from counter-based uniforms (:mod:`lpm.sampling`);
   hard in inference mode, straight-through in differentiable mode. The action holds until the next
   decision step.
6. **transition** — the scenario moves every agent's state with O(N) tensor ops.
7. **record** — the scenario's per-borough quantities of the step are kept; the frames are built at the end.

Two modes. *Inference* (default): ``torch.no_grad``, state in the smallest dtypes, work buffers reused.
*Differentiable*: state in float one-hot form, sampling straight-through, so a loss of the recorded series
has gradients with respect to the scenario's parameters and the alignment offsets (``Simulation.params``).

A run with ``out_dir`` writes ``checkpoint.pt`` atomically after every completed step (state, records,
decisions, counters, timing; no generator state exists to save), and ``run(resume=True)`` continues from
it; the resumed result equals the uninterrupted one bit for bit (inference mode; differentiable runs
are not checkpointed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lpm.archetype import ArchetypeSpec
from lpm.errors import InputError
from lpm.policy import COUNTERS, Policy
from lpm.population import Population
from lpm.sampling import UniformStream, bernoulli_st, categorical_st
from lpm.scenarios import Scenario

__all__ = ["RunResult", "Simulation", "chose"]

#: Random streams the engine uses (a scenario uses streams >= 16).
STREAM_DECIDE = 0
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def chose(action: torch.Tensor, a: int) -> torch.Tensor:
    """Whether each agent took action ``a``: bool (N,) in inference mode, float (N,) with gradient in
    differentiable mode (where ``action`` is an (N, A) straight-through one-hot)."""
    return action[:, a] if action.dim() == 2 else action == a


@dataclass
class RunResult:
    """What a run produced.

    trajectory: tidy frame ``step, date, borough, quantity, value`` (one row per step × borough × quantity).
    decisions: tidy frame ``step, date, archetype, <attributes…>, action, probability, mode, cached``.
    real: the matching real series for plots (``date, borough, quantity, value``), scaled to the population.
    archetypes: the K archetypes (attribute labels and agents).
    series: quantity -> (T, B) tensor of the recorded values (with gradients in differentiable mode).
    counters: llm_queries, cache_hits, prompt_tokens, completion_tokens, tokens, fallbacks.
    step_seconds: wall time inside simulation steps (decisions included); decide_seconds: inside the policy.
    """

    trajectory: pd.DataFrame
    decisions: pd.DataFrame
    real: pd.DataFrame
    archetypes: pd.DataFrame
    series: dict[str, torch.Tensor]
    counters: dict[str, int]
    step_seconds: float
    decide_seconds: float
    steps: int
    agents: int
    resumed_from: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


class Simulation:
    """A scenario on a population under a policy.

    >>> sim = Simulation(CovidScenario(), pop, HeuristicPolicy(), seed=1)
    >>> result = sim.run(60, out_dir="runs/x", resume=True)

    scenario: a :class:`lpm.scenarios.Scenario`; pop: the agents; policy: a :class:`lpm.policy.Policy`.
    seed: base of every random draw. device: ``"cpu"`` or ``"cuda"``. differentiable: straight-through
    sampling and float state, gradients w.r.t. ``params``. offsets: (K, A) alignment offsets added to
    log-probabilities (zeros by default). spec: the archetype spec (default: the scenario's).
    callback: ``f(step, sim)`` after each completed (and checkpointed) step.
    """

    def __init__(
        self,
        scenario: Scenario,
        pop: Population,
        policy: Policy,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        differentiable: bool = False,
        offsets: torch.Tensor | None = None,
        spec: ArchetypeSpec | str | None = None,
        callback: Callable[[int, Simulation], None] | None = None,
    ):
        if not isinstance(scenario, Scenario):
            raise TypeError(f"scenario must be an lpm.scenarios.Scenario, got {type(scenario).__name__}")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an lpm.policy.Policy, got {type(policy).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(
                "device 'cuda' was asked for, but torch sees no CUDA GPU", hint="use device='cpu'"
            )
        self.scenario, self.policy = scenario, policy
        self.seed, self.differentiable, self.callback = int(seed), bool(differentiable), callback
        missing = [c for c in scenario.needs if c not in pop]
        if missing:
            raise InputError(
                f"the {scenario.name} scenario needs population attribute(s) {missing}; the population has "
                f"{', '.join(pop.columns)}",
                hint="synthesize one with Population.synthesize('nyc') or add the columns",
            )
        self.pop = pop.to(self.device)
        self.n = len(pop)
        spec = spec if spec is not None else scenario.spec_name
        self.spec = spec if isinstance(spec, ArchetypeSpec) else ArchetypeSpec.load(spec)
        # 2. group: once per run
        grouping = policy.setup(self.spec, self.pop, self.spec.group(self.pop))
        self.grouping = grouping
        self.k, self.a = grouping.k, len(self.spec.actions)
        if tuple(self.spec.actions) != tuple(scenario.actions):
            raise InputError(
                f"{self.spec.where}: field 'actions': the {scenario.name} scenario reads the actions "
                f"{list(scenario.actions)}, the spec has {self.spec.actions}"
            )
        ids = grouping.ids.to(self.device)
        self.member = ids >= 0
        self.gid = torch.where(
            self.member, ids.to(torch.int32), torch.full_like(ids, self.k, dtype=torch.int32)
        )
        self.all_members = bool(self.member.all())
        self.decide_every = scenario.steps_per(self.spec.cadence.value)
        self.uniforms = UniformStream(self.n, self.device)
        scenario.setup(self.pop, device=self.device, differentiable=self.differentiable)
        if offsets is None:
            offsets = torch.zeros(self.k, self.a)
        offsets = torch.as_tensor(offsets, dtype=torch.float32, device=self.device)
        if tuple(offsets.shape) != (self.k, self.a):
            raise InputError(
                f"offsets must have shape (K, A) = ({self.k}, {self.a}), got {tuple(offsets.shape)}"
            )
        self.params: dict[str, torch.Tensor] = {"offsets": offsets, **scenario.parameters(self.device)}
        if self.differentiable:
            for value in self.params.values():
                value.requires_grad_(True)
        self._reset()

    # -- bookkeeping --------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._records: list[torch.Tensor] = []
        self._decisions: list[dict[str, Any]] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.step_seconds = 0.0
        self.decide_seconds = 0.0

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed."""
        return {
            "scenario": self.scenario.name,
            "config": self.scenario.config(),
            "spec": self.spec.name,
            "policy": self.policy.mode,
            "agents": self.n,
            "seed": self.seed,
            "offsets": self.params["offsets"].detach().cpu().tolist(),
        }

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The scenario's state at step 0 plus the agents' current actions (-1: none yet)."""
        state = self.scenario.init_state(self.seed, self.uniforms)
        if self.differentiable:
            state["action"] = torch.zeros(self.n, self.a, device=self.device)
        else:
            state["action"] = torch.full((self.n,), -1, dtype=torch.int8, device=self.device)
        return state

    # -- one step ---------------------------------------------------------------------------------
    def step(self, state: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        """Advance ``state`` from step ``t`` to ``t + 1``; the phases in the order of the module docstring."""
        params = self.params
        # 1. observe
        context = self.scenario.observe(state, t)
        # 2. group: self.gid, computed at construction
        # 3. decide (at the spec's cadence)
        if t % self.decide_every == 0:
            t0 = time.perf_counter()
            decision = self.policy.decide(context, step=t)
            self.decide_seconds += time.perf_counter() - t0
            probs = decision.probs.to(self.device, torch.float32)
            if tuple(probs.shape) != (self.k, self.a):
                raise ValueError(
                    f"policy returned probs of shape {tuple(probs.shape)}, expected ({self.k}, {self.a})"
                )
            offsets = params["offsets"]
            if offsets.requires_grad or bool(offsets.any()):
                probs = torch.softmax(torch.log(probs.clamp_min(1e-9)) + offsets, dim=1)
            for name, value in decision.counters().items():
                self.counters[name] += value
            date = str(self.scenario.date(t).date())
            for rec in decision.records:
                self._decisions.append({"step": t, "date": date, **rec})
            # 4. broadcast and 5. sample
            state = {**state, "action": self._sample(probs, t)}
        # 6. transition
        state, record = self.scenario.transition(
            state, params, t, lambda s: self.uniforms.draw(self.seed, t, s)
        )
        # 7. record
        self._records.append(record)
        return state

    def _sample(self, probs: torch.Tensor, t: int) -> torch.Tensor:
        """Each agent's action: int8 (N,) index (-1 for non-members), or an (N, A) straight-through one-hot."""
        table = torch.cat([probs, torch.zeros(1, self.a, device=self.device)])  # row K: non-members
        if not self.differentiable:
            u = self.uniforms.draw(self.seed, t, STREAM_DECIDE)
            cdf = torch.cumsum(table, dim=1)
            action = torch.zeros(self.n, dtype=torch.int8, device=self.device)
            for a in range(self.a - 1):  # inverse CDF: one uniform per agent
                action += u >= cdf[:, a].index_select(0, self.gid)
            if not self.all_members:
                action.masked_fill_(~self.member, -1)
            return action
        gid = self.gid.long()
        if self.a == 2:  # the same draw as inference mode
            u = self.uniforms.draw(self.seed, t, STREAM_DECIDE)
            x0 = bernoulli_st(table[gid, 0], u)
            onehot = torch.stack([x0, 1.0 - x0], dim=1)
        else:
            u = torch.stack(
                [self.uniforms.draw(self.seed, t, STREAM_DECIDE + 1 + a).clone() for a in range(self.a)], 1
            )
            onehot = categorical_st(torch.log(table[gid].clamp_min(1e-9)), u)
        return onehot * self.member.unsqueeze(1).to(onehot.dtype)

    # -- a run ------------------------------------------------------------------------------------
    def run(self, steps: int, *, out_dir: str | Path | None = None, resume: bool = False) -> RunResult:
        """Simulate ``steps`` steps from the start (or from ``out_dir``'s checkpoint with ``resume``)."""
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
        self._reset()
        start, state = 0, None
        if resume and path is not None and path.is_file():
            start, state = self._load(path, steps)
        if state is None:
            state = self.initial_state()
        with torch.set_grad_enabled(self.differentiable):
            for t in range(start, steps):
                t0 = time.perf_counter()
                state = self.step(state, t)
                self.step_seconds += time.perf_counter() - t0
                if path is not None and not self.differentiable:
                    self._save(path, state, t + 1)
                if self.callback is not None:
                    self.callback(t, self)
        return self._result(state, steps, start)

    def _save(self, path: Path, state: dict[str, torch.Tensor], done: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint(),
            "done": done,
            "state": {k: v.detach().cpu() for k, v in state.items()},
            "records": [r.detach().cpu() for r in self._records],
            "decisions": self._decisions,
            "counters": self.counters,
            "step_seconds": self.step_seconds,
            "decide_seconds": self.decide_seconds,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)

    def _load(self, path: Path, steps: int) -> tuple[int, dict[str, torch.Tensor]]:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise InputError(
                f"{path}: unreadable checkpoint ({exc})", hint="delete it to start over"
            ) from None
        if blob.get("version") != CHECKPOINT_VERSION:
            raise InputError(
                f"{path}: field 'version' is {blob.get('version')!r}; this lpm reads {CHECKPOINT_VERSION}"
            )
        mine = self.fingerprint()
        theirs = blob.get("fingerprint", {})
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise InputError(
                f"{path}: the checkpoint belongs to a different run (field(s) {', '.join(diff)} differ)",
                hint="resume with the same scenario, parameters, population, seed and policy, or use a new folder",
            )
        done = int(blob["done"])
        if done > steps:
            raise InputError(f"{path}: the checkpoint has {done} steps done, more than the {steps} asked for")
        self._records = [r.to(self.device) for r in blob["records"]]
        self._decisions = list(blob["decisions"])
        self.counters = dict(blob["counters"])
        self.step_seconds = float(blob["step_seconds"])
        self.decide_seconds = float(blob["decide_seconds"])
        return done, {k: v.to(self.device) for k, v in blob["state"].items()}

    def _result(self, state: dict[str, torch.Tensor], steps: int, start: int) -> RunResult:
        stacked = torch.stack(self._records)  # (T, B, Q)
        quantities = self.scenario.quantities
        series = {q: stacked[:, :, i] for i, q in enumerate(quantities)}
        dates = [self.scenario.date(t) for t in range(steps)]
        boroughs = self.pop.labels("borough")
        values = stacked.detach().cpu().double().numpy()
        t_, b_, q_ = values.shape
        idx = pd.MultiIndex.from_product([range(t_), range(b_), range(q_)], names=["step", "b", "q"])
        traj = pd.DataFrame({"value": values.reshape(-1)}, index=idx).reset_index()
        traj.insert(1, "date", pd.to_datetime([dates[s] for s in traj["step"]]))
        traj["borough"] = pd.Categorical.from_codes(traj.pop("b"), categories=boroughs)
        traj["quantity"] = pd.Categorical.from_codes(traj.pop("q"), categories=list(quantities))
        traj = traj[["step", "date", "borough", "quantity", "value"]]
        counters = dict(self.counters)
        counters["tokens"] = counters["prompt_tokens"] + counters["completion_tokens"]
        return RunResult(
            trajectory=traj,
            decisions=self._decision_frame(),
            real=self.scenario.real_data(dates[0], dates[-1]),
            archetypes=self.grouping.table.copy(),
            series=series,
            counters=counters,
            step_seconds=self.step_seconds,
            decide_seconds=self.decide_seconds,
            steps=steps,
            agents=self.n,
            resumed_from=start,
            state=state,
        )

    def _decision_frame(self) -> pd.DataFrame:
        cols = [
            "step",
            "date",
            "archetype",
            *self.spec.attribute_names,
            "action",
            "probability",
            "mode",
            "cached",
        ]
        if not self._decisions:
            return pd.DataFrame(columns=cols)
        wide = pd.DataFrame(self._decisions)
        attrs = self.grouping.table.drop(columns="agents")
        wide = wide.join(attrs, on="archetype")
        keys = [c for c in wide.columns if not c.startswith("p_")]
        long = wide.melt(
            id_vars=keys,
            value_vars=[f"p_{a}" for a in self.spec.actions],
            var_name="action",
            value_name="probability",
        )
        long["action"] = long["action"].str.removeprefix("p_")
        long["date"] = pd.to_datetime(long["date"])
        order = [c for c in cols if c in long.columns] + [c for c in long.columns if c not in cols]
        return long[order].sort_values(["step", "archetype", "action"], kind="stable").reset_index(drop=True)
