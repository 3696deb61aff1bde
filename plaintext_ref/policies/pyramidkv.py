"""PyramidKV: SnapKV scores with a pyramid of per-layer budgets (Cai et al., arXiv 2406.02069).

Rule: the same window votes as :class:`~plaintext_ref.policies.snapkv.SnapKV`, but layer l of L keeps
(Zefan-Cai/PyramidKV ``PyramidKVCluster``, integer division //)::

    min_num = (C − w) // β ;  max_num = 2(C − w) − min_num
    if max_num ≥ n − w:  max_num = n − w ;  min_num = 2(C − w) − max_num
    keep_l  = max_num − l·((max_num − min_num) // (L − 1))   prefix slots  +  w window slots

so lower layers keep more and the mean over layers is ≈ C. If n < C nothing is evicted; if n < 2(C − w)
every layer keeps C (plain SnapKV).

Defaults: β = 20, window_size 32, kernel_size 5, avg pooling, C = 2048 (``init_pyramidkv`` and
``PyramidKVCluster`` of Zefan-Cai/PyramidKV); its LongBench runner uses w = 8, kernel 7, max pooling.

Deviations:
1. A float budget (fraction kept, kvpress ``compression_ratio`` r = 1 − fraction) follows kvpress
   ``PyramidKVPress.get_layer_budget`` instead: C' = w + n(1 − r) in real arithmetic, the same pyramid,
   keep_l = round(max_num − l·steps) slots *window included* (mean ≈ n(1 − r)), and the SnapKV fallback
   max(1, round(n(1 − r))) unless n ≥ max_num ≥ min_num ≥ w. This is what the kvpress parity test checks.
2. As SnapKV deviations 1–3 (mean of votes, pooling before the GQA reduction, K raised to w).
3. L = 1 gives the flat budget (the original divides by L − 1).

GQA: per KV head, votes reduced over the group with ``gqa_agg`` (default mean); ``granularity="q_head"``
gives the original per-query-head cache. Needs: as SnapKV (window queries, keys), plus the layer index and
count (``StepCtx.layer_idx``, ``StepCtx.num_layers``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from plaintext_ref.policies.base import Budget
from plaintext_ref.policies.snapkv import SnapKV


def pyramid_tokens(capacity: int, window: int, beta: int, layer_idx: int, num_layers: int, n: int) -> int:
    """Slots layer ``layer_idx`` keeps out of n for an absolute mean budget C (original, integer)."""
    if n < capacity:
        return n
    prefix = capacity - window
    if n < 2 * prefix:
        return capacity
    min_num = prefix // beta
    max_num = 2 * prefix - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = 2 * prefix - max_num
    steps = (max_num - min_num) // (num_layers - 1) if num_layers > 1 else 0
    return max_num - layer_idx * steps + window


def pyramid_ratio(ratio: float, window: int, beta: int, layer_idx: int, num_layers: int, n: int) -> int:
    """Slots layer ``layer_idx`` keeps out of n for kvpress's compression_ratio (window included)."""
    capacity = window + n * (1 - ratio)
    min_num = (capacity - window) / beta
    max_num = (capacity - window) * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = (capacity - window) * 2 - max_num
    if not n >= max_num >= min_num >= window:
        return max(1, round(n * (1 - ratio)))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer_idx * steps)


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV with per-layer budgets decreasing linearly with depth.

    Parameters
    ----------
    budget : int C (mean slots kept per layer and head, window included; default 2048) or float fraction
        kept (kvpress convention, see deviation 1). After init ``budget`` is the per-layer Budget
        (``budget.resolve(layer_idx, num_layers, n)``) and the given value stays in ``capacity``.
    beta : int, default 20, steepness: the last layer keeps about (C − w)/β prefix slots.
    window_size, kernel_size, pooling : as SnapKV.
    """

    beta: int = 20
    capacity: Budget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise ValueError(f"PyramidKV.beta must be >= 1, got {self.beta}")
        if self.budget is None:
            raise ValueError("PyramidKV: budget is required")
        self.capacity = Budget.of(self.budget)
        if self.capacity.per_layer is not None:
            raise ValueError("PyramidKV derives its per-layer budget; give a token count or a fraction")
        if self.capacity.tokens is not None and self.capacity.tokens <= self.window_size:
            raise ValueError(f"PyramidKV needs budget > window_size, got {self.capacity.tokens} <= {self.window_size}")
        if self.capacity.tokens is not None:
            rule = partial(pyramid_tokens, self.capacity.tokens, self.window_size, self.beta)
        else:
            rule = partial(pyramid_ratio, self.capacity.ratio, self.window_size, self.beta)
        self.budget = Budget(per_layer=rule)                 # rule(layer_idx, num_layers, n) -> slots kept
        super().__post_init__()
