"""CacheBlend: reuse non-prefix chunk caches, recompute only high-KV-deviation tokens (Yao et al., EuroSys 2025,
arXiv 2405.16444; repo YaoJiayi/CacheBlend, ``vllm_blend`` llama.py / xformers backend, ``example/blend.py``).

Rule. A request is ``[prefix][chunk_1]…[chunk_k][query]`` (n context tokens, then the suffix). Each chunk's KV was
computed once, after the shared prefix only, and is fetched from the :class:`KVStore` as pre-RoPE keys; the blended
"old" cache lays the chunks end to end and rotates every reused key to its new position p (``k = R(p)·k_pre``).
Layers ℓ < ``check_layer`` are recomputed for all tokens. At the check layer fresh K/V are computed for all tokens
and each reusable token j gets ``dev_j = Σ_{heads, dims} (V_new[j] − V_old[j])²``; the top ⌊n·r⌋ (r =
``recompute_ratio``) plus every forced token (the query) form the set I. From the check layer on only I's hidden
states go through the network: per layer ``K[I] ← K_new``, ``V[I] ← V_new`` and I's queries attend the blended cache
with slot-order causality. The last token's logits start decoding; the blended cache is the request's KV.

Defaults: ``recompute_ratio = 0.16``, ``check_layer = 1`` (layer 0 fully recomputed) [code ``example/blend.py``,
``check_layers=[1]``, ``recomp_ratio=0.16``].

Deviations:
1. One selection at the check layer, not the paper's gradual filtering (larger sets on the first layers narrowing to
   ≈15%); the released code also selects once.
2. Reused keys are stored pre-RoPE and rotated at use, not re-rotated from post-RoPE (identical in exact math, and
   exact in float); ``LayerRunner.rerotate`` gives the post-RoPE form and is tested for the round trip.
3. The check layer's own attention uses the blended cache (old rows outside I), as the released code does; the
   fresh K/V of tokens outside I computed for the deviation score are discarded.
4. ⌊n·r⌋ counts the reusable tokens only (the prefix is reusable too: its cache is exact, so its deviation is 0 up to
   rounding and it is rarely picked).

Checks (tests/plaintext_ref/test_reuse_cacheblend.py): r = 1 equals full prefill; r = 0 with check_layer = 0 equals
naive concatenation; one chunk after the prefix has zero deviation and equals full prefill at any r.
GQA: deviation summed over KV heads (the selection is per token, shared by all heads and layers).
Needs: pre-RoPE K and V per chunk, a layer runner over a token subset (``LayerRunner``), values at the check layer.
MPC: not ported (cross-request reuse; which tokens are recomputed depends on secret values).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plaintext_ref.reuse.runner import LayerRunner, SeqKV, causal_rows
from plaintext_ref.reuse.store import KVStore, content_key, model_fingerprint


@dataclass
class BlendResult:
    logits: Tensor                 # (1, 1, V) fp32 last-token logits
    cache: SeqKV                   # blended KV of every slot, at positions 0..T−1
    recomputed: Tensor             # (K,) int64 slots recomputed from the check layer on
    deviation: Tensor | None       # (T,) fp32 check-layer value deviation (0 for non-reusable slots), or None
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def selective_prefill(runner: LayerRunner, ids: Tensor, old: SeqKV, reusable: Tensor, forced: Tensor,
                      recompute_ratio: float, check_layer: int = 1) -> BlendResult:
    """The CacheBlend / KVShare core over one prompt ids (T,) laid at positions 0..T−1.

    old: SeqKV of T slots (rows of non-reusable slots are ignored); reusable (T,) bool: slots whose old K/V may be
    kept; forced (T,) bool: slots always recomputed (the query, tokens with no cached KV). The last slot is always
    forced (its hidden state gives the logits). Selects the top ⌊#reusable · r⌋ reusable slots by check-layer
    value deviation. Forced wins where both are set; non-reusable slots are forced.
    """
    t = ids.shape[0]
    dev = runner.device
    assert old.n == t and reusable.shape == (t,) and forced.shape == (t,), (old.n, reusable.shape, forced.shape)
    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError(f"recompute_ratio must lie in [0, 1], got {recompute_ratio}")
    if not 0 <= check_layer < runner.num_layers:
        raise ValueError(f"check_layer must lie in [0, {runner.num_layers}), got {check_layer}")
    forced = (forced | ~reusable).clone()
    forced[-1] = True
    reusable = reusable & ~forced
    pos = torch.arange(t, device=dev)
    rows = torch.arange(t, device=dev)
    full = causal_rows(rows, t)
    h = runner.embed(ids)
    ks, vs = [t_.clone() for t_ in old.k], [t_.clone() for t_ in old.v]
    for l in range(check_layer):                                   # dense layers: everything fresh
        q, k, v = runner.qkv(l, h, pos)
        ks[l], vs[l] = k, v
        h = runner.finish(l, h, runner.attend(q, runner.rope(k, pos), v, full))
    q, k, v = runner.qkv(check_layer, h, pos)                      # check layer: fresh K/V for all tokens
    deviation = ((v - vs[check_layer]) ** 2).sum(dim=(0, 1, 3)).float()      # (T,)
    deviation = torch.where(reusable, deviation, torch.zeros_like(deviation))
    n_sel = int(int(reusable.sum()) * recompute_ratio)
    scores = deviation.masked_fill(~reusable, float("-inf"))
    chosen = forced.clone()
    if n_sel > 0:
        chosen[scores.topk(n_sel).indices] = True
    idx = chosen.nonzero().flatten()                               # (K,) ascending
    allowed = full[idx]                                            # (K, T)
    h = h[:, idx]
    for l in range(check_layer, runner.num_layers):
        if l > check_layer:
            q, k, v = runner.qkv(l, h, pos[idx])
        else:
            q, k, v = q[:, :, idx], k[:, :, idx], v[:, :, idx]
        ks[l][:, :, idx] = k
        vs[l][:, :, idx] = v
        h = runner.finish(l, h, runner.attend(q, runner.rope(ks[l], pos), vs[l], allowed))
    stats = dict(tokens=t, recomputed=int(idx.numel()), reused=t - int(idx.numel()),
                 recompute_fraction=idx.numel() / t)
    return BlendResult(runner.logits(h[:, -1:]), SeqKV(ks, vs, pos), idx, deviation, stats)


@dataclass
class CacheBlend:
    """CacheBlend over a :class:`KVStore` of chunk caches.

    Parameters
    ----------
    recompute_ratio : float in [0, 1], default 0.16, fraction r of the reused tokens recomputed.
    check_layer : int, default 1, layer whose value deviation selects the tokens (earlier layers fully recomputed).
    """

    recompute_ratio: float = 0.16
    check_layer: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"CacheBlend.recompute_ratio must lie in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 0:
            raise ValueError(f"CacheBlend.check_layer must be >= 0, got {self.check_layer}")

    @staticmethod
    def chunk_cache(runner: LayerRunner, store: KVStore, prefix: list[int], chunk: list[int]) -> SeqKV:
        """The chunk's KV computed after the prefix (positions len(prefix)..), from the store or computed once."""
        key = content_key(model_fingerprint(runner.model), "cacheblend-chunk", prefix, chunk)

        def compute() -> SeqKV:
            _, kv = runner.prefill(torch.tensor(prefix + chunk, device=runner.device))
            return kv.take(torch.arange(len(prefix), len(prefix) + len(chunk), device=runner.device))
        return store.get_or_compute(key, compute, {"ids": chunk, "context": prefix})

    @staticmethod
    def prefix_cache(runner: LayerRunner, store: KVStore, prefix: list[int]) -> SeqKV:
        key = content_key(model_fingerprint(runner.model), "prefix", [], prefix)
        return store.get_or_compute(key, lambda: runner.prefill(torch.tensor(prefix, device=runner.device))[1],
                                    {"ids": prefix, "context": []})

    def precompute(self, runner: LayerRunner, store: KVStore, prefix: list[int], chunks: list[list[int]]) -> None:
        """Fill the store ahead of requests (the offline step CacheBlend assumes)."""
        if prefix:
            self.prefix_cache(runner, store, prefix)
        for chunk in chunks:
            self.chunk_cache(runner, store, prefix, chunk)

    def old_cache(self, runner: LayerRunner, store: KVStore, prefix: list[int], chunks: list[list[int]]) -> SeqKV:
        """Naive concatenation [prefix][chunk_1]…[chunk_k], re-positioned to 0..n−1."""
        parts = ([self.prefix_cache(runner, store, prefix)] if prefix else [])
        parts += [self.chunk_cache(runner, store, prefix, c) for c in chunks]
        kv = SeqKV.cat(parts)
        return kv.at(torch.arange(kv.n, device=runner.device))

    @torch.no_grad()
    def prefill(self, runner: LayerRunner, store: KVStore, prefix: list[int], chunks: list[list[int]],
                query: list[int]) -> BlendResult:
        """Blend the stored caches for ``[prefix][chunks…][query]``; returns logits, cache and what was recomputed."""
        ctx = self.old_cache(runner, store, prefix, chunks)
        n, s = ctx.n, len(query)
        if s == 0:
            raise ValueError("CacheBlend needs a non-empty query (its last token starts decoding)")
        ids = torch.tensor(prefix + [t for c in chunks for t in c] + query, device=runner.device)
        pad = SeqKV([torch.zeros_like(k[:, :, :s]) for k in ctx.k], [torch.zeros_like(v[:, :, :s]) for v in ctx.v],
                    torch.arange(n, n + s, device=runner.device))
        old = SeqKV.cat([ctx, pad])
        reusable = torch.arange(n + s, device=runner.device) < n
        return selective_prefill(runner, ids, old, reusable, ~reusable, self.recompute_ratio, self.check_layer)
