"""MPC KV policies: the base class, shared attention / static-eviction steps and the registry.

A policy replaces the attention step of ``SecureAttention``: ``attend(layer, q, cache, mask, partner)``
with q (B, Hkv, G·S, D) already scaled by 1/√D (query head h = kv·G + g, row g·S + s), the layer's
``SecretKVCache`` already holding this step's keys and values, and ``partner``: the cache of layer
``shares_with(layer)`` (cross-layer sharing), else None. A policy holds only its public knobs; what it
keeps about a sequence lives in ``cache.aux``, so one policy object may serve any number of sequences.
S > 1 is the prefill (the cache holds exactly the prompt), S = 1 a decode step.

Public everywhere: shapes, T0, T', every budget (``describe()``). Secret: every score, mask and
one-hot. Nothing is ever revealed here.

Shapes: B batch · Hkv KV heads · G query heads per KV head · S query tokens · W window queries ·
T0 prompt tokens · T cache tokens · D head dim · K kept count.
"""
from __future__ import annotations

from typing import Callable

from mpcache.cache import SecretKVCache
from protocols import lut_nonlinear
from protocols.config import active_config
from protocols.cost import Meter, NullMeter
from protocols.fixed_mask import FixedMaskOperand, fixed_matmul
from protocols.nonlinear import softmax
from protocols.selection import onehot_gather, topk_onehot
from protocols.truncation import Untruncated
from protocols.types import Public, Secret

class MPCPolicy:
    """Base class: full attention at every step. Subclasses override ``prefill`` and/or ``decode``."""

    name = "full"

    def __init__(self, meter: Meter | None = None) -> None:
        self.meter = meter or NullMeter()

    def attend(self, layer: int, q: Secret, cache: SecretKVCache, mask: Public | None,
               partner: SecretKVCache | None = None) -> Secret | Untruncated:
        """q (B, Hkv, G·S, D), mask (G·S, T) 0/1 or None -> attention output (B, Hkv, G·S, D), a
        ``Secret`` or, from the look-up attention, ``Untruncated`` (the output projection fuses its
        truncation)."""
        if mask is not None:  # prefill: the cache holds exactly the S prompt tokens
            assert cache.length == mask.shape[-1], (
                f"layer {layer}: prefill over a non-empty cache ({cache.length} slots, mask {tuple(mask.shape)})")
            return self.prefill(layer, q, cache, mask, partner)
        return self.decode(layer, q, cache, partner)

    def prefill(self, layer: int, q: Secret, cache: SecretKVCache, mask: Public,
                partner: SecretKVCache | None) -> Secret | Untruncated:
        """Full causal attention over the prompt, then ``after_prefill`` on the window rows of [P]."""
        t0 = cache.length
        w = self.window(t0)
        out, probs = full_attention(q, cache, mask, self.meter, probs=bool(w))
        self.after_prefill(layer, cache, window_probs(probs, t0, w) if w else None, partner)
        return out

    def window(self, prompt_len: int) -> int:
        """Observation window W: how many last prompt queries ``after_prefill`` needs (0: none)."""
        return 0

    def shares_with(self, layer: int) -> int | None:
        """The earlier layer whose indices ``layer`` reuses (cross-layer sharing), or None."""
        return None

    def after_prefill(self, layer: int, cache: SecretKVCache, p_win: Secret | None,
                      partner: SecretKVCache | None) -> None:
        """Act on the prompt cache once (e.g. static eviction); p_win (B, Hkv, G, W, T0), or None when
        W = 0 and, in the simulation prefill, on a layer that ``shares_with`` another."""

    def decode(self, layer: int, q: Secret, cache: SecretKVCache, partner: SecretKVCache | None) -> Secret | Untruncated:
        out, _ = full_attention(q, cache, None, self.meter)
        return out

    def describe(self, prompt_len: int, n_new: int = 1) -> dict:
        """Public budget numbers for the summary table (tokens attended per decode step, per KV head)."""
        t = prompt_len + max(n_new - 1, 0)
        return {"policy": self.name, "cache_after_prefill": prompt_len, "attended_last_step": t,
                "budget": 1.0}


class StaticEviction(MPCPolicy):
    """Look-once static eviction after prefill; full attention over the compacted cache at decode.

    Once per layer: [s] = ``score``(window rows of [P]) (B, T0) (+ PROTECT on public ``protected``
    positions), [E] = top-K one-hot rows in position order, [K] ← [E][K], [V] ← [E][V]. A layer with
    ``shares_with(layer) = ℓ'`` reuses layer ℓ''s [E] on its own K, V. Generated tokens are never evicted.
    Public: T0, K, W, the protected positions, the sharing pattern. Secret: [s], [E].
    """

    def n_keep(self, prompt_len: int) -> int:
        raise NotImplementedError

    def score(self, p_win: Secret) -> Secret:
        """[s] (B, T0) from the window rows (B, Hkv, G, W, T0); default Σ over heads and window."""
        return window_scores(p_win)

    def protected(self, prompt_len: int) -> Public | None:
        """Public 0/1 (T0,) of positions that are always kept, or None."""
        return None

    def pool_width(self) -> int:
        """How many window sums ``score`` adds into one token's score (1 without pooling)."""
        return 1

    def after_prefill(self, layer: int, cache: SecretKVCache, p_win: Secret | None,
                      partner: SecretKVCache | None) -> None:
        """[E] into ``cache.aux["static"]`` ((B, K, T0), or None: keep all), then compaction."""
        t0 = cache.length
        with self.meter.stage("kv_static"):
            if partner is not None and "static" in partner.aux:
                onehot = partner.aux["static"]
            else:
                assert p_win is not None, f"layer {layer}: static eviction needs the window probabilities"
                scores = self.score(p_win)  # (B, T0): sums of ≤ pool_width·H·W probabilities
                keep = self.protected(t0)
                if keep is not None:
                    b, hkv, g, w, _ = p_win.shape
                    scores = protect(scores, keep, float(4 * hkv * g * w * self.pool_width()))
                onehot = static_onehot(scores, self.n_keep(t0))
            cache.aux["static"] = onehot
            compact_cache(cache, onehot)

    def describe(self, prompt_len: int, n_new: int = 1) -> dict:
        keep = self.n_keep(prompt_len)
        t = prompt_len + max(n_new - 1, 0)
        attended = keep + max(n_new - 1, 0)
        return {"policy": self.name, "cache_after_prefill": keep, "attended_last_step": attended,
                "budget": round(attended / t, 4)}


