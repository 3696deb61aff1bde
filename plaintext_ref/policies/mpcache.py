"""MPCache (plaintext twin): Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient
Private LLM Inference", arXiv 2501.06807 (NeurIPS 2025).

Rule. (1) Look-once static eviction after prefill: s_j = Σ_{i∈window} mean_h A[h,i,j] over the last
20 % of prompt queries; keep the top-K prompt tokens (K public), in position order, per layer.
Generated tokens are never statically evicted. (2) Query-aware dynamic selection every decode step:
clusters of 32 (level 1) and 16 (level 2) consecutive cached tokens summarised by per-channel r_min,
r_max; score_c = q·k̃_c with k̃_c = α r_max + (1−α) r_min (α = 0.6); level 1 keeps top-int(0.5·C1),
level 2 scores only children of level-1 picks and keeps top-int(0.2·C2); the sink and local
clusters are always added (never duplicating a pick); attention runs over the selected tokens only.
(3) Cross-layer index sharing: layer 2k+1 (k ≥ 1) reuses layer 2k's static set and selection, read
from that layer's ``LayerKV.aux`` (``ctx.partner``).

Defaults: ``plaintext_ref.mpcache_config.MPCacheConfig`` (authors' code, mpcache.md §10), which also lists the
deviations from the authors' code (public top-K instead of a threshold, always-forced local cluster,
no duplicates, scaled causal scores, GQA, unpadded last cluster).
GQA: selection per KV head with the group's mean query (linear, so exact for the linear score).
Needs: q (post-RoPE), at prefill and decode.
MPC twin: ``mpcache.policy`` implements the same selection obliviously and is validated against
these functions on the same inputs.

Shapes: B batch · Hkv KV heads · G query heads per KV head · W window queries · T0 prompt tokens ·
T' cache tokens · D head dim · C clusters · K kept count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plaintext_ref.mpcache_config import MPCacheConfig, config_for_budget
from plaintext_ref.policies.base import KVPolicy, LayerKV, StepCtx, gather_kv, window_attention

NEG = float("-inf")
STATIC = "mpcache_static"     # LayerKV.aux: (B, K) int64 prompt positions kept by the static eviction
DYNAMIC = "mpcache_dynamic"   # LayerKV.aux: (B, Hkv, 1, T') bool, the latest decode step's selection


def static_scores(attn_win: Tensor) -> Tensor:
    """Look-once importance s_j = Σ_{i∈window} mean_h A[h, i, j]: (B, H, W, T0) -> (B, T0)."""
    return attn_win.sum(dim=2).mean(dim=1)


def static_keep(scores: Tensor, n_keep: int) -> Tensor:
    """Kept prompt positions: top-``n_keep`` of ``scores`` (B, T0), ascending. -> (B, K) int64."""
    return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


def cluster_minmax(k: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Per-channel min and max of consecutive clusters of ``s`` tokens.

    k: (B, Hkv, T', D) -> (rmin, rmax), each (B, Hkv, C, D) with C = ceil(T'/s). The last, partial
    cluster summarises its real tokens only (deviation 6 in ``MPCacheConfig``'s list: the authors pad
    it with copies of tokens of the previous cluster).
    """
    b, h, t, d = k.shape
    c = math.ceil(t / s)
    pad = c * s - t
    big = torch.finfo(k.dtype).max
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=big).view(b, h, c, s, d).amin(dim=3)
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=-big).view(b, h, c, s, d).amax(dim=3)
    return lo, hi


def representative_keys(rmin: Tensor, rmax: Tensor, alpha: float) -> Tensor:
    """k̃_c = α·r_max + (1−α)·r_min (the MPC-friendly linearised bound, paper Eq. 2 reordered)."""
    return alpha * rmax + (1 - alpha) * rmin


