"""KNorm: keep the keys with the smallest L2 norm (Devoto et al., EMNLP 2024, arXiv 2406.11430).

Rule: s_j = −‖k_j‖₂ per KV head (a low key norm goes with high attention); keep the top K by s, once, after
the prompt. RoPE is a rotation, so post-RoPE and pre-RoPE keys have the same norm.

Defaults: budget = 0.5 kept (the paper: 50% eviction leaves language modelling and needle-in-a-haystack
intact; 90% for passkey), skip_layers = () (``l2_compress(skip_layers=[])`` in alessiodevoto/l2compress;
its passkey script skips layers 0, 1 and 12). kvpress: ``KnormPress``.

Deviations:
1. K = int(n·(1 − r)) (Budget / kvpress) instead of l2compress's ⌈keep_ratio·n⌉.
2. Every prompt is compressed (kvpress); l2compress only prunes caches of at least ``prune_after`` = 2048.
3. Kept slots stay in time order (l2compress reorders them by norm; attention is order-free, positions are
   kept per slot).

GQA: native per KV head (keys are per KV head). Needs: the cached keys only (no q, no attention weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from plaintext_ref.policies.base import Budget, LayerKV, StepCtx, TopKEviction


@dataclass
class KNorm(TopKEviction):
    """KNorm: keep low-norm keys.

    Parameters
    ----------
    budget : float fraction kept (default 0.5), int tokens, or Budget.
    skip_layers : tuple of layer indices left uncompressed (default none).
    """

    budget: Budget | int | float | None = 0.5
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.skip_layers = tuple(self.skip_layers)
        if any(not isinstance(i, int) or i < 0 for i in self.skip_layers):
            raise ValueError(f"KNorm.skip_layers must be layer indices >= 0, got {self.skip_layers}")
        super().__post_init__()

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, Hkv, T) −‖k‖₂, accumulated in at least fp32."""
        return -torch.linalg.vector_norm(kv.k, dim=-1, dtype=torch.promote_types(kv.k.dtype, torch.float32))

    def compress(self, ctx: StepCtx, kv: LayerKV, keep: int) -> LayerKV:
        return kv if ctx.layer_idx in self.skip_layers else super().compress(ctx, kv, keep)
