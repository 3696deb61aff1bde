"""Correlated randomness for fixed-mask matmul: the party-side providers.

A fixed operand ``[W]`` gets one persistent random mask ``[B]``; every product ``x @ W`` then needs
a fresh pair ``[A]``, ``[C] = [A @ B]`` (see ``protocols.fixed_mask``). Whoever makes ``C`` must know
``B`` in plaintext, so the provider keeps ``B`` per operand under an integer key:

- ``TrustedFirstPartyMasks`` (CrypTen ``TFP``): party 0 draws ``B`` and ``A``, computes ``C`` and
  shares all three by pseudo-random zero sharing. Zero logged communication, **not secure against
  party 0** (it knows every mask), exactly like CrypTen's TFP Beaver triples.
- ``protocols.tape.TapeProvider`` (the separate dealer, rank ``world_size``, running ``serve()``):
  each party draws its shares of ``A`` and ``B`` from per-request seeds it shares with the dealer;
  the dealer keeps ``B`` and sends party 0 its share of ``C``, ahead of use, in the step's tape.
  Party 1 draws ``C``'s share locally and never talks to the dealer.

``FixedMaskProvider`` methods raise ``NotImplementedError`` until a subclass fills them in;
``fixed_mask_provider()`` picks the one that matches the Beaver provider the parties run with.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from protocols.compat import comm, crypten
from protocols.config import ProtocolConfig, protocol_context

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import ArithmeticSharedTensor
from crypten.mpc.provider import TrustedFirstParty

Size = Sequence[int]


def product_size(size_a: Size, size_b: Size, transpose_b: bool) -> torch.Size:
    """Shape of ``A @ B`` (or ``A @ Bᵀ``) under torch.matmul broadcasting, computed without data."""
    a = torch.empty(tuple(size_a), device="meta")
    b = torch.empty(tuple(size_b), device="meta")
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b).shape


def _matmul(a: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> torch.Tensor:
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b)


def outer_mask(m: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> torch.Tensor:
    """(m ⊗ B)[..., i, j] = m[..., i]·B'[..., i, j] with B' = B (or Bᵀ), shapes broadcast: (..., S, I, J)."""
    return m.unsqueeze(-1) * (b.transpose(-1, -2) if transpose_b else b).unsqueeze(-3)


def outer_size(size_a: Size, size_b: Size, transpose_b: bool) -> torch.Size:
    """Shape of ``outer_mask`` for operands of these shapes, computed without data."""
    return outer_mask(torch.empty(tuple(size_a), device="meta"), torch.empty(tuple(size_b), device="meta"),
                      transpose_b).shape


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

    def trunc_pair(self, key: int, size_z: Size, size_b: Size, d: int, transpose: bool,
                   device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Plain shares of (r, q = ⌊r_u/d⌋, m = msb(r)) of ``size_z``, ``q @ B`` and ``outer_mask(m, B)``
        for a truncation fused with a product by ``B[key]`` (``protocols.fixed_mask.trunc_matmul_step``)."""
        raise NotImplementedError(f"{type(self).__name__}.trunc_pair")

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

    def trunc_pair(self, key, size_z, size_b, d, transpose, device=None):
        from protocols.truncation import plain, udiv, wrap
        if comm.get().get_rank() == 0:  # party 0 draws r and knows B
            r = plain(generate_random_ring_element(tuple(size_z), device=device))
            b = plain(self._masks[key])
            q, m = udiv(r, d), (r < 0).long()
            parts = [r, q, m, plain(_matmul(wrap(q), self._masks[key], transpose)), outer_mask(m, b, transpose)]
        else:
            sizes = [size_z] * 3 + [product_size(size_z, size_b, transpose), outer_size(size_z, size_b, transpose)]
            parts = [torch.zeros(tuple(s), dtype=torch.long, device=device) for s in sizes]
        return tuple(plain(ArithmeticSharedTensor(p, precision=0, src=0).share) for p in parts)

    def select(self, key, new_key, dim, index):
        if comm.get().get_rank() == 0:
            self._masks[new_key] = self._masks[key].index_select(dim, index)

    def release(self, key):
        self._masks.pop(key, None)


_TFP_MASKS = TrustedFirstPartyMasks()


def fixed_mask_provider() -> FixedMaskProvider:
    """The fixed-mask provider matching the Beaver provider the parties run with (TFP or the tape)."""
    from protocols.tape import TapeProvider
    beaver = crypten.mpc.get_default_provider()
    if isinstance(beaver, TrustedFirstParty):
        return _TFP_MASKS
    if isinstance(beaver, TapeProvider):
        return beaver
    raise NotImplementedError(f"no fixed-mask provider for CrypTen provider {type(beaver).__name__}")


def serve(cfg: ProtocolConfig | None = None) -> None:
    """Dealer main (rank ``world_size``): serve every correlation (``protocols.tape``) until the
    parties leave. Pass as ``dealer_main`` to ``launch.local.run_parties`` or call on mpirun rank 2."""
    from protocols.tape import TapeDealer
    with protocol_context(cfg or ProtocolConfig(), dealer=True):
        TapeDealer().serve()
