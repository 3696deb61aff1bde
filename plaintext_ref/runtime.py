"""Plaintext KV-policy runtime on HF transformers: a ``Cache`` subclass plus a registered attention function.

How it plugs in (transformers 5.24; no model class is patched):

* :class:`RefCache` (a ``transformers.Cache``) holds one :class:`LayerKV` per layer. Its ``update`` appends
  the new post-RoPE keys/values with their positions (``position_ids``) and validity (left padding).
* ``ATTN_NAME = "mpcache_ref"`` is registered in ``AttentionInterface``; :func:`attach` switches a model to
  it (``model.set_attn_implementation``). The model forwards every extra keyword down to the attention
  function, so each forward passes ``ref_cache=cache`` (and ``ref_token_mask``): the attention function
  finds the layer's LayerKV there, builds a :class:`StepCtx` (post-RoPE q, and as ``partner`` the LayerKV
  of layer ``policy.shares_with(layer)``), applies ``policy.select`` / ``valid`` / ``bias`` /
  ``k_channel_mask``, computes attention in fp32 eager math, then calls ``policy.on_prefill`` (first
  forward of the layer) or ``policy.on_append`` (later forwards).
* The name is deliberately absent from ``ALL_MASK_ATTENTION_FUNCTIONS``, so HF builds no mask: the mask is
  derived here from slot order (slots are kept in time order), ``valid`` and ``select``.

Semantics:
* Timing: a decode step attends every kept slot plus itself, then ``on_append`` may evict, so the cache
  holds the budget between steps (kvpress DecodingPress / H2O / TOVA order).
* Positions are logical: evicting never renumbers, the next token's position is the number of real
  tokens seen (kvpress convention; kv_methods.md §0).
* Left padding: position_ids = cumsum(mask) − 1 (HF generate's rule); padded slots get ``valid=False``.
* GPT-2 routes through the interface too (its ``reorder_and_upcast_attn`` path is only taken under
  "eager"); ``StepCtx.rope`` is None there.

Shapes: B batch · S query tokens this forward · T cache slots · H query heads · Hkv KV heads (G = H/Hkv) ·
D head dim · V vocabulary.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from plaintext_ref.models import max_context
from plaintext_ref.policies.base import NEG_INF, KVPolicy, LayerKV, Phase, StepCtx

log = logging.getLogger(__name__)

ATTN_NAME = "mpcache_ref"
SUPPORTED_NEEDS = frozenset({"q", "attn", "logits"})

__all__ = ["ATTN_NAME", "RefCache", "StepCtx", "attach", "attached", "generate", "ref_attention", "step",
           "teacher_forced_logits"]


class RefLayer(CacheLayerMixin):
    """One layer of :class:`RefCache`: a LayerKV and ``seen``, the number of tokens fed so far."""

    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.kv: LayerKV | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, pos: Tensor, valid: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        """Append S slots: keys/values (B, Hkv, S, D), pos (B, Hkv, S), valid (B, Hkv, S) | None."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = LayerKV(key_states, value_states, pos, valid)
        if self.kv is not None and self.kv.k.shape[1] != new.k.shape[1]:   # cache went per-query-head
            new = new.repeat_heads(self.kv.k.shape[1] // new.k.shape[1])
        self.set_kv(new if self.kv is None else self.kv.append(new))
        self.seen += key_states.shape[2]
        return self.keys, self.values

    def set_kv(self, kv: LayerKV) -> None:
        self.kv, self.keys, self.values = kv, kv.k, kv.v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Logical length (tokens seen), so HF's default position ids stay right after evictions."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self.keys, self.values, self.seen, self.is_initialized = None, None, None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("RefCache does not support beam search")


class RefCache(Cache):
    """Per-layer :class:`LayerKV` store driven by a :class:`KVPolicy` (None = full cache).

    ``cache.kv(i)`` is layer i's LayerKV (None before its first forward); ``cache.get_seq_length()`` is the
    logical length. Raises ValueError if the policy needs something this runtime does not fill.
    """

    def __init__(self, model: PreTrainedModel, policy: KVPolicy | None = None) -> None:
        self.policy = policy if policy is not None else KVPolicy()
        missing = set(self.policy.needs) - SUPPORTED_NEEDS
        if missing:
            raise ValueError(f"{type(self.policy).__name__} needs {sorted(missing)}; the runtime fills only "
                             f"{sorted(SUPPORTED_NEEDS)}")
        self.num_layers = model.config.num_hidden_layers
        super().__init__(layers=[RefLayer() for _ in range(self.num_layers)])
        self.rope = _rope_for(model)
        self.phase: list[Phase | None] = [None] * self.num_layers   # of each layer's current forward
        self.n_old: list[int] = [0] * self.num_layers                # slots before its current append
        self.policy.post_init_from_model(model)

    def kv(self, layer_idx: int) -> LayerKV | None:
        return self.layers[layer_idx].kv

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, S, D) keys/values; HF passes the forward's keywords as ``kwargs=...``."""
        fwd = kwargs.get("kwargs") or {}
        layer = self.layers[layer_idx]
        b, hkv, s, _ = key_states.shape
        pos = fwd.get("position_ids")
        if pos is None:
            pos = torch.arange(layer.seen, layer.seen + s, device=key_states.device)[None]
        pos = pos.to(key_states.device).long().expand(b, s)[:, None, :].expand(b, hkv, s)
        token_mask = fwd.get("ref_token_mask")
        valid = None if token_mask is None else token_mask.to(key_states.device).bool()[:, None, :].expand(b, hkv, s)
        self.n_old[layer_idx] = 0 if layer.kv is None else layer.kv.n
        self.phase[layer_idx] = "prefill" if layer.kv is None else ("decode" if s == 1 else "chunk")
        return layer.update(key_states, value_states, pos.contiguous(), valid)


