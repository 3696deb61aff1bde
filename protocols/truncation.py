"""Exact division of 2-party shares by a public integer: one opening, no wrap errors.

CrypTen truncates 2-party shares locally (each party floors its own share): a value v at scale 2^16
after a product (ring integer z = v·2^32) comes out 2^32·2^-16 off whenever the shares straddle the
ring's wrap, with probability ≈ |z|/2^64 = |v|/2^32 per element (``tests/protocols/test_truncation.py``
measures it). Here every division by a public integer d (each fixed-point product's truncation by the
scale, means, public ``div``) runs the dealer-assisted protocol of Escudero–Ghosh–Keller–Rachuri–
Scholl (CRYPTO 2020, "TruncAPr"), generalised from 2^f to any d < 2^31 (and powers of two up to 2^62):

Dealer (offline): uniform r ∈ Z_2^64 and sharings of r, q_r = ⌊r_u/d⌋ and m_r = msb(r) (r_u: r read
    as an unsigned 64-bit integer).
Online, for [x] with |x| < 2^62:
    1. y = x + 2^62 ∈ [0, 2^63) (party 0 adds the constant): msb(y) = 0.
    2. Open c = y + r (1 round, ``n`` elements): uniform, so it hides y.
    3. The sum wrapped (y + r ≥ 2^64) iff m_r = 1 and msb(c) = 0, so [w] = (1 − msb(c))·[m_r] (local).
    4. y = c_u − r_u + w·2^64, hence ⌊y/d⌋ = ⌊c_u/d⌋ − q_r + w·Q + e with Q = ⌊2^64/d⌋ and
       e ∈ {−1, 0, 1} (the three remainders), and [⌊x/d⌋] = ⌊c_u/d⌋ − [q_r] + Q·[w] − ⌊2^62/d⌋.
Error: |result − x/d| < 2 for every |x| < 2^62 (< 1 ulp + floor when d is a power of two, ρ_Q = 0);
never a large error. Cost per call: 1 round, ``16·n`` logged bytes per party (the opening), plus
the correlation: 3·n elements (5·n with the square) made by party 0 (TFP, no messages) or by the dealer
(``protocols.tape``: party 0's 2·n (4·n) elements in the step's tape; party 1 draws all of its shares
from seeds).
Squares (``trunc_step(..., square=True)``): with x = ⌊c_u/d⌋ − ⌊2^62/d⌋ =: p (public), [x] = p − [q_r] +
    Q·nw·[m_r] (nw = 1 − msb(c) public, w = nw·m_r ∈ {0, 1} so w² = w), hence
    [x²] = p² − 2p·[q_r] + [q_r²] + 2Q·nw·(p·[m_r] − [q_r·m_r]) + Q²·nw·[m_r]: local, from two more
    correlated elements per input (q_r², q_r·m_r). It is the square of the computed ⌊x/d⌋ exactly (a
    ring identity), so a norm after a residual truncation needs no squaring round.
Products (``trunc_mul_step``): the same opening of c with the Beaver opening ε = y − b of a partner
    [y] gives [⌊x/d⌋·y] = (p + Q·nw·[m_r] − [q_r])·ε + p·[b] − [q_r·b] + Q·nw·[m_r·b], so a product whose
    operand is a truncation's result needs no round of its own (correlation: r, b, q_r, m_r, q_r·b,
    m_r·b; the product shape's two in the tape).
Public: shapes, d, c (uniform). ``ProtocolConfig.truncation = "local"`` keeps CrypTen's local
truncation (0 rounds, the hazard above) for comparison.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from protocols.compat import comm
from protocols.dealer import TrustedFirstPartyMasks, fixed_mask_provider

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.cuda import CUDALongTensor
from crypten.mpc.primitives import ArithmeticSharedTensor

_OFFSET = 1 << 62
_MASK32 = (1 << 32) - 1


def _signed(v: int) -> int:
    """``v mod 2^64`` as a signed 64-bit integer."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


def plain(t) -> torch.Tensor:
    """The torch tensor under CrypTen's CUDA share wrapper (ring arithmetic below runs on it)."""
    return t.tensor() if isinstance(t, CUDALongTensor) else t


def wrap(t: torch.Tensor):
    """A ring tensor as CrypTen holds shares: ``CUDALongTensor`` on CUDA, itself on the CPU."""
    return CUDALongTensor(t) if t.is_cuda else t


