"""RazorAttention: full cache for retrieval heads, sink + window + compensation token for the others
(Tang et al., ICLR 2025, arXiv 2407.15891; no code released).

Rule (Algorithm 1, RoPE models): after the prompt, every non-retrieval KV head keeps its first N0 tokens and its
last L_h = max(S0, N/C) tokens; the dropped set D becomes one compensation token k̂ = mean_{m∈D} k_m,
v̂ = mean_{m∈D} v_m attended with multiplicity |D|, i.e. with the logit bias log|D|:
    o = (Σ_{m∉D} e^{s·q·k_m} v_m + |D|·e^{s·q·k̂} v̂) / (Σ_{m∉D} e^{s·q·k_m} + |D|·e^{s·q·k̂}).
Retrieval heads keep everything. They are found once per model, data-free: feed random tokens repeated
``calib_repeats`` times; a query head's echo score is its mean attention on earlier copies of the current
token, its induction score the mean attention on the tokens right after them; the top ``induction_frac`` of
all heads by induction score and the top ``echo_frac`` by echo score are retrieval heads.

Defaults: N0 = n_sink = 4, C = 5 (budget 0.2 = N/C), S0 = min_window = 4000, induction_frac 0.15, echo_frac 0.01
(paper §3 and §4 as summarised in kv_methods.md §4.1, all marked [verify] there). S0 = 4000 leaves prompts
under ~4000 tokens uncompressed, as in the paper; pass ``min_window`` lower for short-context evaluation.
Calibration: 4 copies of 128 random tokens (seed 0) [choice; the paper's lengths are not given here].

Deviations:
1. Heads are ragged inside a layer: the cache keeps the longest head's slot count and marks the others'
   dropped slots invalid (the compensation token takes the first dropped slot). A layer without retrieval
   heads is compacted to N0 + 1 + L_h slots.
2. Prompt only: tokens generated later are appended to every head and never dropped.
3. ``budget`` sets L_h = max(S0, budget.resolve(n)): a float f is 1/C (L_h = max(S0, int(f·N))), an int the
   window directly. The compensation token's ``pos`` is that of the slot it occupies (unused by attention).

GQA: a KV head is retrieval if any of its query heads is. Needs: one calibration forward with HF eager
attention weights per model (``post_init_from_model``, or pass ``retrieval_heads``); keys and values only
at inference (no attention weights, no q).
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from plaintext_ref.policies.base import Budget, KVPolicy, LayerKV, StepCtx, keep_slots, protected_slots

log = logging.getLogger(__name__)


@torch.no_grad()
def head_scores(model: nn.Module, length: int = 128, repeats: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Echo and induction scores (L, H) of every query head on ``repeats`` copies of ``length`` random tokens.

    Query i in copy r ≥ 1 sees its earlier copies at i − m·length (echo) and i − m·length + 1 (induction),
    m = 1..r; a score is the attention mass on those slots, averaged over the queries of copies 1..R−1.
    """
    if length < 2 or repeats < 2:
        raise ValueError(f"calibration needs length >= 2 and repeats >= 2, got {length}, {repeats}")
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=gen).repeat(1, repeats).to(model.device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(ids, output_attentions=True).attentions                  # L × (1, H, S, S)
    finally:
        model.set_attn_implementation(previous)
    n = length * repeats
    query = torch.arange(length, n)[:, None]                                         # (Q, 1)
    copy = query - length * torch.arange(1, repeats)[None, :]                       # (Q, R − 1)
    real = (copy >= 0).float()                                                       # earlier copies only
    echo = torch.zeros(length * (repeats - 1), n).scatter_add_(1, copy.clamp(min=0), real)       # (Q, S)
    induction = torch.zeros_like(echo).scatter_add_(1, (copy + 1).clamp(min=0), real)
    attn = torch.stack([a[0, :, length:].float().cpu() for a in attentions])         # (L, H, Q, S)
    return (attn * echo).sum(-1).mean(-1), (attn * induction).sum(-1).mean(-1)


def retrieval_heads(echo: Tensor, induction: Tensor, n_kv_heads: int, echo_frac: float,
                    induction_frac: float) -> Tensor:
    """(L, Hkv) bool: KV heads with a query head among the top ⌈frac·L·H⌉ of the model by either score."""
    def top(score: Tensor, frac: float) -> Tensor:
        k = math.ceil(frac * score.numel())
        flat = torch.zeros(score.numel(), dtype=torch.bool)
        flat[score.flatten().topk(k).indices] = True
        return flat.view_as(score)
    per_q = top(echo, echo_frac) | top(induction, induction_frac)                  # (L, H)
    return per_q.view(per_q.shape[0], n_kv_heads, -1).any(dim=-1)


@dataclass
class RazorAttention(KVPolicy):
    """RazorAttention: retrieval heads keep all; the others keep sinks, a recent window and a compensation token.

    Parameters
    ----------
    budget : float 1/C (default 0.2), int window, or Budget: the recent window L_h of non-retrieval heads.
    min_window : int >= 0, default 4000, S0, the smallest window.
    n_sink : int >= 0, default 4, N0.
    echo_frac, induction_frac : float in [0, 1], defaults 0.01 and 0.15, share of all query heads protected.
    retrieval_heads : (L, Hkv) or (L, H) bool tensor, or None (default) to calibrate in
        ``post_init_from_model``.
    calib_length, calib_repeats, calib_seed : the calibration input (defaults 128, 4, 0).
    """

    budget: Budget | int | float | None = 0.2
    min_window: int = 4000
    n_sink: int = 4
    echo_frac: float = 0.01
    induction_frac: float = 0.15
    retrieval_heads: Tensor | None = None
    calib_length: int = 128
    calib_repeats: int = 4
    calib_seed: int = 0
    _calibrated: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False)
    _heads: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget is None:
            raise ValueError("RazorAttention: budget is required")
        self.budget = Budget.of(self.budget)
        if self.min_window < 0 or self.n_sink < 0:
            raise ValueError(f"RazorAttention needs min_window, n_sink >= 0, got {self.min_window}, {self.n_sink}")
        if not (0.0 <= self.echo_frac <= 1.0 and 0.0 <= self.induction_frac <= 1.0):
            raise ValueError(f"RazorAttention fractions must lie in [0, 1], got {self.echo_frac}, "
                             f"{self.induction_frac}")
        heads = self.retrieval_heads
        if heads is not None and (heads.dtype != torch.bool or heads.dim() != 2):
            raise ValueError(f"retrieval_heads must be an (L, Hkv) or (L, H) bool tensor, got {self.retrieval_heads!r}")
        self._heads = self.retrieval_heads

    def post_init_from_model(self, model: nn.Module) -> None:
        """Calibrate the retrieval heads of ``model`` once (cached per model) unless they were given."""
        if self.retrieval_heads is not None:
            return
        if model not in self._calibrated:
            echo, induction = head_scores(model, self.calib_length, self.calib_repeats, self.calib_seed)
            n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
            heads = retrieval_heads(echo, induction, n_kv, self.echo_frac, self.induction_frac)
            log.info("RazorAttention: %d of %d KV heads are retrieval heads", int(heads.sum()), heads.numel())
            self._calibrated[model] = heads
        self._heads = self._calibrated[model]

    def window(self, ctx: StepCtx, n: int) -> int:
        """L_h = max(S0, budget.resolve(n))."""
        return max(self.min_window, self.budget.resolve(ctx.layer_idx, ctx.num_layers, n))

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        if self._heads is None:
            raise RuntimeError("RazorAttention has no retrieval heads: pass retrieval_heads or run through RefCache")
        hkv, heads = kv.k.shape[1], self._heads[ctx.layer_idx].to(kv.k.device)         # (Hkv or H,)
        assert heads.numel() % hkv == 0, f"retrieval_heads has {heads.numel()} heads per layer, cache has {hkv}"
        retrieval = heads.view(hkv, -1).any(dim=-1)                                     # (Hkv,)
        valid = kv.valid_mask()
        kept = protected_slots(valid, self.n_sink, self.window(ctx, kv.n))
        dropped = valid & ~kept & ~retrieval[None, :, None]                             # (B, Hkv, T) the set D
        count = dropped.sum(dim=-1)                                                     # (B, Hkv) |D|
        if not bool(count.any()):
            return kv
        w = dropped.float()[..., None] / count.clamp(min=1)[..., None, None]
        k_hat, v_hat = (kv.k.float() * w).sum(2), (kv.v.float() * w).sum(2)            # (B, Hkv, D)
        first = dropped & (dropped.cumsum(-1) == 1)                                     # the compensation slot
        k = torch.where(first[..., None], k_hat[:, :, None].to(kv.k.dtype), kv.k)
        v = torch.where(first[..., None], v_hat[:, :, None].to(kv.v.dtype), kv.v)
        bias = torch.zeros_like(kv.k[..., 0], dtype=torch.float32) if kv.bias is None else kv.bias.float()
        bias = torch.where(first, count.clamp(min=1).float().log()[..., None], bias)
        return keep_slots(replace(kv, k=k, v=v, bias=bias), valid & ~(dropped & ~first))
