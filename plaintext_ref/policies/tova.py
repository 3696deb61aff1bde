"""TOVA: Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

Rule: whenever a layer holds more than C slots, keep the C slots with the highest attention from the
*last* query, averaged over all heads of the layer: s_j = mean_h A[h, t_last, j]. One index set is shared by
every head (KV heads included). Applied after the prompt and after every decode step, so the cache is a
fixed-size multi-state RNN of C states.

Defaults: budget C = 512 tokens (README example of schwartz-lab-NLP/TOVA), granularity "layer" (the
paper's head-averaged score), eviction after the prompt and after every step (``TOVACache.reduce``).

Deviations:
1. Eviction follows each step's attention (the runtime's timing), as the original: a step attends C kept
   slots plus itself, then the layer drops back to C.
2. The last token is not force-kept (the paper does not); kvpress ``TOVAPress`` does: pass
   ``budget=Budget(..., protect_recent=1)`` for its behaviour.
3. ``granularity="kv_head"`` is a per-KV-head variant (scores reduced over the GQA group with ``gqa_agg``),
   not in the paper; with ``"q_head"`` the cache is kept per query head.

GQA: irrelevant with the default granularity (mean over all H query heads, one index set).
Needs: the softmax weights of the step's last query row (``needs = {"attn"}``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from plaintext_ref.policies.base import Budget, Granularity, LayerKV, StepCtx, TopKEviction


@dataclass
class TOVA(TopKEviction):
    """TOVA: keep the C slots the last query attends most (mean over heads), at every step.

    Parameters
    ----------
    budget : int C (default 512), float fraction of the prompt kept, or Budget.
    granularity : "layer" (default, the paper), "kv_head" or "q_head".
    evict_on : "both" (default, the paper), "prefill" (kvpress ``TOVAPress``) or "decode".
    """

    needs = frozenset({"attn"})

    budget: Budget | int | float | None = 512
    evict_on: Literal["prefill", "decode", "both"] = "both"
    granularity: Granularity = "layer"

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, H, T) attention of the step's last query; the base averages it over heads ("layer")."""
        return ctx.attn[:, :, -1, :]
