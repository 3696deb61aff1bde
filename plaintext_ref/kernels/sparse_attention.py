"""Decode attention over selected pages only (Quest / MPCache / TokenSelect attention step).

For KV head h and its G query heads g, with the selected tokens
N_h = {p·S + j : p ∈ page_idx[h], 0 ≤ j < S, p·S + j < T, mask[h, p·S + j]}:
    o_g = Σ_{n∈N_h} softmax_n(scale · q_g·k_n) v_n.
Page indices must be distinct (a repeated page would be counted twice, as in an MPC gather); every
KV head needs at least one selected token. Shapes: q (B, H, D), k/v (B, Hkv, T, D),
page_idx (B, Hkv, P) int32, mask (B, Hkv, T) bool; output (B, H, D) in q's dtype.

The torch path gathers the selected rows and runs softmax attention in fp32. The Triton path is a
split-K (flash-decoding) kernel: grid (B·Hkv, splits); each program streams its share of the
selected pages in blocks of BLOCK_N tokens (page-index gather fused into the loads), keeps the
online-softmax state of all G query heads of its KV head (one K/V read serves the group; the group
is padded to 16 rows for tl.dot), accumulates in fp32 and writes a partial output and its
log-sum-exp; a second kernel merges the splits.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines and CI: the torch path below is used
    triton = None

BLOCK_N = 64          # tokens per inner step (a multiple of the page size)
MAX_SPLITS = 64       # partial outputs per (batch, KV head)
WAVES = 2             # aim for WAVES programs per multiprocessor
NUM_WARPS = 4
LOG2E = 1.4426950408889634


def all_pages(k: Tensor, page_size: int) -> Tensor:
    """Every page of the cache: (B, Hkv, C) int32 with C = ceil(T/page_size)."""
    b, hkv, t, _ = k.shape
    c = math.ceil(t / page_size)
    return torch.arange(c, dtype=torch.int32, device=k.device).expand(b, hkv, c)


def selected_tokens(page_idx: Tensor, page_size: int, length: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token positions of the selected pages and their validity: (B, Hkv, P·S) int64 and bool."""
    tok = page_idx.long()[..., None] * page_size + torch.arange(page_size, device=page_idx.device)
    tok = tok.flatten(-2)                                                             # (B, Hkv, N)
    valid = tok < length
    tok = tok.clamp(max=length - 1)
    if mask is not None:
        valid &= mask.gather(-1, tok)
    return tok, valid


