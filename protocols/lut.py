"""One-round table look-ups on secret shares, from a dealer's one-hot vector (Curl / NssMPClib style).

A public table ``T`` of N = 2^k entries over a grid of step 2^s (ring units of the input) starting
at signed index ``low``; the input [x] is a ring integer (any scale: a product's untruncated
2^32-scaled value works as well as a 2^16 one).

Dealer (offline): uniform r ∈ Z_2^64, and a sharing of the one-hot vector o ∈ {0,1}^N at position
    p = ⌊(r mod 2^(s+k)) / 2^s⌋; with a multiplier, also uniform β and a sharing of o·β.
Online (1 round): x' = x − low·2^s; open c = (x' + r) mod 2^(s+k) (each party sends its share plus
    r's share, mod 2^(s+k): c is uniform, so it hides x) and, with a multiplier [w], ε = w − β.
    With c = c_hi·2^s + c_lo: c_hi − p ≡ ⌊x'/2^s⌋ + [c_lo < r_lo]  (mod N), i.e. the index
    i = (c_hi − p) mod N is x'/2^s rounded down or up, up with probability equal to the fractional
    part (unbiased stochastic rounding: |x'/2^s − i| < 1).
    [T[i]] = Σ_j [o_j]·T[(c_hi − j) mod N]  (local: public rotation of the table),
    [S[i]·w] = ε·[S[i]] + Σ_j [o_j·β]·S[(c_hi − j) mod N]  (local).
Domain: the look-up is correct when low·2^s ≤ x < (low + N − 1)·2^s; outside it the index wraps
    modulo N (a wrong entry, never an error): every caller states the range it guarantees.
Cost: 1 round (batched with any other openings of the round by ``lookup_many``), 16 logged bytes
    per party per input element (+ 16 per multiplier element; CrypTen logs sent + received); dealer
    material N elements per input element (2N with a multiplier), made by party 0 under TFP or sent
    in the step's tape.
Public: shapes, s, k, low, the tables; nothing about x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from protocols.compat import comm
from protocols.dealer import TrustedFirstPartyMasks, fixed_mask_provider
from protocols.rounds import Pending, add_public, together
from protocols.truncation import plain

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import ArithmeticSharedTensor

_CHUNK = 1 << 22  # elements of (rows × N) handled at once in the local rotation


@dataclass(frozen=True)
class Table:
    """Public look-up tables on the grid ``(low + j)·2^shift``, j ∈ [0, N) (ring units of the input).

    ``values`` (K, N): plain outputs; ``slopes`` (K2, N) or None: outputs multiplied by the request's
    multiplier. Entries are ring integers (the caller picks their scale).
    """

    shift: int
    low: int
    values: torch.Tensor
    slopes: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.values.shape[-1])

    @property
    def bits(self) -> int:
        return int(math.log2(self.size))

    def to(self, device) -> "Table":
        slopes = None if self.slopes is None else self.slopes.to(device)
        return Table(self.shift, self.low, self.values.to(device), slopes)


def grid(shift: int, low: int, bits: int, in_frac: int) -> torch.Tensor:
    """The grid points (low + j)·2^shift / 2^in_frac as float64 values, j ∈ [0, 2^bits)."""
    return (torch.arange(1 << bits, dtype=torch.float64) + low) * 2.0 ** (shift - in_frac)


def encode(values: torch.Tensor, frac: int) -> torch.Tensor:
    """Float table entries as ring integers at scale 2^frac (rounded to nearest, clipped to ±2^62)."""
    return torch.round(values * 2.0**frac).clamp(-2.0**62, 2.0**62).long()


def table(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]], shift: int, low: int, bits: int,
          in_frac: int, out_frac: int,
          slopes: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (), slope_frac: int = 0) -> Table:
    """A ``Table`` of ``fn(grid)`` at scale 2^out_frac (and ``slope(grid)`` at 2^slope_frac)."""
    g = grid(shift, low, bits, in_frac)
    values = torch.stack([encode(f(g), out_frac) for f in fns])
    sl = torch.stack([encode(f(g), slope_frac) for f in slopes]) if slopes else None
    return Table(shift, low, values, sl)


def correlation(size: torch.Size, shift: int, bits: int, mult: bool,
                device=None) -> tuple[torch.Tensor, ...]:
    """This party's shares of (r, o) (+ (β, o·β) with a multiplier), plain int64 tensors."""
    provider = fixed_mask_provider()
    if isinstance(provider, TrustedFirstPartyMasks):  # party 0 draws everything: NOT secure against it
        n = 1 << bits
        if comm.get().get_rank() == 0:
            r = plain(generate_random_ring_element(tuple(size), device=device))
            pos = (r & ((1 << (shift + bits)) - 1)) >> shift
            onehot = torch.nn.functional.one_hot(pos, n).long()
            parts = [r, onehot]
            if mult:
                beta = plain(generate_random_ring_element(tuple(size), device=device))
                parts += [beta, onehot * beta.unsqueeze(-1)]
        else:
            z, zn = (torch.zeros(tuple(s), dtype=torch.long, device=device) for s in (size, (*size, n)))
            parts = [z, zn] + ([z, zn] if mult else [])
        return tuple(plain(ArithmeticSharedTensor(p, precision=0, src=0).share) for p in parts)
    from protocols.tape import TapeProvider
    if isinstance(provider, TapeProvider):
        return provider.lut(size, shift, bits, mult, device)
    raise NotImplementedError(f"no look-up correlation for {type(provider).__name__}")


