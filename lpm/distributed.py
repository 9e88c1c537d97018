"""Sharding: one simulation over P processes (torch.distributed: gloo on the CPU, NCCL on GPUs), each holding a
slice of the agents.

:func:`run` starts P processes on this machine (or, under ``torchrun``, is one of them) and returns rank 0's
:class:`~lpm.engine.RunResult`. Each rank:

1. builds the scenario, the whole population and the policy with ``make(rank)`` (the population is not sent
   between processes), and the world and archetypes from the whole population, as one process would;
2. keeps the agents ``start .. stop-1`` (:func:`cut`: contiguous, cut between households, so a household's
   sums stay on one rank) and drops the rest: the population's columns, the world's per-agent tensors
   and each decision's broadcast indices;
3. draws every random number with its agents' global indices (``Sampler(start=...)``), so a draw is the one
   the same agent gets in one process;
4. sums what a step needs over every rank with all-reduce (the sampler's ``tally``, ``count`` and ``total``:
   the COVID scenario's counts per state and borough, and its infectiousness per place and per (ZIP, age)
   cell; of the places only those with members on several ranks); float sums are taken in float64, where
   they are exact, so they do not depend on the order or the cut and a run on P processes gives the
   records of a run on one, bit for bit;
5. asks each decision's policy on rank 0 only (the model or the cache is asked once per archetype in
   total) and broadcasts the (K, A) probabilities; the decision records and counters are rank 0's.

Checkpoints: rank ``r`` writes ``out_dir/rank-r/`` after every step and keeps the previous step's checkpoint
beside it, since a rank can die between its own checkpoint and another's; ``resume=True`` takes the last
step every rank holds, and refuses a run in which some ranks hold checkpoints and others none (a lost
disk), rather than start those over. A rank that dies stops the run: the launcher notices within a second,
stops the others and raises :class:`~lpm.errors.ShardError` naming the rank (a hung collective fails after
``timeout`` seconds). Under ``torchrun`` there is no such launcher: a rank whose collective fails because
a peer died, hung or cannot be reached raises :class:`PeerError` (a ``ShardError``) naming itself, with
the hint to resume.

Devices: with ``device="cpu"`` the ranks talk over gloo, one core each. With ``device="cuda"`` each rank
computes on its own GPU, ``cuda:<LOCAL_RANK>`` (``torchrun`` sets ``LOCAL_RANK``; processes started here use
their rank), and the ranks talk over NCCL (:func:`backend_for`, :func:`rank_device`); a rank without a
GPU of its own is a clear error, never two ranks on one GPU. Every collective's tensors live on the rank's
device, as NCCL requires.

Inference mode only; the scenario must declare ``shardable = True``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lpm.engine import CHECKPOINT, RunResult, Simulation
from lpm.errors import InputError, LpmError, ShardError
from lpm.policy import Archetypes, Policy, PolicyDecision
from lpm.population import Population
from lpm.sampling import HardSampler
from lpm.scenarios import Scenario

__all__ = [
    "Follower",
    "PeerError",
    "Shard",
    "ShardedSimulation",
    "backend_for",
    "check_nproc",
    "cut",
    "rank_device",
    "run",
]

#: The checkpoint of the step before the last, kept beside :data:`lpm.engine.CHECKPOINT` in each rank's folder.
PREVIOUS = "checkpoint-previous.pt"
#: Seconds a collective waits for the other ranks before it fails (a rank that hangs rather than dies).
TIMEOUT = 300.0
#: Seconds the launcher gives the other ranks to fail on their own once one has died, before stopping them.
GRACE = 2.0


class PeerError(ShardError):
    """This rank stopped because a collective with the other ranks failed: a peer rank died, hung past the
    timeout or cannot be reached. The message names this rank; the peer's own error (if it reported one)
    is the cause."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` holds agents ``start .. stop-1`` of ``agents``."""

    rank: int
    size: int
    start: int
    stop: int
    agents: int

    @property
    def n(self) -> int:
        return self.stop - self.start


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torchrun_rank() -> int | None:
    """This process's rank when ``torchrun`` started it (``RANK`` and ``WORLD_SIZE`` set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def backend_for(device: str | torch.device) -> str:
    """The torch.distributed backend of a run on ``device``: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """The device rank ``rank`` computes on: the CPU, or under CUDA the GPU ``LOCAL_RANK`` (the rank's
    index on its machine, set by ``torchrun``; the rank itself when this machine started every rank),
    which must exist: two ranks never share a GPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpus = torch.cuda.device_count()
    if not 0 <= local < gpus:
        raise InputError(
            f"run option 'device': rank {rank} (local rank {local} on its machine) needs GPU {local}, but "
            f"torch sees {gpus} GPU(s) there",
            hint=f"start at most {gpus} process(es) per machine (--nproc, torchrun --nproc-per-node)"
            if gpus
            else "use --device cpu",
        )
    return torch.device("cuda", local)


def check_nproc(nproc: int, agents: int | None = None, device: str | torch.device = "cpu") -> None:
    """Refuse a process count below 1, above the cores (or, on ``cuda``, the GPUs) this machine offers or
    above the agents."""
    cores = available_cores()
    if nproc < 1:
        raise InputError(f"run option 'nproc': must be >= 1, got {nproc}")
    if torch.device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise InputError(
                f"run option 'nproc': {nproc} processes asked for on 'cuda', but this machine has {gpus} GPU(s); "
                "each process takes one",
                hint=f"use --nproc {gpus} or fewer (or torchrun across machines)"
                if gpus
                else "use --device cpu",
            )
    elif nproc > cores:
        raise InputError(
            f"run option 'nproc': {nproc} processes asked for, but this machine offers {cores} CPU core(s)",
            hint=f"use --nproc {cores} or fewer (or torchrun across machines)",
        )
    if agents is not None and nproc > agents:
        raise InputError(
            f"run option 'nproc': {nproc} processes for {agents} agents; each process needs agents",
            hint=f"use --nproc {max(agents, 1)} or fewer",
        )


def cut(household: torch.Tensor, parts: int) -> list[int]:
    """Boundaries ``[0, b1, .., N]`` of ``parts`` contiguous slices of the agents of about N / parts each,
    each boundary moved forward to the next start of a household, so no household spans two slices.

    household: (N,) household id of each agent; the agents of a household must be consecutive (as
    :meth:`Population.synthesize` lays them out). Raises :class:`InputError` otherwise, or when there are
    fewer households than parts.
    """
    n = int(household.shape[0])
    if parts > n:
        raise InputError(
            f"run option 'nproc': {parts} processes for {n} agents; each process needs agents",
            hint=f"use --nproc {max(n, 1)} or fewer",
        )
    starts = torch.ones(n, dtype=torch.bool)  # agent i begins a household
    if n > 1:
        starts[1:] = household[1:] != household[:-1]
    begins = torch.nonzero(starts).view(-1)
    if int(begins.numel()) != int(torch.unique(household).numel()):
        raise InputError(
            "population column 'household': the agents of a household are not consecutive, so the agents "
            "cannot be cut between households",
            hint="order the population household by household (Population.synthesize does)",
        )
    targets = torch.tensor([(k * n) // parts for k in range(1, parts)], dtype=begins.dtype)
    at = torch.searchsorted(begins, targets)  # the first household start at or after each target
    inner = [int(begins[i]) if i < begins.numel() else n for i in at.tolist()]
    bounds = [0, *inner, n]
    if any(b >= e for b, e in zip(bounds, bounds[1:], strict=False)):
        raise InputError(
            f"run option 'nproc': {parts} processes for {int(begins.numel())} households; each process "
            "needs at least one household",
            hint="use fewer processes",
        )
    return bounds


def _narrow_pop(pop: Population, start: int, stop: int) -> Population:
    columns = {c: pop[c][start:stop].clone() for c in pop.columns}
    labels = {c: pop.labels(c) for c in pop.columns if pop.is_categorical(c)}
    return Population(columns, labels, meta=pop.meta)


def _narrow_world(world: Any, n: int, start: int, stop: int) -> Any:
    """The world with every per-agent tensor (first dimension ``n``) cut to ``start .. stop-1`` and its
    field ``n``, if any, set to the slice's length."""
    changes: dict[str, Any] = {}
    for f in fields(world):
        value = getattr(world, f.name)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
            changes[f.name] = value[start:stop].clone()
        elif f.name == "n" and value == n:
            changes[f.name] = stop - start
    return replace(world, **changes)