def udiv(t: torch.Tensor, d: int | torch.Tensor) -> torch.Tensor:
    """``⌊t_u / d⌋ mod 2^64`` for int64 ``t`` read as unsigned and 1 ≤ d < 2^31 (int or int tensor),
    or an int power of two d ≤ 2^62 (a logical shift).

    Long division in two 32-bit digits: ``(rem(hi)·2^32 + lo) < d·2^32 < 2^63`` never overflows.
    """
    if isinstance(d, int) and d >= 1 << 31:
        k = d.bit_length() - 1
        return (t >> k) & ((1 << (64 - k)) - 1)
    hi, lo = (t >> 32) & _MASK32, t & _MASK32
    q_hi = torch.div(hi, d, rounding_mode="floor")
    rest = (hi - q_hi * d) * (1 << 32) + lo
    return q_hi * (1 << 32) + torch.div(rest, d, rounding_mode="floor")


def _check_divisor(d: int | torch.Tensor) -> None:
    if isinstance(d, int) and d >= 1 << 31 and d & (d - 1) == 0 and d <= 1 << 62:
        return
    low, high = (d, d) if isinstance(d, int) else (int(d.min()), int(d.max()))
    if not 1 <= low <= high < 1 << 31:
        raise ValueError("exact truncation needs public divisors in [1, 2^31) or powers of two up to 2^62, "
                         f"got [{low}, {high}]")


