"""The plaintext math of MPCache (float twin of the MPC protocols), on plain tensors.

Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient Private LLM Inference",
arXiv 2501.06807. These functions are the ground truth that ``mpcache.policy`` (MPC) is validated
against, and what ``plaintext_ref.policies.mpcache.MPCachePolicy`` plugs into HF generation.
Knobs and deviations from the authors' code: ``mpcache.config.MPCacheConfig``.

Shapes: B batch · Hkv KV heads · G query heads per KV head · W window queries · T0 prompt tokens ·
T' cache tokens · D head dim · C clusters · K kept count.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mpcache.config import MPCacheConfig

NEG = float("-inf")


def window_attention(q_win: Tensor, k: Tensor) -> Tensor:
    """Causal softmax attention of the last W prompt queries over the T0 prompt keys.

    q_win: (B, H, W, D) post-RoPE queries of the last W prompt tokens; k: (B, Hkv, T0, D).
    Returns (B, H, W, T0) fp32 probabilities, softmax(q kᵀ/√D + causal mask).
    """
    b, h, w, d = q_win.shape
    t0 = k.shape[-2]
    kk = k.repeat_interleave(h // k.shape[1], dim=1).float()              # (B, H, T0, D)
    logits = q_win.float() @ kk.transpose(-1, -2) / math.sqrt(d)           # (B, H, W, T0)
    rows = torch.arange(t0 - w, t0, device=k.device)[:, None]              # absolute query positions
    causal = torch.arange(t0, device=k.device)[None, :] <= rows            # (W, T0)
    return logits.masked_fill(~causal, NEG).softmax(dim=-1)


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