class Follower(Policy):
    """The policy of a rank other than 0: it groups agents as the leader's policy does (the base
    :meth:`Policy.setup`) and is never asked, since rank 0 decides for every rank. ``mode``: the leader's."""

    def __init__(self, mode: str):
        self._mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    def decide(self, archetypes: Archetypes, context: Mapping[str, Any], *, step: int) -> PolicyDecision:
        raise RuntimeError("a follower rank never decides: rank 0 asks the policy and broadcasts")


class ShardedSimulation(Simulation):
    """A :class:`~lpm.engine.Simulation` of one rank's agents in a process group (see the module docstring).

    Built from the whole population like a simulation in one process (the same archetypes, world and
    parameters), then cut to ``shard``'s agents. ``comm_seconds``: time inside all-reduce and broadcast
    (waiting for the other ranks included); ``comm_bytes``: the bytes this rank handed to them.
    """

    def __init__(
        self,
        scenario: Scenario,
        pop: Population,
        policy: Policy | Mapping[str, Policy],
        *,
        shard: Shard,
        seed: int = 0,
        device: str | torch.device = "cpu",
        **options: Any,
    ):
        if options.get("differentiable"):
            raise InputError("a sharded run runs in inference mode only", hint="drop differentiable=True")
        if not getattr(scenario, "shardable", False):
            raise InputError(
                f"the {scenario.name} scenario cannot be sharded ({type(scenario).where()} does not declare "
                "shardable = True)",
                hint="run it in one process (nproc 1)",
            )
        if not dist.is_initialized():
            raise RuntimeError("ShardedSimulation needs an initialised process group (lpm.distributed.run)")
        if len(pop) != shard.agents:
            raise InputError(f"rank {shard.rank} built {len(pop)} agents, the shard expects {shard.agents}")
        super().__init__(scenario, pop, policy, seed=seed, device=device, **options)
        lo, hi = shard.start, shard.stop
        self.shard = shard
        self.comm_seconds = 0.0
        self.comm_bytes = 0  # bytes this rank handed to all-reduce and broadcast
        self._out_dir: str | Path | None = None  # the run folder, for the hint of a PeerError
        self._shared_bins: dict[tuple[int, int, int], torch.Tensor] = {}
        self.world = _narrow_world(self.world, self.n, lo, hi)
        for d in self.asked:
            d.gid, d.member = d.gid[lo:hi].clone(), d.member[lo:hi].clone()
        self.pop = _narrow_pop(self.pop, lo, hi)
        self.n = hi - lo
        self.sampler = HardSampler(self.n, self.device, seed=self.seed, start=lo)
        self.sampler.reduce = self._all_reduce

    # -- communication -------------------------------------------------------------------------------
    def _all_reduce(self, aggregate: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of ``aggregate`` over the ranks: integers as int64, floats as float64 (exact for the sums
        lpm takes, hence the same in any order), returned in its own dtype. With ``index`` (this rank's
        agents' bins, the only ones the caller reads) only the bins that agents of several ranks share
        are summed (:meth:`_shared`); the others are complete here."""
        t0 = time.perf_counter()
        wide = torch.int64 if not aggregate.is_floating_point() else torch.float64
        if index is None:
            total = aggregate.to(wide, copy=True).contiguous()
            with self._collective():
                dist.all_reduce(total)
            self.comm_bytes += total.element_size() * total.numel()
            total = total.to(aggregate.dtype)
        else:
            shared = self._shared(index, aggregate.shape[0])
            part = aggregate.index_select(0, shared).to(wide)
            with self._collective():
                dist.all_reduce(part)
            self.comm_bytes += part.element_size() * part.numel()
            total = aggregate.index_copy(0, shared, part.to(aggregate.dtype))
        self.comm_seconds += time.perf_counter() - t0
        return total

    def _shared(self, index: torch.Tensor, bins: int) -> torch.Tensor:
        """int64 indices of the bins among ``bins`` that agents of two or more ranks are in, for this rank's
        (N,) ``index`` (computed with one all-reduce at its first use, then kept: ``index`` is a tensor of
        the world, the same at every step)."""
        key = (index.data_ptr(), int(index.shape[0]), bins)
        if key not in self._shared_bins:
            ranks = (torch.bincount(index.long(), minlength=bins) > 0).to(torch.int32)
            with self._collective():
                dist.all_reduce(ranks)
            self._shared_bins[key] = torch.nonzero(ranks > 1).view(-1)
        return self._shared_bins[key]

    def _probs(self, d: Any, context: Mapping[str, Any], t: int) -> torch.Tensor:
        """Rank 0 asks the policy (its counters and records are the run's); the others receive its table."""
        if self.shard.rank == 0:
            table = super()._probs(d, context, t).to(torch.float32).contiguous()
        else:
            table = torch.empty(d.k, d.a, dtype=torch.float32, device=self.device)
        t0 = time.perf_counter()
        with self._collective():
            dist.broadcast(table, src=0)
        self.comm_seconds += time.perf_counter() - t0
        self.comm_bytes += table.element_size() * table.numel()
        return table

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """Around a collective: its failure (gloo's "Connection reset by peer", a timeout) becomes a
        :class:`PeerError` naming this rank, the step and how to resume."""
        try:
            yield
        except RuntimeError as exc:  # gloo's errors, and torch.distributed.DistError (a timeout), are these
            s = self.shard
            cause = _first_sentence(str(exc)) or type(exc).__name__
            keeps = (
                f"; the run folder {self._out_dir} keeps each rank's checkpoint"
                if self._out_dir is not None
                else ""
            )
            hint = (
                f"once every rank can run again, resume: the same command with --resume and the same --out "
                f"{self._out_dir} on every node (resume=True in Python)"
                if self._out_dir is not None
                else "run again; with a run folder (--out) a run resumes from its checkpoints"
            )
            raise PeerError(
                f"rank {s.rank} of {s.size}: a peer rank failed (died, hung past the timeout or cannot be "
                f"reached): the exchange with the other ranks broke off at step {self.done} ({cause}){keeps}",
                hint=hint,
            ) from exc

    def fingerprint(self) -> dict[str, Any]:
        s = self.shard  # "agents": this rank's, so one process never resumes from a rank's checkpoint
        return {**super().fingerprint(), "shard": [s.rank, s.size, s.start, s.stop, s.agents]}

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, path: Path, *args: Any) -> None:
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        super()._save(path, *args)

    def _agree(self, folder: Path) -> None:
        """Before a resumed run: make ``folder/checkpoint.pt`` the last step every rank holds. Every rank
        learns what every other holds, so all take the same decision: start over when no rank has a
        checkpoint, and raise :class:`InputError` (on every rank) when some have one and others none (a
        lost disk or folder), or when a rank lacks the common step."""
        current, previous = folder / CHECKPOINT, folder / PREVIOUS
        done = {p: _steps_done(p) for p in (current, previous)}
        s = self.shard
        gathered = [torch.zeros(2, dtype=torch.int64, device=self.device) for _ in range(s.size)]
        mine = torch.tensor([done[current], done[previous]], dtype=torch.int64, device=self.device)
        with self._collective():
            dist.all_gather(gathered, mine)
        held = [sorted({int(v) for v in g.tolist()} - {-1}) for g in gathered]  # steps each rank holds
        if not any(held):  # no rank has a checkpoint: all start over
            return
        lacking = [r for r in range(s.size) if not held[r]]
        if lacking:
            holding = [r for r in range(s.size) if held[r]]
            folders = ", ".join(str(folder.parent / f"rank-{r}") for r in lacking)
            raise InputError(
                f"--resume: {_ranks(lacking, s.size)} no checkpoint ({folders} on the node that ran "
                f"{'it' if len(lacking) == 1 else 'them'}), while {_ranks(holding, s.size)} checkpointed "
                f"{max(max(h) for h in held if h)} steps; a run cannot resume without every rank's checkpoint",
                hint=f"put back the missing {folders} (each node keeps its ranks' folders under the --out "
                "folder) and resume, or start over: delete the run folder on every node and run without --resume",
            )
        common = min(h[-1] for h in held)
        short = [r for r in range(s.size) if common not in held[r]]
        if short:
            raise InputError(
                f"{folder.parent}: {_ranks(short, s.size)} no checkpoint after {common} steps, the most every "
                f"rank completed (only after {', '.join(str(held[r]) for r in short)} steps)",
                hint="delete the run folder on every node to start over",
            )
        if done[current] != common:
            os.replace(previous, current)

    def run(self, steps: int, *, out_dir: str | Path | None = None, resume: bool = False) -> RunResult:
        folder = None if out_dir is None else Path(out_dir) / f"rank-{self.shard.rank}"
        self._out_dir = out_dir
        if folder is not None and resume:
            self._agree(folder)
        self.comm_seconds = 0.0
        result = super().run(steps, out_dir=folder, resume=resume)
        result.agents = self.shard.agents
        result.comm_seconds = self.comm_seconds
        return result


def _first_sentence(text: str) -> str:
    """The first sentence of a backend's error, without gloo's ``[file.cc:line]`` prefix."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    return text.split(". ")[0].rstrip(".")


def _ranks(ranks: list[int], size: int) -> str:
    """``rank 1 of 4 has`` or ``ranks 1, 3 of 4 have``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]} of {size} has"
    return f"ranks {', '.join(map(str, ranks))} of {size} have"