# ---- torch fallback --------------------------------------------------------------------------------
def sparse_decode_attention_torch(q: Tensor, k: Tensor, v: Tensor, page_idx: Tensor, page_size: int,
                                  scale: float, mask: Tensor | None = None) -> Tensor:
    """Gather the selected K/V rows, then fp32 softmax attention; returns (B, H, D) in q's dtype."""
    b, h, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    tok, valid = selected_tokens(page_idx, page_size, t, mask)                        # (B, Hkv, N)
    rows = tok[..., None].expand(-1, -1, -1, d)
    ks = k.gather(2, rows).float()                                                    # (B, Hkv, N, D)
    vs = v.gather(2, rows).float()
    qg = q.float().view(b, hkv, h // hkv, d)                                          # (B, Hkv, G, D)
    logits = (qg @ ks.transpose(-1, -2)) * scale                                      # (B, Hkv, G, N)
    probs = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(dim=-1)
    return (probs @ vs).view(b, h, d).to(q.dtype)


# ---- Triton kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _split_program(HKV, GP: tl.constexpr, DP: tl.constexpr):
        """Program (B·Hkv, splits) of a split-K decode kernel: batch b, KV head h, split, n_splits, and the
        row (GP,) and channel (DP,) ranges; plus the zero online-softmax state m (GP,), l (GP,), acc (GP, DP)."""
        pid_bh = tl.program_id(0)
        g = tl.arange(0, GP)
        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([GP, DP], dtype=tl.float32)
        return (pid_bh // HKV, pid_bh % HKV, tl.program_id(1), tl.num_programs(1), g, tl.arange(0, DP), m_i,
                tl.zeros([GP], dtype=tl.float32), acc)

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
        """One block of the online softmax in log2 units: scores s (GP, BLOCK_N), -inf where masked, values
        v (BLOCK_N, DP) -> the updated m = max_n s, l = Σ_n 2^(s − m) and acc = Σ_n 2^(s − m) v."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        corr = tl.math.exp2(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return m_new, l_i, acc

    @triton.jit
    def _store_split(o_ptr, lse_ptr, acc, m_i, l_i, bh, split, n_splits, g, d, G: tl.constexpr, D: tl.constexpr):
        """Write a split's partial output acc / l (G, D) and its log2-sum-exp m + log2 l (-inf if it saw no
        slot) at row (bh·n_splits + split)·G + g of the (B·Hkv, splits, G) buffers."""
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        row = (bh * n_splits + split) * G + g
        tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=(g < G)[:, None] & (d < D)[None, :])
        tl.store(lse_ptr + row, lse, mask=g < G)

    @triton.jit
    def _sparse_decode_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, mask_ptr, o_ptr, lse_ptr,
                              T, P, HKV, pages_per_split, qk_scale,
                              sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, si_b, si_h, sm_b, sm_h,
                              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                              PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                              DOT_PREC: tl.constexpr):
        b, h, split, n_splits, g, d, m_i, l_i, acc = _split_program(HKV, GP, DP)
        q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :],
                    mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)                # (GP, DP)
        n_start = split * pages_per_split * PAGE
        for n0 in range(0, pages_per_split * PAGE, BLOCK_N):                          # pages_per_split·PAGE % BLOCK_N == 0
            n = n_start + n0 + tl.arange(0, BLOCK_N)
            valid = n < P * PAGE
            page = tl.load(idx_ptr + b * si_b + h * si_h + n // PAGE, mask=valid, other=0)
            tok = page.to(tl.int64) * PAGE + n % PAGE
            valid &= tok < T
            if HAS_MASK:
                valid &= tl.load(mask_ptr + b * sm_b + h * sm_h + tok, mask=valid, other=0) != 0
            ld = valid[:, None] & (d < D)[None, :]
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + tok[:, None] * sk_t + d[None, :], mask=ld, other=0.0)
            vt = tl.load(v_ptr + b * sv_b + h * sv_h + tok[:, None] * sv_t + d[None, :], mask=ld, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale          # (GP, BLOCK_N), log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, DOT_PREC)
        _store_split(o_ptr, lse_ptr, acc, m_i, l_i, b * HKV + h, split, n_splits, g, d, G, D)

    @triton.jit
    def _merge_splits_kernel(o_ptr, lse_ptr, out_ptr, n_splits,
                             G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr):
        # one program per (b·Hkv, g): out = Σ_s 2^(lse_s − m) o_s / Σ_s 2^(lse_s − m)
        pid = tl.program_id(0)
        bh = pid // G
        g = pid % G
        s = tl.arange(0, SP)
        d = tl.arange(0, DP)
        row = (bh * n_splits + s) * G + g
        lse = tl.load(lse_ptr + row, mask=s < n_splits, other=float("-inf"))
        w = tl.math.exp2(lse - tl.max(lse, axis=0))
        o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=(s < n_splits)[:, None] & (d < D)[None, :],
                    other=0.0)
        out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + pid * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _n_splits(work: int, n_pages: int, pages_per_block: int, device: torch.device) -> tuple[int, int]:
    """Splits and pages per split so that about WAVES programs per multiprocessor run."""
    sms = _sm_count(device)
    blocks = max(1, math.ceil(n_pages / pages_per_block))
    splits = max(1, min(MAX_SPLITS, blocks, math.ceil(WAVES * sms / work)))
    per_split = math.ceil(blocks / splits) * pages_per_block
    return math.ceil(n_pages / per_split), per_split


def sparse_decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, page_idx: Tensor, page_size: int,
                                   scale: float, mask: Tensor | None = None) -> Tensor:
    """Triton twin of ``sparse_decode_attention_torch`` (page_size a power of two ≤ BLOCK_N)."""
    b, h, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = h // hkv
    assert h == g * hkv, f"query heads {h} must be a multiple of KV heads {hkv}"
    assert page_size & (page_size - 1) == 0 and page_size <= BLOCK_N, \
        f"Triton sparse attention needs a power-of-two page <= {BLOCK_N}, got {page_size}"
    assert g <= 16, f"Triton sparse attention supports a group of at most 16 query heads, got {g}"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    page_idx = page_idx.to(torch.int32)
    n_pages = page_idx.shape[-1]
    splits, per_split = _n_splits(b * hkv, n_pages, BLOCK_N // page_size, q.device)
    part = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=q.device)
    m = mask.view(torch.uint8) if mask is not None else page_idx                    # dummy pointer when unmasked
    _sparse_decode_kernel[(b * hkv, splits)](
        q, k, v, page_idx, m, part, lse, t, n_pages, hkv, per_split, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        page_idx.stride(0), page_idx.stride(1), m.stride(0), m.stride(1),
        G=g, GP=16, D=d, DP=triton.next_power_of_2(d), PAGE=page_size, BLOCK_N=BLOCK_N,
        HAS_MASK=mask is not None, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS, num_stages=2)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(b * h,)](part, lse, out, splits, G=g, D=d, DP=triton.next_power_of_2(d),
                                   SP=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