def _rope_for(model: PreTrainedModel) -> Callable[[Tensor, Tensor], Tensor] | None:
    """rope(x (B, h, n, D), positions (B, n) | (B, h, n)) with the model's own rotary table; None if no RoPE."""
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None:
        return None

    def rope(x: Tensor, positions: Tensor) -> Tensor:
        b, h, n, _ = x.shape
        p = positions if positions.dim() == 3 else positions[:, None, :]
        cos, sin = rotary(x, p.expand(b, h, n))                       # (B, h, n, D) each
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half(x)
        return x * cos + rotated * sin
    return rope


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, allowed: Tensor,
                      bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 softmax(q kᵀ·scaling + bias, masked by ``allowed``) v with grouped heads.

    q: (B, H, S, D); k, v: (B, Hkv, T, D); allowed: bool broadcastable to (B, Hkv, G, S, T);
    bias: (B, Hkv, T) | None. Rows with no allowed key output 0. Returns out (B, H, S, D) fp32,
    probs and logits (B, H, S, T) fp32 (logits −∞ where masked).
    """
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q.float().view(b, hkv, h // hkv, s, d)                          # (B, Hkv, G, S, D)
    logits = (qg @ k.float()[:, :, None].transpose(-1, -2)) * scaling   # (B, Hkv, G, S, T)
    if bias is not None:
        logits = logits + bias.float()[:, :, None, None, :]
    logits = logits.masked_fill(~allowed, NEG_INF)
    probs = logits.softmax(dim=-1).nan_to_num(0.0)                       # all-masked rows -> 0
    out = probs @ v.float()[:, :, None]                                  # (B, Hkv, G, S, D)
    return out.reshape(b, h, s, v.shape[-1]), probs.reshape(b, h, s, t), logits.reshape(b, h, s, t)


def _causal(n_old: int, s: int, t: int, device: torch.device) -> Tensor:
    """(S, T) bool: query i (slot n_old + i) sees slots 0..n_old + i (slots are in time order)."""
    return torch.arange(t, device=device)[None, :] <= (n_old + torch.arange(s, device=device))[:, None]


def ref_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, ref_cache: RefCache | None = None,
                  **kwargs) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: query (B, H, S, D), key/value (B, Hkv, T, D) -> (B, S, H, D).

    With ``ref_cache`` (passed by :func:`step`) the policy is applied; without it this is plain causal fp32
    attention (HF builds no padding mask for this implementation, so padded batches need a RefCache).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if ref_cache is None:
        s, t = query.shape[2], key.shape[2]
        out, _, _ = _masked_attention(query, key, value, scaling, _causal(t - s, s, t, query.device))
        return out.transpose(1, 2).to(query.dtype), None
    return _attend(ref_cache, module, query, scaling, kwargs["position_ids"])


def _attend(cache: RefCache, module: nn.Module, query: Tensor, scaling: float, position_ids: Tensor
            ) -> tuple[Tensor, Tensor | None]:
    """select -> read -> masked fp32 attention -> on_prefill / on_append, for layer ``module.layer_idx``."""
    idx, policy = module.layer_idx, cache.policy
    kv, phase, n_old = cache.kv(idx), cache.phase[idx], cache.n_old[idx]
    b, h, s, _ = query.shape
    src = policy.shares_with(idx, cache.num_layers)
    assert src is None or 0 <= src < idx, f"layer {idx} shares with layer {src}, which has not run before it"
    ctx = StepCtx(idx, cache.num_layers, phase, module, position_ids.expand(b, s), scaling, query, cache.rope,
                  partner=None if src is None else cache.kv(src))
    select = policy.select(ctx, kv)
    k, v, bias = policy.read(ctx, kv)
    if kv.k_channel_mask is not None:
        k = k * kv.k_channel_mask[:, :, None, :].to(k.dtype)
    hkv, t = k.shape[1], k.shape[2]
    assert t == n_old + s, f"layer {idx}: read() returned {t} slots, expected {n_old} + {s}"
    allowed = _causal(n_old, s, t, query.device)[None, None, None]          # (1, 1, 1, S, T)
    if kv.valid is not None:
        allowed = allowed & kv.valid[:, :, None, None, :]                  # (B, Hkv, 1, S, T)
    if select is not None:
        assert select.shape[1] in (h, hkv), f"select() mask {tuple(select.shape)}: heads must be {h} or {hkv}"
        allowed = allowed & select.reshape(b, hkv, -1, s, t)               # (B, Hkv, G or 1, S, T)
    out, probs, logits = _masked_attention(query, k, v, scaling, allowed, bias)
    ctx.attn = probs if "attn" in policy.needs else None
    ctx.logits = logits if "logits" in policy.needs else None
    hook = policy.on_prefill if phase == "prefill" else policy.on_append
    cache.layers[idx].set_kv(hook(ctx, kv))
    return out.transpose(1, 2).to(query.dtype), (probs.to(query.dtype) if ctx.attn is not None else None)


def attach(model: PreTrainedModel) -> None:
    """Register ``ref_attention`` as "mpcache_ref" and switch ``model`` to it (idempotent)."""
    AttentionInterface.register(ATTN_NAME, ref_attention)
    if model.config._attn_implementation != ATTN_NAME:
        log.debug("switching %s from %r to %r", type(model).__name__, model.config._attn_implementation, ATTN_NAME)
        model.set_attn_implementation(ATTN_NAME)


@contextmanager
def attached(model: PreTrainedModel) -> Iterator[None]:
    """Switch ``model`` to the reference attention for the block, then restore its implementation."""
    previous = model.config._attn_implementation
    attach(model)
    try:
        yield
    finally:
        if previous != ATTN_NAME:
            model.set_attn_implementation(previous)


def step(model: PreTrainedModel, cache: RefCache, input_ids: Tensor, position_ids: Tensor,
         token_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
    """One forward of input_ids (B, S) at position_ids (B, S) through an attached model with ``cache``.

    token_mask (B, S) bool marks real tokens (False = padding; None = all real). Returns fp32 logits
    (B, S or logits_to_keep, V).
    """
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"model uses attention {model.config._attn_implementation!r}; call attach(model) first")
    out = model(input_ids=input_ids, cache=cache, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, ref_cache=cache, ref_token_mask=token_mask)
    return out.logits.float()


def _check_context(model: PreTrainedModel, n_prompt: int, n_total: int) -> None:
    limit = max_context(model.config)
    if n_prompt > limit:
        raise ValueError(f"prompt of {n_prompt} tokens is longer than the model's maximum context of "
                         f"{limit} tokens")
    if n_total > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) plus new tokens needs {n_total} positions, more than "
                         f"the model's maximum context of {limit} tokens")


@torch.no_grad()
def generate(model: PreTrainedModel, input_ids: Tensor, policy: KVPolicy | None = None, *,
             max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
             attention_mask: Tensor | None = None) -> Tensor:
    """Greedy generation with ``policy`` acting on the cache (None = full cache).

    input_ids: (B, S) int64, left-padded when rows differ (attention_mask (B, S) 1 = real token).
    eos_token_id: None = ``model.generation_config.eos_token_id``. A row that emitted EOS continues with the
    pad token (generation_config.pad_token_id, else the first EOS id), as HF does; generation stops when
    every row is done or after ``max_new_tokens``. Returns (B, S + n) int64, n <= max_new_tokens.
    Raises ValueError when S + max_new_tokens exceeds the model's context or the padding is not on the left.
    """
    device = model.device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    _check_context(model, s, s + max_new_tokens)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    if not mask[:, -1].all():
        raise ValueError("generate needs left padding: attention_mask[:, -1] must be all ones")
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                       dtype=torch.long, device=device)
    pad = model.generation_config.pad_token_id
    pad = int(eos[0]) if pad is None and len(eos) else (pad or 0)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)               # (B, S), HF generate's rule
    cache = RefCache(model, policy)
    tokens, done = [input_ids], torch.zeros(b, dtype=torch.bool, device=device)
    with attached(model):
        logits = step(model, cache, input_ids, position_ids, None if mask.all() else mask, logits_to_keep=1)
        next_pos = position_ids[:, -1:] + 1
        for i in range(max_new_tokens):
            tok = logits[:, -1].argmax(dim=-1)                              # (B,)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            done = done | torch.isin(tok, eos)
            tokens.append(tok[:, None])
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = step(model, cache, tok[:, None], next_pos, logits_to_keep=1)
            next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def teacher_forced_logits(model: PreTrainedModel, input_ids: Tensor, prefix_len: int,
                          policy: KVPolicy | None = None) -> Tensor:
    """Logits of input_ids (B, S) under ``policy``: prefill the prefix, then one decode step per token.

    The prefix input_ids[:, :prefix_len] is prefilled in one forward (prefill compression happens there);
    tokens prefix_len .. S−2 are then fed one decode step each. Row j of the result is the distribution
    over token prefix_len + j given tokens 0 .. prefix_len + j − 1, so with the full cache it equals the
    one-shot ``model(input_ids).logits[:, prefix_len − 1 : S − 1]``. Targets are input_ids[:, prefix_len:].
    Returns (B, S − prefix_len, V) fp32. Needs 1 <= prefix_len < S <= max context; no padding.
    """
    device = model.device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    if not 1 <= prefix_len < s:
        raise ValueError(f"prefix_len must lie in [1, {s - 1}] for {s} tokens, got {prefix_len}")
    _check_context(model, s, s)
    positions = torch.arange(s, device=device)[None].expand(b, s)
    cache = RefCache(model, policy)
    with attached(model):
        rows = [step(model, cache, input_ids[:, :prefix_len], positions[:, :prefix_len], logits_to_keep=1)]
        for j in range(prefix_len, s - 1):
            rows.append(step(model, cache, input_ids[:, j:j + 1], positions[:, j:j + 1], logits_to_keep=1))
    return torch.cat(rows, dim=1)
