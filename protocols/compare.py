"""Exact comparison of secret ring integers in two rounds, from a dealer's one-hot digits.

For [x] with |x| < 2^B (public B ≤ 62), ``[β] = [x ≥ 0]`` (a 0/1 share at scale 1) and, with a
multiplier [w], ``[β·w]`` in the same two rounds — the compare-and-select of a max, ``b + [a − b ≥ 0]·(a − b)``.
The digit decomposition of the mask is the classic one (Damgård et al. TCC 2006; with one-hot digits
as in the look-up-table comparisons of Pika, Wagh PETS 2022); the digit trits are combined by one
exact look-up instead of a product tree.

Dealer (offline): uniform r ∈ Z_2^64; sharings of ρ_top = bit B of r and of the one-hot vectors o_j
    of the D digits ρ_j of r mod 2^B (widths k_j ≤ 8, Σ k_j = B; ``digit_widths``).
Round 1: y = x + 2^B ∈ [0, 2^(B+1)) (party 0 adds 2^B); open c = (y + r) mod 2^(B+1), uniform, so it
    hides y. With c = c_top·2^B + c_lo and γ_j the digits of c_lo: y = (c − r) mod 2^(B+1), so bit B of
    y, which is [x ≥ 0], equals c_top ⊕ ρ_top ⊕ [r mod 2^B > c_lo] (the borrow).
    Digit trits t_j = 2·[ρ_j > γ_j] + [ρ_j = γ_j] ∈ {0, 1, 2} are local: t_j = S_j[γ_j] + S_j[γ_j + 1]
    with S_j the suffix sums of o_j. s = Σ_j 3^j·t_j + 3^D·ρ_top ∈ [0, 2·3^D), a secret small integer.
Round 2: one exact look-up (``protocols.lut``, step 1, N = 2^⌈log2(2·3^D)⌉ entries) of
    f(s) = ρ_top ⊕ [the highest j with t_j ≠ 1 has t_j = 2], with the multiplier w: [f], [f·w]. Then
    [β] = c_top + (1 − 2c_top)·[f] and [β·w] = c_top·[w] + (1 − 2c_top)·[f·w] (c_top public: local).
Cost: 2 rounds; logged bytes per party and element 16 (round 1) + 16 (round 2) + 16 with a multiplier;
    dealer material Σ_j 2^k_j + 1 elements (round 1) and N (2N with a multiplier) per element, made by
    party 0 under TFP (NOT secure against it) or sent in the step's tape (``protocols.tape``, kind "cmp").
Error: exact for every |x| < 2^B; outside it the bit is wrong (never an exception): callers state B.
Public: B, shapes, c (uniform mod 2^(B+1)); nothing about x.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch

from protocols.compat import comm
from protocols.dealer import TrustedFirstPartyMasks, fixed_mask_provider
from protocols.lut import Request, Table, lookup_many
from protocols.rounds import add_public, open_many
from protocols.truncation import plain

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import ArithmeticSharedTensor

MAX_DIGIT_BITS = 8


@functools.lru_cache(maxsize=None)
def digit_widths(bits: int) -> tuple[int, ...]:
    """Digit widths (LSB first, each ≤ 8, summing to ``bits``) that minimise the dealer material
    Σ 2^k_j + 2^⌈log2(2·3^D)⌉ per element."""
    if not 1 <= bits <= 62:
        raise ValueError(f"comparison bound must be in [1, 62] bits, got {bits}")
    best = None
    for d in range(math.ceil(bits / MAX_DIGIT_BITS), min(bits, 8) + 1):
        widths = tuple(bits // d + (j < bits % d) for j in range(d))
        cost = sum(1 << k for k in widths) + (1 << _carry_bits(d))
        if best is None or cost < best[0]:
            best = (cost, widths)
    return best[1]


def material(bits: int, mult: bool = False) -> int:
    """Dealer elements per compared element (one-hots, the top bit, the round-2 one-hot)."""
    widths = digit_widths(bits)
    return sum(1 << k for k in widths) + 1 + (1 << _carry_bits(len(widths))) * (2 if mult else 1)


def _carry_bits(d: int) -> int:
    return math.ceil(math.log2(2 * 3**d))


@functools.lru_cache(maxsize=None)
def _carry_table(d: int, mult: bool) -> Table:
    """f(s) = ρ_top ⊕ borrow(s) on s = Σ 3^j t_j + 3^D ρ_top (module docstring), 0 past 2·3^D."""
    n = 1 << _carry_bits(d)
    f = torch.zeros(n, dtype=torch.long)
    for top in (0, 1):
        for trits in itertools.product(range(3), repeat=d):  # trits[j] = t_j
            first = next((t for t in reversed(trits) if t != 1), 1)
            s = sum(t * 3**j for j, t in enumerate(trits)) + top * 3**d
            f[s] = top ^ int(first == 2)
    row = f.unsqueeze(0)
    return Table(0, 0, row, row if mult else None)


def digit_onehots(r: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hots of r mod 2^B's digits, concatenated (..., Σ 2^k_j), and bit B of r (...)."""
    parts, at = [], 0
    for k in widths:
        parts.append(torch.nn.functional.one_hot((r >> at) & ((1 << k) - 1), 1 << k).long())
        at += k
    return torch.cat(parts, dim=-1), (r >> at) & 1


