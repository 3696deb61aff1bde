"""Quest: query-aware page selection at decode (Tang et al., ICML 2024, arXiv 2406.10774).

Rule: the cache is split into pages of P consecutive slots; each page keeps per-channel m = min_j k_j and
M = max_j k_j of its post-RoPE keys. A decode query q scores every page with the upper bound
U(q, page) = Σ_c max(q_c M_c, q_c m_c) ≥ max_{j∈page} q·k_j, and attends (ordinary softmax, causal)
only to the tokens of its top k_p = min(max(3, B // P), #pages) pages, B the token budget. Nothing is
evicted: the full cache stays and ``select()`` returns a key mask.

Defaults: page_size P = 16 (``chunk_size 16`` in mit-han-lab/Quest ``scripts/passkey.sh``, ``longbench.sh``);
budget B = 1024 tokens (the scripts sweep 512..4096); at least 3 pages and dense layers 0 and 1 and dense
prefill (``if q_len > 1 or self.layer_id < 2`` in ``evaluation/quest_attention.py``); per-query-head pages
(the eval code selects after ``repeat_kv``).

Deviations:
1. The partial last page is summarised over its real tokens only (the page metadata of the kernels).
2. A float budget is the fraction of the current cache attended (``Budget.of``); the paper uses tokens.
3. Left-padding slots are excluded from the page min/max; a page with no real token scores −∞.

GQA: ``granularity="q_head"`` (default, as the eval code) gives each query head its own pages;
``"kv_head"`` gives one page set per KV head from ``gqa_agg`` over the group's bounds: "max" (still an
upper bound for every head of the group; computed directly by ``kernels.cluster_scores``), "mean", "sum".
Needs: the current post-RoPE query. Page min/max are maintained incrementally in ``LayerKV.aux``: only the
last, growing page is recomputed each step (``kernels.page_minmax``, Triton on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from plaintext_ref.kernels import cluster_scores, page_minmax
from plaintext_ref.policies.base import NEG_INF, Budget, GqaAgg, KVPolicy, LayerKV, StepCtx, gqa_aggregate

AUX_KEY = "quest_pages"


def masked_page_minmax(k: Tensor, valid: Tensor | None, page_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Page min, max (B, Hkv, C, D) over the valid slots of k (B, Hkv, T, D), and (B, Hkv, C) 'has a valid slot'."""
    if valid is None:
        lo, hi = page_minmax(k, page_size)
        return lo, hi, torch.ones(lo.shape[:3], dtype=torch.bool, device=k.device)
    keep = valid[..., None]
    lo = page_minmax(k.masked_fill(~keep, float("inf")), page_size)[0]
    hi = page_minmax(k.masked_fill(~keep, NEG_INF), page_size)[1]
    any_valid = page_minmax(keep.to(k.dtype), page_size)[1][..., 0] > 0
    return lo, hi, any_valid


@dataclass
class Quest(KVPolicy):
    """Quest: attend the top-k_p pages by the min/max upper bound of q·k.

    Parameters
    ----------
    budget : int tokens (default 1024), float fraction of the cache, or Budget: tokens attended per step.
    page_size : int, default 16, tokens per page.
    min_pages : int, default 3, floor on the number of pages selected.
    dense_layers : int, default 2, the first layers attend densely.
    granularity : "q_head" (default) or "kv_head", who owns a page set.
    gqa_agg : "max" (default), "mean" or "sum", group reduction of the bound for ``granularity="kv_head"``.
    """

    budget: Budget | int | float = 1024
    page_size: int = 16
    min_pages: int = 3
    dense_layers: int = 2
    granularity: Literal["q_head", "kv_head"] = "q_head"
    gqa_agg: GqaAgg = "max"
    needs = frozenset({"q"})

    def __post_init__(self) -> None:
        self.budget = Budget.of(self.budget)
        if self.page_size < 1 or self.min_pages < 1 or self.dense_layers < 0:
            raise ValueError(f"Quest needs page_size >= 1, min_pages >= 1, dense_layers >= 0; got "
                             f"{self.page_size}, {self.min_pages}, {self.dense_layers}")
        if self.granularity not in ("q_head", "kv_head"):
            raise ValueError(f"Quest granularity must be q_head or kv_head, got {self.granularity!r}")
        if self.gqa_agg not in ("mean", "max", "sum"):
            raise ValueError(f"gqa_agg must be mean, max or sum, got {self.gqa_agg!r}")

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """(B, H or Hkv, 1, T) bool at decode outside the dense layers; None (dense) otherwise."""
        if ctx.phase != "decode" or ctx.layer_idx < self.dense_layers:
            return None
        budget = self.budget.resolve(ctx.layer_idx, ctx.num_layers, kv.n)
        lo, hi, any_valid = self.page_summaries(kv)                          # (B, Hkv, C, D) x2, (B, Hkv, C)
        n_pages = lo.shape[2]
        k_p = min(max(self.min_pages, budget // self.page_size), n_pages)
        if budget >= kv.n or k_p == n_pages:
            return None
        scores = self.page_scores(ctx.q[:, :, -1], lo, hi)                   # (B, h, C)
        g = scores.shape[1] // lo.shape[1]
        scores = scores.masked_fill(~any_valid.repeat_interleave(g, dim=1), NEG_INF)
        top = scores.topk(k_p, dim=-1).indices                               # (B, h, k_p)
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        mask = picked.repeat_interleave(self.page_size, dim=-1)[..., :kv.n]  # (B, h, T)
        if kv.valid is not None:
            mask = mask & kv.valid.repeat_interleave(g, dim=1)
        return mask[:, :, None, :]

    def page_summaries(self, kv: LayerKV) -> tuple[Tensor, Tensor, Tensor]:
        """Page min, max (B, Hkv, C, D) and validity (B, Hkv, C), updated from the last incomplete page on."""
        cached = kv.aux.get(AUX_KEY)
        start = 0 if cached is None else (cached[3] // self.page_size) * self.page_size
        valid = None if kv.valid is None else kv.valid[:, :, start:]
        fresh = masked_page_minmax(kv.k[:, :, start:], valid, self.page_size)
        if cached is not None:
            c0 = start // self.page_size
            fresh = tuple(torch.cat([old[:, :, :c0], new], dim=2) for old, new in zip(cached[:3], fresh))
        kv.aux[AUX_KEY] = (*fresh, kv.n)
        return fresh

    def page_scores(self, q: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Upper bounds U: q (B, H, D), pages (B, Hkv, C, D) -> (B, H, C) (q_head) or (B, Hkv, C) (kv_head)."""
        hkv = lo.shape[1]
        if self.granularity == "kv_head" and self.gqa_agg == "max":
            return cluster_scores(q, lo, hi, mode="quest")
        g = q.shape[1] // hkv
        per_head = cluster_scores(q, lo.repeat_interleave(g, dim=1), hi.repeat_interleave(g, dim=1), mode="quest")
        return per_head if self.granularity == "q_head" else gqa_aggregate(per_head, hkv, self.gqa_agg)
