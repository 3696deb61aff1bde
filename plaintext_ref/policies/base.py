"""KV-policy contract for the plaintext reference: LayerKV, StepCtx, KVPolicy, Scorer, Budget, TopKEviction.

A policy acts on one layer's cache at four points of a forward pass (``plaintext_ref.runtime`` calls them):
``select`` (before attention: a key mask, no eviction), ``read`` (the K, V and bias attention uses),
``on_prefill`` (after the prompt has attended; kvpress timing) and ``on_append`` (after each decode step's
attention, so the step's weights are available). Eviction policies only write ``score()`` and inherit
score -> protect -> top-k -> order-preserving gather from :class:`TopKEviction` (kvpress's ScorerPress split;
higher score = keep).

Spec: /work/shared/research/kv_methods.md §0 (notation, budgets, GQA aggregation) and §15 (this API).
Shapes: B batch · H query heads · Hkv KV heads (G = H / Hkv) · S query tokens this forward · T cache slots ·
D head dim · W window queries · K kept slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Phase = Literal["prefill", "decode", "chunk"]
GqaAgg = Literal["mean", "max", "sum"]
Granularity = Literal["kv_head", "q_head", "layer"]
NEG_INF = float("-inf")


@dataclass
class LayerKV:
    """One layer's cache, batch-first. Slot order is time order (evictions keep the order).

    k, v: (B, Hkv, T, D) keys (post-RoPE) and values. pos: (B, Hkv, T) int64 position each key was
    rotated with (logical: evicting never renumbers). valid: (B, Hkv, T) bool or None (= all True);
    False means the slot must not be attended (left padding, or a ragged per-head eviction).
    bias: (B, Hkv, T) additive logit bias or None. k_channel_mask: (B, Hkv, D) bool or None (ThinK).
    aux: per-policy state. Tensors in aux shaped (B, Hkv, T, ...) are per-slot state: :func:`gather_kv`
    gathers them; extending them on append is the owning policy's job.
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor | None = None
    bias: Tensor | None = None
    k_channel_mask: Tensor | None = None
    aux: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.k.shape == self.v.shape[:-1] + self.k.shape[-1:], (self.k.shape, self.v.shape)
        for name in ("pos", "valid", "bias"):
            t = getattr(self, name)
            assert t is None or t.shape == self.k.shape[:3], f"{name} {tuple(t.shape)} vs k {tuple(self.k.shape)}"

    @property
    def n(self) -> int:
        """Number of slots T."""
        return self.k.shape[2]

    def valid_mask(self) -> Tensor:
        """(B, Hkv, T) bool, materialising ``valid=None`` as all True."""
        if self.valid is None:
            return torch.ones(self.k.shape[:3], dtype=torch.bool, device=self.k.device)
        return self.valid

    def append(self, new: LayerKV) -> LayerKV:
        """Concatenate ``new`` slots at the end (k, v, pos, valid, bias; aux is kept as is)."""
        def cat(a: Tensor | None, b: Tensor | None, fill: float | bool) -> Tensor | None:
            if a is None and b is None:
                return None
            a = a if a is not None else torch.full(self.k.shape[:3], fill, dtype=b.dtype, device=b.device)
            b = b if b is not None else torch.full(new.k.shape[:3], fill, dtype=a.dtype, device=a.device)
            return torch.cat([a, b], dim=2)
        return replace(self, k=torch.cat([self.k, new.k], 2), v=torch.cat([self.v, new.v], 2),
                       pos=torch.cat([self.pos, new.pos], 2), valid=cat(self.valid, new.valid, True),
                       bias=cat(self.bias, new.bias, 0.0))

    def repeat_heads(self, g: int) -> LayerKV:
        """Per-query-head layout: every KV head repeated ``g`` times (the ``repeat_kv`` order).

        Repeats k, v, pos, valid, bias, k_channel_mask and aux tensors shaped (B, Hkv, ...) with ≥ 3 dims.
        """
        b, h = self.k.shape[:2]

        def rep(t):
            per_head = isinstance(t, Tensor) and t.dim() >= 3 and tuple(t.shape[:2]) == (b, h)
            return t.repeat_interleave(g, dim=1) if per_head else t
        return LayerKV(rep(self.k), rep(self.v), rep(self.pos), rep(self.valid), rep(self.bias),
                       rep(self.k_channel_mask), {key: rep(val) for key, val in self.aux.items()})


