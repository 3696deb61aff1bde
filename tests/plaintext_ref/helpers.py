"""Helpers shared by the plaintext_ref policy tests: seeded prompts, a runtime prefill, HF's eager
attentions, a GQA model with duplicated query heads."""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from plaintext_ref.runtime import RefCache, _attached, step


def prompt(batch: int, length: int, seed: int = 0) -> Tensor:
    """Seeded random token ids (B, S) in [3, 5000)."""
    return torch.randint(3, 5000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(model, ids: Tensor, policy) -> RefCache:
    """One prompt forward through the runtime; returns the cache after on_prefill."""
    cache = RefCache(model, policy)
    with _attached(model):
        step(model, cache, ids, torch.arange(ids.shape[1])[None].expand_as(ids))
    return cache


@torch.no_grad()
def eager_attentions(model, ids: Tensor) -> tuple[Tensor, ...]:
    """HF's own eager attention weights, one (B, H, S, S) per layer."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


def group_duplicated(model):
    """Copy of a GQA model whose query heads repeat within each KV group (q_proj rows copied)."""
    dup = copy.deepcopy(model)
    cfg = dup.config
    d, g = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for layer in dup.model.layers:
            w = layer.self_attn.q_proj.weight.view(cfg.num_key_value_heads, g, d, -1)
            w.copy_(w[:, :1].expand_as(w).clone())
    return dup
