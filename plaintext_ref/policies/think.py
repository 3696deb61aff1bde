"""ThinK: query-driven key-channel pruning (Xu et al., arXiv 2407.21018).

Rule: after the prompt, each KV head scores its D key channels with the last w queries,
    s_c = mean_i q_ic² · mean_j k_jc²   (∝ ‖Q_c K_cᵀ‖_F², Q_c the window queries' channel c, K_c the keys'),
and drops the ⌊λ·D⌋ lowest-scoring channels of the prompt keys, except the most recent ``recent_size`` ones;
a pruned channel reads as 0, so q·k is computed over the kept channels only. Keys appended later (and the
recent ones) keep all D channels.

Defaults: pruning_ratio λ = 0.4 (ThinK_flash ``eval.sh``), window_size w = 32 (``q_states[..., -32:, :]`` in
``key_pruner_query_driven``; kvpress ``ThinKPress``), recent_size = 32 (the original's full-width recent
keys). ``recent_size=0`` is kvpress's ``ThinKPress(key_channel_compression_ratio=λ)``, which prunes every
prompt key.

Deviations:
1. Pruned channels are zeroed in place in ``LayerKV.k`` (kvpress's ``keys.scatter_(-1, idx, 0)``) instead of
   being removed physically (the original stores the narrow keys and restores zeros in ``recover_cache``);
   attention is identical, the saving is bookkeeping: ``aux["think_keep"]`` (B, Hkv, 1, D) bool holds the
   kept channels and ``aux["think_pruned"]`` (B, Hkv, T) bool the slots read through them.
   ``LayerKV.k_channel_mask`` is left None because the runtime applies it to every slot, decode keys
   included, which neither the original nor kvpress does.
2. Per KV head: q² is averaged over the query heads of a group with ``gqa_agg`` (kvpress: mean); the
   original scores per query head after ``repeat_kv``.
3. Left-padded queries are left out of the q² means, padded keys out of the k² means.

GQA: one channel set per KV head, q² reduced over the group with ``gqa_agg``. Needs: the last w prompt
queries (``StepCtx.q``) and the keys; no attention weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import GqaAgg, KVPolicy, LayerKV, StepCtx, gqa_aggregate, protected_slots

KEEP = "think_keep"       # LayerKV.aux: (B, Hkv, 1, D) bool, kept key channels
PRUNED = "think_pruned"   # LayerKV.aux: (B, Hkv, T) bool, slots whose pruned channels are zero


def channel_scores(q_win: Tensor, k: Tensor, q_valid: Tensor, k_valid: Tensor, gqa_agg: GqaAgg = "mean") -> Tensor:
    """s (B, Hkv, D) = agg_group(mean_i q_ic²) · mean_j k_jc² over real queries / keys.

    q_win (B, H, W, D), k (B, Hkv, T, D), q_valid (B, W) bool, k_valid (B, Hkv, T) bool.
    """
    qw = q_valid.float()[:, None, :, None]                                            # (B, 1, W, 1)
    q_sq = (q_win.float().pow(2) * qw).sum(dim=2) / qw.sum(dim=2).clamp(min=1.0)       # (B, H, D)
    kw = k_valid.float()[..., None]                                                   # (B, Hkv, T, 1)
    k_sq = (k.float().pow(2) * kw).sum(dim=2) / kw.sum(dim=2).clamp(min=1.0)          # (B, Hkv, D)
    return gqa_aggregate(q_sq, k.shape[1], gqa_agg) * k_sq


@dataclass
class ThinK(KVPolicy):
    """ThinK: zero the least important key channels of the prompt keys.

    Parameters
    ----------
    pruning_ratio : float in [0, 1), default 0.4, fraction λ of the D key channels pruned.
    window_size : int >= 1, default 32, last prompt queries that score the channels.
    recent_size : int >= 0, default 32, most recent prompt keys left at full width.
    gqa_agg : "mean" (default), "max" or "sum", reduction of q² over a GQA group.
    budget : accepted for the eval CLI (``budget=`` is the fraction of key channels kept, 1 − λ) or None.
    """

    pruning_ratio: float = 0.4
    window_size: int = 32
    recent_size: int = 32
    gqa_agg: GqaAgg = "mean"
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, float) or not 0.0 < self.budget <= 1.0:
                raise ValueError(f"ThinK.budget is the fraction of key channels kept, in (0, 1]; got {self.budget!r}")
            self.pruning_ratio = 1.0 - self.budget
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ValueError(f"ThinK.pruning_ratio must lie in [0, 1), got {self.pruning_ratio}")
        if self.window_size < 1 or self.recent_size < 0:
            raise ValueError(f"ThinK needs window_size >= 1 and recent_size >= 0, got "
                             f"{self.window_size}, {self.recent_size}")
        if self.gqa_agg not in ("mean", "max", "sum"):
            raise ValueError(f"ThinK.gqa_agg must be mean, max or sum, got {self.gqa_agg!r}")

    def kept_channels(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, Hkv, D) bool: all but the ⌊λ·D⌋ lowest-scoring channels of each KV head."""
        w = min(self.window_size, ctx.q.shape[2])
        valid = kv.valid_mask()
        scores = channel_scores(ctx.q[:, :, -w:], kv.k, valid[:, 0, -w:], valid, self.gqa_agg)
        drop = scores.topk(int(kv.k.shape[-1] * self.pruning_ratio), dim=-1, largest=False).indices
        return torch.ones_like(scores, dtype=torch.bool).scatter(-1, drop, False)

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        keep = self.kept_channels(ctx, kv)[:, :, None]                                # (B, Hkv, 1, D)
        valid = kv.valid_mask()
        pruned = valid & ~protected_slots(valid, 0, self.recent_size)                 # (B, Hkv, T)
        k = kv.k.masked_fill(pruned[..., None] & ~keep, 0.0)
        return replace(kv, k=k, aux={**kv.aux, KEEP: keep, PRUNED: pruned})

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """New keys stay full width: extend the per-slot flag with False."""
        pruned = kv.aux.get(PRUNED)
        if pruned is not None and pruned.shape[2] < kv.n:
            kv.aux[PRUNED] = F.pad(pruned, (0, kv.n - pruned.shape[2]), value=False)
        return kv
