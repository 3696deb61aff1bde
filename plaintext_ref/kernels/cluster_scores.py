"""Page (cluster) summaries and query-to-page scores for Quest, MPCache and TokenSelect.

Math (shared/research/kv_methods.md §3.1–3.2, mpcache.md §4). Query head h reads KV head h // G.
- page min/max: m_c = min_{j∈c} k_j, M_c = max_{j∈c} k_j per channel (the partial last page
  summarises its real tokens only, as ``plaintext_ref.policies.mpcache.cluster_minmax``).
- ``linear`` (MPCache): s_c = q̄·(α M_c + (1−α) m_c), q̄ = mean of the G query heads of the KV head
  (``policies.mpcache.group_query`` + ``cluster_scores``; tests check the two agree).
- ``quest``: U_c = max_g Σ_i max(q_gi M_ci, q_gi m_ci). Per query head this is Quest's upper bound
  of max_{j∈c} q_g·k_j; the max over the group keeps it an upper bound for every head of the group,
  so one page set per KV head is safe. The torch path uses Σ_i max(q_i M_i, q_i m_i) = q⁺·M + q⁻·m
  (M ≥ m), two matmuls instead of a (G, C, D) temporary.
- ``head_logits``: TokenSelect criticality c_{h,j} = q_h·k_{h//G, j} (no 1/√D, as the authors'
  kernel); ``soft_votes`` turns it into S_j = Σ_h softmax_j(c_{h,j}).

All scores are fp32. The Triton kernels read bf16/fp16/fp32 inputs, one program per
(batch · KV head, block of pages), and load each page row once for the whole query group.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines and CI: the torch paths below are used
    triton = None

ScoreMode = Literal["linear", "quest"]
_MODES = {"linear": 0, "quest": 1, "dot": 2}


# ---- torch fallbacks (the references) -----------------------------------------------------------
def page_minmax_torch(k: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """k: (B, Hkv, T, D) -> (kmin, kmax), each (B, Hkv, C, D) in k's dtype, C = ceil(T/page_size)."""
    b, h, t, d = k.shape
    c = math.ceil(t / page_size)
    pad = (0, 0, 0, c * page_size - t)
    lo = torch.nn.functional.pad(k, pad, value=float("inf")).view(b, h, c, page_size, d).amin(dim=3)
    hi = torch.nn.functional.pad(k, pad, value=float("-inf")).view(b, h, c, page_size, d).amax(dim=3)
    return lo, hi


