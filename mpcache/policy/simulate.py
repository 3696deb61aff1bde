"""SIMULATION ONLY (NOT PRIVATE): start decoding from a plaintext KV cache that the client shares.

The authors' MPC harness (``infer/generation_evaluation.py``, mpcache.md §6) does the prefill in
plaintext and times only decode steps; this reproduces that set-up for decode benchmarks at long
contexts. Computing the KV cache in plaintext needs the model weights and the prompt in one place, so a
run that uses this is NOT a private inference: every caller must label its results "simulation".
What still runs in MPC: sharing of K/V (and of the window queries), the window attention that static
eviction scores, the oblivious static eviction itself, the cluster summaries, and every decode step.
"""
from __future__ import annotations

import logging
import math

import torch

from mpcache.cache import SecretKVCache, Sequence
from mpcache.model import SecureTransformer, causal_mask
from protocols.compat import comm, crypten
from protocols.fixed_mask import fixed_matmul
from protocols.nonlinear import softmax

log = logging.getLogger(__name__)
CLIENT = 0
CHUNK_ELEMENTS = 1 << 24  # window-softmax elements per chunk: bounds the memory of long prompts (8K)


def _share(x: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> crypten.CrypTensor:
    if comm.get().get_rank() == CLIENT:
        assert x is not None and tuple(x.shape) == shape, f"client must pass a tensor of shape {shape}"
    value = x.float() if comm.get().get_rank() == CLIENT else torch.zeros(shape)
    return crypten.cryptensor(value.to(device), src=CLIENT, device=device)


def prefill_from_plaintext_kv(model: SecureTransformer, seq: Sequence, n_prompt: int,
                              kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                              window_queries: list[torch.Tensor] | None, batch: int = 1) -> None:
    """Fill every layer's cache of the empty ``seq`` from the client's plaintext cache, then run the
    sequence policy's prefill step.

    kv: per layer (k, v), each (B, Hkv, T0, D) post-RoPE, on the client (rank 0); None elsewhere.
    window_queries: per layer the post-RoPE, unscaled queries (B, H, W, D) of the last
    W = policy.window(T0) prompt positions, on the client; None elsewhere or when W = 0.
    Public: T0, W, shapes. The window attention is skipped on layers that reuse another layer's
    static set (it would be unused).
    """
    log.warning("SIMULATION: the KV cache comes from a plaintext prefill; this run is NOT private")
    assert seq.length == 0, f"the simulation prefill needs an empty sequence, got {seq.length} tokens"
    a, policy = model.args, seq.policy
    w = policy.window(n_prompt)
    kv_shape = (batch, a.n_kv_heads, n_prompt, a.head_dim)
    mask = causal_mask(torch.arange(n_prompt - w, n_prompt), n_prompt, a.n_groups) if w else None
    for layer, cache in enumerate(seq.caches):
        mine = comm.get().get_rank() == CLIENT
        k, v = kv[layer] if mine else (None, None)
        cache.append(_share(k, kv_shape, model.device), _share(v, kv_shape, model.device))
        p_win = None
        partner = seq.partner(layer)
        if w and partner is None:  # a sharing layer reuses its partner's static set
            q = _share(window_queries[layer] if mine else None, (batch, a.n_heads, w, a.head_dim), model.device)
            q = (q * (1.0 / math.sqrt(a.head_dim))).reshape(batch, a.n_kv_heads, a.n_groups * w, a.head_dim)
            p_win = window_softmax(q, cache, mask).view(batch, a.n_kv_heads, a.n_groups, w, n_prompt)
        policy.after_prefill(layer, cache, p_win, partner)


def window_softmax(q: crypten.CrypTensor, cache: SecretKVCache, mask: torch.Tensor) -> crypten.CrypTensor:
    """softmax([q] [K]ᵀ, mask) for q (B, Hkv, R, D) over the cache, R rows at a time in chunks of at
    most ``CHUNK_ELEMENTS`` logits (rows are independent): same result, bounded memory, one softmax's
    rounds per chunk. mask (R, T0) public."""
    b, hkv, r, _ = q.shape
    rows = max(1, CHUNK_ELEMENTS // (b * hkv * cache.length))
    out = []
    for i in range(0, r, rows):
        z = fixed_matmul(q[:, :, i:i + rows], cache.keys, transpose_w=True)  # (B, Hkv, rows, T0)
        out.append(softmax(z, dim=-1, mask=mask[i:i + rows]))
    return out[0] if len(out) == 1 else crypten.cat(out, dim=2)
