"""Many openings in one round: flat all-reduces and batched raw Beaver products on ring shares.

CrypTen opens one tensor (or a pair) per collective; a protocol step that needs several independent
openings (a look-up's masked index and its multiplier, several products of different shapes, a
product and a truncation) pays one round each. Here every opening of a step goes into one flat int64
all-reduce: one round, the same bytes (16 logged per element: CrypTen counts sent + received).

Shares here are plain int64 torch tensors (``protocols.truncation.plain`` unwraps CrypTen's CUDA
wrapper); values are ring integers, so a product of two fixed-point shares is at the sum of their
scales until someone truncates it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from protocols.compat import MPCTensor, comm, crypten
from protocols.truncation import plain, wrap

Shape = Sequence[int]


def open_many(shares: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The plaintexts ``Σ_p share_p`` of every tensor in ``shares``, in one all-reduce (1 round)."""
    if not shares:
        return []
    flat = torch.cat([s.reshape(-1) for s in shares])
    total = plain(comm.get().all_reduce(wrap(flat)))
    out, at = [], 0
    for s in shares:
        out.append(total[at:at + s.numel()].reshape(s.shape))
        at += s.numel()
    return out


@dataclass
class Pending:
    """One protocol step waiting for its round: the shares it opens, and what it makes of the sums."""

    opens: list[torch.Tensor]
    finish: Callable[[list[torch.Tensor]], Any]


def together(*steps: Pending) -> list[Any]:
    """Run independent steps in one round: all their openings in one all-reduce, then each finish."""
    opened = open_many([t for s in steps for t in s.opens])
    out, at = [], 0
    for s in steps:
        out.append(s.finish(opened[at:at + len(s.opens)]))
        at += len(s.opens)
    return out


def triples(pairs: Sequence[tuple[Shape, Shape]], device) -> list[tuple[torch.Tensor, ...]]:
    """Beaver triples ``([a], [b], [a·b])`` (element-wise, broadcast) from the parties' provider."""
    provider = crypten.mpc.get_default_provider()
    out = []
    for sx, sy in pairs:
        a, b, c = provider.generate_additive_triple(torch.Size(sx), torch.Size(sy), "mul", device=device)
        out.append((plain(a.share), plain(b.share), plain(c.share)))
    return out


def mul_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Shares of ``x·y`` (ring product, no truncation) for every pair, in one round (``mul_step``)."""
    return together(mul_step(pairs))[0]


def mul_step(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Pending:
    """Beaver products as a step: open ε = x − a and δ = y − b for all pairs;
    ``[xy] = [c] + ε[b] + δ[a] + εδ`` (party 0 adds εδ). Cost: 1 round, ``16·(|x| + |y|)`` logged
    bytes per party and pair."""
    if not pairs:
        return Pending([], lambda _: [])
    trip = triples([(tuple(x.shape), tuple(y.shape)) for x, y in pairs], pairs[0][0].device)
    rank = comm.get().get_rank()

    def finish(opened: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (a, b, c) in enumerate(trip):
            eps, delta = opened[2 * i], opened[2 * i + 1]
            z = c + eps * b + a * delta
            out.append(z + eps * delta if rank == 0 else z)
        return out

    return Pending([t for (x, y), (a, b, _) in zip(pairs, trip) for t in (x - a, y - b)], finish)


def _mul3_correlation(sa: Shape, sb: Shape, sc: Shape, device) -> tuple[torch.Tensor, ...]:
    """This party's shares of (a, b, c, a·b, a·c, b·c, a·b·c) from the parties' provider."""
    from protocols.dealer import TrustedFirstPartyMasks, fixed_mask_provider
    from protocols.tape import TapeProvider
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.primitives import ArithmeticSharedTensor
    provider = fixed_mask_provider()
    if isinstance(provider, TapeProvider):
        return provider.mul3(sa, sb, sc, device)
    assert isinstance(provider, TrustedFirstPartyMasks), type(provider).__name__
    if comm.get().get_rank() == 0:  # party 0 draws a, b, c: NOT secure against party 0
        a, b, c = (plain(generate_random_ring_element(tuple(s), device=device)) for s in (sa, sb, sc))
        parts = [a, b, c, a * b, a * c, b * c, a * b * c]
    else:
        shapes = [sa, sb, sc, torch.broadcast_shapes(sa, sb), torch.broadcast_shapes(sa, sc),
                  torch.broadcast_shapes(sb, sc), torch.broadcast_shapes(sa, sb, sc)]
        parts = [torch.zeros(tuple(s), dtype=torch.long, device=device) for s in shapes]
    return tuple(plain(ArithmeticSharedTensor(p, precision=0, src=0).share) for p in parts)


def mul3_step(factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Pending:
    """Three-factor products x·y·z (broadcast, no truncation) in one round: open x − a, y − b, z − c;
    with ε, δ, γ those openings, [xyz] = εδγ + εδ[c] + εγ[b] + δγ[a] + ε[bc] + δ[ac] + γ[ab] + [abc]
    (party 0 adds εδγ). Correlation (a, b, c, ab, ac, bc, abc) from the dealer or party 0 (TFP).
    Cost: 1 round, ``16·(|x| + |y| + |z|)`` logged bytes per party and product."""
    corr = [_mul3_correlation(x.shape, y.shape, z.shape, x.device) for x, y, z in factors]
    rank = comm.get().get_rank()

    def finish(opened: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (a, b, c, ab, ac, bc, abc) in enumerate(corr):
            e, d, g = opened[3 * i: 3 * i + 3]
            z = e * d * c + e * g * b + d * g * a + e * bc + d * ac + g * ab + abc
            out.append(z + e * d * g if rank == 0 else z)
        return out

    return Pending([t for (x, y, z), (a, b, c, *_) in zip(factors, corr) for t in (x - a, y - b, z - c)], finish)


def add_public(share: torch.Tensor, value) -> torch.Tensor:
    """``[x] + v`` for a public ring integer (tensor) v: party 0 adds it."""
    return share + value if comm.get().get_rank() == 0 else share + 0 * value


def share_of(t: MPCTensor) -> torch.Tensor:
    """The plain int64 share of a CrypTen MPCTensor (ring integers at its encoder's scale)."""
    return plain(t.share)


def to_secret(share: torch.Tensor, precision: int = 16) -> MPCTensor:
    """An MPCTensor over ``share`` read at scale 2^precision (no communication)."""
    return MPCTensor.from_shares(wrap(share), precision=precision)