def correlation(size: torch.Size, widths: tuple[int, ...], device=None) -> tuple[torch.Tensor, ...]:
    """This party's shares of (r, the digit one-hots, ρ_top) from the provider the parties run with."""
    provider = fixed_mask_provider()
    if isinstance(provider, TrustedFirstPartyMasks):  # party 0 draws r: NOT secure against party 0
        if comm.get().get_rank() == 0:
            r = plain(generate_random_ring_element(tuple(size), device=device))
            parts = (r, *digit_onehots(r, widths))
        else:
            z = lambda *s: torch.zeros(s, dtype=torch.long, device=device)  # noqa: E731
            parts = (z(*size), z(*size, sum(1 << k for k in widths)), z(*size))
        return tuple(plain(ArithmeticSharedTensor(p, precision=0, src=0).share) for p in parts)
    from protocols.tape import TapeProvider
    if isinstance(provider, TapeProvider):
        return provider.cmp(size, widths, device)
    raise NotImplementedError(f"no comparison correlation for {type(provider).__name__}")


def ge_zero_many(items: Sequence[tuple[torch.Tensor, torch.Tensor | None]], bits: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of ``([x ≥ 0], [x ≥ 0]·w)`` (the second None without a multiplier) for every
    (plain int64 share x, multiplier share w or None), all in the same 2 rounds; |x| < 2^bits."""
    if all(x.numel() == 0 for x, _ in items):  # nothing to compare: no round
        return [(x.clone(), None if w is None else w.clone()) for x, w in items]
    widths = digit_widths(bits)
    d, modulus = len(widths), 1 << (bits + 1)
    corr = [correlation(x.shape, widths, x.device) for x, _ in items]
    opened = open_many([(add_public(x, 1 << bits) + r) & (modulus - 1) for (x, _), (r, _, _) in zip(items, corr)])
    requests, tops = [], []
    for (x, w), (_, o, rho), c in zip(items, corr, opened):
        c = c & (modulus - 1)
        tops.append(c >> bits)
        s, at, off = rho * 3**d, 0, 0
        for j, k in enumerate(widths):
            suffix = o[..., at:at + (1 << k)].flip(-1).cumsum(-1).flip(-1)  # S[v] = Σ_{u ≥ v} o_j[u]
            suffix = torch.nn.functional.pad(suffix, (0, 1))  # S[2^k] = 0
            g = ((c >> off) & ((1 << k) - 1)).unsqueeze(-1)  # γ_j
            s = s + 3**j * (suffix.gather(-1, g) + suffix.gather(-1, g + 1)).squeeze(-1)
            at, off = at + (1 << k), off + k
        requests.append(Request(s, _carry_table(d, w is not None), w))
    out = []
    for (_, w), top, (f, fw) in zip(items, tops, lookup_many(requests)):
        flip = 1 - 2 * top
        beta = add_public(flip * f[0], top)
        out.append((beta, None if w is None else top * w + flip * fw[0]))
    return out

