"""Keyformer: key tokens by an annealed Gumbel-softmax score (Adnan et al., MLSys 2024, arXiv 2403.09054).

Rule: every slot accumulates, per head, the Gumbel-softmax of the logits it receives,
f_j ← f_j + Σ_i softmax_j((z_ij + G_ij) / τ_t), G = −log(−log U), U ~ U(0, 1) i.i.d., z the scaled
pre-softmax logits; τ_t = τ_init + t·Δτ with t the layer's forward count (0 for the prompt). The budget
K = int(n_prompt·kv_cache) is fixed after the prompt; whenever a layer holds more than K slots it keeps the
⌊K·recent⌋ most recent slots plus the top K − ⌊K·recent⌋ older slots by f. Evicted slots take f with them.

Defaults (d-matrix-ai/keyformer-llm, ``GPTJAttention._attn`` and its run scripts): kv_cache = 0.6 of the
prompt (``--kv_cache 60``; the paper mostly reports 50%), recent = 0.3 of the budget (``--recent 30``),
τ_init = 1.0, Δτ = 0.01 (the paper anneals τ from 1 to 2 over the generation).

Deviations:
1. Scores are kept per batch row; the original sums them over the batch (``gumbel_score.sum(0)``).
2. Evicted slots are removed (gather) instead of masked with ``token_discard_mask``; the attention over
   the kept slots and the scores are the same.
3. Eviction follows the step's attention (the runtime's timing): the cache holds K slots between steps and
   a step attends K + 1; the original evicts so that K includes the next token (one fewer old slot).
4. Queries on left-padding slots add nothing to the scores.
5. The noise comes from one ``torch.Generator`` per sequence and device, seeded with ``seed`` and drawn in
   call order by every layer, so runs are reproducible; it lives in layer 0's ``LayerKV.aux`` (the other
   layers read it as ``ctx.partner``). ``gumbel=False`` sets G ≡ 0 (with Δτ = 0 and τ_init = 1 this is H2O).

GQA: scores are accumulated per query head and reduced over the group with ``gqa_agg`` (mean, max or sum)
at each eviction (the released models are MHA). Needs: the scaled logits of every forward
(``needs = {"logits"}``), hence the eager reference attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from plaintext_ref.policies.base import (Budget, LayerKV, StepCtx, TopKEviction, accumulate_received,
                                         per_query_head, protected_slots, received_attention)

ACC = "keyformer_acc"     # LayerKV.aux: (B, Hkv, T, G) accumulated Gumbel-softmax score per query head
STEP = "keyformer_step"   # LayerKV.aux: int, forwards seen by the layer (t in τ_t)
NOISE = "keyformer_noise" # layer 0's LayerKV.aux: {device: torch.Generator}, the sequence's noise streams


@dataclass
class Keyformer(TopKEviction):
    """Keyformer: recent window plus key tokens chosen by an accumulated, annealed Gumbel-softmax score.

    Parameters
    ----------
    budget : float fraction of the prompt kept (default 0.6), int tokens, or Budget.
    recent_fraction : float in [0, 1], default 0.3, share of the budget given to the most recent slots.
    tau_init : float > 0, default 1.0, temperature of the prompt forward.
    tau_delta : float >= 0, default 0.01, temperature increase per forward.
    gumbel : bool, default True; False drops the noise (G ≡ 0).
    seed : int, default 0, seed of the noise generator (re-seeded at every new sequence).
    evict_on : "both" (default, the paper), "decode" or "prefill".
    """

    needs = frozenset({"logits"})

    budget: Budget | int | float | None = 0.6
    recent_fraction: float = 0.3
    tau_init: float = 1.0
    tau_delta: float = 0.01
    gumbel: bool = True
    seed: int = 0
    evict_on: Literal["prefill", "decode", "both"] = "both"

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"Keyformer.recent_fraction must lie in [0, 1], got {self.recent_fraction}")
        if self.tau_init <= 0 or self.tau_delta < 0:
            raise ValueError(f"Keyformer needs tau_init > 0 and tau_delta >= 0, got {self.tau_init}, {self.tau_delta}")
        if self.granularity == "q_head" or self.head_adaptive:
            raise ValueError("Keyformer supports granularity 'kv_head' or 'layer' and no head_adaptive")
        super().__post_init__()

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        """Every layer draws from layer 0's noise streams."""
        return 0 if layer_idx > 0 else None

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        self._accumulate(ctx, kv)
        return super().on_prefill(ctx, kv)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        self._accumulate(ctx, kv)
        return super().on_append(ctx, kv)

    def temperature(self, t: int) -> float:
        """τ_t = τ_init + t·Δτ."""
        return self.tau_init + t * self.tau_delta

    def gumbel_noise(self, streams: dict[torch.device, torch.Generator], shape: torch.Size,
                     device: torch.device) -> Tensor:
        """G = −log E, E ~ Exp(1) (≡ −log(−log U)), drawn from ``streams[device]`` (seeded at first use)."""
        gen = streams.get(device)
        if gen is None:
            gen = streams[device] = torch.Generator(device).manual_seed(self.seed)
        return -torch.empty(shape, device=device).exponential_(generator=gen).log()

    def _accumulate(self, ctx: StepCtx, kv: LayerKV) -> None:
        """Add this forward's Gumbel-softmax column sums over real queries to ``kv.aux[ACC]``."""
        step = kv.aux.get(STEP, 0)
        z = ctx.logits
        if self.gumbel:
            streams = (kv if ctx.partner is None else ctx.partner).aux.setdefault(NOISE, {})
            z = z + self.gumbel_noise(streams, z.shape, z.device)
        probs = (z / self.temperature(step)).softmax(dim=-1).nan_to_num(0.0)      # (B, H, S, T)
        kv.aux[ACC] = accumulate_received(kv.aux.get(ACC), received_attention(probs, kv))
        kv.aux[STEP] = step + 1

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, H, T) accumulated score per query head; the base reduces it over the GQA group."""
        return per_query_head(kv.aux[ACC])

    def protected(self, valid: Tensor, keep: int) -> Tensor:
        """The ⌊keep·recent_fraction⌋ most recent valid slots."""
        return protected_slots(valid, 0, int(keep * self.recent_fraction))
