"""WindowKV: task-adaptive group-wise KV window selection (2025; code optim996/WindowKV; arXiv id unverified).

Rule: the last w prompt tokens (the suffix) are kept; the review part [0, n − w) is cut into windows of W
tokens. With a_j = Σ_{i ∈ suffix} A_win[i, j] (suffix attention, causal inside the suffix, per head), a window
scores mean_{heads, j ∈ window} a_j ("average") or mean over heads of the mean of its top ⌊W/2⌋ a_j ("max").
Layer l keeps C_l review tokens: the bottom ⌈(n − w − C_l)/W⌉ windows are dropped (all of the review part
if that covers it). C_l decays arithmetically over groups of ``shared_layers`` layers::

    last = C·shared_layers // β ;  first = 2C − last ;  C_group_g = first − g·((first − last) // (n_groups − 1))

(the last group gets ``last``). Only the first layer of a group scores; the others reuse its windows.

Defaults (``models/compress_utils.py``, ``script/windowkv.sh``): C = max_capacity_prompt = 2048,
review_window_size W = 8, shared_layers = 8, β = 14, suffix 32 for "max" and 16 for "average".

Deviations:
1. No task classifier (its BERT checkpoint is not released): ``strategy`` is a field, default "max"
   (the QA strategy).
2. Windows are chosen per batch row; the original scores over the whole batch (``window.mean()``).
3. n_groups = ⌈L / shared_layers⌉ with a flat budget when there is one group; the original needs
   L ≥ 2·shared_layers and a multiple of it. "max" takes at least one value per window (W = 1).
4. A float budget f is kvpress-style: C = int(n·f) − w review tokens, so about n·f slots are kept with the
   suffix. An int budget is the original C (the suffix comes on top).
5. Shared windows live in the group leader's ``LayerKV.aux`` (the group reads them as ``ctx.partner``), not
   on a class attribute.

GQA: one window set per layer group, shared by all heads (scores averaged over every query head).
Needs: the suffix queries (``StepCtx.q``) and the keys; the suffix attention is recomputed (no eager weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import Budget, KVPolicy, LayerKV, StepCtx, keep_slots, window_attention

Strategy = Literal["max", "average"]
KEPT = "windowkv_kept"   # LayerKV.aux: (B, T) bool, the group's kept_slots


def group_budgets(capacity: int, shared_layers: int, beta: int, num_layers: int) -> list[int]:
    """Review tokens kept by each of ``num_layers`` layers: arithmetic decay over layer groups (integer)."""
    n_groups = math.ceil(num_layers / shared_layers)
    if n_groups == 1:
        return [capacity] * num_layers
    last = capacity * shared_layers // beta
    first = 2 * capacity - last
    steps = (first - last) // (n_groups - 1)
    groups = [first - g * steps for g in range(n_groups - 1)] + [last]
    return [max(0, groups[layer // shared_layers]) for layer in range(num_layers)]


def window_scores(votes: Tensor, size: int, strategy: Strategy) -> Tensor:
    """Scores (B, C) of the windows of ``size`` slots over votes (B, H, R); the last window may be partial."""
    b, h, r = votes.shape
    n_win = math.ceil(r / size)
    blocks = F.pad(votes, (0, n_win * size - r), value=math.nan).view(b, h, n_win, size)   # (B, H, C, W)
    if strategy == "average":
        return blocks.nanmean(dim=(1, 3))
    top = blocks.nan_to_num(-math.inf).topk(max(1, size // 2), dim=-1).values           # (B, H, C, W/2)
    real = top.isfinite()
    return top.where(real, 0.0).sum(dim=(1, 3)) / real.sum(dim=(1, 3))


@dataclass
class WindowKV(KVPolicy):
    """WindowKV: keep the best-scored windows of W tokens plus the suffix, shared within layer groups.

    Parameters
    ----------
    budget : int C (mean review tokens per layer, suffix excluded; default 2048) or float fraction kept.
    strategy : "max" (default) or "average".
    suffix_size : int or None (default: 32 for "max", 16 for "average").
    review_window_size : int >= 1, default 8, window length W.
    shared_layers : int >= 1, default 8, layers per group sharing one window set.
    beta : int >= 1, default 14, steepness of the group budgets.
    """

    budget: Budget | int | float | None = 2048
    strategy: Strategy = "max"
    suffix_size: int | None = None
    review_window_size: int = 8
    shared_layers: int = 8
    beta: int = 14

    def __post_init__(self) -> None:
        if self.budget is None:
            raise ValueError("WindowKV: budget is required")
        self.budget = Budget.of(self.budget)
        if self.budget.per_layer is not None:
            raise ValueError("WindowKV derives its per-layer budget; give a token count or a fraction")
        if self.strategy not in ("max", "average"):
            raise ValueError(f"WindowKV.strategy must be max or average, got {self.strategy!r}")
        if self.suffix_size is None:
            self.suffix_size = 32 if self.strategy == "max" else 16
        if min(self.suffix_size, self.review_window_size, self.shared_layers, self.beta) < 1:
            raise ValueError(f"WindowKV needs suffix_size, review_window_size, shared_layers, beta >= 1, got "
                             f"{self.suffix_size}, {self.review_window_size}, {self.shared_layers}, {self.beta}")

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        """The first layer of ``layer_idx``'s group (None for that layer itself)."""
        leader = layer_idx - layer_idx % self.shared_layers
        return None if leader == layer_idx else leader

    def review_budget(self, layer_idx: int, num_layers: int, n: int) -> int:
        """C_l, review tokens kept by layer ``layer_idx`` for an n-token prompt."""
        if self.budget.tokens is not None:
            capacity = self.budget.tokens
        else:
            capacity = max(0, int(n * (1.0 - self.budget.ratio)) - min(self.suffix_size, n))
        return group_budgets(capacity, self.shared_layers, self.beta, num_layers)[layer_idx]

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        w = min(self.suffix_size, kv.n)
        review, keep_l = kv.n - w, self.review_budget(ctx.layer_idx, ctx.num_layers, kv.n)
        if review <= keep_l:
            return kv
        keep = self.kept_slots(ctx, kv, w, keep_l) if ctx.partner is None else ctx.partner.aux[KEPT]
        out = keep_slots(kv, keep[:, None].expand(-1, kv.k.shape[1], -1) & kv.valid_mask())
        out.aux[KEPT] = keep
        return out

    def kept_slots(self, ctx: StepCtx, kv: LayerKV, w: int, keep_l: int) -> Tensor:
        """(B, T) bool: the suffix plus every window but the ⌈(n − w − C_l)/W⌉ lowest-scored ones."""
        b, review, size = kv.k.shape[0], kv.n - w, self.review_window_size
        n_drop = math.ceil((review - keep_l) / size)
        keep_review = torch.zeros(b, review, dtype=torch.bool, device=kv.k.device)
        if n_drop * size < review:
            attn = window_attention(ctx.q[:, :, -w:], kv.k, ctx.scaling, kv.valid)       # (B, H, W, T)
            scores = window_scores(attn[..., :review].sum(dim=2), size, self.strategy)    # (B, C)
            drop = scores.topk(n_drop, dim=-1, largest=False).indices
            keep_win = torch.ones_like(scores, dtype=torch.bool).scatter(-1, drop, False)
            keep_review = keep_win.repeat_interleave(size, dim=-1)[:, :review]
        return torch.cat([keep_review, keep_review.new_ones(b, w)], dim=-1)
