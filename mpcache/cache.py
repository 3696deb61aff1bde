"""The secret KV cache of one layer, and the full-cache attention policy.

``SecretKVCache`` holds [K] and [V] as fixed-mask operands that grow by rows (tokens): each row's
``δ = row − B_row`` is opened once, when it is appended, so later ``q @ Kᵀ`` and ``P @ V`` products
open only the (small) query / probability side. ``FullCachePolicy`` is the attention step every KV
policy replaces: ``attend(layer, q, cache, mask)``; MPCache's policies plug in at this one call.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from protocols.fixed_mask import FixedMaskOperand, StockOperand, fixed_matmul
from protocols.nonlinear import softmax
from protocols.types import Public, Secret


class SecretKVCache:
    """[K], [V] of one layer, each (B, Hkv, T, D), T growing by appended rows (tokens).

    ``operand``: ``FixedMaskOperand`` (default) or ``StockOperand`` (the stock-CrypTen baseline:
    nothing opened on append, K and V opened by every product).
    """

    def __init__(self, operand: type[FixedMaskOperand] | type[StockOperand] = FixedMaskOperand) -> None:
        self.operand = operand
        self.k: FixedMaskOperand | None = None
        self.v: FixedMaskOperand | None = None

    def append(self, k: Secret, v: Secret) -> None:
        """Append S new tokens: k, v (B, Hkv, S, D); opens only their masked rows."""
        if self.k is None:
            self.k, self.v = self.operand(k, grow_dim=2), self.operand(v, grow_dim=2)
        else:
            self.k.append(k)
            self.v.append(v)

    def replace(self, k: FixedMaskOperand, v: FixedMaskOperand) -> None:
        """Swap in new [K], [V] (B, Hkv, T', D) operands, e.g. after static eviction's compaction."""
        assert k.shape == v.shape and k.grow_dim == v.grow_dim == 2, f"bad K/V {k!r}, {v!r}"
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        """T, the number of cached tokens (public)."""
        return 0 if self.k is None else int(self.k.shape[2])

    @property
    def keys(self) -> FixedMaskOperand:
        assert self.k is not None, "empty cache: append before reading"
        return self.k

    @property
    def values(self) -> FixedMaskOperand:
        assert self.v is not None, "empty cache: append before reading"
        return self.v


class Meter(Protocol):
    """What the model needs of a ``protocols.cost.CostMeter``."""

    def stage(self, name: str) -> AbstractContextManager: ...


class KVPolicy(Protocol):
    """What attention calls once per layer; MPCache's policies implement the same method."""

    def attend(self, layer: int, q: Secret, cache: SecretKVCache, mask: Public | None) -> Secret: ...


class FullCachePolicy:
    """Attend over every cached token: softmax([q] [K]ᵀ, mask) [V].

    Public: T, the 0/1 mask. Cost: two fixed-mask matmuls (open |q| + |P| elements) plus one softmax.
    """

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def attend(self, layer: int, q: Secret, cache: SecretKVCache, mask: Public | None) -> Secret:
        """q: (B, Hkv, G·S, D), already scaled by 1/√D; mask: (G·S, T) 0/1 or None -> (B, Hkv, G·S, D)."""
        with self.meter.stage("attention"):
            scores = fixed_matmul(q, cache.keys, transpose_w=True)  # (B,Hkv,GS,D) x (B,Hkv,D,T) -> (B,Hkv,GS,T)
        with self.meter.stage("softmax"):
            probs = softmax(scores, dim=-1, mask=mask)
        with self.meter.stage("attention"):
            return fixed_matmul(probs, cache.values)  # (B,Hkv,GS,T) x (B,Hkv,T,D) -> (B,Hkv,GS,D)
