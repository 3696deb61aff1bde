"""MiKV: importance-aware mixed-precision KV cache (Yang et al., "No Token Left Behind", arXiv 2402.18096).

Based on https://arxiv.org/abs/2402.18096 (paper only, no code released) and kv_methods.md §6.2.

Rule: H2O decides importance (``plaintext_ref.policies.h2o``): every slot accumulates the attention it
receives, and whenever a layer holds more than K high-precision slots, the ⌊K·recent_fraction⌋ most recent
ones plus the top K − ⌊K·recent_fraction⌋ older ones by accumulated attention stay high precision. The slots
H2O would evict are *demoted* instead: kept, quantized per token (groups of ``group_size`` channels) with
asymmetric RTN at ``low_bits`` (α = (max − min)/(2^b − 1), β = min). A demoted slot never comes back.
Outlier-aware channel balancer, set once after the prompt per layer, KV head and channel c:
b_c = sqrt(max_t |q_{t,c}| / max_t |k_{t,c}|); demoted keys are quantized as k' = k·b and read as
k̂ = deq(q(k'))/b, which equals attending k̂' with q' = q/b (q'·k' = q·k), so outlier channels shared by
queries and keys are flattened before quantization.

Defaults: budget 0.2 of the prompt at high precision, split evenly between recent and heavy slots
(H2O's defaults), low_bits 3, one group per token (group_size = D), balancer on. The paper sweeps the
important share (about 20–50%) and INT2/3/4 for the rest [paper; defaults not read in code: none released].

Deviations:
1. The important set stays at full precision (16-bit in the accounting); the paper's INT8 option for it is
   not implemented.
2. The balancer uses the prompt's post-RoPE queries of the query heads of each KV group (max over the group)
   and stays fixed during decode.
3. ``low_bits=0`` drops demoted slots (physical eviction), which is exactly H2O with the same budget.
4. Dequantized slots replace the exact ones in ``LayerKV.k``/``v`` (a simulated cache); codes, scales and
   zero points are per-slot tensors in ``LayerKV.aux`` (zeros for high-precision slots).

Memory of one layer, B = 1, with P high-precision and L low-precision slots per KV head (``memory``):
bits = Hkv·[16·2·D·P + b·2·D·L + 16·2·2·(D/g)·L + 16·D], g = group_size; the last term (the balancer) only
when low_bits > 0 and balance is on.
The H2O scores and the precision flags are bookkeeping and are not counted.

GQA: importance per query head, reduced over the group with ``gqa_agg`` (H2O); precision per KV head.
Needs: the full softmax weights of every forward (``needs = {"attn"}``) and the prompt queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import (
    NEG_INF,
    Budget,
    GqaAgg,
    KVPolicy,
    LayerKV,
    StepCtx,
    accumulate_received,
    gather_kv,
    gqa_aggregate,
    per_query_head,
    protected_slots,
    received_attention,
)
from plaintext_ref.policies.quant import FP_BITS, KVMemory, dequantize_groups, quantize_groups

ACC = "mikv_acc"           # (B, Hkv, T, G) attention received per query head (H2O's score)
HIGH = "mikv_high"         # (B, Hkv, T) bool, slot kept at full precision
BALANCE = "mikv_balance"   # (B, Hkv, 1, D) channel balancer b
# Per-slot codes of the low-precision slots (zeros elsewhere): codes (B, Hkv, T, D), scale / zero (B, Hkv, T, D/g).
CODES = ("mikv_k_codes", "mikv_k_scale", "mikv_k_zero", "mikv_v_codes", "mikv_v_scale", "mikv_v_zero")
N_PROMPT = "mikv_n_prompt"


def balance_factors(q: Tensor, k: Tensor, q_valid: Tensor | None = None, k_valid: Tensor | None = None) -> Tensor:
    """b (B, Hkv, D) = sqrt(max |q| / max |k|) per channel; 1 where either max is 0.

    q (B, H, S, D) over real queries (q_valid (B, S)), k (B, Hkv, T, D) over real keys (k_valid (B, Hkv, T)).
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    q_abs = q.float().abs() if q_valid is None else q.float().abs() * q_valid[:, None, :, None]
    k_abs = k.float().abs() if k_valid is None else k.float().abs() * k_valid[..., None]
    q_max = q_abs.amax(dim=2).view(b, hkv, h // hkv, d).amax(dim=2)                # (B, Hkv, D)
    k_max = k_abs.amax(dim=2)                                                     # (B, Hkv, D)
    ok = (q_max > 0) & (k_max > 0)
    return torch.where(ok, (q_max / k_max.clamp(min=torch.finfo(torch.float32).tiny)).sqrt(), 1.0)


@dataclass
class MiKV(KVPolicy):
    """MiKV: H2O's important slots at full precision, the would-be-evicted ones at ``low_bits``.

    Parameters
    ----------
    budget : float fraction of the prompt kept at high precision (default 0.2), int tokens, or Budget.
    recent_fraction : float in [0, 1], default 0.5, share of the budget for the most recent slots.
    low_bits : int in [0, 16], default 3; 0 drops the demoted slots (H2O).
    group_size : int or None (default: D), channels per quantization group of a token.
    balance : bool, default True, outlier-aware channel balancer for the keys.
    gqa_agg : "mean" (default), "max" or "sum", reduction of the scores over a GQA group.
    """

    needs = frozenset({"attn"})

    budget: Budget | int | float = 0.2
    recent_fraction: float = 0.5
    low_bits: int = 3
    group_size: int | None = None
    balance: bool = True
    gqa_agg: GqaAgg = "mean"

    def __post_init__(self) -> None:
        self.budget = Budget.of(self.budget)
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"MiKV.recent_fraction must lie in [0, 1], got {self.recent_fraction}")
        if not 0 <= self.low_bits <= 16:
            raise ValueError(f"MiKV.low_bits must lie in [0, 16], got {self.low_bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"MiKV.group_size must be >= 1 or None, got {self.group_size}")
        if self.gqa_agg not in ("mean", "max", "sum"):
            raise ValueError(f"MiKV.gqa_agg must be mean, max or sum, got {self.gqa_agg!r}")

    def group(self, head_dim: int) -> int:
        g = head_dim if self.group_size is None else self.group_size
        if head_dim % g:
            raise ValueError(f"MiKV: head_dim {head_dim} is not a multiple of group_size {g}")
        return g

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        b, hkv, t, d = kv.k.shape
        valid = kv.valid_mask()
        kv.aux[N_PROMPT] = t
        kv.aux[ACC] = received_attention(ctx.attn, kv)
        kv.aux[HIGH] = torch.ones(b, hkv, t, dtype=torch.bool, device=kv.k.device)
        if self.low_bits:
            kv.aux[BALANCE] = (balance_factors(ctx.q, kv.k, valid[:, 0], valid) if self.balance
                               else kv.k.new_ones(b, hkv, d, dtype=torch.float32))[:, :, None]
            codes, scale, zero = quantize_groups(kv.k.new_zeros(b, hkv, t, d), self.low_bits, self.group(d), 3)
            kv.aux.update(zip(CODES, (codes, scale, zero) * 2))
        return self._demote(kv, self.budget.resolve(ctx.layer_idx, ctx.num_layers, t))

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """New slots arrive at high precision; demote down to the decode cap."""
        s = kv.n - kv.aux[HIGH].shape[2]
        kv.aux[ACC] = accumulate_received(kv.aux[ACC], received_attention(ctx.attn, kv))
        kv.aux[HIGH] = F.pad(kv.aux[HIGH], (0, s), value=True)
        for key in CODES if self.low_bits else ():
            kv.aux[key] = F.pad(kv.aux[key], (0, 0, 0, s))
        cap = self.budget.decode_cap(ctx.layer_idx, ctx.num_layers, kv.aux[N_PROMPT])
        return self._demote(kv, cap)

    def _demote(self, kv: LayerKV, keep: int) -> LayerKV:
        """Keep ``keep`` high-precision slots per KV head (H2O's choice among them); quantize or drop the rest."""
        high = kv.aux[HIGH]
        if int(high.sum(dim=-1).max()) <= keep:
            return kv
        hkv = kv.k.shape[1]
        valid = kv.valid_mask()
        scores = gqa_aggregate(per_query_head(kv.aux[ACC]), hkv, self.gqa_agg)       # (B, Hkv, T)
        scores = scores.masked_fill(~valid, -1.0)                                      # padding goes first
        scores = scores.masked_fill(protected_slots(valid & high, 0, int(keep * self.recent_fraction)), math.inf)
        scores = scores.masked_fill(~high, NEG_INF)                                    # already low: not eligible
        top = scores.topk(keep, dim=-1).indices                                        # (B, Hkv, K)
        chosen = torch.zeros_like(high).scatter_(-1, top, True)
        if self.low_bits == 0:
            return gather_kv(kv, top.sort(dim=-1).values)
        demoted = high & ~chosen                                                       # same count per head
        kv.aux[HIGH] = chosen
        return self._quantize(kv, demoted)

    def _quantize(self, kv: LayerKV, demoted: Tensor) -> LayerKV:
        """Per-token RTN of the demoted slots (keys balanced); writes codes and x̂ in place of the slots."""
        m = int(demoted.sum(dim=-1).max())
        idx = demoted.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :m]   # (B, Hkv, M)
        d = kv.k.shape[-1]
        g = self.group(d)
        rows = idx[..., None].expand(-1, -1, -1, d)
        bal = kv.aux[BALANCE]                                                         # (B, Hkv, 1, D)
        kq = quantize_groups(kv.k.gather(2, rows).float() * bal, self.low_bits, g, 3)
        vq = quantize_groups(kv.v.gather(2, rows), self.low_bits, g, 3)
        k_hat = dequantize_groups(*kq, g, 3) / bal
        v_hat = dequantize_groups(*vq, g, 3)
        for key, part in zip(CODES, kq + vq):
            kv.aux[key] = kv.aux[key].scatter(2, idx[..., None].expand(-1, -1, -1, part.shape[-1]), part)
        return replace(kv, k=kv.k.scatter(2, rows, k_hat.to(kv.k.dtype)), v=kv.v.scatter(2, rows, v_hat.to(kv.v.dtype)))

    def memory(self, kv: LayerKV) -> KVMemory:
        """Storage of this layer's cache, counted from the precision flags."""
        b, hkv, t, d = kv.k.shape
        n_high = int(kv.aux[HIGH].sum()) if self.low_bits else b * hkv * t
        return self._memory(b * hkv, d, n_high, b * hkv * t - n_high)

    def cache_memory(self, n_tokens: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0,
                     num_layers: int = 1) -> KVMemory:
        """Storage of one layer (batch 1) right after a prefill of ``n_tokens``."""
        keep = min(self.budget.resolve(layer_idx, num_layers, n_tokens), n_tokens)
        n_low = n_tokens - keep if self.low_bits else 0
        return self._memory(n_kv_heads, head_dim, n_kv_heads * keep, n_kv_heads * n_low)

    def _memory(self, rows: int, d: int, n_high: int, n_low: int) -> KVMemory:
        """``rows`` = B·Hkv (head, sequence) rows holding ``n_high`` + ``n_low`` slots in all."""
        params = 2 * 2 * (d // self.group(d)) * n_low + (rows * d if self.balance and self.low_bits else 0)
        return KVMemory(self.low_bits * 2 * d * n_low, FP_BITS * params, FP_BITS * 2 * d * n_high,
                        2 * d * (n_high + n_low))
