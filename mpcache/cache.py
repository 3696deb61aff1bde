"""Per-sequence secret state: one layer's KV cache (``SecretKVCache``) and one generation's
(``Sequence``: a cache per layer and the KV policy that decides what they attend).

``SecretKVCache`` holds [K] and [V] as fixed-mask operands that grow by rows (tokens): each row's
``δ = row − B_row`` is opened once, when it is appended, so later ``q @ Kᵀ`` and ``P @ V`` products
open only the (small) query / probability side. Whatever a policy keeps about a sequence (static
one-hots, cluster summaries, the last selection) lives in the cache's ``aux``, never on the policy, so
one model serves any number of sequences, interleaved or restarted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.fixed_mask import FixedMaskOperand, StockOperand, append_all
from protocols.types import Secret

if TYPE_CHECKING:
    from mpcache.policy.base import MPCPolicy


class SecretKVCache:
    """[K], [V] of one layer, each (B, Hkv, T, D), T growing by appended rows (tokens), and ``aux``:
    the policy's secret per-sequence state for this layer (by name).

    ``operand``: ``FixedMaskOperand`` (default) or ``StockOperand`` (the stock-CrypTen baseline:
    nothing opened on append, K and V opened by every product).
    """

    def __init__(self, operand: type[FixedMaskOperand] | type[StockOperand] = FixedMaskOperand) -> None:
        self.operand = operand
        self.k: FixedMaskOperand | None = None
        self.v: FixedMaskOperand | None = None
        self.aux: dict[str, object] = {}

    def append(self, k: Secret, v: Secret) -> None:
        """Append S new tokens: k, v (B, Hkv, S, D); opens only their masked rows."""
        if self.k is None:
            self.k, self.v = self.operand(k, grow_dim=2), self.operand(v, grow_dim=2)
        elif isinstance(self.k, FixedMaskOperand):
            append_all([(self.k, k), (self.v, v)])  # both openings in one round: the next q·Kᵀ's
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


class Sequence:
    """One generation's secret state: ``caches[ℓ]`` for every layer ℓ, and its KV ``policy``.

    The model's forward passes layer ℓ its own cache and, when ``policy.shares_with(ℓ) = ℓ'``,
    layer ℓ''s cache as the partner whose selection it reuses. Public: T (``length``).
    """

    def __init__(self, n_layers: int, policy: MPCPolicy,
                 operand: type[FixedMaskOperand] | type[StockOperand] = FixedMaskOperand) -> None:
        self.caches = [SecretKVCache(operand) for _ in range(n_layers)]
        self.policy = policy

    @property
    def length(self) -> int:
        """T, the number of cached tokens (public; every layer holds the same count)."""
        return self.caches[0].length

    def partner(self, layer: int) -> SecretKVCache | None:
        """The cache of the layer whose selection ``layer`` reuses, or None."""
        src = self.policy.shares_with(layer)
        return None if src is None else self.caches[src]