@dataclass
class StepCtx:
    """What the runtime exposes to a policy at one layer for one forward.

    q: (B, H, S, D) post-RoPE queries (always filled). attn: (B, H, S, T) fp32 softmax weights over the
    slots attended this forward (only when the policy needs "attn"; T counts the slots at attention time,
    i.e. before ``on_prefill``/``on_append`` evict). logits: (B, H, S, T) fp32 scaled pre-softmax scores
    with masked entries at -inf ("logits"). position_ids: (B, S). scaling: the 1/√D the model uses.
    rope(x, positions): rotates x (B, h, n, D) by positions (B, n) or (B, h, n); None for GPT-2.
    hidden is not filled by this runtime yet (None). partner: the LayerKV of layer
    ``policy.shares_with(layer_idx, num_layers)`` as that layer left it earlier in this forward (its aux
    carries the state it shares); None when the policy names no such layer.
    """

    layer_idx: int
    num_layers: int
    phase: Phase
    module: nn.Module
    position_ids: Tensor
    scaling: float
    q: Tensor
    rope: Callable[[Tensor, Tensor], Tensor] | None = None
    attn: Tensor | None = None
    logits: Tensor | None = None
    hidden: Tensor | None = None
    partner: LayerKV | None = None


class KVPolicy:
    """Base policy: the full cache. Subclasses override the hooks they need.

    ``needs`` ⊆ {"q", "attn", "logits"} tells the runtime what to fill in :class:`StepCtx`.
    Per-sequence state belongs in ``LayerKV.aux``, not on the policy (one policy object may serve many runs,
    interleaved); a layer reads state of another layer of its sequence only through ``ctx.partner``.
    """

    needs: frozenset[str] = frozenset()

    def post_init_from_model(self, model: nn.Module) -> None:
        """Called by ``RefCache`` with the model (kvpress's hook; e.g. head calibration)."""

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        """The earlier layer (< ``layer_idx``) whose LayerKV calls on ``layer_idx`` get as ``ctx.partner``."""
        return None

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """After the prompt forward of layer ``ctx.layer_idx`` (the prompt has attended the full prompt)."""
        return kv

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """After each decode (or chunk) step's attention; ``kv`` already holds the new slots."""
        return kv

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """Before attention: bool mask (B, H or Hkv, S, T), True = may attend; None = no restriction.

        May record the choice in ``kv.aux`` for the layers that share it (it persists when the hook after
        attention returns ``kv``, as the default does).
        """
        return None

    def read(self, ctx: StepCtx, kv: LayerKV) -> tuple[Tensor, Tensor, Tensor | None]:
        """K (B, Hkv, T, D), V (B, Hkv, T, D) and bias (B, Hkv, T) | None that attention uses."""
        return kv.k, kv.v, kv.bias


class Scorer(Protocol):
    """Importance of every slot, higher = keep: (B, Hkv or H, T) float."""

    needs: frozenset[str]

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor: ...