def _steps_done(path: Path) -> int:
    """Steps done in a checkpoint file, -1 if there is none."""
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["done"])
    except Exception as exc:  # noqa: BLE001 (a damaged or foreign file: the engine's own load says more)
        raise InputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


# -- the launcher ---------------------------------------------------------------------------------------

Make = Callable[[int], Any]  # rank -> (scenario, population, policy), or a context manager yielding them


def run(
    make: Make,
    steps: int,
    *,
    nproc: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    timeout: float = TIMEOUT,
    **options: Any,
) -> RunResult:
    """Simulate ``steps`` steps over ``nproc`` processes and return rank 0's result (records, decisions).

    make: a picklable function ``rank -> (scenario, population, policy)`` (or returning a context manager
    that yields them), called in every process; every rank must build the same scenario and population.
    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) this process is one rank and ``nproc`` must be
    None or ``WORLD_SIZE``. options: keyword arguments of :class:`ShardedSimulation` (``specs``,
    ``offsets``, ``callback``...).
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if options.get("differentiable"):
        raise InputError("a sharded run runs in inference mode only", hint="drop differentiable=True")
    rank = torchrun_rank()
    if rank is not None:  # torchrun: this process is one rank of the run
        size = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != size:
            raise InputError(f"run option 'nproc': {nproc}, but torchrun started {size} processes")
        return _rank(rank, _Job(size, "env://", make, steps, seed, out_dir, resume, timeout, options))
    if nproc is None:
        raise InputError("run option 'nproc': give the number of processes")
    check_nproc(nproc, device=options.get("device", "cpu"))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lpm-shards-") as tmp:
        address = f"tcp://127.0.0.1:{_free_port()}"
        job = _Job(nproc, address, make, steps, seed, out_dir, resume, timeout, options)
        procs = [ctx.Process(target=_child, args=(r, job, tmp), name=f"lpm-rank-{r}") for r in range(nproc)]
        for p in procs:
            p.start()
        try:
            _watch(procs, tmp, out_dir)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        with open(Path(tmp) / "result.pkl", "rb") as f:
            return pickle.load(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _Job:
    """What every rank of one sharded run is given: the number of ranks, the rendezvous address, the
    :func:`run` arguments and :class:`ShardedSimulation`'s options."""

    size: int
    address: str
    make: Make
    steps: int
    seed: int
    out_dir: str | Path | None
    resume: bool
    timeout: float
    options: dict[str, Any]


