"""Correlated randomness for fixed-mask matmul: the party-side providers and the dealer process.

A fixed operand ``[W]`` gets one persistent random mask ``[B]``; every product ``x @ W`` then needs
a fresh pair ``[A]``, ``[C] = [A @ B]`` (see ``protocols.fixed_mask``). Whoever makes ``C`` must know
``B`` in plaintext, so the provider keeps ``B`` per operand under an integer key:

- ``TrustedFirstPartyMasks`` (CrypTen ``TFP``): party 0 draws ``B`` and ``A``, computes ``C`` and
  shares all three by pseudo-random zero sharing. Zero logged communication, **not secure against
  party 0** (it knows every mask), exactly like CrypTen's TFP Beaver triples.
- ``DealerMasks`` (CrypTen ``TTP``): rank ``world_size`` runs ``serve()`` (a ``TTPServer`` that also
  answers ``fm_*`` requests). Each party draws its shares of ``A`` and ``B`` from the PRG it shares
  with the dealer; the dealer derives ``A, B`` from both PRGs, keeps ``B`` and sends party 0 its
  share of ``C``. As in CrypTen's TTP, that traffic (request, size, ``|C|`` elements) is logged in
  party 0's stats; party 1 draws ``C``'s share locally and logs nothing.

Both follow CrypTen's ``TupleProvider`` shape: ``FixedMaskProvider`` methods raise
``NotImplementedError`` until a subclass fills them in; ``fixed_mask_provider()`` picks the one that
matches the Beaver provider the parties were launched with.
"""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

import torch

from protocols.compat import comm, crypten
from protocols.config import ProtocolConfig, protocol_context

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import ArithmeticSharedTensor
from crypten.mpc.provider import TrustedFirstParty, TrustedThirdParty, TTPServer
from crypten.mpc.provider.ttp_provider import TTPClient

logger = logging.getLogger(__name__)

Size = Sequence[int]


def product_size(size_a: Size, size_b: Size, transpose_b: bool) -> torch.Size:
    """Shape of ``A @ B`` (or ``A @ Bᵀ``) under torch.matmul broadcasting, computed without data."""
    a = torch.empty(tuple(size_a), device="meta")
    b = torch.empty(tuple(size_b), device="meta")
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b).shape


def _matmul(a: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> torch.Tensor:
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b)


class FixedMaskProvider:
    """Party-side source of fixed masks ``[B]`` and per-call pairs ``([A], [C] = [A @ B])``.

    All returned shares are ring elements with precision 0 (no fixed-point scaling).
    """

    NAME = "abstract"

    def __init__(self) -> None:
        self._keys = itertools.count()

    def new_key(self) -> int:
        """A fresh operand key; every party calls this at the same program point."""
        return next(self._keys)

    def mask(self, key: int, size: Size, dim: int | None = None,
             device: torch.device | None = None) -> ArithmeticSharedTensor:
        """``[B]`` for a new operand (``dim=None``) or for rows appended to ``key`` along ``dim``."""
        raise NotImplementedError(f"{type(self).__name__}.mask")

    def pair(self, key: int, size_a: Size, size_b: Size, transpose: bool,
             device: torch.device | None = None) -> tuple[ArithmeticSharedTensor, ArithmeticSharedTensor]:
        """Fresh ``[A]`` of ``size_a`` and ``[C] = [A @ B]`` (``[A @ Bᵀ]`` when ``transpose``).

        ``size_b`` is the current shape of ``B[key]`` (known to every party).
        """
        raise NotImplementedError(f"{type(self).__name__}.pair")

    def select(self, key: int, new_key: int, dim: int, index: torch.Tensor) -> None:
        """Register ``B[new_key] = B[key].index_select(dim, index)`` (public ``index``)."""
        raise NotImplementedError(f"{type(self).__name__}.select")

    def release(self, key: int) -> None:
        """Forget ``B[key]`` (called by a finalizer: must not communicate)."""
        raise NotImplementedError(f"{type(self).__name__}.release")


class TrustedFirstPartyMasks(FixedMaskProvider):
    """Party 0 plays dealer and keeps every ``B`` in plaintext (benchmark only, NOT secure)."""

    NAME = "TFP"

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[int, torch.Tensor] = {}  # filled on party 0 only

    def mask(self, key, size, dim=None, device=None):
        b = generate_random_ring_element(tuple(size), device=device)
        if comm.get().get_rank() == 0:
            self._masks[key] = b if dim is None else torch.cat([self._masks[key], b], dim=dim)
        return ArithmeticSharedTensor(b, precision=0, src=0)

    def pair(self, key, size_a, size_b, transpose, device=None):
        a = generate_random_ring_element(tuple(size_a), device=device)
        if comm.get().get_rank() == 0:
            c = _matmul(a, self._masks[key], transpose)
        else:  # only the size matters off the source party
            c = torch.zeros(product_size(size_a, size_b, transpose), dtype=torch.long, device=device)
        return (ArithmeticSharedTensor(a, precision=0, src=0),
                ArithmeticSharedTensor(c, precision=0, src=0))

    def select(self, key, new_key, dim, index):
        if comm.get().get_rank() == 0:
            self._masks[new_key] = self._masks[key].index_select(dim, index)

    def release(self, key):
        self._masks.pop(key, None)


