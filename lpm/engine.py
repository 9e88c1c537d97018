"""The tensor engine: runs a scenario's agents step by step under a policy.

The order of one step, the only place it is written down (:meth:`Simulation.step`):

1. **observe** — at a step where some decision is due, the scenario reads the context of its prompts
   from the state (cases, trend, rates, date).
2. **group** — agents' archetype ids per decision, computed once at construction (``spec.group`` /
   ``policy.setup``).
3. **decide** — for each decision due at this step (its spec's cadence): the policy answers (K, A) action
   probabilities from the context variables the spec declares (rendered prompts → response cache → model,
   or rules); per-archetype alignment offsets (K, A), zero by default, are added to their logs.
4. **broadcast** — ``probs[group_ids]``: each agent gets its archetype's row (non-members get none).
5. **sample** — each agent draws its own action from counter-based uniforms (stream ``i`` for decision
   ``i``); the action holds until that decision's next step.
6. **transition** — the scenario moves every agent's state with O(N) tensor ops (:meth:`Scenario.step`).
7. **record** — the step's named records are checked against the declared quantities and kept; the frames
   are built at the end.

Two modes, one code path: the scenario's step calls only the operations of a sampler
(:mod:`lpm.sampling`). *Inference* (default): :class:`~lpm.sampling.HardSampler` under ``torch.no_grad``,
states in the smallest dtypes. *Differentiable*: float one-hot states and actions, so a loss of the recorded series has
gradients with respect to ``Simulation.params`` (the scenario's learnable parameters and each decision's
alignment offsets), by one of the estimators of :data:`lpm.sampling.ESTIMATORS`: ``"pruned"`` (default
``"auto"`` picks it for a step written for it, the COVID step's: the run stays hard and each household carries
one alternative run whose weighted difference is the derivative), ``"households"`` (``"expected"``, with
household transmission carried by generation so that the backward pass follows the
paths a household outbreak can take), ``"expected"`` (the forward values equal inference mode's for the
same seed; the backward pass is the Jacobian of each step's expected transition), ``"bernoulli"``
(per-agent straight-through, biased low over weeks, kept for comparison) or ``"mean-field"``
(deterministic expected occupancies).

A simulation owns everything a run changes or precomputes: the scenario's *world* (``scenario.setup``),
each decision's :class:`~lpm.policy.Archetypes` (``policy.setup``), the sampler and the records; scenario
and policy objects are immutable configuration that many simulations may share.

A run with ``out_dir`` checkpoints after every completed step: it appends that step's records and
decisions to ``checkpoint-steps.jsonl`` (one JSON line per step) and atomically rewrites ``checkpoint.pt``
(state, counters, timing, and how many bytes of the journal belong to it; no generator state exists to
save), so a step costs the same to checkpoint at any point of a long run. ``run(resume=True)`` continues
from it; the resumed result equals the uninterrupted one bit for bit (inference mode; differentiable runs
are not checkpointed).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle  # only for its error type: checkpoints load with weights_only=True
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lpm.archetype import ArchetypeSpec
from lpm.errors import InputError
from lpm.policy import COUNTERS, Archetypes, Policy
from lpm.population import Population
from lpm.sampling import DEFAULT_ESTIMATOR, ESTIMATORS, Sampler, choose_estimator, sampler_class
from lpm.scenarios import Scenario
from lpm.scenarios.base import check_cadence, load_spec

__all__ = ["RunResult", "SimState", "Simulation"]

CHECKPOINT = "checkpoint.pt"
#: Journal of a checkpointed run: one JSON line per completed step (its records and decisions).
JOURNAL = "checkpoint-steps.jsonl"
CHECKPOINT_VERSION = 3


@dataclass
class SimState:
    """The state of a run between two steps: the scenario's named tensors and each decision's actions
    (int8 (N,) indices, -1 for non-members, in inference mode; float (N, A) one-hot rows in differentiable
    mode)."""

    scenario: dict[str, torch.Tensor]
    actions: dict[str, torch.Tensor]


@dataclass
class RunResult:
    """What a run produced.

    trajectory: tidy frame ``step, date, <breakdown attributes>, quantity, value`` (one row per step ×
    quantity × label of its breakdown; categorical columns keep their labels).
    decisions: tidy frame ``step, date, decision, archetype, <attributes…>, action, probability, mode,
    scoring, coverage, cached`` (scoring: how the probabilities were read, :data:`lpm.logprobs.SCORINGS` or
    ``rule``; coverage: first-token mass on action tokens before renormalising, NaN where none was read).
    real: the matching real series for plots (``date, <breakdown>, quantity, value``), on the population's scale.
    archetypes: decision -> its K archetypes (attribute labels and agents).
    series: quantity -> (T, labels) or (T,) tensor of the recorded values (with gradients in
    differentiable mode).
    counters: llm_queries, cache_hits, prompt_tokens, completion_tokens, tokens, fallbacks (the run's);
    decision_counters: the same per decision.
    step_seconds: wall time inside simulation steps (decisions included); decide_seconds: inside policies
    (both summed over every part of a resumed run); resumed_from: the step this part began at;
    prior_wall_seconds: wall time of the parts before it; comm_seconds: time inside all-reduce and
    broadcast in this part (a sharded run's rank 0, :mod:`lpm.distributed`; 0 in one process).
    """

    trajectory: pd.DataFrame
    decisions: pd.DataFrame
    real: pd.DataFrame
    archetypes: dict[str, pd.DataFrame]
    series: dict[str, torch.Tensor]
    counters: dict[str, int]
    decision_counters: dict[str, dict[str, int]]
    step_seconds: float
    decide_seconds: float
    steps: int
    agents: int
    resumed_from: int = 0
    prior_wall_seconds: float = 0.0
    comm_seconds: float = 0.0
    state: SimState | None = field(default=None, repr=False)


@dataclass
class _Asked:
    """One decision in one run: its spec, policy, archetypes and broadcast index (the engine's own)."""

    index: int  # the decision's random stream
    name: str
    spec: ArchetypeSpec
    policy: Policy
    archetypes: Archetypes
    gid: torch.Tensor  # (N,) int32 archetype of each agent; K for non-members
    member: torch.Tensor  # (N,) bool
    all_members: bool

    @property
    def k(self) -> int:
        return self.archetypes.k

    @property
    def a(self) -> int:
        return len(self.spec.actions)


class Simulation:
    """A scenario on a population under a policy.

    >>> sim = Simulation(make_scenario("covid"), pop, HeuristicPolicy(), seed=1)
    >>> result = sim.run(60, out_dir="runs/x", resume=True)

    scenario: an :class:`lpm.scenarios.Scenario`; pop: the agents; policy: a :class:`lpm.policy.Policy` for
    every decision, or a mapping decision name -> policy. seed: base of every random draw. device: ``"cpu"``
    or ``"cuda"``. differentiable: float states, gradients w.r.t. ``params``; estimator: the
    gradient estimator of differentiable mode (:data:`lpm.sampling.ESTIMATORS`).
    offsets: (K, A) alignment offsets added to log-probabilities (a tensor for a scenario with one
    decision, or a mapping decision name -> tensor; zeros by default). specs: decision name -> archetype spec
    (or its name or path) replacing the scenario's (same actions). callback: ``f(step, sim)`` after each
    completed (and checkpointed) step.

    ``params``: name -> tensor of what gradients reach: the scenario's learnable parameters and
    ``offsets.<decision>`` for each decision.
    """

    def __init__(
        self,
        scenario: Scenario,
        pop: Population,
        policy: Policy | Mapping[str, Policy],
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        differentiable: bool = False,
        estimator: str = DEFAULT_ESTIMATOR,
        offsets: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        specs: Mapping[str, ArchetypeSpec | str] | None = None,
        callback: Callable[[int, Simulation], None] | None = None,
    ):
        if not isinstance(scenario, Scenario):
            raise TypeError(f"scenario must be an lpm.scenarios.Scenario, got {type(scenario).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(
                "device 'cuda' was asked for, but torch sees no CUDA GPU", hint="use device='cpu'"
            )
        if differentiable and not scenario.differentiable:
            raise InputError(
                f"the {scenario.name} scenario runs in inference mode only ({type(scenario).where()} "
                "declares differentiable = False)",
                hint="drop differentiable=True",
            )
        self.scenario = scenario
        self.seed, self.differentiable, self.callback = int(seed), bool(differentiable), callback
        missing = [c for c in scenario.needs if c not in pop]
        if missing:
            raise InputError(
                f"the {scenario.name} scenario needs population attribute(s) {missing}; the population has "
                f"{', '.join(pop.columns)}",
                hint="synthesize one with Population.synthesize('nyc') or add the columns",
            )
        self._shapes = self._record_shapes(pop)
        self.pop = pop.to(self.device)
        self.n = len(pop)
        estimator = choose_estimator(estimator, scenario.pruned)
        self.estimator = estimator if self.differentiable else None
        if self.differentiable and getattr(ESTIMATORS[estimator], "pruned", False) and not scenario.pruned:
            raise InputError(
                f"the {estimator!r} gradient estimator needs a step written for it; the {scenario.name} "
                f"scenario's ({type(scenario).where()}) is not",
                hint="use estimator='expected'",
            )
        self.sampler: Sampler = sampler_class(self.differentiable, estimator)(
            self.n, self.device, seed=self.seed
        )
        unknown = sorted(set(specs or {}) - {d.name for d in scenario.decisions})
        if unknown:
            raise InputError(
                f"specs for unknown decision(s) {unknown}; the {scenario.name} scenario's decisions: "
                f"{', '.join(d.name for d in scenario.decisions) or 'none'}"
            )
        # 2. group: once per run, per decision
        self.asked = [
            self._ask(i, decision, policy, specs or {}) for i, decision in enumerate(scenario.decisions)
        ]
        self.world = scenario.setup(self.pop, self.device)
        self.params: dict[str, torch.Tensor] = {
            **scenario.params(self.device),
            **{f"offsets.{d.name}": self._offsets(d, offsets) for d in self.asked},
        }
        if self.differentiable:
            for value in self.params.values():
                value.requires_grad_(True)
        self.wall_origin: float | None = None  # perf_counter() at which this part began (default: run())
        self._reset()

    # -- construction ------------------------------------------------------------------------------
    def _record_shapes(self, pop: Population) -> dict[str, tuple[int, ...]]:
        """The shape of each declared quantity's record: (labels of its breakdown,) or ()."""
        shapes = {}
        for i, q in enumerate(self.scenario.quantities):
            if q.by is not None and not (q.by in pop and pop.is_categorical(q.by)):
                raise InputError(
                    f"{type(self.scenario).where()}: field 'quantities[{i}].by': {q.by!r} is not a "
                    f"categorical attribute of the population ({', '.join(pop.columns)})"
                )
            shapes[q.name] = () if q.by is None else (len(pop.labels(q.by)),)
        return shapes

    def _ask(self, index: int, decision: Any, policy: Any, specs: Mapping[str, Any]) -> _Asked:
        chosen = policy.get(decision.name) if isinstance(policy, Mapping) else policy
        if not isinstance(chosen, Policy):
            raise TypeError(
                f"policy for decision {decision.name!r} must be an lpm.policy.Policy, got {type(chosen).__name__}"
            )
        if decision.name in specs:
            where = f"specs[{decision.name!r}]"
            spec = load_spec(specs[decision.name], where=where, folder=Path.cwd())
            if tuple(spec.actions) != tuple(decision.actions):
                raise InputError(
                    f"{spec.where}: field 'actions': decision {decision.name!r} of the {self.scenario.name} "
                    f"scenario reads the actions {list(decision.actions)}, the spec has {spec.actions}"
                )
            check_cadence(type(self.scenario), decision.name, spec)
        else:
            spec = self.scenario.specs()[decision.name]
        archetypes = chosen.setup(decision, spec, self.pop, spec.group(self.pop))
        ids = archetypes.grouping.ids.to(self.device)
        member = ids >= 0
        gid = torch.where(member, ids.to(torch.int32), torch.full_like(ids, archetypes.k, dtype=torch.int32))
        return _Asked(index, decision.name, spec, chosen, archetypes, gid, member, bool(member.all()))

    def _offsets(self, d: _Asked, offsets: Any) -> torch.Tensor:
        if isinstance(offsets, Mapping):
            unknown = sorted(set(offsets) - {a.name for a in self.asked})
            if unknown:
                raise InputError(f"offsets for unknown decision(s) {unknown}; decisions: {self._names()}")
            given = offsets.get(d.name)
        elif offsets is not None and len(self.asked) > 1:
            raise InputError(
                f"the scenario has {len(self.asked)} decisions: give offsets as {{name: tensor}}"
            )
        else:
            given = offsets
        value = torch.zeros(d.k, d.a) if given is None else given
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device).clone()
        if tuple(value.shape) != (d.k, d.a):
            raise InputError(
                f"offsets of decision {d.name!r} must have shape (K, A) = ({d.k}, {d.a}), got {tuple(value.shape)}"
            )
        return value

    def _names(self) -> str:
        return ", ".join(d.name for d in self.asked) or "none"

    # -- bookkeeping --------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._records: list[dict[str, torch.Tensor]] = []
        self._decisions: list[dict[str, Any]] = []
        self.decision_counters = {d.name: dict.fromkeys(COUNTERS, 0) for d in self.asked}
        self.step_seconds = 0.0
        self.decide_seconds = 0.0
        self.prior_wall_seconds = 0.0  # wall time of the earlier parts of a resumed run
        self._journal_bytes = 0
        self.done = 0  # steps completed (and checkpointed) so far

    @property
    def counters(self) -> dict[str, int]:
        """Model requests, cache hits, tokens and fallbacks summed over the decisions."""
        return {c: sum(dc[c] for dc in self.decision_counters.values()) for c in COUNTERS}

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed."""
        return {
            "scenario": f"{type(self.scenario).__module__}.{type(self.scenario).__qualname__}",
            "config": self.scenario.config.model_dump(mode="json"),
            "specs": {d.name: d.spec.name for d in self.asked},
            "policy": {d.name: d.policy.mode for d in self.asked},
            "agents": self.n,
            "seed": self.seed,
            "offsets": {d.name: self.params[f"offsets.{d.name}"].detach().cpu().tolist() for d in self.asked},
        }

    def initial_state(self) -> SimState:
        """The scenario's state at step 0, and every decision's actions (-1 or zero rows: none yet)."""
        if "params" in inspect.signature(self.scenario.init_state).parameters:
            state = self.scenario.init_state(self.world, self.sampler.at(0), self.params)
        else:
            state = self.scenario.init_state(self.world, self.sampler.at(0))
        actions = {}
        for d in self.asked:
            if self.differentiable:
                actions[d.name] = torch.zeros(self.n, d.a, device=self.device)
            else:
                actions[d.name] = torch.full((self.n,), -1, dtype=torch.int8, device=self.device)
        return SimState(state, actions)

    def memory(self) -> dict[str, float]:
        """Bytes per agent held by the run: ``population``, ``world`` (the scenario's per-agent index
        tensors and buffers), ``decisions`` (broadcast indices), ``sampler`` (its buffers)."""

        def per_agent(tensors: Any) -> float:
            held = [t for t in tensors if isinstance(t, torch.Tensor) and t.shape[:1] == (self.n,)]
            return sum(t.element_size() * t.numel() for t in held) / self.n

        world = vars(self.world).values() if hasattr(self.world, "__dict__") else ()
        return {
            "population": self.pop.nbytes / self.n,
            "world": per_agent(world),
            "decisions": per_agent([x for d in self.asked for x in (d.gid, d.member)]),
            "sampler": self.sampler.nbytes() / self.n,
        }

    # -- one step ---------------------------------------------------------------------------------
    def step(self, state: SimState, t: int) -> SimState:
        """Advance ``state`` from step ``t`` to ``t + 1``; the phases in the order of the module docstring."""
        sampler = self.sampler.at(t)
        due = [d for d in self.asked if self.scenario.decides_at(d.spec.cadence.value, t)]
        actions = state.actions
        if due:
            # 1. observe
            context = self.scenario.observe(self.world, state.scenario, t)
            actions = dict(actions)
            for d in due:
                # 3. decide, 4. broadcast and 5. sample (2. group: d.gid, computed at construction)
                actions[d.name] = self._decide(d, context, t)
        # 6. transition
        scenario_state, records = self.scenario.step(
            self.world, state.scenario, actions, self.params, t, sampler
        )
        # 7. record
        self._records.append(self._checked(records, t))
        return SimState(scenario_state, actions)

    def _decide(self, d: _Asked, context: Mapping[str, Any], t: int) -> torch.Tensor:
        probs = self._probs(d, context, t)
        table = torch.cat([probs, torch.zeros(1, d.a, device=self.device)])  # row K: non-members
        action = self.sampler.categorical(table, d.gid, d.index)
        if d.all_members:
            return action
        if self.differentiable:
            return action * d.member.unsqueeze(1).to(action.dtype)
        return action.masked_fill_(~d.member, -1)

    def _probs(self, d: _Asked, context: Mapping[str, Any], t: int) -> torch.Tensor:
        """(K, A) action probabilities of decision ``d`` at step ``t`` (offsets applied); keeps the policy's
        counters and decision records."""
        missing = [v for v in d.spec.context if v not in context]
        if missing:
            raise InputError(
                f"{type(self.scenario).where()}: observe() at step {t} gave no value for context variable(s) "
                f"{missing} that decision {d.name!r} (spec {d.spec.where}) declares"
            )
        ctx = {v: context[v] for v in d.spec.context}
        t0 = time.perf_counter()
        decision = d.policy.decide(d.archetypes, ctx, step=t)
        self.decide_seconds += time.perf_counter() - t0
        probs = decision.probs.to(self.device, torch.float32)
        if tuple(probs.shape) != (d.k, d.a):
            raise ValueError(
                f"policy {d.policy.mode} returned probs of shape {tuple(probs.shape)} for decision "
                f"{d.name!r}, expected ({d.k}, {d.a})"
            )
        offsets = self.params[f"offsets.{d.name}"]
        if offsets.requires_grad or bool(offsets.any()):
            probs = torch.softmax(torch.log(probs.clamp_min(1e-9)) + offsets, dim=1)
        counters = self.decision_counters[d.name]
        for name, value in decision.counters().items():
            counters[name] += value
        date = str(self.scenario.date(t).date())
        for rec in decision.records:
            self._decisions.append({"step": t, "date": date, "decision": d.name, **rec})
        return probs

    def _checked(self, records: Mapping[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        declared = list(self._shapes)
        extra = sorted(set(records) - set(declared))
        missing = [q for q in declared if q not in records]
        if extra or missing:
            what = (
                f"the record(s) {extra} at step {t}, which 'quantities' does not declare"
                if extra
                else f"no record for declared quantity(ies) {missing} at step {t}"
            )
            raise InputError(
                f"{type(self.scenario).where()}: field 'quantities': step() returned {what}",
                hint=f"declared: {', '.join(declared)}",
            )
        for q in self.scenario.quantities:
            want, value = self._shapes[q.name], records[q.name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(
                    f"{type(self.scenario).where()}: record {q.name!r} at step {t} has shape {got}; "
                    f"quantity {q.name!r} is by {q.by!r}, so its shape is {want}"
                )
        return {name: records[name] for name in declared}

    # -- records so far ------------------------------------------------------------------------------
    def recorded(self, name: str, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Quantity ``name`` recorded at steps ``first .. last-1`` so far, stacked: (steps, *its shape)
        (with gradients in differentiable mode); for callers that drive :meth:`step` themselves."""
        return torch.stack([r[name] for r in self._records[first:last]])

    def detach_records(self, first: int = 0, last: int | None = None) -> None:
        """Cut the records of steps ``first .. last-1`` from the autograd graph (truncated backpropagation)."""
        self._records[first:last] = [{k: v.detach() for k, v in r.items()} for r in self._records[first:last]]

    def rerun(
        self, state: SimState | None, first: int, last: int
    ) -> tuple[SimState, list[dict[str, torch.Tensor]]]:
        """Steps ``first .. last-1`` once more from ``state``, the state the run passed through at
        ``first`` (None: :meth:`initial_state`, for ``first`` 0), with their autograd graph; the run's own
        records, decision records and counters stay as they were. Returns the state at ``last`` and the
        steps' records. For backpropagation by recomputation (:func:`lpm.calibration.calibrate` keeps
        the states at the ends of a piece's segments and builds one segment's graph at a time): the
        draws depend only on the seed, the step and the stream, and the policy answers a step again
        as it did (a replayed LLM policy from its table), so the values are those of the first pass."""
        records, decisions = len(self._records), len(self._decisions)
        counters = {name: dict(c) for name, c in self.decision_counters.items()}
        decide_seconds = self.decide_seconds
        try:
            if state is None:
                state = self.initial_state()
            for t in range(first, last):
                state = self.step(state, t)
            return state, self._records[records:]
        finally:
            del self._records[records:], self._decisions[decisions:]
            self.decision_counters, self.decide_seconds = counters, decide_seconds

    # -- a run ------------------------------------------------------------------------------------
    def run(self, steps: int, *, out_dir: str | Path | None = None, resume: bool = False) -> RunResult:
        """Simulate ``steps`` steps from the start (or from ``out_dir``'s checkpoint with ``resume``)."""
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
        self._reset()
        start, state = 0, None
        began = self.wall_origin if self.wall_origin is not None else time.perf_counter()
        if resume and path is not None and path.is_file():
            start, state = self._load(path, steps)
        elif path is not None:
            (path.parent / JOURNAL).unlink(missing_ok=True)  # a fresh run: no steps of another one
        if state is None:
            state = self.initial_state()
        self.done = start
        with torch.set_grad_enabled(self.differentiable):
            for t in range(start, steps):
                t0 = time.perf_counter()
                decided = len(self._decisions)
                state = self.step(state, t)
                self.step_seconds += time.perf_counter() - t0
                if path is not None and not self.differentiable:
                    self._save(path, state, t, decided, time.perf_counter() - began)
                self.done = t + 1
                if self.callback is not None:
                    self.callback(t, self)
        return self._result(state, steps, start)

    def _save(self, path: Path, state: SimState, t: int, decided: int, wall: float) -> None:
        """Checkpoint after step ``t``: append its records and decisions (``self._decisions[decided:]``) to
        the journal, then rewrite ``checkpoint.pt`` (state, counters, timing, the journal's length)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        detach = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        records = {
            k: {
                "dtype": str(v.dtype).removeprefix("torch."),
                "shape": list(v.shape),
                "values": v.reshape(-1).tolist(),
            }
            for k, v in detach(self._records[t]).items()
        }
        line = json.dumps(
            {"step": t, "records": records, "decisions": self._decisions[decided:]}, default=_plain
        )
        with open(path.parent / JOURNAL, "r+b" if t else "wb") as journal:
            journal.truncate(self._journal_bytes)  # drops a line of a step whose checkpoint was never written
            journal.seek(self._journal_bytes)
            journal.write(line.encode() + b"\n")
            journal.flush()
            os.fsync(journal.fileno())
            self._journal_bytes = journal.tell()
        blob = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint(),
            "done": t + 1,
            "journal_bytes": self._journal_bytes,
            "state": detach(state.scenario),
            "actions": detach(state.actions),
            "counters": self.decision_counters,
            "step_seconds": self.step_seconds,
            "decide_seconds": self.decide_seconds,
            "wall_seconds": self.prior_wall_seconds + wall,
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def checkpointed(out_dir: str | Path) -> int:
        """Steps the checkpoint in ``out_dir`` holds (0 without one). After an interrupt this, not
        :attr:`done`, is what a resume starts from: a signal can land between the checkpoint's write
        and the counter's update."""
        path = Path(out_dir) / CHECKPOINT
        if not path.is_file():
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
        return int(blob["done"])

    def _read_journal(self, path: Path, done: int, length: int) -> None:
        """Records and decisions of steps ``0..done-1`` from the journal's first ``length`` bytes."""
        journal = path.parent / JOURNAL
        try:
            with open(journal, "rb") as f:
                lines = f.read(length).splitlines()
            steps = [json.loads(line) for line in lines]
            if [s["step"] for s in steps] != list(range(done)):
                raise ValueError(f"it holds steps {[s['step'] for s in steps][:5]}…, not 0..{done - 1}")
            for s in steps:
                self._records.append(
                    {
                        k: torch.tensor(
                            r["values"], dtype=getattr(torch, r["dtype"]), device=self.device
                        ).reshape(r["shape"])
                        for k, r in s["records"].items()
                    }
                )
                self._decisions.extend(s["decisions"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise InputError(
                f"{journal}: unreadable journal of the checkpoint ({exc})",
                hint="delete the run folder to start over",
            ) from None
        self._journal_bytes = length

    def _load(self, path: Path, steps: int) -> tuple[int, SimState]:
        try:
            with warnings.catch_warnings():  # a foreign file's pickle protocol warning says nothing useful
                warnings.simplefilter("ignore")
                blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if isinstance(exc, pickle.UnpicklingError):  # torch's text suggests weights_only=False: never
                first = "it holds more than tensors and plain values, or is not a torch file"
            raise InputError(
                f"{path}: unreadable checkpoint ({first})", hint="delete the run folder to start over"
            ) from None
        if not isinstance(blob, dict):
            raise InputError(f"{path}: not an lpm checkpoint (it holds a {type(blob).__name__})")
        if blob.get("version") != CHECKPOINT_VERSION:
            raise InputError(
                f"{path}: field 'version' is {blob.get('version')!r}; this lpm reads {CHECKPOINT_VERSION}",
                hint="start the run again in a new folder",
            )
        mine = self.fingerprint()
        theirs = blob.get("fingerprint", {})
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise InputError(
                f"{path}: the checkpoint belongs to a different run (field(s) {', '.join(diff)} differ)",
                hint="resume with the same scenario, parameters, population, seed and policy, or use a new folder",
            )
        try:
            done = int(blob["done"])
            if done > steps:
                raise InputError(
                    f"{path}: the checkpoint has {done} steps done, more than the {steps} asked for"
                )
            to_device = lambda d: {k: v.to(self.device) for k, v in d.items()}  # noqa: E731
            self._read_journal(path, done, int(blob["journal_bytes"]))
            self.decision_counters = {k: dict(v) for k, v in blob["counters"].items()}
            self.step_seconds = float(blob["step_seconds"])
            self.decide_seconds = float(blob["decide_seconds"])
            self.prior_wall_seconds = float(blob["wall_seconds"])
            return done, SimState(to_device(blob["state"]), to_device(blob["actions"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(
                f"{path}: damaged checkpoint (field {exc})", hint="delete the run folder to start over"
            ) from None

    # -- frames -------------------------------------------------------------------------------------
    def _result(self, state: SimState, steps: int, start: int) -> RunResult:
        series = {q.name: torch.stack([r[q.name] for r in self._records]) for q in self.scenario.quantities}
        dates = [self.scenario.date(t) for t in range(steps)]
        counters = self.counters
        counters["tokens"] = counters["prompt_tokens"] + counters["completion_tokens"]
        return RunResult(
            trajectory=self._trajectory(series, dates),
            decisions=self._decision_frame(),
            real=self.scenario.real_data(self.world, dates[0], dates[-1]),
            archetypes={d.name: d.archetypes.grouping.table.copy() for d in self.asked},
            series=series,
            counters=counters,
            decision_counters={k: dict(v) for k, v in self.decision_counters.items()},
            step_seconds=self.step_seconds,
            decide_seconds=self.decide_seconds,
            steps=steps,
            agents=self.n,
            resumed_from=start,
            prior_wall_seconds=self.prior_wall_seconds,
            state=state,
        )

    def _trajectory(self, series: dict[str, torch.Tensor], dates: list[pd.Timestamp]) -> pd.DataFrame:
        quantities = self.scenario.quantities
        bys = list(dict.fromkeys(q.by for q in quantities if q.by is not None))
        names = pd.CategoricalDtype([q.name for q in quantities])
        parts = []
        for q in quantities:
            values = series[q.name].detach().cpu().double().numpy()
            t = values.shape[0]
            width = values.shape[1] if values.ndim == 2 else 1
            part = pd.DataFrame(
                {
                    "step": np.repeat(np.arange(t, dtype=np.int64), width),
                    "date": pd.to_datetime(dates[:t]).repeat(width),
                }
            )
            for by in bys:
                labels = self.pop.labels(by)
                codes = list(range(width)) * t if by == q.by else [-1] * (t * width)
                part[by] = pd.Categorical.from_codes(codes, categories=labels)
            part["quantity"] = pd.Categorical([q.name] * len(part), dtype=names)
            part["value"] = values.reshape(-1)
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
        return frame.sort_values(["step"], kind="stable").reset_index(drop=True)

    def _decision_frame(self) -> pd.DataFrame:
        attributes = list(dict.fromkeys(a for d in self.asked for a in d.archetypes.grouping.table.columns))
        attributes = [a for a in attributes if a != "agents"]
        cols = [
            "step",
            "date",
            "decision",
            "archetype",
            *attributes,
            "action",
            "probability",
            "mode",
            "scoring",
            "coverage",
            "cached",
        ]
        if not self._decisions:
            return pd.DataFrame(columns=cols)
        parts = []
        for d in self.asked:
            wide = pd.DataFrame([r for r in self._decisions if r["decision"] == d.name])
            if wide.empty:
                continue
            table = d.archetypes.grouping.table.drop(columns="agents")
            wide = wide.join(table, on="archetype")
            keys = [c for c in wide.columns if not c.startswith("p_")]
            long = wide.melt(
                id_vars=keys,
                value_vars=[f"p_{a}" for a in d.spec.actions],
                var_name="action",
                value_name="probability",
            )
            long["action"] = long["action"].str.removeprefix("p_")
            parts.append(long)
        frame = pd.concat(parts, ignore_index=True)
        frame["date"] = pd.to_datetime(frame["date"])
        labels = {}
        for d in self.asked:
            labels.update({a: v for a, v in d.archetypes.grouping.labels.items() if a not in labels})
        for a in attributes:
            frame[a] = pd.Categorical(
                frame[a], categories=labels.get(a) or sorted(frame[a].dropna().unique())
            )
        frame["decision"] = pd.Categorical(frame["decision"], categories=[d.name for d in self.asked])
        actions = list(dict.fromkeys(a for d in self.asked for a in d.spec.actions))
        frame["action"] = pd.Categorical(frame["action"], categories=actions)
        frame["mode"] = pd.Categorical(frame["mode"])
        if "scoring" in frame:
            frame["scoring"] = pd.Categorical(frame["scoring"])
        order = [c for c in cols if c in frame.columns] + [c for c in frame.columns if c not in cols]
        frame = frame[order].sort_values(["step", "decision", "archetype", "action"], kind="stable")
        return frame.reset_index(drop=True)


def _plain(value: Any) -> Any:
    """JSON form of the numpy and torch scalars a decision record may hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
