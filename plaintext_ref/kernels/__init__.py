"""Hot paths of query-aware KV selection at decode: page summaries, page scores, sparse attention.

Each op has a Triton kernel and a torch fallback with the same results (up to float rounding).
``backend="auto"`` picks Triton for CUDA tensors when triton imports, torch otherwise;
``backend="torch"`` forces the fallback; ``backend="triton"`` forces the kernel (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``). Triton is optional: this package imports without it.

Shapes: q (B, H, D) decode query (post-RoPE), k/v (B, Hkv, T, D) with H = G·Hkv (query head h
reads KV head h // G), page summaries (B, Hkv, C, D), page_idx (B, Hkv, P) int32 with P public.
"""
from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from plaintext_ref.kernels import cluster_scores as _cs
from plaintext_ref.kernels import sparse_attention as _sa
from plaintext_ref.kernels.cluster_scores import ScoreMode

Backend = Literal["auto", "triton", "torch"]
HAS_TRITON = _cs.triton is not None


def use_triton(x: Tensor, backend: Backend = "auto") -> bool:
    """Whether an op on ``x`` runs the Triton kernel under ``backend``."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed")
    return backend == "triton" or (backend == "auto" and HAS_TRITON and x.is_cuda)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def page_minmax(k: Tensor, page_size: int, backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """Per-channel min and max of pages of ``page_size`` consecutive tokens.

    k: (B, Hkv, T, D) -> (kmin, kmax), each (B, Hkv, C, D) in k's dtype, C = ceil(T/page_size);
    the partial last page summarises its real tokens only.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if use_triton(k, backend) and (backend == "triton" or _pow2(page_size)):
        return _cs.page_minmax_triton(k, page_size)
    return _cs.page_minmax_torch(k, page_size)


def cluster_scores(q: Tensor, rmin: Tensor, rmax: Tensor, mode: ScoreMode = "linear", alpha: float = 0.6,
                   backend: Backend = "auto") -> Tensor:
    """Score of each page for each KV head: (B, H, D), (B, Hkv, C, D) x2 -> (B, Hkv, C) fp32.

    linear (MPCache): q̄·(α r_max + (1−α) r_min), q̄ the group's mean query.
    quest: max_g Σ_i max(q_gi r_max,i, q_gi r_min,i), an upper bound of max_{j∈page} q_g·k_j.
    """
    if mode not in ("linear", "quest"):
        raise ValueError(f"mode must be 'linear' or 'quest', got {mode!r}")
    if q.shape[1] % rmin.shape[1] or rmin.shape != rmax.shape or q.shape[-1] != rmin.shape[-1]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, rmin {tuple(rmin.shape)}, rmax {tuple(rmax.shape)}")
    if use_triton(q, backend):
        return _cs.cluster_scores_triton(q, rmin, rmax, mode, alpha)
    return _cs.cluster_scores_torch(q, rmin, rmax, mode, alpha)


def head_logits(q: Tensor, k: Tensor, backend: Backend = "auto") -> Tensor:
    """TokenSelect criticality c_{h,j} = q_h·k_{h//G, j} (no 1/√D): -> (B, H, T) fp32."""
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    if use_triton(q, backend):
        return _cs.head_logits_triton(q, k)
    return _cs.head_logits_torch(q, k)


def soft_votes(q: Tensor, k: Tensor, backend: Backend = "auto") -> Tensor:
    """TokenSelect soft voting S_j = Σ_h softmax_j(q_h·k_{h//G, j}): -> (B, T) fp32."""
    return head_logits(q, k, backend).softmax(dim=-1).sum(dim=1)


def sparse_decode_attention(q: Tensor, k: Tensor, v: Tensor, page_idx: Tensor | None = None,
                            page_size: int = 16, scale: float | None = None, mask: Tensor | None = None,
                            backend: Backend = "auto") -> Tensor:
    """Decode attention of each KV head's query group over its selected tokens only.

    Selected = tokens of the pages in ``page_idx`` (B, Hkv, P) (all pages when None), inside the
    cache, and where ``mask`` (B, Hkv, T) bool is True (when given). Pages must be distinct and each
    KV head needs one selected token. scale defaults to 1/√D. Returns (B, H, D) in q's dtype.
    """
    b, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or h % k.shape[1] or k.shape[-1] != d:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if page_idx is None:
        page_idx = _sa.all_pages(k, page_size)
    if page_idx.shape[:2] != k.shape[:2]:
        raise ValueError(f"page_idx {tuple(page_idx.shape)} must be (B, Hkv, P) for k {tuple(k.shape)}")
    if mask is not None and mask.shape != k.shape[:3]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, Hkv, T) for k {tuple(k.shape)}")
    scale = 1 / math.sqrt(d) if scale is None else scale
    supported = _pow2(page_size) and page_size <= _sa.BLOCK_N and h // k.shape[1] <= 16
    if use_triton(q, backend) and (backend == "triton" or supported):
        return _sa.sparse_decode_attention_triton(q, k, v, page_idx, page_size, scale, mask)
    return _sa.sparse_decode_attention_torch(q, k, v, page_idx, page_size, scale, mask)


__all__ = ["Backend", "HAS_TRITON", "ScoreMode", "cluster_scores", "head_logits", "page_minmax",
           "soft_votes", "sparse_decode_attention", "use_triton"]
