"""Per-agent randomness that does not depend on how agents are laid out, and differentiable samples.

Counter-based uniforms: the number agent ``i`` draws at step ``t`` from stream ``s`` is a hash of
``(seed, t, s, i)``, so a trajectory is the same whether agents are simulated in one tensor, in shards or
on another device, a resumed run needs no generator state, and two runs with different parameters see the
same numbers (common random numbers, which make finite differences of a simulation meaningful).

The hash: ``(seed, step, stream)`` is mixed once in Python with SplitMix64 into a 32-bit odd multiplier
``m`` and an offset ``a``; agent ``i`` gets ``lowbias32(i * m + a)`` (Wellons' two-multiply 32-bit
integer hash, a bijection with full avalanche), whose top 24 bits make a float32 in ``[0, 1)``. Everything
per agent is int32 tensor arithmetic done in place, about a dozen passes over ``n`` integers.

Differentiable mode has five gradient estimators (:data:`ESTIMATORS`), chosen with numbers in
``benchmarks/gradients.py`` (per-week ratio to finite differences of the stochastic model):

* ``"pruned"`` (:class:`PrunedSampler`, the default for a step written for it, the COVID step's;
  ``"auto"`` picks it there and ``"expected"`` elsewhere): stochastic derivatives with pruning, one
  alternative run per household; unbiased for the model's own draws, within about 10 % of finite
  differences over 8 weeks where ``"households"`` over-corrects at high household attack rates, and 4x
  faster; noisier (1-6 % standard error over 8 seeds at 50,000 agents).
* ``"households"`` (:class:`HouseholdSampler`): ``"expected"``, and a step with households
  carries household transmission by the number of consecutive household hops, each hop weighted by what
  a real household outbreak can take; within about 10 % of finite differences over 8 weeks where
  ``"expected"`` runs away after 3-4.
* ``"expected"`` (:class:`SoftSampler`): the forward pass is the hard stochastic run; the
  backward pass of each step is the Jacobian of the step's *expected* transition given the agents'
  current states (``next = hard + (E[next | states] - E[next | states].detach())``). A perturbation of an
  agent's state probabilities moves along its chain of states with the chain's rates (an extra infection
  becomes exposed, then infectious, then infects others), which per-agent straight-through misses.
* ``"bernoulli"`` (:class:`BernoulliSTSampler`): per-agent straight-through Bernoulli draws (``d/dp = 1``);
  kept to measure against: its gradient never leaves the column an agent was pushed into, so it is
  biased low over weeks.
* ``"mean-field"`` (:class:`MeanFieldSampler`): no sampling at all; every agent carries its expected
  state probabilities (a deterministic relaxation whose forward pass differs from the stochastic run).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ESTIMATORS",
    "DEFAULT_ESTIMATOR",
    "BernoulliSTSampler",
    "HardSampler",
    "HouseholdSampler",
    "MeanFieldSampler",
    "PrunedSampler",
    "Moves",
    "Sampler",
    "SoftSampler",
    "sampler_class",
    "shared_gradient",
    "UniformStream",
    "bernoulli_st",
    "byte_flags",
    "categorical_st",
    "chain_leave",
    "choose_estimator",
    "in_codes",
    "leaving_hazard",
    "mix_key",
    "prune",
    "uniform",
]

_MASK64 = (1 << 64) - 1
_M1 = 0x7FEB352D  # lowbias32 multipliers (C. Wellons, "Prospecting for hash functions", 2018)
_M2 = 0x846CA68B - (1 << 32)  # the same bits as a signed int32
_INV24 = 1.0 / (1 << 24)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def mix_key(seed: int, step: int, stream: int) -> tuple[int, int]:
    """The per-draw constants ``(m, a)`` of ``(seed, step, stream)``: ``m`` odd, both as signed int32."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(step) & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return _signed32((h >> 32) | 1), _signed32(h)


