"""Helpers shared by the plaintext_ref policy tests: seeded prompts, a runtime prefill, interleaved
teacher-forced runs, HF's eager attentions, a GQA model with duplicated query heads."""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from plaintext_ref.runtime import RefCache, attached, step


def prompt(batch: int, length: int, seed: int = 0) -> Tensor:
    """Seeded random token ids (B, S) in [3, 5000)."""
    return torch.randint(3, 5000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(model, ids: Tensor, policy) -> RefCache:
    """One prompt forward through the runtime; returns the cache after on_prefill."""
    cache = RefCache(model, policy)
    with attached(model):
        step(model, cache, ids, torch.arange(ids.shape[1])[None].expand_as(ids))
    return cache


def snapshot(cache: RefCache) -> list[dict[str, Tensor]]:
    """Every layer's pos and tensor aux entries, cloned."""
    return [{"pos": kv.pos.clone(), **{key: val.clone() for key, val in kv.aux.items() if isinstance(val, Tensor)}}
            for kv in (cache.kv(i) for i in range(cache.num_layers))]


def same_snapshots(a: list[list[dict[str, Tensor]]], b: list[list[dict[str, Tensor]]]) -> bool:
    """Two runs' snapshots hold the same entries, bit for bit, after every forward."""
    return len(a) == len(b) and all(
        len(sa) == len(sb) and all(la.keys() == lb.keys() and all(torch.equal(v, lb[k]) for k, v in la.items())
                                   for la, lb in zip(sa, sb))
        for sa, sb in zip(a, b))


@torch.no_grad()
def interleaved(model, policy, runs: list[tuple[Tensor, int]]) -> list[tuple[Tensor, list]]:
    """Teacher-forced runs (ids (B, S), prefix_len) through one ``policy``, one RefCache each, taken in turn.

    Prefill run 0, prefill run 1, ..., then one decode step of each unfinished run per round. Returns per run
    its logits (B, S − prefix_len, V), as :func:`teacher_forced_logits` computes them, and a
    :func:`snapshot` after each of its forwards.
    """
    caches = [RefCache(model, policy) for _ in runs]
    rows: list[list[Tensor]] = [[] for _ in runs]
    snaps: list[list] = [[] for _ in runs]
    with attached(model):
        for j in range(max(ids.shape[1] - p for ids, p in runs)):
            for i, ((ids, p), cache) in enumerate(zip(runs, caches)):
                if p + j >= ids.shape[1]:
                    continue
                lo, hi = (0, p) if j == 0 else (p + j - 1, p + j)
                pos = torch.arange(lo, hi)[None].expand(ids.shape[0], -1)
                rows[i].append(step(model, cache, ids[:, lo:hi], pos, logits_to_keep=1))
                snaps[i].append(snapshot(cache))
    return [(torch.cat(r, dim=1), s) for r, s in zip(rows, snaps)]


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