def full_attention(q: Secret, cache: SecretKVCache, mask: Public | None, meter: Meter, probs: bool = False
                   ) -> tuple[Secret | Untruncated, Secret | None]:
    """softmax([q] [K]ᵀ, mask) [V] -> (out (B, Hkv, G·S, D), [P] (B, Hkv, G·S, T), or None unless ``probs``).

    Cost: two fixed-mask matmuls (open |q| + |P| elements) plus one softmax over T; with the look-up
    non-linears and fixed-mask K, V: ``protocols.lut_nonlinear.attention`` (3 rounds fewer: the
    normalisation after the value product, q·Kᵀ's truncation beside the max tree's first level),
    metered as stage "softmax" as a whole; its output comes back ``Untruncated`` unless ``probs``
    (the output projection fuses the last truncation: one round fewer).
    """
    if (active_config().nonlinear == "lut" and isinstance(cache.keys, FixedMaskOperand)
            and isinstance(cache.values, FixedMaskOperand)):
        with meter.stage("softmax"):
            return lut_nonlinear.attention(q, cache.keys, cache.values, mask, probs=probs)
    with meter.stage("attention"):
        scores = fixed_matmul(q, cache.keys, transpose_w=True)  # (B,Hkv,GS,D) x (B,Hkv,D,T) -> (B,Hkv,GS,T)
    with meter.stage("softmax"):
        probs = softmax(scores, dim=-1, mask=mask)
    with meter.stage("attention"):
        return fixed_matmul(probs, cache.values), probs  # (B,Hkv,GS,T) x (B,Hkv,T,D) -> (B,Hkv,GS,D)


def window_probs(probs: Secret, s: int, w: int) -> Secret:
    """Rows of the last ``w`` query positions of every head: (B, Hkv, G·S, T) -> (B, Hkv, G, W, T). Local."""
    b, hkv, gs, t = probs.shape
    return probs.view(b, hkv, gs // s, s, t)[:, :, :, s - w:, :]


def window_scores(p_win: Secret) -> Secret:
    """[s_j] = Σ_{heads} Σ_{window} [P] (B, Hkv, G, W, T) -> (B, T). Local.

    The twins use the mean over the H heads; the public factor 1/H does not change any ranking and is
    omitted (it would cost a truncation).
    """
    return p_win.sum(dim=3).sum(dim=2).sum(dim=1)


def protect(scores: Secret, keep: Public, bonus: float) -> Secret:
    """[s] + bonus on the public 0/1 positions ``keep`` (T,); with bonus > max |s| they always win a
    top-k. Local."""
    return scores + keep.to(scores.device).float() * bonus


def static_onehot(scores: Secret, n_keep: int) -> Secret | None:
    """[E] (B, K, T0): one-hot rows of the top-``n_keep`` scores in position order; None if K = T0.

    Public: K, T0. Cost: ``topk_onehot`` over T0 (bitonic sort for T0 > 128, ⌈log2 K⌉-bit one-hot).
    """
    if n_keep >= scores.shape[-1]:
        return None
    return topk_onehot(scores, n_keep, sort_by_index=True)


def compact_cache(cache: SecretKVCache, onehot: Secret | None) -> None:
    """Order-preserving compaction ``[K] ← [E][K]``, ``[V] ← [E][V]`` with E (B, K, T0) shared by
    every KV head, then a fresh fixed mask for the compacted rows.

    Cost: 2 fixed-mask matmuls (open 2·|E| = 2·B·K·T0) + re-masking (open 2·B·Hkv·K·D). Exact.
    """
    if onehot is None:
        return
    e = onehot.unsqueeze(1)  # (B, 1, K, T0): broadcast over Hkv
    k = onehot_gather(e, cache.keys)  # (B, 1, K, T0) x (B, Hkv, T0, D) -> (B, Hkv, K, D)
    v = onehot_gather(e, cache.values)
    cache.replace(FixedMaskOperand(k, grow_dim=2), FixedMaskOperand(v, grow_dim=2))


def new_key(cache: SecretKVCache) -> Secret:
    """[k] of the newest cached token (B, Hkv, 1, D) (local: a slice of this party's share)."""
    return cache.keys.secret[:, :, -1:, :]


_REGISTRY: dict[str, Callable[..., MPCPolicy]] = {}


def register(name: str, factory: Callable[..., MPCPolicy]) -> None:
    """Add a policy under ``name``; duplicates raise ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"MPC policy {name!r} is already registered")
    _REGISTRY[name] = factory


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, meter: Meter | None = None, **kwargs) -> MPCPolicy:
    """Build the registered policy ``name`` with ``meter`` and its keyword options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown MPC KV policy {name!r}; choose one of {policy_names()}")
    return _REGISTRY[name](meter=meter, **kwargs)
