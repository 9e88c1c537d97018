"""Per-agent randomness that does not depend on how agents are laid out, and differentiable samples.

Counter-based uniforms: the number agent ``i`` draws at step ``t`` from stream ``s`` is a hash of
``(seed, t, s, i)``, so a trajectory is the same whether agents are simulated in one tensor, in shards or
on another device, a resumed run needs no generator state, and two runs with different parameters see the
same numbers (common random numbers, which make finite differences of a simulation meaningful).

The hash: ``(seed, step, stream)`` is mixed once in Python with SplitMix64 into a 32-bit odd multiplier
``m`` and an offset ``a``; agent ``i`` gets ``lowbias32(i * m + a)`` (Wellons' two-multiply 32-bit
integer hash, a bijection with full avalanche), whose top 24 bits make a float32 in ``[0, 1)``. Everything
per agent is int32 tensor arithmetic done in place, about a dozen passes over ``n`` integers.

Differentiable sampling uses straight-through estimators: the forward value is a hard sample, the
backward pass sees the gradient of a smooth surrogate (the probability itself for a Bernoulli, a
Gumbel-softmax relaxation for a categorical draw).
"""

from __future__ import annotations

import torch

__all__ = ["UniformStream", "bernoulli_st", "categorical_st", "mix_key", "uniform"]

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