@dataclass
class Budget:
    """How many slots a layer keeps; exactly one of ``ratio``, ``tokens``, ``per_layer``.

    Parameters
    ----------
    ratio : float in [0, 1), kvpress ``compression_ratio`` (fraction removed): K = int(n·(1 − ratio)).
    tokens : int >= 0, absolute count kept per layer and head (max_capacity_prompt / cache_size), window
        and protected slots included: K = min(n, tokens).
    per_layer : callable (layer_idx, num_layers, n) -> tokens (PyramidKV, WindowKV); clipped to [0, n].
    protect_sink, protect_recent : the first / last valid slots that always survive (kvpress's
        force-keep trick). K is raised to the number of protected slots if it falls below it.
    """

    ratio: float | None = None
    tokens: int | None = None
    per_layer: Callable[[int, int, int], int] | None = None
    protect_sink: int = 0
    protect_recent: int = 0

    def __post_init__(self) -> None:
        given = [name for name in ("ratio", "tokens", "per_layer") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget: give exactly one of ratio, tokens, per_layer (got {given or 'none'})")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"Budget.ratio must lie in [0, 1), got {self.ratio}")
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"Budget.tokens must be >= 0, got {self.tokens}")
        if self.protect_sink < 0 or self.protect_recent < 0:
            raise ValueError(f"Budget.protect_sink/protect_recent must be >= 0, got "
                             f"{self.protect_sink}/{self.protect_recent}")

    @classmethod
    def of(cls, value: Budget | int | float) -> Budget:
        """A Budget from shorthand: an int is a token count, a float in (0, 1] the fraction *kept*."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"budget must be a Budget, an int or a float, got {value!r}")
        if isinstance(value, int):
            return cls(tokens=value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a float budget is the fraction kept, in (0, 1]; got {value}")
        return cls(ratio=1.0 - value)

    def resolve(self, layer_idx: int, num_layers: int, n: int) -> int:
        """Slots kept out of ``n`` at layer ``layer_idx``."""
        if self.ratio is not None:
            keep = int(n * (1.0 - self.ratio))
        elif self.tokens is not None:
            keep = self.tokens
        else:
            keep = int(self.per_layer(layer_idx, num_layers, n))
        protected = min(n, self.protect_sink + self.protect_recent)
        return max(min(keep, n), protected)

    def decode_cap(self, layer_idx: int, num_layers: int, n_prompt: int) -> int:
        """Most slots a layer may hold during decode: ``tokens`` if absolute, else the prompt's budget."""
        if self.tokens is not None:
            return max(self.tokens, self.protect_sink + self.protect_recent)
        return self.resolve(layer_idx, num_layers, n_prompt)


def gqa_aggregate(x: Tensor, n_kv_heads: int, mode: GqaAgg = "mean") -> Tensor:
    """agg(X) = reduce(X.view(B, Hkv, G, ...), dim=2): (B, H, ...) -> (B, Hkv, ...)."""
    b, h = x.shape[:2]
    assert h % n_kv_heads == 0, f"{h} query heads are not a multiple of {n_kv_heads} KV heads"
    grouped = x.reshape(b, n_kv_heads, h // n_kv_heads, *x.shape[2:])  # (B, Hkv, G, ...)
    if mode == "mean":
        return grouped.mean(dim=2)
    if mode == "max":
        return grouped.amax(dim=2)
    if mode == "sum":
        return grouped.sum(dim=2)
    raise ValueError(f"unknown GQA aggregation {mode!r}; use mean, max or sum")


def gather_kv(kv: LayerKV, idx: Tensor) -> LayerKV:
    """Order-preserving gather of slots: idx (B, Hkv, K) int64 ascending -> LayerKV with K slots.

    Gathers k, v, pos, valid, bias and every aux tensor shaped (B, Hkv, T, ...).
    """
    b, h, t = kv.k.shape[:3]

    def take(x):
        if not isinstance(x, Tensor) or x.dim() < 3 or tuple(x.shape[:3]) != (b, h, t):
            return x
        index = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
        return x.gather(2, index)
    return LayerKV(take(kv.k), take(kv.v), take(kv.pos), take(kv.valid), take(kv.bias),
                   kv.k_channel_mask, {key: take(val) for key, val in kv.aux.items()})


def keep_slots(kv: LayerKV, keep: Tensor) -> LayerKV:
    """Order-preserving gather of the slots where keep (B, Hkv, T) is True; rows may keep different counts.

    Every (B, Hkv) row gets K = max kept count slots: its kept slots in time order, padded with its earliest
    dropped slots, which are marked invalid. Returns ``kv`` itself when every slot is kept.
    """
    n_keep = int(keep.sum(dim=-1).max())
    if n_keep == kv.n:
        return replace(kv, valid=kv.valid_mask() & keep) if not bool(keep.all()) else kv
    order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)[..., :n_keep]   # kept first, then dropped
    idx = order.sort(dim=-1).values                                             # (B, Hkv, K)
    out = gather_kv(kv, idx)
    return replace(out, valid=out.valid_mask() & keep.gather(2, idx))