class UniformStream:
    """Draws of ``uniform`` for agents ``start .. start+n-1`` into buffers allocated once.

    ``draw`` returns a buffer that the next ``draw`` overwrites: use (or copy) it before drawing again.
    """

    def __init__(self, n: int, device: str | torch.device = "cpu", *, start: int = 0):
        if n < 0 or start < 0 or start + n > 2**31:
            raise ValueError(f"agent indices must lie in [0, 2**31), got start={start}, n={n}")
        self.n, self.start = int(n), int(start)
        self.index = torch.arange(start, start + n, dtype=torch.int32, device=device)
        self._x = torch.empty_like(self.index)
        self._t = torch.empty_like(self.index)
        self._u = torch.empty(n, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        """Bytes of the per-agent tensors the stream holds (indices and the buffers of a draw)."""
        return sum(x.element_size() * x.numel() for x in (self.index, self._x, self._t, self._u))

    def work(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two (n,) int32 work buffers of a draw, free for other use until the next draw overwrites
        them."""
        return self._x, self._t

    def draw(self, seed: int, step: int, stream: int) -> torch.Tensor:
        """(n,) float32 in [0, 1): agent ``start + j``'s number for ``(seed, step, stream)`` at ``j``."""
        m, a = mix_key(seed, step, stream)
        x, t = self._x, self._t
        torch.mul(self.index, m, out=x)
        x.add_(a)
        for shift, mult in ((16, _M1), (15, _M2)):  # lowbias32, with logical right shifts
            torch.bitwise_right_shift(x, shift, out=t)
            t.bitwise_and_((1 << (32 - shift)) - 1)
            x.bitwise_xor_(t).mul_(mult)
        torch.bitwise_right_shift(x, 16, out=t)
        t.bitwise_and_(0xFFFF)
        x.bitwise_xor_(t)
        x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # top 24 bits
        return self._u.copy_(x).mul_(_INV24)


def byte_flags(compare: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """``compare(a, b)`` (a comparison such as ``torch.eq``) as uint8 0/1 of ``a``'s shape. On the CPU a
    comparison of bytes into bool runs a scalar loop, some ten times slower than into uint8 (1 M agents:
    0.4 against 0.04 ms), and uint8 converts to float 4x faster than bool."""
    return compare(a, b, out=torch.empty(a.shape, dtype=torch.uint8, device=a.device))


def in_codes(codes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """uint8 (N,) 0/1: whether each uint8 code lies in ``lo .. hi`` (one pass: codes below ``lo`` wrap
    above ``255 - lo``)."""
    return torch.sub(codes, lo).le_(hi - lo)


def chain_leave(
    u: torch.Tensor, chain_at: torch.Tensor, first: torch.Tensor, p_first: torch.Tensor
) -> torch.Tensor:
    """bool (N,): whether each agent leaves its state along a chain, ``u < chain[state]`` or, in state 0,
    ``u < p_first``. ``chain_at``: (N,) ``chain[state]`` with ``chain[0] = 0`` (:func:`leaving_hazard`),
    overwritten; ``first``: uint8 (N,) 0/1, whether the agent is in state 0. One comparison with
    ``chain[state] + first × p_first``, exactly the threshold that applies, instead of three into bool."""
    return u < chain_at.addcmul_(first, p_first)


def _equal(a: torch.Tensor, b: int) -> torch.Tensor:
    """bool ``a == b``, through uint8 (:func:`byte_flags`) where ``a`` is a byte tensor; the same values."""
    if a.dtype in (torch.uint8, torch.int8):
        return byte_flags(torch.eq, a, b).view(torch.bool)
    return a == b


def leaving_hazard(hazard: torch.Tensor) -> torch.Tensor:
    """float32 (k,) copy of a chain's ``hazard`` with state 0's entry 0: ``u < chain[state]`` then never
    holds in state 0, whose agents leave by their own probability instead. (A fill: ``chain[0] = 0.0``
    would copy the number from the host on a GPU.)"""
    chain = hazard.to(torch.float32).clone()
    chain[:1] = 0.0
    return chain


def uniform(
    seed: int, step: int, stream: int, n: int, device: str | torch.device = "cpu", *, start: int = 0
) -> torch.Tensor:
    """(n,) float32 uniforms in [0, 1) for agents ``start .. start+n-1``; a fresh tensor.

    ``uniform(s, t, k, n)[i:j]`` equals ``uniform(s, t, k, j - i, start=i)``: a draw depends only on
    ``(seed, step, stream, agent index)``.
    """
    return UniformStream(n, device, start=start).draw(seed, step, stream)


def bernoulli_st(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Straight-through Bernoulli: forward exactly ``(u < p)`` as ``p.dtype``; backward d/dp = 1.

    p: (...) probabilities; u: uniforms of the same shape (fixed, no gradient). The backward pass is the
    gradient of the expected value ``E[x] = p``, so sums over many agents get unbiased one-step gradients.
    """
    hard = (u < p).to(p.dtype)
    return hard + (p - p.detach())


def categorical_st(logits: torch.Tensor, u: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax: forward a hard one-hot sample, backward the soft relaxation.

    logits: (..., A) unnormalised log-probabilities; u: (..., A) uniforms in [0, 1) (Gumbel noise is
    ``-log(-log(u))``); tau: temperature of the relaxation (> 0; smaller is closer to the hard sample,
    with noisier gradients). The hard sample is ``argmax(logits + gumbel)``, distributed as
    ``softmax(logits)``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    u = u.to(logits.dtype).clamp(1e-7, 1.0 - 1e-7)
    z = logits + (-torch.log(-torch.log(u)))
    soft = torch.softmax(z / tau, dim=-1)
    hard = torch.nn.functional.one_hot(z.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


class _ChainStep(torch.autograd.Function):
    """One step along a chain in differentiable mode: forward the hard next states (one-hot rows of
    ``following``), backward the Jacobian of the expected next states ``states - flow + shift(flow)``
    with ``flow = states * r``, ``r = [p_first, hazard[1:]]`` (what leaves state j enters j + 1), written
    out so that the forward pass builds no (N, k) intermediate and the graph keeps only ``states`` and
    ``p_first``. With ``d_j = g_{j+1} - g_j`` (``g_k = 0``): d states_j = g_j + r_j d_j, d p_first =
    states_0 d_0, d hazard_j = sum over agents of states_j d_j (j >= 1)."""

    @staticmethod
    def forward(ctx, states, p_first, hazard, following):
        ctx.save_for_backward(states, p_first, hazard)
        if following.ndim == 2:  # the one-hot rows themselves (another copy of the same step): shared
            return following.view_as(following)
        out = torch.zeros(following.shape[0], hazard.shape[0], dtype=states.dtype, device=states.device)
        return out.scatter_(1, following.long().view(-1, 1), 1.0)

    @staticmethod
    def backward(ctx, g):
        states, p_first, hazard = ctx.saved_tensors
        d = torch.nn.functional.pad(g[:, 1:], (0, 1)).sub_(g)  # g_{j+1} - g_j
        d_states = d_p = d_hazard = None
        if ctx.needs_input_grad[0]:
            d_states = d * hazard.to(g.dtype)
            d_states[:, 0] = d[:, 0] * p_first
            d_states.add_(g)
        if ctx.needs_input_grad[1]:
            d_p = states[:, 0] * d[:, 0]
        if ctx.needs_input_grad[2]:
            d_hazard = (states * d).sum(0).to(hazard.dtype)
            d_hazard[0] = 0.0
        return d_states, d_p, d_hazard, None


class _Shared(torch.autograd.Function):
    """Forward ``value``; backward the same gradient to ``value`` and to each of ``others``."""

    @staticmethod
    def forward(ctx, value, *others):
        ctx.others = len(others)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, g):
        return (g,) * (ctx.others + 1)


class _RunSums(torch.autograd.Function):
    """Sums of consecutive runs of a vector: forward one sum per run (``bounds``: R pairs ``(start, stop)``
    covering it in order), backward each run's gradient repeated over its entries. What ``index_add`` by a
    sorted index computes, as R reductions instead of a scatter that adds agent by agent (and a gather
    back)."""

    @staticmethod
    def forward(ctx, values, bounds):
        ctx.bounds = bounds
        return torch.stack([values[a:b].sum() for a, b in bounds])

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g[i].expand(b - a) for i, (a, b) in enumerate(ctx.bounds)]), None


class _DrawnRows(torch.autograd.Function):
    """Straight-through one-hot draws from the rows of a small table: forward the one-hot rows of the
    drawn columns ``hard`` (N,), backward the gradient of ``table.index_select(0, index)`` (each table
    entry gains the gradient of every agent's same column in its row), summed by one ``bincount`` per
    column: the same sums, in agent order, as ``index_select``'s backward (a row ``index_add``, several
    times slower for rows this short)."""

    @staticmethod
    def forward(ctx, table, index, hard):
        ctx.save_for_backward(index)
        ctx.shape = table.shape
        out = torch.zeros(hard.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
        return out.scatter_(1, hard.long().view(-1, 1), 1.0)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        rows, cols = ctx.shape
        index = index if index.dtype in (torch.int32, torch.int64) else index.long()
        sums = [torch.bincount(index, g[:, c], minlength=rows) for c in range(cols)]  # a column at a time
        return torch.stack(sums, 1).to(g.dtype), None, None


def shared_gradient(value: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``value``, whose gradient also reaches every one of ``others`` (tensors of its shape): what
    ``value + sum(o - o.detach() for o in others)`` computes, without the arithmetic. For several copies
    of one quantity that carry different gradient paths (:class:`HouseholdSampler`)."""
    return _Shared.apply(value, *others) if others else value


@dataclass(frozen=True)
class Moves:
    """Who left which state in one :meth:`Sampler.transition` or :meth:`Sampler.markov`.

    ``out(s)``: (N,) per agent, bool in inference mode (the agent was in state ``s`` and left it); float in
    differentiable mode (forward the same 0/1, backward the expected flow out of ``s``).
    code, leave: hard codes before the move and whether each agent moved (None in mean-field mode);
    flow: (N, k) expected flows out of each state (None in inference mode).
    """

    code: torch.Tensor | None
    leave: torch.Tensor | None
    flow: torch.Tensor | None
    chain: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (states, p_first, hazard)

    def out(self, s: int) -> torch.Tensor:
        hard = None if self.code is None else _equal(self.code, s) & self.leave
        if self.flow is not None:
            f = self.flow[:, s]
        elif self.chain is not None:  # a chain's expected flow out of s, one column only
            states, p_first, hazard = self.chain
            f = states[:, s] * (p_first if s == 0 else hazard[s].to(states.dtype))
        else:
            return hard
        return f if hard is None else hard.to(f.dtype) + (f - f.detach())


# -- samplers: the only thing that differs between inference and differentiable mode ----------------


class Sampler:
    """How one run draws and represents discrete outcomes; a scenario's step calls only these operations,
    so one implementation of a step serves both modes.

    Two kinds: :class:`HardSampler` (inference: outcomes are bool tensors, categorical agent states are
    integer codes, actions are int8 indices) and :class:`SoftSampler` (differentiable: outcomes are float
    straight-through samples, states and actions are float one-hot rows, so a loss of the recorded series
    has gradients). For the same seed both give the same forward values.

    Randomness is counter-based (:func:`uniform`): the engine sets the step with :meth:`at`, and
    ``uniform(stream)`` is then each agent's number for ``(seed, step, stream)``. Streams 0–15 belong to
    the engine (decision ``i`` draws from stream ``i``); a scenario uses 16 and up.

    Categorical agent states (e.g. compartments S, E, I, R) are built with :meth:`states` from integer
    codes and read with :meth:`member`, :meth:`value`, :meth:`tally`. They move with
    :meth:`transition` (a chain of states: leave state 0 with a per-agent probability, state ``j > 0``
    with a per-state daily hazard, the last state absorbing) or :meth:`markov` (any per-agent transition
    matrix); both return the next states and the :class:`Moves` (who left which state).
    """

    differentiable: bool = False
    #: extra copies of the agents' states a step with households carries (see :class:`HouseholdSampler`)
    household_generations: int = 0

    #: how a sharded run (:mod:`lpm.distributed`) sums an aggregate of this shard's agents over every
    #: shard; None: the agents are all here
    reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def __init__(self, n: int, device: str | torch.device = "cpu", *, seed: int = 0, start: int = 0):
        self.n, self.device, self.seed = int(n), torch.device(device), int(seed)
        self.t = 0
        self._uniforms = UniformStream(n, self.device, start=start)  # agent i draws as agent start + i
        #: id of an index tensor -> (the tensor, bins, its runs or None): :meth:`_runs`
        self._run_cache: dict[int, tuple[torch.Tensor, int, list[tuple[int, int]] | None]] = {}

    def _runs(self, index: torch.Tensor, bins: int) -> list[tuple[int, int]] | None:
        """When ``index`` (N,) is sorted (the population lies borough by borough): the bounds ``(start,
        stop)`` of its runs of bins 0 .. bins - 1, else None; found once per index tensor (its checks and
        bounds read back to the host that once). Sums per run add in another order than a scatter: the
        same numbers for whole counts, within rounding otherwise."""
        hit = self._run_cache.get(id(index))
        if hit is None or hit[0] is not index or hit[1] != bins:
            runs = None
            if index.shape[0] and bool((index[1:] >= index[:-1]).all()) and int(index[-1]) < bins:
                ends = torch.cumsum(torch.bincount(index.long(), minlength=bins), 0).tolist()
                runs = list(zip([0, *ends[:-1]], ends, strict=True))
            hit = self._run_cache[id(index)] = (index, bins, runs)
        return hit[2]

    def total(self, aggregate: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``aggregate`` (sums over this sampler's agents, e.g. per place or per bin) summed over every
        shard of a sharded run; itself in one process. index: the (N,) bin of each of this sampler's
        agents, when the caller reads the sums only at those bins (a sharded run then adds up only the
        bins that agents of several shards share)."""
        return aggregate if self.reduce is None else self.reduce(aggregate, index)

    def at(self, t: int) -> Sampler:
        """Draw the numbers of step ``t`` from now on; returns self."""
        self.t = int(t)
        return self

    def uniform(self, stream: int) -> torch.Tensor:
        """(N,) float32 uniforms of this step and ``stream``; a buffer the next draw overwrites."""
        return self._uniforms.draw(self.seed, self.t, stream)

    def nbytes(self) -> int:
        """Bytes of the per-agent buffers the sampler holds."""
        return self._uniforms.nbytes()

    def support(
        self, states: torch.Tensor, table: torch.Tensor, codes: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The agents whose ``table[state]`` is non-zero and their values, for sums that only those agents
        enter: here ``(None, value(states, table))``, every agent ((N,) values); :class:`HardSampler`
        gives the few agents' indices (M,) and their values (M,). ``codes``: ``(lo, hi)`` when the caller
        knows that exactly the consecutive codes ``lo .. hi`` are non-zero (the table is not read back)."""
        return None, self.value(states, table)

    @staticmethod
    def _check_chain(hazard: torch.Tensor) -> None:
        if hazard.ndim != 1 or hazard.shape[0] < 2:
            raise ValueError(f"hazard must be a (k,) vector with k >= 2, got shape {tuple(hazard.shape)}")

    @staticmethod
    def _rows(table: torch.Tensor, index: torch.Tensor | None, code: torch.Tensor) -> torch.Tensor:
        """(N, k) row ``code`` of each agent's transition matrix: ``table[index]`` (G, k, k) or (N, k, k)."""
        k = table.shape[-1]
        if index is None:
            return table.gather(1, code.long().view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
        return table.reshape(-1, k).index_select(0, index.long() * k + code.long())

    @staticmethod
    def _expected_rows(states: torch.Tensor, table: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """(N, k) expected next-state probabilities: ``states[n] @ T_n``."""
        per_agent = table if index is None else table.index_select(0, index.long())
        return torch.einsum("nk,nkj->nj", states, per_agent)

    @staticmethod
    def _inverse_cdf(u: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """int8 (N,) index of the action each agent draws from row ``index`` of ``table`` (K, A)."""
        cdf = torch.cumsum(table, dim=1).T.contiguous()  # (A, K): a gather from a contiguous row is faster
        action = torch.zeros(u.shape[0], dtype=torch.int8, device=u.device)
        for a in range(table.shape[1] - 1):  # one uniform per agent, A - 1 comparisons
            action += u >= cdf[a].index_select(0, index)
        return action


#: Agents from which :meth:`HardSampler._bincount` counts into lanes (below, one pass is cheap anyway).
LANES_FROM = 1 << 16


class HardSampler(Sampler):
    """Inference mode: exact discrete draws in the smallest dtypes, no gradients."""

    differentiable = False

    def __init__(self, n: int, device: str | torch.device = "cpu", *, seed: int = 0, start: int = 0):
        super().__init__(n, device, seed=seed, start=start)
        self._work: dict[str, torch.Tensor] = {}
        self._lanes: dict[int, torch.Tensor] = {}  # (N,) uint8 agent index % lanes (:meth:`_bincount`)

    def work(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The run's (N,) work buffer ``name`` (one meaning per name), kept from step to step so that
        in-place arithmetic needs no fresh per-agent memory: allocated on first use, its contents are
        whatever the last user left."""
        buffer = self._work.get(name)
        if buffer is None or buffer.dtype != dtype:
            buffer = self._work[name] = torch.empty(self.n, dtype=dtype, device=self.device)
        return buffer

    def nbytes(self) -> int:
        """Bytes of the per-agent buffers the sampler holds (the draws' and the work buffers)."""
        held = [*self._work.values(), *self._lanes.values()]
        return super().nbytes() + sum(b.element_size() * b.numel() for b in held)

    def bernoulli(self, p: torch.Tensor, stream: int) -> torch.Tensor:
        """bool (N,): each agent's outcome of probability ``p`` (N,)."""
        return self.uniform(stream) < p

    def categorical(self, table: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
        """int8 (N,): each agent's action drawn from row ``index`` (N,) of ``table`` (K, A)."""
        return self._inverse_cdf(self.uniform(stream), table, index)

    def chose(self, action: torch.Tensor, a: int) -> torch.Tensor:
        """bool (N,): whether each agent took action ``a`` (agents without the decision hold -1)."""
        return _equal(action, a)

    def hard(self, outcome: torch.Tensor) -> torch.Tensor:
        """The outcome as a bool tensor (for indexing and ``torch.where``)."""
        return outcome

    def states(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """The representation of categorical agent states from uint8 codes (N,) in ``0..k-1``: the codes."""
        return codes.to(torch.uint8)

    def codes(self, states: torch.Tensor) -> torch.Tensor:
        """Integer code (N,) of each agent's state."""
        return states

    def member(self, states: torch.Tensor, s: int) -> torch.Tensor:
        """bool (N,): whether each agent is in state ``s``."""
        return _equal(states, s)

    def tally(
        self, states: torch.Tensor, k: int, index: torch.Tensor, bins: int, flag: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 counts of agents by state × ``index`` bin: (k, bins), or (k, bins, 2) split by ``flag``."""
        size = k * bins if flag is None else 2 * k * bins
        key = states.to(torch.uint8 if size <= 256 else torch.int32) * (size // k)  # a byte if it fits
        if flag is None:
            key.add_(index)
        else:
            key.add_(index, alpha=2).add_(flag)
        counts = self.total(self._bincount(key, size)).to(torch.float32)
        return counts.view(k, bins) if flag is None else counts.view(k, bins, 2)

    def count(self, index: torch.Tensor, bins: int, where: torch.Tensor) -> torch.Tensor:
        """float32 (bins,): agents per ``index`` bin among those ``where`` holds."""
        # the agents counted go to bins .. 2 bins - 1, the others to 0 .. bins - 1, both by their index
        # (were the others in one bin, each increment of bincount would wait on the last)
        if index.dtype == torch.uint8 and where.dtype == torch.bool and 2 * bins <= 256:
            key = torch.add(index, where.view(torch.uint8), alpha=bins)  # one pass over bytes
        else:
            key = torch.add(index.to(torch.int32), where.to(torch.int32), alpha=bins)
        return self.total(self._bincount(key, 2 * bins)[bins:]).to(torch.float32)

    def _bincount(self, key: torch.Tensor, size: int) -> torch.Tensor:
        """int64 (size,) counts of ``key`` (N,) in ``0 .. size-1`` (uint8 or int32; overwritten).

        Agents lie household by household, so a borough's or a ZIP area's agents are consecutive and
        their keys come in runs of one value, where each increment of a plain bincount waits on the one
        before (measured at the full city: 10-15 ms a pass against 3 for shuffled keys). Consecutive
        agents count into different copies of the bins (``lanes``: 8, or as many as keep a uint8 key a
        byte) and the copies are summed: 4 ms. The counts are integers, so the same in any order.

        On a GPU, ``histc`` over the keys as int32 (bins of width 1): CUDA's ``bincount`` reads the smallest
        and largest key back to the host, a wait in every step, where ``histc`` with its range given does
        not (``benchmarks/gpu_counts.py`` on an H200, the COVID day of 1 B agents: 0.148 s against 0.249 s,
        one host wait a day against five, the same trajectory). Its int32 counts hold any population
        below 2^31."""
        if key.device.type == "cuda":
            return torch.histc(key.to(torch.int32), bins=size, min=0, max=size).to(torch.int64)
        lanes = next(k for k in (8, 4, 2, 1) if key.dtype != torch.uint8 or size * k <= 256)
        if lanes == 1 or key.shape[0] < LANES_FROM:
            return torch.bincount(key, minlength=size)
        lane = self._lanes.get(lanes)
        if lane is None:
            lane = self._lanes[lanes] = (
                torch.arange(self.n, device=self.device, dtype=torch.int32) % lanes
            ).to(torch.uint8)
        key.mul_(lanes).add_(lane)
        return torch.bincount(key, minlength=size * lanes).view(size, lanes).sum(1)

    def pick(self, table: torch.Tensor, index: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        """(N,): entry ``table[index, flag]`` of a (bins, 2) table for each agent."""
        return table.reshape(-1).index_select(0, torch.add(flag, index, alpha=2))

    def value(self, states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(N,) ``table[state]`` of each agent, from a (k,) float table."""
        return table.index_select(0, states.to(torch.int32))

    def support(
        self, states: torch.Tensor, table: torch.Tensor, codes: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (M,) indices of the agents whose ``table[state]`` ((k,) table) is non-zero, and (M,) those
        values: one pass over the uint8 codes when the non-zero entries are consecutive codes. ``codes``:
        ``(lo, hi)``, the consecutive non-zero codes when the caller knows them; otherwise the table is read
        back to the host (a device sync on a GPU)."""
        if codes is not None:
            lo, hi = codes
            consecutive = True
        else:
            found = torch.nonzero(table).view(-1).tolist()
            lo, hi = (found[0], found[-1]) if found else (0, -1)
            consecutive = found == list(range(lo, hi + 1))
        if states.dtype == torch.uint8 and consecutive:
            inside = in_codes(states, lo, hi)
        else:
            inside = (table != 0).index_select(0, states.to(torch.int32))
        who = inside.nonzero().view(-1)
        return who, table.index_select(0, states.index_select(0, who).to(torch.int32))

    def transition(
        self, states: torch.Tensor, p_first: torch.Tensor, hazard: torch.Tensor, stream: int
    ) -> tuple[torch.Tensor, Moves]:
        """One step along a chain of ``k`` states: an agent in state 0 leaves with its probability
        ``p_first`` (N,), one in state ``j > 0`` with ``hazard[j]`` ((k,), ``hazard[k-1] = 0``: absorbing);
        leaving means moving to the next state. Returns the next states and the moves."""
        self._check_chain(hazard)
        u = self.uniform(stream)
        code, p = self._uniforms.work()  # free until the next draw
        chain = leaving_hazard(hazard)
        threshold = torch.index_select(chain, 0, code.copy_(states), out=p.view(torch.float32))
        if states.dtype == torch.uint8 and p_first.dtype == threshold.dtype:
            leave = chain_leave(u, threshold, byte_flags(torch.eq, states, 0), p_first)
        else:
            leave = (u < threshold) | ((states == 0) & (u < p_first))
        return states + leave, Moves(states, leave, None)

    def markov(
        self, states: torch.Tensor, table: torch.Tensor, stream: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Moves]:
        """One step of a Markov chain: each agent's next state drawn from row ``state`` of its transition
        matrix, ``table[index]`` ((G, k, k) with an (N,) group ``index``) or ``table`` ((N, k, k))."""
        rows = self._rows(table, index, states)
        nxt = self._inverse_cdf(self.uniform(stream), rows, torch.arange(rows.shape[0], device=rows.device))
        nxt = nxt.to(torch.uint8)
        return nxt, Moves(states, nxt != states, None)

    def advance(self, states: torch.Tensor, k: int, leave: torch.Tensor) -> torch.Tensor:
        """States after the agents where ``leave`` holds moved to the next of the ``k`` states (the last one
        is absorbing); a fresh tensor."""
        return (states + leave).clamp_max_(k - 1)


class SoftSampler(Sampler):
    """Differentiable mode, estimator ``"expected"``: forward values equal :class:`HardSampler`'s; the
    backward pass of a draw is the gradient of its expected value given the current states (the
    probability of a Bernoulli or categorical draw; for :meth:`transition` and :meth:`markov` the
    expected next-state probabilities, so perturbations travel along the chain). States and actions are
    float one-hot rows."""

    differentiable = True

    def bernoulli(self, p: torch.Tensor, stream: int) -> torch.Tensor:
        """float (N,) straight-through sample: forward ``u < p``, backward d/dp = 1."""
        return bernoulli_st(p, self.uniform(stream))

    def categorical(self, table: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
        """float (N, A) straight-through one-hot: forward the hard draw, backward the gradient of the row's
        probabilities (``probs[index]``)."""
        hard = self._inverse_cdf(self.uniform(stream), table.detach(), index)
        return _DrawnRows.apply(table, index, hard)

    def chose(self, action: torch.Tensor, a: int) -> torch.Tensor:
        return action[:, a]

    def hard(self, outcome: torch.Tensor) -> torch.Tensor:
        return outcome.detach() > 0.5

    def states(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """float (N, k) one-hot rows."""
        return torch.nn.functional.one_hot(codes.long(), k).to(torch.float32)

    def codes(self, states: torch.Tensor) -> torch.Tensor:
        return states.detach().argmax(dim=1)

    def member(self, states: torch.Tensor, s: int) -> torch.Tensor:
        return states[:, s]

    def tally(
        self, states: torch.Tensor, k: int, index: torch.Tensor, bins: int, flag: torch.Tensor | None = None
    ) -> torch.Tensor:
        index = index.long()
        zeros = torch.zeros(bins, k, device=states.device, dtype=states.dtype)
        if flag is None:
            return zeros.index_add(0, index, states).T
        parts = [zeros.index_add(0, index, states * w[:, None]) for w in (1.0 - flag, flag)]
        return torch.stack(parts, dim=2).transpose(0, 1)  # (k, bins, 2)

    def count(self, index: torch.Tensor, bins: int, where: torch.Tensor) -> torch.Tensor:
        runs = self._runs(index, bins)
        if runs is not None:  # agents lie in runs of one bin (boroughs): a sum per run
            return _RunSums.apply(where, runs)
        index = index if index.dtype in (torch.int32, torch.int64) else index.int()  # int32 scatters faster
        return torch.zeros(bins, device=where.device, dtype=where.dtype).index_add(0, index, where)

    def pick(self, table: torch.Tensor, index: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        rows = table.index_select(0, index.long())
        return rows[:, 0] * (1.0 - flag) + rows[:, 1] * flag  # exact at flag 0 or 1; d/dflag = difference

    def advance(self, states: torch.Tensor, k: int, leave: torch.Tensor) -> torch.Tensor:
        out = states[:, :-1] * leave[:, None]  # what leaves each state but the last (absorbing) one
        pad = torch.nn.functional.pad
        return states - pad(out, (0, 1)) + pad(out, (1, 0))

    def value(self, states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return states @ table.to(states.dtype)

    @staticmethod
    def _flow(states: torch.Tensor, p_first: torch.Tensor, hazard: torch.Tensor) -> torch.Tensor:
        """(N, k) expected flow out of each state: ``states * [p_first, hazard[1:]]``."""
        return torch.cat([states[:, :1] * p_first[:, None], states[:, 1:] * hazard[1:].to(states.dtype)], 1)

    @staticmethod
    def _shifted(states: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Expected next states of a chain: what leaves each state enters the next one."""
        return states - flow + torch.nn.functional.pad(flow[:, :-1], (1, 0))

    def transition(
        self, states: torch.Tensor, p_first: torch.Tensor, hazard: torch.Tensor, stream: int
    ) -> tuple[torch.Tensor, Moves]:
        self._check_chain(hazard)
        code = self.codes(states)
        p = torch.where(code == 0, p_first.detach(), hazard.index_select(0, code))
        leave = self.uniform(stream) < p
        following = _ChainStep.apply(states, p_first, hazard, code + leave)
        return following, Moves(code, leave, None, (states, p_first, hazard))

    def follow(
        self,
        states: torch.Tensor,
        p_first: torch.Tensor,
        hazard: torch.Tensor,
        moves: Moves,
        hard: torch.Tensor,
    ) -> tuple[torch.Tensor, Moves]:
        """The step :meth:`transition` took (``moves``, whose next states are ``hard``), for another copy of
        the same states: the same next states (forward), the expected transition of ``states`` and
        ``p_first`` (backward). A step that carries one state along several gradient paths
        (:class:`HouseholdSampler`) moves each copy with it."""
        following = _ChainStep.apply(states, p_first, hazard, hard.detach())
        return following, Moves(moves.code, moves.leave, None, (states, p_first, hazard))

    def markov(
        self, states: torch.Tensor, table: torch.Tensor, stream: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Moves]:
        k = table.shape[-1]
        code = self.codes(states)
        rows = self._rows(table.detach(), index, code)
        nxt = self._inverse_cdf(self.uniform(stream), rows, torch.arange(rows.shape[0], device=rows.device))
        hard = torch.nn.functional.one_hot(nxt.long(), k).to(states.dtype)
        expected = self._expected_rows(states, table, index)
        stay = torch.diagonal(
            table.index_select(0, index.long()) if index is not None else table, dim1=1, dim2=2
        )
        flow = states * (1.0 - stay)
        return hard + (expected - expected.detach()), Moves(code, nxt.long() != code, flow)


class HouseholdSampler(SoftSampler):
    """Differentiable mode, estimator ``"households"``: :class:`SoftSampler`'s expected transitions, and a
    scenario with households (the COVID step) carries household transmission along
    ``household_generations`` extra copies of the agents' states, one per number of consecutive
    household hops a perturbation has taken, each hop weighted by the share of it the real household
    outbreak can take (:func:`lpm.scenarios.covid.household_path_factors`). The linearised backward pass
    of :class:`SoftSampler` lets housemates who escaped infection keep "infecting" each other (B → C →
    B) and counts a housemate reached along two paths twice; in households of four or more its gradient
    grows without bound after three weeks. Forward values are the same stochastic run."""

    household_generations = 3


class PrunedSampler(HardSampler):
    """Differentiable mode, estimator ``"pruned"``: stochastic derivatives with pruning (Arya et al.,
    "Automatic differentiation of programs with discrete randomness", NeurIPS 2022), one alternative
    per household. The run itself stays hard (integer states, the inference run's draws); decisions are
    straight-through as in :class:`SoftSampler`.

    The derivative of a draw ``u < p`` that came out 0 is the alternative in which it came out 1, with
    weight ``p' / (1 - p)``: ``d E[f] = E[w (f(alternative) - f(run))]``, unbiased. A step that supports
    this estimator (the COVID step) keeps, per household, one alternative run of its members (their
    states, moved on with the same uniforms as the run) and its weight, a zero-valued tensor that carries
    the gradient. Every infection draw that came out 0 is a candidate; :func:`prune` keeps one alternative
    per household, chosen in proportion to a magnitude proxy and reweighted so that the expectation holds.
    What an alternative changes outside its household (its infectiousness in schools, workplaces and the
    community) enters the other households' infection probabilities linearly, through its weight, and
    its own members' in the alternative's run (a housemate infected that way is one where the
    alternative's member is infected too). Unbiased for
    the model's own randomness; the decisions' straight-through gradient and truncated backpropagation are
    what remain approximate."""

    differentiable = True
    pruned = True

    def bernoulli(self, p: torch.Tensor, stream: int) -> torch.Tensor:
        return SoftSampler.bernoulli(self, p, stream) if p.requires_grad else super().bernoulli(p, stream)

    categorical = SoftSampler.categorical
    chose = SoftSampler.chose

    def hard(self, outcome: torch.Tensor) -> torch.Tensor:
        return outcome.detach() > 0.5 if outcome.is_floating_point() else outcome

    def count(self, index: torch.Tensor, bins: int, where: torch.Tensor) -> torch.Tensor:
        if where.is_floating_point():  # a differentiable outcome (decisions, or a step's own sums)
            return SoftSampler.count(self, index, bins, where)
        return super().count(index, bins, where)


def prune(
    weight: torch.Tensor,
    rate: torch.Tensor,
    group: torch.Tensor,
    new_weight: torch.Tensor,
    new_rate: torch.Tensor,
    u_agent: torch.Tensor,
    u_group: torch.Tensor,
    effect: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep one alternative per group among the group's current one and its new candidates.

    weight, rate: (H,) each group's alternative's weight (a zero-valued tensor with the gradient) and the
    sum of the magnitude proxies of the candidates it has absorbed (0: none). group: (N,) int64 group of
    each agent; new_weight, new_rate: (N,) each agent's candidate's weight and proxy (rate 0: no candidate).
    u_agent (N,), u_group (H,): uniforms. A reservoir step: each of the group's alternatives is kept with
    probability its proxy over the group's total (an exponential race: the smallest ``-log(u) / rate``,
    ties to the lowest index) and its weight divided by that probability, so that ``E[kept weight ×
    kept difference]`` is the sum of every alternative's weight × difference. Returns the groups' weights
    and proxies, the (N,) bool winners (the agent whose candidate replaced its group's alternative) and
    the (H,) bool groups replaced.

    effect: (H,) factor in (0, 1] on the current alternative's proxy, for one whose difference from the run
    matters less per unit of weight than a new candidate's (any positive proxy keeps the step unbiased; the
    variance is least when each proxy follows |weight × difference to come|). The kept alternative's
    proxy is then the group's total over its own factor (the size of its weight).

    index: int64 ``0 .. N - 1``, if the caller holds one (else made here: an 8-byte-per-agent fill);
    scratch: an int64 (N,) buffer the race may overwrite (else a fresh one, fresh pages each call)."""
    h = weight.shape[0]
    n, device = group.shape[0], group.device
    rate64 = rate.to(torch.float64, copy=True)
    if effect is not None:  # in float64, as rate64 × effect.to(float64)
        rate64.mul_(effect)
    new32 = new_rate.to(torch.float32)
    # the race: per agent in float32 (ties go to the lowest index), per group in float64
    # +0 .. +inf; a rate of +0 gives +inf (x / +0, or NaN for x = 0, set to +inf): the numbers of
    # masked_fill_(new32 <= 0, inf) for rates >= +0, without a random mask's slow scalar loop
    key = torch.neg(u_agent).log1p_().neg_().div_(new32).nan_to_num_(nan=math.inf, posinf=math.inf)
    # each group's smallest key and the lowest index among the agents holding it, in one reduction: the
    # bits of floats from +0 to +inf order as integers, so (bits << 32 | index) orders by key, then index
    index = torch.arange(n, dtype=torch.int64, device=device) if index is None else index
    bits = key.view(torch.int32)
    packed = bits.to(torch.int64) if scratch is None else scratch.copy_(bits)
    packed.bitwise_left_shift_(32).bitwise_or_(index)
    least = torch.full((h,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    with warnings.catch_warnings():  # "index_reduce() is in beta": 3x faster than scatter_reduce here
        warnings.simplefilter("ignore", UserWarning)
        least = least.index_reduce_(0, group, packed, "amin")
    best = (least >> 32).to(torch.int32).view(torch.float32)  # NaN for a group of no agents
    # in place where it can be: the (H,) float64 temporaries are fresh pages each day
    old = u_group.to(torch.float64).neg_().log1p_().neg_().div_(rate64)  # rate 0: +inf, as for key
    old.nan_to_num_(nan=math.inf, posinf=math.inf)
    replaced = best.to(torch.float64) < old  # only where best is finite
    first = least.bitwise_and_(0xFFFFFFFF)  # each group's best agent
    winner = torch.zeros(n, dtype=torch.bool, device=device)
    winner[first[replaced]] = True
    total = torch.zeros(h, device=device).scatter_add_(0, group.long(), new32).to(torch.float64).add_(rate64)
    at = first.clamp_max(max(n - 1, 0))  # each group's winner (any agent where none won: masked below)
    won_weight = new_weight.index_select(0, at)
    won_rate = new32.index_select(0, at).to(torch.float64)
    # 0/1 masks as float64 factors: x × m (+ 1 - m) gives the numbers of torch.where and masked_fill_ for
    # finite x, without their slow scalar loop over a random mask. Each quotient is finite where unused
    # (its divisor + 1 there): the backward multiplies the unused branch's zero gradient by it. Where
    # used, the divisors are those of the former clamp_min(1e-300): the proxies are sums of float32
    # rates (at least 1e-45) times the effects
    # (the (H,) float64 temporaries reuse each other's arrays: each fresh one costs its pages' faults)
    is_new = replaced.view(torch.uint8).to(torch.float64)
    is_old = torch.sub(1.0, is_new)
    scale_new = torch.div(total, won_rate.add_(is_old), out=won_rate).mul_(is_new).to(weight.dtype)
    # groups whose old alternative's weight stays as it is (or has none), and 1 - that
    unscaled = (replaced | (rate64 <= 0)).view(torch.uint8).to(torch.float64)
    scaled = torch.sub(1.0, unscaled, out=is_new)
    # the old alternative's factor, 0 where replaced (so the sum below is torch.where(replaced, ., .))
    scale_old = torch.add(rate64, unscaled)
    scale_old = torch.div(total, scale_old, out=scale_old).mul_(scaled).add_(unscaled).mul_(is_old)
    kept = won_weight * scale_new + weight * scale_old.to(weight.dtype)
    if effect is not None:  # total / effect where scaled: a divisor of 1 elsewhere
        total = total.div_(effect.to(torch.float64).mul_(scaled).add_(unscaled))
    return kept, total.to(rate.dtype), winner, replaced


class BernoulliSTSampler(SoftSampler):
    """Differentiable mode, estimator ``"bernoulli"``: per-agent straight-through draws (``d/dp = 1``) and
    :meth:`advance` on the sampled outcome. Kept as the baseline the default is measured against: an
    agent pushed towards the next state carries that gradient in the next state's column, but the column
    moves on only when the agent's hard state does, so chains (exposed → infectious → infecting others)
    lose their gradient over weeks."""

    def transition(
        self, states: torch.Tensor, p_first: torch.Tensor, hazard: torch.Tensor, stream: int
    ) -> tuple[torch.Tensor, Moves]:
        self._check_chain(hazard)
        code = self.codes(states)
        p = torch.where(code == 0, p_first, hazard.index_select(0, code).to(p_first.dtype))
        leave = self.bernoulli(p, stream)
        return self.advance(states, hazard.shape[0], leave), Moves(None, None, states * leave[:, None])

    def markov(
        self, states: torch.Tensor, table: torch.Tensor, stream: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Moves]:
        k = table.shape[-1]
        code = self.codes(states)
        rows = self._rows(table, index, code)
        nxt = self._inverse_cdf(
            self.uniform(stream), rows.detach(), torch.arange(rows.shape[0], device=rows.device)
        )
        onehot = torch.nn.functional.one_hot(nxt.long(), k).to(states.dtype)
        moved = onehot + (rows - rows.detach())
        left = (nxt.long() != code).to(states.dtype)
        return moved, Moves(None, None, states * left[:, None])


class MeanFieldSampler(SoftSampler):
    """Differentiable mode, estimator ``"mean-field"``: nothing is sampled. A Bernoulli draw is its
    probability, a categorical draw its probability row, and each agent carries its expected state
    probabilities through :meth:`transition` and :meth:`markov`. Deterministic; the forward values are
    the individual-based mean-field approximation, not the stochastic run's."""

    def bernoulli(self, p: torch.Tensor, stream: int) -> torch.Tensor:
        return p

    def categorical(self, table: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
        return table.index_select(0, index)

    def hard(self, outcome: torch.Tensor) -> torch.Tensor:
        raise TypeError("the mean-field estimator has no hard outcomes; write the step with transition()")

    def transition(
        self, states: torch.Tensor, p_first: torch.Tensor, hazard: torch.Tensor, stream: int
    ) -> tuple[torch.Tensor, Moves]:
        self._check_chain(hazard)
        flow = self._flow(states, p_first, hazard)
        return self._shifted(states, flow), Moves(None, None, flow)

    def markov(
        self, states: torch.Tensor, table: torch.Tensor, stream: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Moves]:
        per_agent = table if index is None else table.index_select(0, index.long())
        flow = states * (1.0 - torch.diagonal(per_agent, dim1=1, dim2=2))
        return self._expected_rows(states, table, index), Moves(None, None, flow)


#: Gradient estimators of differentiable mode, by name (see the module docstring).
ESTIMATORS: dict[str, type[Sampler]] = {
    "pruned": PrunedSampler,
    "households": HouseholdSampler,
    "expected": SoftSampler,
    "bernoulli": BernoulliSTSampler,
    "mean-field": MeanFieldSampler,
}


#: The estimator of differentiable runs unless one is named: ``"auto"`` is ``"pruned"`` for a scenario whose
#: step carries its alternatives (``Scenario.pruned``: the COVID step), else ``"expected"``.
DEFAULT_ESTIMATOR = "auto"


def choose_estimator(estimator: str, pruned_step: bool) -> str:
    """The estimator a run uses: ``estimator``, or for ``"auto"`` ``"pruned"`` where the scenario's step
    supports it (``pruned_step``) and ``"expected"`` elsewhere. InputError for an unknown name."""
    if estimator == "auto":
        return "pruned" if pruned_step else "expected"
    if estimator not in ESTIMATORS:
        from lpm.errors import InputError

        raise InputError(f"unknown gradient estimator {estimator!r}; known: auto, {', '.join(ESTIMATORS)}")
    return estimator


def sampler_class(differentiable: bool, estimator: str = "expected") -> type[Sampler]:
    """The sampler of a run: :class:`HardSampler` in inference mode, else the named estimator's."""
    if not differentiable:
        return HardSampler
    try:
        return ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown gradient estimator {estimator!r}; known: {', '.join(ESTIMATORS)}"
        ) from None
