"""KIVI: tuning-free asymmetric low-bit KV quantization (Liu et al., ICML 2024, arXiv 2402.02750).

Based on https://arxiv.org/abs/2402.02750 and kv_methods.md §6.1.

Rule (jy-yuan/KIVI ``models/llama_kivi.py``): min-max RTN at b bits (``quant.rtn``), with
* keys per channel: groups of G consecutive tokens of one channel; keys are quantized in blocks of R tokens:
  the prompt's first ⌊n/R⌋·R keys after the prompt, then the full-precision residual grows by one key per
  decode step and is flushed (all R keys quantized) once it holds R;
* values per token: groups of G channels of one token; the most recent R values stay full precision and
  the oldest residual value is quantized each step once there are more than R (a sliding window);
* the prompt attends itself at full precision; later queries read the dequantized slots.

Defaults: b = 2, G = 32, R = 128 (paper §4; the README's ``example.py`` uses residual_length 32).

Deviations:
1. Value groups span min(G, D) channels (KIVI needs D % G == 0 and uses G = 32 with D = 128; the tiny test
   models have D = 16).
2. Dequantized slots replace the exact ones in ``LayerKV.k``/``v`` (a simulated cache: attention is exact
   over x̂); the codes, scales and zero points live in ``LayerKV.aux`` unpacked, and ``memory`` counts them
   as packed b-bit codes plus fp16 scale and zero per group (KIVI packs into int32 words with fp16 params).
3. Left-padded slots take part in the group statistics, as in KIVI (no special padding path).
4. ``transformers.QuantizedCache`` is not used as a reference: its integer backends need optimum-quanto or
   hqq (not installed; the ``fp8`` backend is per-tensor FP8, a different method), and its layer re-quantizes
   the whole cache at every flush and groups keys and values alike, unlike KIVI. The tests check this
   file against the quantizer's math (error ≤ s/2, exact residual, exact accounting).

Memory of one layer after n cached tokens, B = 1 (``cache_memory``):
Nk = ⌊n/R⌋·R quantized keys, Nv = max(n − R, 0) quantized values,
bits = Hkv·[b·D·(Nk + Nv) + 2·16·(D·Nk/G + Nv·D/G_v) + 16·D·((n − Nk) + (n − Nv))],
so ≈ b + 32/G bits per element for n ≫ R (G_v = G).

GQA: per KV head (groups never cross heads). Needs only K and V (no queries, no attention weights).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from plaintext_ref.policies.base import KVPolicy, LayerKV, StepCtx
from plaintext_ref.policies.quant import FP_BITS, KVMemory, dequantize_groups, quantize_groups

KEYS, VALUES = "kivi_k", "kivi_v"   # LayerKV.aux: (codes, scale, zero) of the quantized key / value prefix


@dataclass
class KIVI(KVPolicy):
    """KIVI: per-channel key and per-token value quantization with a full-precision residual window.

    Parameters
    ----------
    bits : int in [1, 16], default 2, code width b for keys and values.
    group_size : int >= 1, default 32, G: tokens per key group, channels per value group (min(G, D)).
    residual_length : int, default 128, R: a positive multiple of G, full-precision recent tokens.
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"KIVI.bits must lie in [1, 16], got {self.bits}")
        if self.group_size < 1 or self.residual_length < 1 or self.residual_length % self.group_size:
            raise ValueError(f"KIVI.residual_length must be a positive multiple of group_size >= 1, got "
                             f"{self.residual_length} and {self.group_size}")

    def value_group(self, head_dim: int) -> int:
        g = min(self.group_size, head_dim)
        if head_dim % g:
            raise ValueError(f"KIVI: head_dim {head_dim} is not a multiple of the value group {g}")
        return g

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        d = kv.k.shape[-1]
        empty = kv.k.new_zeros(*kv.k.shape[:2], 0, d)
        kv.aux[KEYS] = quantize_groups(empty, self.bits, self.group_size, 2)
        kv.aux[VALUES] = quantize_groups(empty, self.bits, self.value_group(d), 3)
        return self.on_append(ctx, kv)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """Flush whole blocks of R full-precision keys, and every value older than the last R."""
        k, v = kv.k, kv.v
        nk, nv = self.n_quantized(kv)
        flush = (kv.n - nk) // self.residual_length * self.residual_length
        if flush:
            k = self._quantize(kv, KEYS, k, nk, nk + flush, self.group_size, 2)
        if kv.n - nv > self.residual_length:
            v = self._quantize(kv, VALUES, v, nv, kv.n - self.residual_length, self.value_group(v.shape[-1]), 3)
        return replace(kv, k=k, v=v)

    def _quantize(self, kv: LayerKV, key: str, x: Tensor, lo: int, hi: int, group: int, dim: int) -> Tensor:
        """Quantize slots lo:hi of x (B, Hkv, T, D), append their codes to aux[key]; x with x̂ there."""
        codes, scale, zero = quantize_groups(x[:, :, lo:hi], self.bits, group, dim)
        old = kv.aux[key]
        kv.aux[key] = tuple(torch.cat([a, b], dim=2) for a, b in zip(old, (codes, scale, zero)))
        x = x.clone()
        x[:, :, lo:hi] = dequantize_groups(codes, scale, zero, group, dim).to(x.dtype)
        return x

    def n_quantized(self, kv: LayerKV) -> tuple[int, int]:
        """(Nk, Nv): how many of the oldest keys / values are quantized."""
        return kv.aux[KEYS][0].shape[2], kv.aux[VALUES][0].shape[2]

    def memory(self, kv: LayerKV) -> KVMemory:
        """Storage of this layer's cache, counted from what ``aux`` holds."""
        (kc, ks, kz), (vc, vs, vz) = kv.aux[KEYS], kv.aux[VALUES]
        nk, nv = kc.shape[2], vc.shape[2]
        b, h, t, d = kv.k.shape
        fp = FP_BITS * b * h * d * ((t - nk) + (t - nv))
        return KVMemory(self.bits * (kc.numel() + vc.numel()), FP_BITS * (ks.numel() + kz.numel() + vs.numel()
                        + vz.numel()), fp, 2 * b * h * t * d)

    def cache_memory(self, n_tokens: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0,
                     num_layers: int = 1) -> KVMemory:
        """Storage of one layer (batch 1) right after a prefill of ``n_tokens`` (the formula above)."""
        r, g, gv = self.residual_length, self.group_size, self.value_group(head_dim)
        nk, nv = n_tokens // r * r, max(n_tokens - r, 0)
        hd = n_kv_heads * head_dim
        groups = n_kv_heads * (nk // g * head_dim + nv * (head_dim // gv))
        return KVMemory(self.bits * hd * (nk + nv), 2 * FP_BITS * groups, FP_BITS * hd * (2 * n_tokens - nk - nv),
                        2 * hd * n_tokens)
