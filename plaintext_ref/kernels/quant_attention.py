"""Fused dequantize-attention for a KIVI cache at decode (Liu et al., arXiv 2402.02750, §3.3 and its CUDA
``gemv`` kernels): attention reads the packed low-bit codes and dequantizes them on the fly, never writing K̂/V̂.

Cache layout (:class:`QuantKV`, one layer; what :class:`plaintext_ref.policies.KIVI` keeps, packed):
* keys per channel: the oldest Nk slots as b-bit codes with one scale s and zero z per (G tokens, channel),
  k̂_{t,c} = code_{t,c}·s_{⌊t/G⌋,c} + z_{⌊t/G⌋,c}; slots Nk..T−1 full precision (the key residual);
* values per token: the oldest Nv slots as codes with one (s, z) per (token, Gv channels),
  v̂_{t,c} = code_{t,c}·s_{t,⌊c/Gv⌋} + z_{t,⌊c/Gv⌋}; slots Nv..T−1 full precision (the value residual).
Codes are packed along the channel axis, 32/b per int32 word: channel c sits in word ⌊c·b/32⌋ at bit
(c mod 32/b)·b (b ∈ {1, 2, 4, 8}; D·b a multiple of 32).

Op: o_g = Σ_{t<T} softmax_t(scale·q_g·k̃_t)·ṽ_t for the G query heads g of each KV head, with k̃ / ṽ the
dequantized or residual slot. Backends:
* torch: unpacks the codes and computes without materialising K̂ or V̂, by linearity:
  q·k̂_t = Σ_c (q_c s_{⌊t/G⌋,c}) code_{t,c} + Σ_c q_c z_{⌊t/G⌋,c}, and
  o_c = Σ_t (p_t s_{t,⌊c/Gv⌋}) code_{t,c} + Σ_t p_t z_{t,⌊c/Gv⌋} over the quantized values (KIVI's trick);
* triton: a split-K (flash-decoding) kernel, grid (B·Hkv, splits): each program streams its share of the
  slots in blocks of BLOCK_N, loads the int32 words, shifts and masks the codes out, dequantizes in registers
  (residual slots are loaded instead where t ≥ Nk or t ≥ Nv), keeps the online softmax of its G query heads
  (padded to 16 rows for tl.dot) in fp32, and writes a partial output and log-sum-exp; the program set-up,
  online-softmax step, split store and merge kernel are ``sparse_attention``'s.

Shapes: q (B, H, D) decode query, H = G·Hkv; output (B, H, D) in q's dtype. Every slot is attended (no
padding mask). Speed: ``benchmarks/kv_kernels.py --quant``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from plaintext_ref.kernels import Backend, use_triton
from plaintext_ref.kernels import sparse_attention as _sa
from plaintext_ref.policies.base import LayerKV
from plaintext_ref.policies.kivi import KEYS, VALUES, KIVI

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines and CI: the torch path is used
    triton = None

BLOCK_N = 64
NUM_WARPS = 4
PACK_BITS = (1, 2, 4, 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(…, D) integer codes < 2^bits -> (…, D·bits/32) int32 words (channel c at bit (c mod 32/b)·b)."""
    if bits not in PACK_BITS or codes.shape[-1] % (32 // bits):
        raise ValueError(f"cannot pack D={codes.shape[-1]} codes of {bits} bits (bits in {PACK_BITS}, D·bits a "
                         "multiple of 32)")
    per = 32 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (codes.to(torch.int64).unflatten(-1, (-1, per)) << shifts).sum(dim=-1)          # (…, W) in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_codes(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (…, W) int32 -> (…, W·32/bits) int64 codes."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    return ((words.to(torch.int64)[..., None] & 0xFFFFFFFF) >> shifts & (2 ** bits - 1)).flatten(-2)


@dataclass
class QuantKV:
    """One layer of a KIVI cache, packed for the kernel (see the module docstring).

    k_words: (B, Hkv, Nk, D·b/32) int32; k_scale, k_zero: (B, Hkv, Nk/G, D); k_res: (B, Hkv, T − Nk, D).
    v_words: (B, Hkv, Nv, D·b/32) int32; v_scale, v_zero: (B, Hkv, Nv, D/Gv); v_res: (B, Hkv, T − Nv, D).
    """

    k_words: Tensor
    k_scale: Tensor
    k_zero: Tensor
    k_res: Tensor
    v_words: Tensor
    v_scale: Tensor
    v_zero: Tensor
    v_res: Tensor
    bits: int
    group: int
    value_group: int

    def __post_init__(self) -> None:
        nk, nv, d = self.k_words.shape[2], self.v_words.shape[2], self.k_res.shape[-1]
        assert nk + self.k_res.shape[2] == nv + self.v_res.shape[2], "keys and values must cover the same slots"
        assert self.k_scale.shape[2] * self.group == nk and self.k_scale.shape[-1] == d, \
            f"key params {tuple(self.k_scale.shape)} do not fit {nk} slots in groups of {self.group}"
        assert self.v_scale.shape[-1] * self.value_group == d, f"value params {tuple(self.v_scale.shape)}, D={d}"

    @property
    def n(self) -> int:
        """Slots T."""
        return self.k_words.shape[2] + self.k_res.shape[2]

    @classmethod
    def from_kivi(cls, kv: LayerKV, policy: KIVI) -> QuantKV:
        """Pack the codes a KIVI cache keeps in ``kv.aux``; residual slots come from kv.k / kv.v as they are."""
        assert kv.valid is None or bool(kv.valid.all()), "the fused kernel attends every slot (no padding)"
        (kc, ks, kz), (vc, vs, vz) = kv.aux[KEYS], kv.aux[VALUES]
        nk, nv, dt = kc.shape[2], vc.shape[2], kv.k.dtype
        return cls(pack_codes(kc, policy.bits), ks.to(dt), kz.to(dt), kv.k[:, :, nk:], pack_codes(vc, policy.bits),
                   vs.to(dt), vz.to(dt), kv.v[:, :, nv:], policy.bits, policy.group_size,
                   policy.value_group(kv.k.shape[-1]))

    @classmethod
    def from_dense(cls, k: Tensor, v: Tensor, policy: KIVI) -> QuantKV:
        """KIVI's prompt quantization of k, v (B, Hkv, T, D) (its ``on_prefill``), packed."""
        pos = torch.arange(k.shape[2], device=k.device).expand(k.shape[:3])
        return cls.from_kivi(policy.on_prefill(None, LayerKV(k, v, pos)), policy)   # KIVI's hooks read only kv

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """K̃, Ṽ (B, Hkv, T, D) fp32: dequantized slots, then the residual ones."""
        k = unpack_codes(self.k_words, self.bits).float().unflatten(2, (-1, self.group))          # (B, Hkv, Nk/G, G, D)
        k = (k * self.k_scale.float()[:, :, :, None] + self.k_zero.float()[:, :, :, None]).flatten(2, 3)
        v = unpack_codes(self.v_words, self.bits).float().unflatten(-1, (-1, self.value_group))  # (B,Hkv,Nv,D/Gv,Gv)
        v = (v * self.v_scale.float()[..., None] + self.v_zero.float()[..., None]).flatten(-2)
        return torch.cat([k, self.k_res.float()], 2), torch.cat([v, self.v_res.float()], 2)


def quant_decode_attention(q: Tensor, cache: QuantKV, scale: float | None = None,
                           backend: Backend = "auto") -> Tensor:
    """Decode attention of q (B, H, D) over a packed KIVI layer -> (B, H, D) in q's dtype; scale defaults 1/√D."""
    b, h, d = q.shape
    hkv = cache.k_res.shape[1]
    if cache.k_res.shape[0] != b or h % hkv or cache.k_res.shape[-1] != d:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {hkv} KV heads, D={cache.k_res.shape[-1]}")
    scale = 1 / math.sqrt(d) if scale is None else scale
    if use_triton(q, backend) and (backend == "triton" or h // hkv <= 16):
        return quant_decode_attention_triton(q, cache, scale)
    return quant_decode_attention_torch(q, cache, scale)


# ---- torch fallback --------------------------------------------------------------------------------
def quant_decode_attention_torch(q: Tensor, cache: QuantKV, scale: float) -> Tensor:
    """Attention on the codes by linearity (module docstring), fp32; K̂ and V̂ are never formed."""
    b, h, d = q.shape
    hkv, gk, gv = cache.k_res.shape[1], cache.group, cache.value_group
    qg = q.float().view(b, hkv, h // hkv, d)                                                 # (B, Hkv, G, D)
    kc = unpack_codes(cache.k_words, cache.bits).float().unflatten(2, (-1, gk))             # (B, Hkv, Nk/G, Gk, D)
    qs = qg[:, :, :, None] * cache.k_scale.float()[:, :, None]                               # (B, Hkv, G, Nk/G, D)
    quant = torch.einsum("bhgnd,bhntd->bhgnt", qs, kc) + (qg @ cache.k_zero.float().transpose(-1, -2))[..., None]
    logits = torch.cat([quant.flatten(-2), qg @ cache.k_res.float().transpose(-1, -2)], -1) * scale   # (B, Hkv, G, T)
    p = logits.softmax(dim=-1)
    nv = cache.v_words.shape[2]
    pq = p[..., :nv]                                                                         # (B, Hkv, G, Nv)
    vc = unpack_codes(cache.v_words, cache.bits).float().unflatten(-1, (-1, gv))            # (B, Hkv, Nv, D/Gv, Gv)
    ps = pq[..., None] * cache.v_scale.float()[:, :, None]                                   # (B, Hkv, G, Nv, D/Gv)
    out = torch.einsum("bhgtj,bhtjc->bhgjc", ps, vc).flatten(-2)                             # (B, Hkv, G, D)
    out = out + (pq @ cache.v_zero.float()).repeat_interleave(gv, dim=-1) + p[..., nv:] @ cache.v_res.float()
    return out.reshape(b, h, d).to(q.dtype)


# ---- Triton kernel -------------------------------------------------------------------------------
if triton is not None:
    from plaintext_ref.kernels.sparse_attention import _online_softmax_step, _split_program, _store_split

    @triton.jit
    def _quant_decode_kernel(q_ptr, kw_ptr, ks_ptr, kz_ptr, kr_ptr, vw_ptr, vs_ptr, vz_ptr, vr_ptr, o_ptr, lse_ptr,
                             T, NK, NV, HKV, per_split, qk_scale,
                             sq_b, sq_h, skw_b, skw_h, skw_t, sks_b, sks_h, sks_g, skr_b, skr_h, skr_t,
                             svw_b, svw_h, svw_t, svs_b, svs_h, svs_t, svr_b, svr_h, svr_t,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                             BITS: tl.constexpr, PER: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
                             BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
        b, h, split, n_splits, g, d, m_i, l_i, acc = _split_program(HKV, GP, DP)
        dm = (d < D)[None, :]
        word = (d // PER)[None, :]                                                  # PER = 32 / BITS codes a word
        shift = ((d % PER) * BITS)[None, :]
        q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :],
                    mask=(g < G)[:, None] & dm, other=0.0).to(tl.float32)                 # (GP, DP)
        for n0 in range(0, per_split, BLOCK_N):                                             # per_split % BLOCK_N == 0
            n = split * per_split + n0 + tl.arange(0, BLOCK_N)
            live = n < T
            kq = (live & (n < NK))[:, None] & dm                                            # quantized keys
            kf = (live & (n >= NK))[:, None] & dm                                           # residual keys
            w = tl.load(kw_ptr + b * skw_b + h * skw_h + n[:, None] * skw_t + word, mask=kq, other=0)
            code = ((w >> shift) & ((1 << BITS) - 1)).to(tl.float32)
            grp = (n // GK)[:, None] * sks_g + d[None, :]
            ks = tl.load(ks_ptr + b * sks_b + h * sks_h + grp, mask=kq, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + b * sks_b + h * sks_h + grp, mask=kq, other=0.0).to(tl.float32)
            kr = tl.load(kr_ptr + b * skr_b + h * skr_h + (n - NK)[:, None] * skr_t + d[None, :], mask=kf,
                         other=0.0).to(tl.float32)
            k = tl.where(kq, code * ks + kz, kr)                                             # (BLOCK_N, DP)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale                 # (GP, BLOCK_N), log2 units
            s = tl.where(live[None, :], s, float("-inf"))
            vq = (live & (n < NV))[:, None] & dm
            vf = (live & (n >= NV))[:, None] & dm
            w = tl.load(vw_ptr + b * svw_b + h * svw_h + n[:, None] * svw_t + word, mask=vq, other=0)
            code = ((w >> shift) & ((1 << BITS) - 1)).to(tl.float32)
            prm = n[:, None] * svs_t + (d // GV)[None, :]
            vs = tl.load(vs_ptr + b * svs_b + h * svs_h + prm, mask=vq, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + b * svs_b + h * svs_h + prm, mask=vq, other=0.0).to(tl.float32)
            vr = tl.load(vr_ptr + b * svr_b + h * svr_h + (n - NV)[:, None] * svr_t + d[None, :], mask=vf,
                         other=0.0).to(tl.float32)
            v = tl.where(vq, code * vs + vz, vr)                                              # (BLOCK_N, DP)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
        _store_split(o_ptr, lse_ptr, acc, m_i, l_i, b * HKV + h, split, n_splits, g, d, G, D)


def quant_decode_attention_triton(q: Tensor, cache: QuantKV, scale: float) -> Tensor:
    """Triton twin of :func:`quant_decode_attention_torch` (G <= 16 query heads per KV head)."""
    b, h, d = q.shape
    hkv, t = cache.k_res.shape[1], cache.n
    g = h // hkv
    assert g <= 16, f"the fused kernel supports a group of at most 16 query heads, got {g}"
    assert cache.bits in PACK_BITS, f"packed codes need bits in {PACK_BITS}, got {cache.bits}"
    c = QuantKV(*(x if x.stride(-1) == 1 else x.contiguous() for x in (
        cache.k_words, cache.k_scale, cache.k_zero, cache.k_res, cache.v_words, cache.v_scale, cache.v_zero,
        cache.v_res)), cache.bits, cache.group, cache.value_group)
    q = q if q.stride(-1) == 1 else q.contiguous()
    splits, per_split = _sa._n_splits(b * hkv, t, BLOCK_N, q.device)
    part = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=q.device)
    _quant_decode_kernel[(b * hkv, splits)](
        q, c.k_words, c.k_scale, c.k_zero, c.k_res, c.v_words, c.v_scale, c.v_zero, c.v_res, part, lse,
        t, c.k_words.shape[2], c.v_words.shape[2], hkv, per_split, scale * _sa.LOG2E,
        q.stride(0), q.stride(1), *c.k_words.stride()[:3], *c.k_scale.stride()[:3], *c.k_res.stride()[:3],
        *c.v_words.stride()[:3], *c.v_scale.stride()[:3], *c.v_res.stride()[:3],
        G=g, GP=16, D=d, DP=triton.next_power_of_2(d), BITS=c.bits, PER=32 // c.bits, GK=c.group, GV=c.value_group,
        BLOCK_N=BLOCK_N, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS,
        num_stages=1 if q.element_size() * d > 256 else 2)   # two stages of fp32 D=128 blocks overflow shared memory
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    _sa._merge_splits_kernel[(b * h,)](part, lse, out, splits, G=g, D=d, DP=triton.next_power_of_2(d),
                                       SP=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
