"""H2O: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

Rule: every slot accumulates the attention it receives, score_j(t) = Σ_{i ≤ t} A[i, j] (prompt queries
included), per head. Whenever a layer holds more than K slots, it keeps the ⌊K·recent_fraction⌋ most recent
slots plus the heavy hitters: the top K − ⌊K·recent_fraction⌋ older slots by score. Evicted slots take their
scores with them. Applied after the prompt and after every decode step.

Defaults: budget = 0.2 of the prompt, split evenly (recent_fraction 0.5): heavy 10% + recent 10%
(``--heavy_ratio 0.1 --recent_ratio 0.1``, FMInference/H2O ``scripts/lm_eval/h2o.sh``). An int budget is
``hh_size + recent_size`` of the real-drop ``H2OKVCache_LayerWise``.

Deviations:
1. Scores are kept per batch row; the original sums them over the batch (``attn.sum(0).sum(1)``).
2. Queries on left-padding slots add nothing to the scores.
3. A float budget fixes K from the prompt length (K = int(n_prompt·fraction), kvpress rounding) and keeps
   it during decode, as the ratio-based original sizes its cache once.

GQA: scores are accumulated per query head and reduced over the group with ``gqa_agg`` (mean, max or sum)
at each eviction; ``granularity="layer"`` shares one index set (mean over all heads). "q_head" is refused.
Needs: the full softmax weights of every forward (``needs = {"attn"}``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from plaintext_ref.policies.base import (Budget, LayerKV, StepCtx, TopKEviction, accumulate_received,
                                         per_query_head, protected_slots, received_attention)

ACC = "h2o_acc"   # LayerKV.aux key: (B, Hkv, T, G) attention received, per query head of each group


@dataclass
class H2O(TopKEviction):
    """H2O: keep recent slots plus the slots with the largest accumulated attention.

    Parameters
    ----------
    budget : float fraction of the prompt kept (default 0.2), int tokens (hh_size + recent_size), or Budget.
    recent_fraction : float in [0, 1], default 0.5, share of the budget given to the most recent slots.
    evict_on : "both" (default, the paper), "decode" or "prefill".
    """

    needs = frozenset({"attn"})

    budget: Budget | int | float | None = 0.2
    recent_fraction: float = 0.5
    evict_on: Literal["prefill", "decode", "both"] = "both"

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"H2O.recent_fraction must lie in [0, 1], got {self.recent_fraction}")
        if self.granularity == "q_head" or self.head_adaptive:
            raise ValueError("H2O supports granularity 'kv_head' or 'layer' and no head_adaptive")
        super().__post_init__()

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        kv.aux[ACC] = self._accumulate(ctx, kv)
        return super().on_prefill(ctx, kv)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        kv.aux[ACC] = self._accumulate(ctx, kv)
        return super().on_append(ctx, kv)

    def _accumulate(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """Old scores (zero for the S new slots) plus this forward's column sums over real queries."""
        return accumulate_received(kv.aux.get(ACC), received_attention(ctx.attn, kv))

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, H, T) accumulated attention per query head; the base reduces it over the GQA group."""
        return per_query_head(kv.aux[ACC])

    def protected(self, valid: Tensor, keep: int) -> Tensor:
        """The ⌊keep·recent_fraction⌋ most recent valid slots."""
        return protected_slots(valid, 0, int(keep * self.recent_fraction))