def _wrap_constant(d: int | torch.Tensor) -> int | torch.Tensor:
    """Q = ⌊2^64/d⌋ mod 2^64 (signed) for an int, ⌊(2^64 − 1)/d⌋ per element for a tensor (the
    error bound absorbs the difference of at most 1)."""
    if isinstance(d, int):
        return _signed((1 << 64) // d)
    return udiv(torch.full_like(d, -1), d)


def correlation(size: torch.Size, d: int | torch.Tensor, device: torch.device | None = None,
                square: bool = False) -> tuple[torch.Tensor, ...]:
    """This party's shares of (r, ⌊r_u/d⌋, msb(r)), and with ``square`` of (q_r², q_r·m_r), from the
    provider the parties run with."""
    provider = fixed_mask_provider()
    rank = comm.get().get_rank()
    if isinstance(provider, TrustedFirstPartyMasks):  # party 0 draws r: NOT secure against party 0
        if rank == 0:
            r = plain(generate_random_ring_element(tuple(size), device=device))
            q, m = udiv(r, d), (r < 0).long()
            parts = (r, q, m) + ((q * q, q * m) if square else ())
        else:
            parts = (torch.zeros(size, dtype=torch.long, device=device),) * (5 if square else 3)
        return tuple(ArithmeticSharedTensor(p, precision=0, src=0).share for p in parts)
    from protocols.tape import TapeProvider
    if isinstance(provider, TapeProvider):
        return provider.trunc(size, d, device, square=square)
    raise NotImplementedError(f"no truncation correlation for {type(provider).__name__}")


def mul_correlation(size_z: torch.Size, size_y: torch.Size, d: int,
                    device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """This party's shares of (r, b, ⌊r_u/d⌋, msb(r), q_r·b, m_r·b) (``trunc_mul_step``)."""
    provider = fixed_mask_provider()
    if isinstance(provider, TrustedFirstPartyMasks):  # party 0 draws r, b: NOT secure against party 0
        out = torch.broadcast_shapes(size_z, size_y)
        if comm.get().get_rank() == 0:
            r = plain(generate_random_ring_element(tuple(size_z), device=device))
            b = plain(generate_random_ring_element(tuple(size_y), device=device))
            q, m = udiv(r, d), (r < 0).long()
            parts = (r, b, q, m, q * b, m * b)
        else:
            parts = tuple(torch.zeros(s, dtype=torch.long, device=device)
                          for s in (size_z, size_y, size_z, size_z, out, out))
        return tuple(ArithmeticSharedTensor(p, precision=0, src=0).share for p in parts)
    from protocols.tape import TapeProvider
    if isinstance(provider, TapeProvider):
        return provider.trunc_mul(size_z, size_y, d, device)
    raise NotImplementedError(f"no truncation correlation for {type(provider).__name__}")


def opening(share: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """What this party sends for the truncation of ``share`` with mask ``r``: its share of c = x + 2^62 + r."""
    return share + r + (_OFFSET if comm.get().get_rank() == 0 else 0)


def truncated(c: torch.Tensor, d: int | torch.Tensor, q: torch.Tensor, m: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """From the opened c and this party's [q_r], [m_r]: (its share of ⌊x/d⌋ *without* party 0's public
    part p, p = ⌊c_u/d⌋ − ⌊2^62/d⌋, nw = 1 − msb(c), Q): [⌊x/d⌋] = p + Q·nw·[m_r] − [q_r]."""
    nw = (c >= 0).long()  # the sum wrapped iff m_r = 1 and nw = 1
    big = _wrap_constant(d)
    p = udiv(c, d) - torch.div(torch.as_tensor(_OFFSET, device=c.device), d, rounding_mode="floor")
    return big * nw * m - q, p, nw, big


def exact_div_(x: ArithmeticSharedTensor, d: int | torch.Tensor) -> ArithmeticSharedTensor:
    """``[x] ← [⌊x/d⌋]`` in place, for |x| < 2^62 and public 1 ≤ d < 2^31 (see module docstring)."""
    (x.share,) = (wrap(t) for t in exact_div_many([(plain(x.share), d)]))
    return x


def exact_div_many(items: list[tuple[torch.Tensor, int | torch.Tensor]]) -> list[torch.Tensor]:
    """Shares of ``⌊x/d⌋`` for every (plain int64 share, public divisor) pair, all opened in one round."""
    from protocols.rounds import together
    return together(trunc_step(items))[0]


def trunc_step(items: list[tuple[torch.Tensor, int | torch.Tensor]], square: bool = False):
    """``exact_div_many`` as a ``protocols.rounds.Pending`` step (to share a round with others).

    ``square``: each result is the pair (⌊x/d⌋, ⌊x/d⌋²) (int d), the square at no extra round
    (module docstring, "Squares")."""
    from protocols.rounds import Pending
    rank = comm.get().get_rank()
    prepared = []
    for share, d in items:
        _check_divisor(d)
        if square and not isinstance(d, int):
            raise ValueError("a truncation with its square needs an int divisor")
        if not isinstance(d, int):
            d = d.to(device=share.device, dtype=torch.long)
        r, *corr = (plain(t) for t in correlation(share.size(), d, device=share.device, square=square))
        prepared.append((opening(share, r), d, corr))

    def finish(opened: list[torch.Tensor]) -> list:
        out = []
        for c, (_, d, corr) in zip(opened, prepared):
            q, m = corr[:2]
            share, p, nw, big = truncated(c, d, q, m)
            if rank == 0:
                share = share + p
            if not square:
                out.append(share)
                continue
            q2, qm = corr[2:]
            # (p − q + Q·w)² with w = nw·m ∈ {0, 1}: p² − 2p·q + q² + 2Q·nw·(p·m − q·m) + Q²·nw·m
            sq = q2 - 2 * p * q + _signed(2 * big) * nw * (p * m - qm) + _signed(big * big) * nw * m
            out.append((share, sq + p * p if rank == 0 else sq))
        return out

    return Pending([p[0] for p in prepared], finish)


def trunc_mul_step(z: torch.Tensor, d: int, y: torch.Tensor):
    """⌊z/d⌋·y in the truncation's own round, as a ``protocols.rounds.Pending`` (module docstring,
    "Products"): opens c = z + 2^62 + r and ε = y − b; the finish gives (⌊z/d⌋, ⌊z/d⌋·y) shares
    (shapes broadcast; the product at the sum of the two scales, untruncated)."""
    from protocols.rounds import Pending
    _check_divisor(d)
    if not isinstance(d, int):
        raise ValueError("a truncation fused with a product needs an int divisor")
    rank = comm.get().get_rank()
    r, b, q, m, qb, mb = (plain(t) for t in mul_correlation(z.size(), y.size(), d, device=z.device))

    def finish(opened: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c, eps = opened
        x, p, nw, big = truncated(c, d, q, m)  # x + p on party 0
        # (p − q + Q·nw·m)·(ε + b) = p·ε + (Q·nw·m − q)·ε + p·b − q·b + Q·nw·m·b
        xy = x * eps + p * b - qb + big * nw * mb
        if rank == 0:
            return x + p, xy + p * eps
        return x, xy

    return Pending([opening(z, r), y - b], finish)


class Untruncated(NamedTuple):
    """A fixed-point secret whose last truncation is still to come: the value is ⌊[share]/d⌋ @2^16.

    The consumer either fuses the truncation into its own opening (``protocols.fixed_mask.
    trunc_matmul_step``: a product with a fixed-mask matrix in the truncation's round) or ``settle``s
    it (1 round, ``16·n`` logged bytes)."""

    share: torch.Tensor
    d: int

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def settle(self):
        """The truncated secret as an MPCTensor (1 round)."""
        from protocols.rounds import to_secret
        return to_secret(exact_div_many([(self.share, self.d)])[0])

    def map(self, fn) -> Untruncated:
        """The same pending truncation of ``fn(share)``; ``fn`` only rearranges elements (reshape,
        transpose, slicing), which commutes with the element-wise truncation."""
        return Untruncated(fn(self.share), self.d)


def local_div_(x: ArithmeticSharedTensor, d: int | torch.Tensor) -> ArithmeticSharedTensor:
    """CrypTen's 2-party local truncation (0 rounds; off by 2^64/d w.p. ≈ |x|/2^64)."""
    x.share = wrap(plain(x.share).div_(d, rounding_mode="trunc"))
    return x