def cluster_scores_torch(q: Tensor, rmin: Tensor, rmax: Tensor, mode: ScoreMode, alpha: float) -> Tensor:
    """q: (B, H, D); rmin/rmax: (B, Hkv, C, D) -> (B, Hkv, C) fp32 (see the module docstring)."""
    b, h, d = q.shape
    hkv = rmin.shape[1]
    qg = q.float().view(b, hkv, h // hkv, d)                                          # (B, Hkv, G, D)
    if mode == "linear":
        krep = alpha * rmax.float() + (1 - alpha) * rmin.float()                      # (B, Hkv, C, D)
        return (krep @ qg.mean(dim=2).unsqueeze(-1)).squeeze(-1)
    pos, neg = qg.clamp(min=0), qg.clamp(max=0)
    bound = pos @ rmax.float().transpose(-1, -2) + neg @ rmin.float().transpose(-1, -2)  # (B, Hkv, G, C)
    return bound.amax(dim=2)


def head_logits_torch(q: Tensor, k: Tensor) -> Tensor:
    """c_{h,j} = q_h·k_{h//G, j}: q (B, H, D), k (B, Hkv, T, D) -> (B, H, T) fp32."""
    b, h, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q.float().view(b, hkv, h // hkv, d)                                          # (B, Hkv, G, D)
    return (qg @ k.float().transpose(-1, -2)).view(b, h, t)


# ---- Triton kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _page_minmax_kernel(k_ptr, lo_ptr, hi_ptr, T, HKV,
                            sk_b, sk_h, sk_t, so_b, so_h, so_c,
                            D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr):
        pid_bh = tl.program_id(0)
        c = tl.program_id(1)
        b = pid_bh // HKV
        h = pid_bh % HKV
        t = c * PAGE + tl.arange(0, PAGE)
        d = tl.arange(0, DP)
        ok = (t < T)[:, None] & (d < D)[None, :]
        x = tl.load(k_ptr + b * sk_b + h * sk_h + t[:, None] * sk_t + d[None, :], mask=ok, other=0.0)
        lo = tl.min(tl.where(ok, x, float("inf")), axis=0)                            # (DP,)
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)
        out = b * so_b + h * so_h + c * so_c + d
        tl.store(lo_ptr + out, lo.to(lo_ptr.dtype.element_ty), mask=d < D)
        tl.store(hi_ptr + out, hi.to(hi_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def _scores_kernel(q_ptr, lo_ptr, hi_ptr, out_ptr, C, HKV, alpha,
                       sq_b, sq_h, sr_b, sr_h, sr_c, so_b, so_h,
                       G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       BLOCK_C: tl.constexpr, MODE: tl.constexpr):
        # MODE 0: linear (mean query, one row per KV head); 1: quest (max over the group);
        # 2: dot (one row per query head, hi_ptr unused: lo_ptr holds the keys).
        pid_bh = tl.program_id(0)
        b = pid_bh // HKV
        h = pid_bh % HKV
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, DP)
        ok = (c < C)[:, None] & (d < D)[None, :]
        rows = b * sr_b + h * sr_h + c[:, None] * sr_c + d[None, :]
        lo = tl.load(lo_ptr + rows, mask=ok, other=0.0).to(tl.float32)               # (BLOCK_C, DP)
        q_row = q_ptr + b * sq_b + h * G * sq_h + d
        if MODE == 0:
            hi = tl.load(hi_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            qm = tl.zeros([DP], dtype=tl.float32)
            for g in tl.static_range(G):
                qm += tl.load(q_row + g * sq_h, mask=d < D, other=0.0).to(tl.float32)
            krep = alpha * hi + (1.0 - alpha) * lo
            score = tl.sum(krep * (qm / G)[None, :], axis=1)
            tl.store(out_ptr + b * so_b + h * so_h + c, score, mask=c < C)
        elif MODE == 1:
            hi = tl.load(hi_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            score = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            for g in tl.static_range(G):
                qg = tl.load(q_row + g * sq_h, mask=d < D, other=0.0).to(tl.float32)[None, :]
                score = tl.maximum(score, tl.sum(tl.maximum(qg * hi, qg * lo), axis=1))
            tl.store(out_ptr + b * so_b + h * so_h + c, score, mask=c < C)
        else:
            for g in tl.static_range(G):
                qg = tl.load(q_row + g * sq_h, mask=d < D, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + b * so_b + (h * G + g) * so_h + c, tl.sum(qg * lo, axis=1), mask=c < C)


def _block_c(c: int) -> int:
    return max(16, min(64, triton.next_power_of_2(c)))


def page_minmax_triton(k: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Triton twin of ``page_minmax_torch`` (page_size a power of two)."""
    b, hkv, t, d = k.shape
    assert page_size & (page_size - 1) == 0, f"Triton page_minmax needs a power-of-two page, got {page_size}"
    k = k if k.stride(-1) == 1 else k.contiguous()
    c = math.ceil(t / page_size)
    lo = torch.empty(b, hkv, c, d, dtype=k.dtype, device=k.device)
    hi = torch.empty_like(lo)
    _page_minmax_kernel[(b * hkv, c)](
        k, lo, hi, t, hkv, k.stride(0), k.stride(1), k.stride(2), lo.stride(0), lo.stride(1), lo.stride(2),
        D=d, DP=triton.next_power_of_2(d), PAGE=page_size, num_warps=2)
    return lo, hi


def _launch_scores(q: Tensor, lo: Tensor, hi: Tensor, mode: str, alpha: float) -> Tensor:
    b, h, d = q.shape
    hkv, c = lo.shape[1], lo.shape[2]
    assert h % hkv == 0, f"query heads {h} must be a multiple of KV heads {hkv}"
    assert lo.stride(-1) == 1 and hi.stride(-1) == 1 and lo.stride() == hi.stride(), "page rows must be dense"
    q = q if q.stride(-1) == 1 else q.contiguous()
    rows = h if mode == "dot" else hkv
    out = torch.empty(b, rows, c, dtype=torch.float32, device=q.device)
    block = _block_c(c)
    _scores_kernel[(b * hkv, triton.cdiv(c, block))](
        q, lo, hi, out, c, hkv, float(alpha), q.stride(0), q.stride(1),
        lo.stride(0), lo.stride(1), lo.stride(2), out.stride(0), out.stride(1),
        G=h // hkv, D=d, DP=triton.next_power_of_2(d), BLOCK_C=block, MODE=_MODES[mode], num_warps=4)
    return out


def cluster_scores_triton(q: Tensor, rmin: Tensor, rmax: Tensor, mode: ScoreMode, alpha: float) -> Tensor:
    """Triton twin of ``cluster_scores_torch``."""
    return _launch_scores(q, rmin, rmax, mode, alpha)


def head_logits_triton(q: Tensor, k: Tensor) -> Tensor:
    """Triton twin of ``head_logits_torch``."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    return _launch_scores(q, k, k, "dot", 1.0)
