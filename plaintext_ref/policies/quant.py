"""Shared mechanics of the quantization policies (KIVI, MiKV, VidKV): group quantizers and memory accounting.

Quantizer (kv_methods.md §6): asymmetric min-max round-to-nearest over a group,
z = min x, s = (max x − z)/(2^b − 1), q = clamp(round((x − z)/s), 0, 2^b − 1), x̂ = q·s + z, so that
|x − x̂| ≤ s/2 elementwise. A group is ``group`` consecutive entries along one axis of a (B, Hkv, N, D) tensor:
``dim=2`` groups tokens (one group per channel: KIVI keys, VidKV keys and values), ``dim=3`` groups channels
(one group per token: KIVI values, MiKV).

How the policies use the runtime: after attention (``on_prefill`` / ``on_append``) they replace the quantized
slots of ``LayerKV.k`` / ``LayerKV.v`` by their dequantized values x̂, so attention reads exactly what a
dequantize-then-attend kernel would read, while ``LayerKV.aux`` keeps the codes, scales and zero points
(unpacked: one uint8 / int32 per code) that the memory accounting counts.

Memory accounting (:class:`KVMemory`): codes at their bit width as if densely packed; scales, zero points
and every full-precision slot at ``FP_BITS`` = 16 (fp16, the storage all three papers assume), whatever the
dtype the simulation computes in. ``cache_bytes`` gives the whole cache of a model after a prefill.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from plaintext_ref.policies.base import KVPolicy
from plaintext_ref.policies.full import FullCache

FP_BITS = 16   # bits of a full-precision value, scale or zero point in the accounting (fp16)


@dataclass(frozen=True)
class KVMemory:
    """Storage of (part of) a KV cache, in bits.

    code_bits: integer codes. param_bits: scales, zero points and other per-group / per-channel side data.
    fp_bits: slots kept at full precision (``FP_BITS`` each). elements: K and V entries the cache stands
    for (2·B·Hkv·T·D), the denominator of ``bits_per_element``.
    """

    code_bits: float
    param_bits: float
    fp_bits: float
    elements: int

    @property
    def bits(self) -> float:
        return self.code_bits + self.param_bits + self.fp_bits

    @property
    def bytes(self) -> float:
        return self.bits / 8

    @property
    def bits_per_element(self) -> float:
        return self.bits / self.elements if self.elements else 0.0

    def __add__(self, other: KVMemory) -> KVMemory:
        return KVMemory(self.code_bits + other.code_bits, self.param_bits + other.param_bits,
                        self.fp_bits + other.fp_bits, self.elements + other.elements)


def full_memory(n_tokens: int, n_kv_heads: int, head_dim: int, batch: int = 1) -> KVMemory:
    """The full cache of one layer at fp16: 2·B·Hkv·T·D values."""
    elements = 2 * batch * n_kv_heads * n_tokens * head_dim
    return KVMemory(0, 0, FP_BITS * elements, elements)


def code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


def rtn(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max RTN over the last axis: x (..., G) -> codes (..., G), scale (..., 1), zero (..., 1), all fp32.

    A constant group gets s = 0 and codes 0, so x̂ = z = x exactly.
    """
    x = x.float()
    zero = x.amin(dim=-1, keepdim=True)
    scale = (x.amax(dim=-1, keepdim=True) - zero) / (2 ** bits - 1)
    ratio = torch.where(scale > 0, (x - zero) / scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return ratio.round().clamp(0, 2 ** bits - 1), scale, zero


def quantize_groups(x: Tensor, bits: int, group: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group RTN of x (B, Hkv, N, D) in groups of ``group`` consecutive entries along ``dim`` (2 or 3).

    Returns codes (B, Hkv, N, D) (uint8, or int32 above 8 bits) and fp32 scale, zero: (B, Hkv, N/group, D)
    for dim=2, (B, Hkv, N, D/group) for dim=3. The axis length must be a multiple of ``group``.
    """
    assert dim in (2, 3), f"dim must be 2 (tokens) or 3 (channels), got {dim}"
    assert x.shape[dim] % group == 0, f"axis {dim} of {tuple(x.shape)} is not a multiple of group {group}"
    grouped = x.movedim(dim, -1).unflatten(-1, (-1, group))                # (..., L/group, group)
    q, scale, zero = rtn(grouped, bits)
    codes = q.to(code_dtype(bits)).flatten(-2).movedim(-1, dim)
    return codes, scale.squeeze(-1).movedim(-1, dim), zero.squeeze(-1).movedim(-1, dim)


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor, group: int, dim: int) -> Tensor:
    """x̂ = q·s + z for the layout of :func:`quantize_groups`; fp32 (B, Hkv, N, D)."""
    q = codes.float().movedim(dim, -1).unflatten(-1, (-1, group))          # (..., L/group, group)
    x = q * scale.movedim(dim, -1)[..., None] + zero.movedim(dim, -1)[..., None]
    return x.flatten(-2).movedim(-1, dim)


def kv_dims(config) -> tuple[int, int, int]:
    """(num_layers, n_kv_heads, head_dim) of a transformers config (Llama-style or GPT-2)."""
    heads = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, hkv, head_dim


def cache_bytes(policy: KVPolicy | None, config, n_tokens: int) -> float | None:
    """Bytes of a model's whole KV cache (all layers, batch 1) right after a prefill of ``n_tokens``.

    Quantization policies answer through ``cache_memory``; the full cache counts fp16; None for any other
    policy (an eviction or selection method's memory is its budget, not computed here).
    """
    num_layers, hkv, head_dim = kv_dims(config)
    if hasattr(policy, "cache_memory"):
        per_layer = [policy.cache_memory(n_tokens, hkv, head_dim, i, num_layers) for i in range(num_layers)]
    elif policy is None or type(policy) in (KVPolicy, FullCache):
        per_layer = [full_memory(n_tokens, hkv, head_dim)] * num_layers
    else:
        return None
    return sum(m.bytes for m in per_layer)