def protected_slots(valid: Tensor, n_sink: int, n_recent: int) -> Tensor:
    """(B, h, T) bool: the first ``n_sink`` and the last ``n_recent`` valid slots of each row."""
    v = valid.long()
    rank = v.cumsum(-1) - 1                                   # 0 for the first valid slot
    rank_back = v.flip(-1).cumsum(-1).flip(-1) - 1            # 0 for the last valid slot
    return valid & ((rank < n_sink) | (rank_back < n_recent))


def window_attention(q_win: Tensor, k: Tensor, scaling: float, valid: Tensor | None = None) -> Tensor:
    """Attention of the last W queries of a prompt over its T keys (SnapKV-family scoring).

    A_win = softmax(q_win Kᵀ·scaling + M), M masking the causal triangle inside the window (query i sits
    at slot T − W + i) and invalid slots. q_win: (B, H, W, D) post-RoPE; k: (B, Hkv, T, D);
    valid: (B, Hkv, T) | None. Returns (B, H, W, T) fp32.
    """
    b, h, w, d = q_win.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q_win.float().view(b, hkv, h // hkv, w, d)                        # (B, Hkv, G, W, D)
    logits = (qg @ k.float()[:, :, None].transpose(-1, -2)) * scaling     # (B, Hkv, G, W, T)
    slots = torch.arange(t, device=k.device)
    allowed = slots[None, :] <= torch.arange(t - w, t, device=k.device)[:, None]   # (W, T)
    allowed = allowed[None, None, None]
    if valid is not None:
        allowed = allowed & valid[:, :, None, None, :]
    probs = logits.masked_fill(~allowed, NEG_INF).softmax(dim=-1).nan_to_num(0.0)
    return probs.reshape(b, h, w, t)


@dataclass
class TopKEviction(KVPolicy):
    """Generic eviction: score -> protect -> top-k -> order-preserving gather.

    Subclasses write ``score()`` (or pass a ``scorer``). Scores may come per KV head (B, Hkv, T) or per
    query head (B, H, T); invalid slots are scored −∞ and protected ones +∞ before top-k.

    Parameters
    ----------
    scorer : Scorer | None, used by the default ``score()``.
    budget : Budget, or shorthand for ``Budget.of``: an int token count or a float fraction kept.
    evict_on : "prefill" (compress once after the prompt, kvpress), "decode" (cap the cache after every
        decode step) or "both".
    granularity : "kv_head" (default; every KV head keeps its own K slots), "q_head" (the cache is first
        expanded to one copy per query head, the layout of SnapKV/PyramidKV/Quest originals; no memory
        saving on GQA) or "layer" (one index set shared by all heads, scores averaged over heads).
    gqa_agg : how per-query-head scores become per-KV-head scores: "mean" (kvpress), "max", "sum".
    head_adaptive : AdaKV-style: one top-(K·Hkv) over all heads of the layer; heads keep ragged counts,
        expressed with ``LayerKV.valid`` (no physical compaction). Prefill only.
    """

    scorer: Scorer | None = None
    budget: Budget | int | float | None = None
    evict_on: Literal["prefill", "decode", "both"] = "prefill"
    granularity: Granularity = "kv_head"
    gqa_agg: GqaAgg = "mean"
    head_adaptive: bool = False

    def __post_init__(self) -> None:
        if self.budget is None:
            raise ValueError(f"{type(self).__name__}: budget is required")
        self.budget = Budget.of(self.budget)
        if self.evict_on not in ("prefill", "decode", "both"):
            raise ValueError(f"evict_on must be prefill, decode or both, got {self.evict_on!r}")
        if self.granularity not in ("kv_head", "q_head", "layer"):
            raise ValueError(f"granularity must be kv_head, q_head or layer, got {self.granularity!r}")
        if self.gqa_agg not in ("mean", "max", "sum"):
            raise ValueError(f"gqa_agg must be mean, max or sum, got {self.gqa_agg!r}")
        if self.head_adaptive and (self.evict_on != "prefill" or self.granularity != "kv_head"):
            raise ValueError("head_adaptive needs evict_on='prefill' and granularity='kv_head'")

    @property
    def needs(self) -> frozenset[str]:
        return self.scorer.needs if self.scorer is not None else frozenset()

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, Hkv or H, T) importance, higher = keep."""
        if self.scorer is None:
            raise NotImplementedError(f"{type(self).__name__} must override score() or be given a scorer")
        return self.scorer.score(ctx, kv)

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        kv.aux["n_prompt"] = kv.n
        if self.evict_on == "decode":
            return kv
        return self.compress(ctx, kv, self.budget.resolve(ctx.layer_idx, ctx.num_layers, kv.n))

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        if self.evict_on == "prefill":
            return kv
        cap = self.budget.decode_cap(ctx.layer_idx, ctx.num_layers, kv.aux.get("n_prompt", kv.n))
        return self.compress(ctx, kv, cap) if kv.n > cap else kv

    def compress(self, ctx: StepCtx, kv: LayerKV, keep: int) -> LayerKV:
        """Keep ``keep`` slots per head (or a ragged layer total when head_adaptive)."""
        n_heads = ctx.q.shape[1]
        if self.granularity == "q_head" and kv.k.shape[1] < n_heads:
            kv = kv.repeat_heads(n_heads // kv.k.shape[1])
        if keep >= kv.n and not self.head_adaptive:
            return kv
        hkv = kv.k.shape[1]
        scores = self._scores_per_head(self.score(ctx, kv).float(), hkv)      # (B, Hkv, T)
        valid = kv.valid_mask()
        scores = scores.masked_fill(~valid, NEG_INF)
        protect = self.protected(valid, keep)
        scores = scores.masked_fill(protect, math.inf)
        if self.head_adaptive:
            b, _, t = scores.shape
            top = scores.reshape(b, hkv * t).topk(min(keep * hkv, hkv * t), dim=-1).indices
            chosen = torch.zeros(b, hkv * t, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
            return replace(kv, valid=valid & chosen.view(b, hkv, t))
        idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values         # (B, Hkv, K)
        return gather_kv(kv, idx)

    def protected(self, valid: Tensor, keep: int) -> Tensor:
        """(B, Hkv, T) bool slots that survive any top-k: the budget's sinks and recent slots.

        Override when the protected count depends on ``keep`` (H2O's recent share of the budget).
        """
        return protected_slots(valid, self.budget.protect_sink, self.budget.protect_recent)

    def _scores_per_head(self, scores: Tensor, hkv: int) -> Tensor:
        """Bring (B, h, T) scores to (B, Hkv, T) following ``granularity`` and ``gqa_agg``."""
        h = scores.shape[1]
        if self.granularity == "layer":
            return scores.mean(dim=1, keepdim=True).expand(-1, hkv, -1)
        if h > hkv:
            return gqa_aggregate(scores, hkv, self.gqa_agg)
        if h < hkv:
            return scores.repeat_interleave(hkv // h, dim=1)
        return scores



def received_attention(probs: Tensor, kv: LayerKV) -> Tensor:
    """Attention each slot received this forward, per query head, over the real (unpadded) queries.

    probs: (B, H, S, T) weights of the S new slots' queries -> (B, Hkv, T, G) (H2O, Keyformer).
    """
    b, h, s, t = probs.shape
    hkv = kv.k.shape[1]
    real = kv.valid_mask()[:, 0, -s:].to(probs.dtype)                      # (B, S): the queries are the new slots
    received = (probs * real[:, None, :, None]).sum(dim=2)                # (B, H, T)
    return received.view(b, hkv, h // hkv, t).transpose(2, 3)             # (B, Hkv, T, G)


def accumulate_received(old: Tensor | None, received: Tensor) -> Tensor:
    """Running score: ``old`` (B, Hkv, T_old, G), zero for the new slots, plus ``received`` (B, Hkv, T, G)."""
    if old is None:
        return received
    return received + F.pad(old, (0, 0, 0, received.shape[2] - old.shape[2]))


def per_query_head(acc: Tensor) -> Tensor:
    """(B, Hkv, T, G) -> (B, H, T), query head h = kv·G + g; the base reduces it over the GQA group."""
    b, hkv, t, g = acc.shape
    return acc.transpose(2, 3).reshape(b, hkv * g, t)
