"""SnapKV: the last prompt queries vote for the prefix (Li et al., NeurIPS 2024, arXiv 2404.14469).

Rule: the observation window is the last w prompt tokens. Each prefix slot j < n − w gets
s_j = (1/w) Σ_{i ∈ window} A_win[i, j], with A_win = softmax(q_win Kᵀ·scaling + M) over all n slots (M masks
the causal triangle inside the window); s ← pool1d(s, kernel, stride 1, padding kernel // 2) over the prefix.
Once, after the prompt, each head keeps the top C − w prefix slots by s plus the whole window (C = budget,
window included). Generated tokens are never evicted.

Defaults: window_size 32, kernel_size 5, avg pooling, budget C = 2048 tokens, from ``init_snapkv`` of
FasterDecoding/SnapKV and Zefan-Cai/PyramidKV (KVCache-Factory). kvpress ``SnapKVPress`` uses window 64; the
SnapKV LongBench configs use kernel 7 with max pooling (``pooling="max"``).

Deviations:
1. The window votes are averaged (kvpress) rather than summed (original); the ranking is the same.
2. With granularity "kv_head" the votes are pooled per query head and then reduced over the GQA group
   (kvpress order); the original pools per query head after ``repeat_kv`` and keeps a cache per query head
   (``granularity="q_head"``). Avg pooling commutes with the group mean, max pooling does not.
3. A float budget is kvpress's convention: K = int(n·(1 − r)) slots, window included. K is raised to w if
   it falls below (kvpress would then keep an arbitrary part of the window).
4. A prompt shorter than C is kept whole (as the original); one of at most w tokens is never scored.

GQA: per KV head, votes reduced over the group with ``gqa_agg`` (default mean, SnapKV issue #22).
Needs: the post-RoPE queries of the last w prompt positions (``StepCtx.q``) and the cached keys; no
attention weights (the window attention is recomputed, as kvpress does).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import Budget, LayerKV, StepCtx, TopKEviction, window_attention

Pooling = Literal["avg", "max"]


def pool_votes(votes: Tensor, kernel_size: int, pooling: Pooling) -> Tensor:
    """Length-preserving 1-D pooling over the last axis (stride 1, padding k // 2; avg counts the zero pad)."""
    if pooling == "avg":
        return F.avg_pool1d(votes, kernel_size, stride=1, padding=kernel_size // 2)
    return F.max_pool1d(votes, kernel_size, stride=1, padding=kernel_size // 2)


@dataclass
class SnapKV(TopKEviction):
    """SnapKV: keep the prefix slots the observation window attends most, plus the window.

    Parameters
    ----------
    budget : int C (slots kept per head, window included; default 2048), float fraction kept, or Budget.
    window_size : int, default 32, observation window w (always kept).
    kernel_size : int, default 5, odd pooling width (1 = no pooling).
    pooling : "avg" (default) or "max".
    """

    budget: Budget | int | float | None = 2048
    window_size: int = 32
    kernel_size: int = 5
    pooling: Pooling = "avg"

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"{type(self).__name__}.window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}.kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"{type(self).__name__}.pooling must be avg or max, got {self.pooling!r}")
        if self.evict_on != "prefill":
            raise ValueError(f"{type(self).__name__} compresses the prompt only (evict_on='prefill')")
        if self.budget is None:
            raise ValueError(f"{type(self).__name__}: budget is required")
        self.budget = replace(Budget.of(self.budget), protect_recent=self.window_size)
        super().__post_init__()

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, h, T) pooled window votes for the prefix; window slots get 0 (they are protected)."""
        w = min(self.window_size, kv.n)
        attn = window_attention(ctx.q[:, :, -w:], kv.k, ctx.scaling, kv.valid)   # (B, h, W, T)
        votes = attn[..., : kv.n - w].mean(dim=2)                                # (B, h, T − W)
        votes = pool_votes(votes, self.kernel_size, self.pooling)
        return F.pad(votes, (0, w))                                              # (B, h, T)