def _child(rank: int, job: _Job, tmp: str) -> None:
    """One spawned rank: runs, rank 0 writes its result; an error is written for the launcher to report."""
    torch.set_num_threads(1)  # one core per rank
    try:
        result = _rank(rank, job)
        if rank == 0:
            result.state = None  # rank 0's agents only: not the run's state
            result.series = {k: v.detach().cpu() for k, v in result.series.items()}  # off the rank's GPU
            with open(Path(tmp) / "result.pkl.tmp", "wb") as f:
                pickle.dump(result, f)
            os.replace(Path(tmp) / "result.pkl.tmp", Path(tmp) / "result.pkl")
    except BaseException as exc:  # noqa: BLE001 (reported to the launcher, then the process fails)
        with open(Path(tmp) / f"error-{rank}.pkl", "wb") as f:
            lpm = isinstance(exc, LpmError)
            text = str(exc) if lpm else "".join(traceback.format_exception(exc)).strip()
            peer = isinstance(exc, PeerError)  # a consequence of another rank's failure, not a cause
            pickle.dump(
                {
                    "lpm": lpm,
                    "peer": peer,
                    "type": type(exc).__name__,
                    "text": text,
                    "hint": getattr(exc, "hint", None),
                },
                f,
            )
        os._exit(1)


