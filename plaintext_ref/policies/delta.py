"""DELTA: dynamic layer-aware token attention with full, Δ and sparse layers (Entezari Zarch et al., arXiv 2510.09883).

Rule (repo hoenza/DELTA, ``model.py``, ``page_selector_v2.py``, ``page_score.py``): layers in ``full_layers``
attend the whole cache; a full layer whose next layer is not full is a Δ-layer and, after its full attention,
re-selects pages of P slots by score(page) = Σ_{j∈page} max_h p_{h,j} (p the current query's softmax weights,
max over all query heads), with the last L pages forced (+∞) and ties broken by −1e−7·page index; it keeps
the top ``subset_cache_size`` pages. Every other (sparse) layer attends only the pages of the most recent
Δ-layer. Selection starts once #pages > compression_ratio · subset_cache_size; nothing is evicted.

Defaults: full layers [0, 1, 2, 14, 22] of the 28 of DeepSeek-R1-Distill-Qwen-7B; page size 16; 64 pages
(1024 tokens) per step; L = 8 recent pages; compression_ratio = 1 (``run_reason_accuracy_8gpu.sh``).

Deviations:
1. ``full_layers=None`` rescales the default to any depth L: {0, 1, 2, round(14·L/28), round(22·L/28)}.
2. ``budget`` (int tokens, float fraction of the cache, or Budget) sets subset_cache_size = ⌈budget / P⌉
   pages, the recency window included; a budget below L pages is raised to L pages.
3. Only single-token decode steps select; the prompt and multi-token chunks attend densely.
4. The Δ-layer's page set is handed to the following sparse layers through its ``LayerKV.aux``: a sparse
   layer shares with the last full layer before it (``ctx.partner``), which is the latest Δ-layer.

GQA: one page set per layer group, shared by every head of every sparse layer.
Needs: the softmax weights of the current query at the Δ-layers (``needs = {"attn"}``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import Budget, KVPolicy, LayerKV, StepCtx

DEFAULT_FULL_LAYERS = (0, 1, 2, 14, 22)
DEFAULT_DEPTH = 28
PAGES = "delta_pages"   # LayerKV.aux of a Δ-layer: (B, T) bool token mask of this decode step, None = all pages


def page_scores(attn: Tensor, page_size: int) -> Tensor:
    """score(page) = Σ_{j∈page} max_h p_{h,j}: (B, H, T) softmax weights -> (B, C), C = ceil(T/P)."""
    per_token = attn.float().amax(dim=1)                                      # (B, T)
    t = per_token.shape[-1]
    n_pages = -(-t // page_size)
    return F.pad(per_token, (0, n_pages * page_size - t)).view(-1, n_pages, page_size).sum(dim=-1)


@dataclass
class DELTA(KVPolicy):
    """DELTA: full layers, Δ-layers that pick pages, sparse layers that reuse them.

    Parameters
    ----------
    budget : int tokens (default 1024 = 64 pages), float fraction of the cache, or Budget.
    full_layers : tuple of layer indices or None (default pattern rescaled to the model's depth); must hold 0.
    page_size : int, default 16.
    recent_pages : int, default 8, the last pages always selected.
    compression_ratio : float, default 1.0, selection starts when #pages > ratio · budget pages.
    """

    budget: Budget | int | float = 1024
    full_layers: tuple[int, ...] | None = None
    page_size: int = 16
    recent_pages: int = 8
    compression_ratio: float = 1.0
    needs = frozenset({"attn"})

    def __post_init__(self) -> None:
        self.budget = Budget.of(self.budget)
        if self.page_size < 1 or self.recent_pages < 0 or self.compression_ratio < 0:
            raise ValueError(f"DELTA needs page_size >= 1, recent_pages >= 0, compression_ratio >= 0; got "
                             f"{self.page_size}, {self.recent_pages}, {self.compression_ratio}")
        if self.full_layers is not None:
            self.full_layers = tuple(sorted(set(self.full_layers)))
            if 0 not in self.full_layers or self.full_layers[0] < 0:
                raise ValueError(f"DELTA full_layers must hold layer 0 and no negative index, got {self.full_layers}")

    def full_set(self, num_layers: int) -> frozenset[int]:
        """Indices of the full-attention layers for a model of ``num_layers`` layers."""
        if self.full_layers is None:
            scaled = (round(i * num_layers / DEFAULT_DEPTH) for i in DEFAULT_FULL_LAYERS)
            return frozenset(i for i in scaled if i < num_layers)
        if self.full_layers[-1] >= num_layers:
            raise ValueError(f"DELTA full_layers {self.full_layers} exceed the model's {num_layers} layers")
        return frozenset(self.full_layers)

    def is_delta(self, layer_idx: int, num_layers: int) -> bool:
        """A full layer followed by a sparse one."""
        full = self.full_set(num_layers)
        return layer_idx in full and layer_idx + 1 < num_layers and layer_idx + 1 not in full

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        """A sparse layer reads the pages of the last full layer before it (a Δ-layer); full layers: None."""
        full = self.full_set(num_layers)
        return None if layer_idx in full else max(i for i in full if i < layer_idx)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """Sparse layers at decode: (B, Hkv, 1, T) bool, the latest Δ-layer's pages; None elsewhere."""
        if ctx.phase != "decode" or ctx.partner is None or ctx.partner.aux[PAGES] is None:
            return None
        pages = ctx.partner.aux[PAGES]
        assert pages.shape[-1] == kv.n, f"Δ-layer saw {pages.shape[-1]} slots, layer has {kv.n}"
        return (pages[:, None, :] & kv.valid_mask())[:, :, None, :]

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """At a Δ-layer's decode step, choose the pages the next sparse layers attend."""
        if ctx.phase == "decode" and self.is_delta(ctx.layer_idx, ctx.num_layers):
            kv.aux[PAGES] = self.choose(ctx.attn[:, :, -1], ctx.layer_idx, ctx.num_layers)
        return kv

    def choose(self, attn: Tensor, layer_idx: int, num_layers: int) -> Tensor | None:
        """(B, T) bool token mask of the top pages for softmax weights attn (B, H, T); None = all pages."""
        t = attn.shape[-1]
        scores = page_scores(attn, self.page_size)                            # (B, C)
        n_pages = scores.shape[-1]
        keep = max(self.recent_pages, -(-self.budget.resolve(layer_idx, num_layers, t) // self.page_size))
        if n_pages <= self.compression_ratio * keep or keep >= n_pages:
            return None
        scores[:, max(0, n_pages - self.recent_pages):] = float("inf")
        scores = scores - 1e-7 * torch.arange(n_pages, device=scores.device)
        top = scores.topk(keep, dim=-1).indices
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return picked.repeat_interleave(self.page_size, dim=-1)[:, :t]