def group_query(q: Tensor, n_kv_heads: int) -> Tensor:
    """Mean query of each KV head's group: (B, H, D) -> (B, Hkv, D)."""
    b, h, d = q.shape
    return q.view(b, n_kv_heads, h // n_kv_heads, d).mean(dim=2)


def cluster_scores(q_kv: Tensor, krep: Tensor) -> Tensor:
    """score_c = q · k̃_c: (B, Hkv, D), (B, Hkv, C, D) -> (B, Hkv, C)."""
    return (krep.float() @ q_kv.float().unsqueeze(-1)).squeeze(-1)


def forced_clusters(n_clusters: int, cfg: MPCacheConfig) -> list[int]:
    """Sink (0) and local (C−1) clusters, deduplicated, when enabled."""
    forced = ([0] if cfg.force_sink else []) + ([n_clusters - 1] if cfg.force_local else [])
    return sorted(set(forced))


def select_clusters(q_kv: Tensor, k: Tensor, cfg: MPCacheConfig) -> Tensor:
    """Hierarchical query-aware selection; returns the picked finest-level clusters.

    Level l: score every cluster with q·k̃, keep only candidates (all clusters at level 0, children of
    the level-(l−1) picks deeper), exclude the forced clusters, take top-``n_topk`` and add the forced
    ones. q_kv: (B, Hkv, D); k: (B, Hkv, T', D). Returns a bool (B, Hkv, C_last) selection.
    """
    t = k.shape[-2]
    parent: Tensor | None = None
    for level, s in enumerate(cfg.cluster_sizes):
        c = cfg.n_clusters(t, level)
        rmin, rmax = cluster_minmax(k, s)
        score = cluster_scores(q_kv, representative_keys(rmin, rmax, cfg.alpha))    # (B, Hkv, C)
        if parent is None:
            candidate = torch.ones_like(score, dtype=torch.bool)
        else:
            fan = cfg.cluster_sizes[level - 1] // s
            candidate = parent.repeat_interleave(fan, dim=-1)[..., :c]
        forced = forced_clusters(c, cfg)
        candidate[..., forced] = False
        n = cfg.n_topk(t, level)
        picked = torch.zeros_like(candidate)
        if n > 0:
            idx = score.masked_fill(~candidate, NEG).topk(n, dim=-1).indices
            picked.scatter_(-1, idx, True)
        picked[..., forced] = True
        parent = picked
    return parent


def cluster_token_mask(picked: Tensor, s: int, length: int) -> Tensor:
    """Expand a (B, Hkv, C) cluster selection to a (B, Hkv, T') token mask."""
    return picked.repeat_interleave(s, dim=-1)[..., :length]


def dynamic_token_mask(q: Tensor, k: Tensor, cfg: MPCacheConfig) -> Tensor:
    """Tokens each KV head attends this decode step. q: (B, H, D) post-RoPE; k: (B, Hkv, T', D).

    Returns a bool (B, Hkv, T'); all True when T' ≤ cfg.dynamic_min_tokens.
    """
    t = k.shape[-2]
    if t <= cfg.dynamic_min_tokens:
        return torch.ones(k.shape[:2] + (t,), dtype=torch.bool, device=k.device)
    picked = select_clusters(group_query(q, k.shape[1]), k, cfg)
    return cluster_token_mask(picked, cfg.cluster_sizes[-1], t)


@dataclass
class MPCache(KVPolicy):
    """MPCache plaintext twin (see module docstring).

    Parameters
    ----------
    config : MPCacheConfig, every knob (default: the authors' defaults).
    budget : optional float in (0, 1], fraction of the prompt attended per decode step; overrides
        ``config.static_keep`` and the level-2 ratio via :func:`config_for_budget`.
    """

    config: MPCacheConfig = field(default_factory=MPCacheConfig)
    budget: float | None = None
    needs = frozenset({"q"})

    def __post_init__(self) -> None:
        if self.budget is not None:
            self.config = config_for_budget(float(self.budget), self.config)

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        return self.config.shares_with(layer_idx)

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """Look-once static eviction: keep the public top-K prompt tokens (the partner's if any), in order."""
        cfg = self.config
        if ctx.partner is not None:
            idx = ctx.partner.aux[STATIC]
        else:
            t0 = kv.n
            w = cfg.window(t0)
            attn = window_attention(ctx.q[:, :, -w:], kv.k, ctx.scaling, kv.valid)          # (B, H, W, T0)
            scores = static_scores(attn)                                                  # (B, T0)
            if kv.valid is not None:
                scores = scores.masked_fill(~kv.valid.all(dim=1), NEG)
            idx = self.keep(scores, cfg.n_keep(t0), ctx.layer_idx)                       # (B, K)
        b, hkv = kv.k.shape[:2]
        out = gather_kv(kv, idx[:, None, :].expand(b, hkv, idx.shape[-1]))
        out.aux[STATIC] = idx
        return out

    def keep(self, scores: Tensor, n_keep: int, layer_idx: int) -> Tensor:
        """The static set of a layer that selects: ``static_keep`` (a subclass may resolve ties
        another way, e.g. a test replaying the MPC's choice at a fixed-point near-tie)."""
        return static_keep(scores, n_keep)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """Dynamic selection before attention at decode (the partner's of this step if any): (B, Hkv, 1, T') bool."""
        if ctx.phase != "decode":
            return None
        if ctx.partner is not None:
            mask = ctx.partner.aux[DYNAMIC]
            assert mask.shape[-1] == kv.n, f"partner selected over {mask.shape[-1]} slots, layer has {kv.n}"
        else:
            mask = dynamic_token_mask(ctx.q[:, :, -1], kv.k, self.config)[:, :, None, :]
        kv.aux[DYNAMIC] = mask
        return mask if kv.valid is None else mask & kv.valid[:, :, None, :]