@dataclass
class Request:
    """One look-up: the input share ``x`` (plain int64), its ``table``, an optional multiplier share."""

    x: torch.Tensor
    table: Table
    mult: torch.Tensor | None = None


def _rotated_dot(o: torch.Tensor, c_hi: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """``Σ_j o[..., j]·T[k, (c_hi − j) mod N]`` for every table row k: (K, *c_hi.shape)."""
    n = o.shape[-1]
    flat_o, flat_c = o.reshape(-1, n), c_hi.reshape(-1)
    ar = torch.arange(n, device=o.device)
    rows = max(1, _CHUNK // (n * max(1, tables.shape[0])))
    out = []
    for at in range(0, flat_c.numel(), rows):
        c = flat_c[at:at + rows]
        rolled = flat_o[at:at + rows].gather(1, (c.unsqueeze(1) - ar) % n)  # rolled[:, k] = o[(c − k) mod N]
        out.append((rolled.unsqueeze(0) * tables.unsqueeze(1)).sum(-1))  # (K, rows)
    return torch.cat(out, dim=1).reshape(tables.shape[0], *c_hi.shape)


def lookup_many(requests: Sequence[Request]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of ``(values[:, i], slopes[:, i]·w)`` per request (see module docstring), in 1 round."""
    return together(lookup_step(requests))[0]


def lookup_step(requests: Sequence[Request]) -> Pending:
    """``lookup_many`` as a ``protocols.rounds.Pending`` step (to share a round with others)."""
    prepared, to_open = [], []
    for req in requests:
        t = req.table.to(req.x.device)
        modulus = 1 << (t.shift + t.bits)
        x = add_public(req.x, -t.low * (1 << t.shift))
        corr = correlation(x.size(), t.shift, t.bits, req.mult is not None, device=x.device)
        to_open.append((x + corr[0]) & (modulus - 1))
        if req.mult is not None:
            to_open.append(req.mult - corr[2])
        prepared.append((req, t, modulus, corr))

    def finish(opened_list: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        opened, out = iter(opened_list), []
        for req, t, modulus, corr in prepared:
            c_hi = (next(opened) & (modulus - 1)) >> t.shift
            values = _rotated_dot(corr[1], c_hi, t.values)
            prods = None
            if req.mult is not None:
                eps = next(opened)
                prods = _rotated_dot(corr[1], c_hi, t.slopes) * eps + _rotated_dot(corr[3], c_hi, t.slopes)
            out.append((values, prods))
        return out

    return Pending(to_open, finish)