class DealerMasks(FixedMaskProvider):
    """Masks from the separate dealer (rank ``world_size``), over CrypTen's TTP channel.

    Party ``i`` draws its shares of ``B`` and ``A`` from the PRG it shares with the dealer; party 1
    also draws its share of ``C``; party 0 asks the dealer for ``c0 = A @ B − c1``. Releases are
    queued by finalizers and piggybacked on the next request (no extra rounds).
    """

    NAME = "TTP"

    def __init__(self) -> None:
        super().__init__()
        self._released: list[int] = []

    def _request(self, function: str, device, *args) -> torch.Tensor:
        released, self._released = self._released, []
        return TTPClient.get().ttp_request(function, device, *args, release=released)

    def mask(self, key, size, dim=None, device=None):
        gen = TTPClient.get().get_generator(device=device)
        b = generate_random_ring_element(tuple(size), generator=gen, device=device)
        if comm.get().get_rank() == 0:
            self._request("fm_mask", device, key, tuple(size), dim)
        else:
            self._released.clear()  # only party 0 talks to the dealer
        return ArithmeticSharedTensor.from_shares(b, precision=0)

    def pair(self, key, size_a, size_b, transpose, device=None):
        gen = TTPClient.get().get_generator(device=device)
        a = generate_random_ring_element(tuple(size_a), generator=gen, device=device)
        if comm.get().get_rank() == 0:
            c = self._request("fm_pair", device, key, tuple(size_a), transpose)
        else:
            c = generate_random_ring_element(product_size(size_a, size_b, transpose),
                                             generator=gen, device=device)
        return (ArithmeticSharedTensor.from_shares(a, precision=0),
                ArithmeticSharedTensor.from_shares(c, precision=0))

    def select(self, key, new_key, dim, index):
        if comm.get().get_rank() == 0:
            self._request("fm_select", None, key, new_key, dim, index.tolist())

    def request_trunc(self, size: Size, d: int | list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Party 0's shares of (⌊r_u/d⌋, msb(r)) for ``protocols.truncation`` (one request)."""
        qm = self._request("trunc", device, tuple(size), d)
        return qm[0], qm[1]

    def release(self, key):
        self._released.append(key)


_PROVIDERS: dict[type, FixedMaskProvider] = {
    TrustedFirstParty: TrustedFirstPartyMasks(),
    TrustedThirdParty: DealerMasks(),
}


def fixed_mask_provider() -> FixedMaskProvider:
    """The fixed-mask provider matching the Beaver provider the parties run with (TFP or TTP)."""
    beaver = type(crypten.mpc.get_default_provider())
    if beaver not in _PROVIDERS:
        raise NotImplementedError(f"no fixed-mask provider for CrypTen provider {beaver.__name__}")
    return _PROVIDERS[beaver]


class FixedMaskServer(TTPServer):
    """CrypTen's ``TTPServer`` plus the ``fm_*`` requests; keeps every live ``B`` in plaintext.

    Construction runs the serving loop (as ``TTPServer`` does) until party 0 sends "terminate".
    """

    def __init__(self) -> None:
        self._masks: dict[int, torch.Tensor] = {}
        super().__init__()

    def _forget(self, release: Sequence[int]) -> None:
        for key in release:
            self._masks.pop(key, None)

    def fm_mask(self, key: int, size: Size, dim: int | None, release: Sequence[int] = ()):
        self._forget(release)
        b = self._get_additive_PRSS(size)  # b0 + b1, the same draws the parties make
        self._masks[key] = b if dim is None else torch.cat([self._masks[key], b], dim=dim)
        logger.debug("dealer: mask %d now %s (%d live)", key, tuple(self._masks[key].shape),
                     len(self._masks))
        return torch.empty(0, dtype=torch.long)

    def fm_pair(self, key: int, size_a: Size, transpose: bool, release: Sequence[int] = ()):
        self._forget(release)
        if key not in self._masks:
            raise KeyError(f"dealer has no mask for operand {key}")
        a = self._get_additive_PRSS(size_a)
        c = _matmul(a, self._masks[key].to(a.device), transpose)
        return c - self._get_additive_PRSS(c.size(), remove_rank=True)

    def fm_select(self, key: int, new_key: int, dim: int, index: list[int],
                  release: Sequence[int] = ()):
        self._forget(release)
        self._masks[new_key] = self._masks[key].index_select(dim, torch.as_tensor(index, device=self._masks[key].device))
        return torch.empty(0, dtype=torch.long)

    def trunc(self, size: Size, d: int | list, release: Sequence[int] = ()):
        """Party 0's shares of (⌊r_u/d⌋, msb(r)) stacked; r and party 1's shares come from the PRGs."""
        self._forget(release)
        r = self._get_additive_PRSS(size)
        party1 = [self._get_additive_PRSS(size, remove_rank=True) for _ in range(2)]
        return _trunc_answer(r, d, party1)


def _trunc_answer(r: torch.Tensor, d: int | list, party1: list[torch.Tensor]) -> torch.Tensor:
    from protocols.truncation import udiv
    dd = d if isinstance(d, int) else torch.as_tensor(d, device=r.device)
    return torch.stack([udiv(r, dd) - party1[0], (r < 0).long() - party1[1]])


def serve(cfg: ProtocolConfig | None = None) -> None:
    """Dealer main (rank ``world_size``): serve Beaver tuples and fixed masks until parties leave.

    Pass as ``dealer_main`` to ``launch.local.run_parties`` or call on mpirun rank 2.
    """
    with protocol_context(cfg or ProtocolConfig(), dealer=True):
        FixedMaskServer()
