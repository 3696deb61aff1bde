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


def add_public(share: torch.Tensor, value) -> torch.Tensor:
    """``[x] + v`` for a public ring integer (tensor) v: party 0 adds it."""
    return share + value if comm.get().get_rank() == 0 else share + 0 * value


def share_of(t: MPCTensor) -> torch.Tensor:
    """The plain int64 share of a CrypTen MPCTensor (ring integers at its encoder's scale)."""
    return plain(t.share)


def to_secret(share: torch.Tensor, precision: int = 16) -> MPCTensor:
    """An MPCTensor over ``share`` read at scale 2^precision (no communication)."""
    return MPCTensor.from_shares(wrap(share), precision=precision)