def _rank(rank: int, job: _Job) -> RunResult:
    device = rank_device(job.options.get("device", "cpu"), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        init_method=job.address,
        rank=rank,
        world_size=job.size,
        timeout=dt.timedelta(seconds=job.timeout),
        device_id=device if device.type == "cuda" else None,
    )
    options = {**job.options, "device": device}
    try:
        made = job.make(rank)
        with made if hasattr(made, "__enter__") else contextlib.nullcontext(made) as (scenario, pop, policy):
            bounds = cut(pop["household"], job.size)
            shard = Shard(rank, job.size, bounds[rank], bounds[rank + 1], len(pop))
            sim = ShardedSimulation(scenario, pop, policy, shard=shard, seed=job.seed, **options)
            del pop
            return sim.run(job.steps, out_dir=job.out_dir, resume=job.resume)
    finally:
        dist.destroy_process_group()


def _watch(procs: list[Any], tmp: str, out_dir: str | Path | None) -> None:
    """Wait for every rank; when one fails, give the others :data:`GRACE` seconds, stop them and raise."""
    size = len(procs)
    failed_at = None
    while True:
        multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and (
            all(c is not None for c in codes) or time.monotonic() - failed_at > GRACE
        ):
            break
    stopped = {r for r, p in enumerate(procs) if p.is_alive()}
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errors = {}
    for r in range(size):
        path = Path(tmp) / f"error-{r}.pkl"
        if path.is_file():
            with open(path, "rb") as f:
                errors[r] = pickle.load(f)
    # the cause: a rank that died without reporting (a signal, the OOM killer), else an lpm error, else the
    # first; a rank that only saw a peer fail (PeerError) comes last
    dead = [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in errors and r not in stopped]
    resume = (
        f"; the run folder {out_dir} keeps each rank's checkpoint: run again with resume=True (--resume)"
        if out_dir is not None
        else ""
    )
    if dead:
        r = dead[0]
        code = procs[r].exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise ShardError(f"rank {r} of {size} died ({how}); the other ranks were stopped{resume}")
    reported = sorted(errors, key=lambda r: (errors[r]["peer"], not errors[r]["lpm"], r))
    if reported:
        r = reported[0]
        e = errors[r]
        if e["peer"]:
            raise ShardError(e["text"], hint=e["hint"])
        if e["lpm"]:
            raise ShardError(f"rank {r} of {size}: {e['text']}", hint=e["hint"])
        raise ShardError(f"rank {r} of {size} failed ({e['type']}){resume}:\n{e['text']}")
    raise ShardError(f"a rank of {size} stopped without a result{resume}")
