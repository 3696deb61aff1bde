"""TRIM-KV: learned token retention for a memory-bounded KV cache (Bui et al., ICLR 2026, arXiv 2512.03324,
"Cache What Lasts"; repo ngocbh/trimkv).

Based on https://arxiv.org/abs/2512.03324 and kv_methods.md §8.1.

Rule: when token i enters layer l, a small gate reads the hidden state x_i entering that layer's attention and
predicts one retention β_i = σ(w_h·x_i + b_h) ∈ (0, 1) per KV head h. Its retention at step t decays
exponentially, ᾱ_{t,i} = β_i^{t−i}, so the eviction score is
    log ᾱ_{t,i} = (t − i)·log β_i        (strategy "alpha"),  or  log ᾱ_{t,i} + log‖k_i‖  ("knorm_alpha"),
with t the newest position and i the slot's position. Whenever a layer holds more than M slots, each KV head
keeps its M best-scored slots (after the prompt and after every decode step). Equal β for all tokens makes the
score −c·(t − i): pure recency, i.e. a sliding window of M (StreamingLLM without sinks).

Gates (``RetentionGates``): log β = logsigmoid(W_l x + b_l), W_l: (Hkv, E), b_l: (Hkv,), trained on the frozen
model with :mod:`plaintext_ref.policies.trim_kv_train` (retention-gated attention, KL + next-token + capacity
loss; that module's docstring gives the objective). The shipped gates ``plaintext_ref/data/trimkv_smollm2.pt``
(SmolLM2-135M-Instruct, 30 layers × 3 KV heads × 577 weights, fp32, 210 KB) were trained on a CPU with

    python -m plaintext_ref.policies.trim_kv_train --minutes 18 --seq-len 512 --memory 128

on held-out Python 3.11 documentation (Debian python3.11-doc: the text after the first 2M characters that
``plaintext_ref.eval`` scores), 1 thread of a 2-core Intel Xeon VM; the file's ``meta`` records the steps,
tokens, wall time and final losses.

Defaults: M = 512 tokens (the README's ``memory_size``; the config's default is 1024), strategy "alpha"
(``compress_strategy``), no protected window; the gate bias starts at 10 (``retention_gate_bias_init``), so an
untrained gate gives β = σ(10) ≈ 0.99995, recency.

Deviations:
1. Linear gates instead of the paper's MLP (E → 512 → Hkv, with a separate bias): 1/170 of the parameters, so
   they train in minutes on a CPU and ship in a 210 KB file (the MLP would be 36 MB for SmolLM2).
2. Eviction after every step (``buffer_size`` = 1) so a layer holds exactly M slots between steps, as the
   other methods of the report do; the official cache grows to M + 128 (``buffer_size``) between compressions.
3. t − i is measured in logical positions (``LayerKV.pos``), as the official cache's ``kv_positions``; the
   gates were trained on contexts of 512 tokens only (the paper trains on long reasoning traces).
4. The gate reads the layer's attention input through a forward pre-hook on each ``self_attn`` (the runtime
   does not fill ``StepCtx.hidden``); the hook only acts for forwards whose ``ref_cache`` runs a TrimKV (also
   inside a wrapper such as ``Metered``), and hands log β to the same layer's ``on_prefill``/``on_append`` of
   that forward through ``TrimKV.pending`` (so one policy object must not run two forwards concurrently).

GQA: one β and one kept set per KV head (the group's G query heads share it). Needs: the hidden state entering
each attention layer (through the hook), positions and, for "knorm_alpha", the keys; no queries, no attention
weights.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plaintext_ref.policies.base import Budget, LayerKV, StepCtx, TopKEviction

GATES_FILE = Path(__file__).resolve().parents[1] / "data" / "trimkv_smollm2.pt"
LOG_BETA = "trimkv_log_beta"   # LayerKV.aux: (B, Hkv, T) fp32 log β of every slot
Strategy = Literal["alpha", "knorm_alpha"]
LOGIT_MAX = 80.0   # gate logits are clamped to ±80: log σ(80) ≈ −1.8e−35 and σ(−80) ≈ 1.8e−35 are normal fp32
_HOOKED: weakref.WeakSet = weakref.WeakSet()   # attention modules that carry the gate hook


class RetentionGates(nn.Module):
    """Linear retention gates of every layer: log β_{l,h}(x) = logsigmoid(clamp(W_l[h]·x + b_l[h], ±LOGIT_MAX)).

    weight: (L, Hkv, E), bias: (L, Hkv). Zero weights and ``bias_init`` 10 give β ≈ 0.99995 everywhere. The
    clamp keeps log β negative, finite and e^{log β} > 0 in fp32 (β ∈ (0, 1)), so scores stay strictly monotone
    in age.
    """

    def __init__(self, num_layers: int, hidden_size: int, n_kv_heads: int, bias_init: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, n_kv_heads, hidden_size))
        self.bias = nn.Parameter(torch.full((num_layers, n_kv_heads), float(bias_init)))
        self.meta: dict = {}   # training record of saved gates (trim_kv_train.record)

    @classmethod
    def for_config(cls, config, bias_init: float = 10.0) -> RetentionGates:
        """Untrained gates shaped for a Llama-style transformers config."""
        hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, hkv, bias_init)

    def forward(self, layer_idx: int, hidden: Tensor) -> Tensor:
        """hidden (B, S, E) entering layer ``layer_idx``'s attention -> log β (B, Hkv, S) fp32, < 0."""
        logits = hidden.float() @ self.weight[layer_idx].T + self.bias[layer_idx]    # (B, S, Hkv)
        return F.logsigmoid(logits.clamp(-LOGIT_MAX, LOGIT_MAX)).transpose(1, 2)

    def save(self, path: str | Path, meta: dict) -> None:
        torch.save({"weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu(), "meta": meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> RetentionGates:
        """Gates written by :meth:`save`; their training record is in ``.meta``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TRIM-KV gates {path} not found; train them with "
                                    f"`python -m plaintext_ref.policies.trim_kv_train --out {path}`")
        saved = torch.load(path, weights_only=True)
        gates = cls(*saved["weight"].shape[:1], saved["weight"].shape[2], saved["weight"].shape[1])
        gates.load_state_dict({"weight": saved["weight"], "bias": saved["bias"]})
        gates.meta = saved["meta"]
        return gates


def retention_scores(log_beta: Tensor, pos: Tensor) -> Tensor:
    """log ᾱ_{t,i} = (t − pos_i)·log β_i with t = the newest position of each row: (B, h, T) fp32."""
    t = pos.amax(dim=-1, keepdim=True)                                           # (B, h, 1)
    return (t - pos).float() * log_beta.float()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's ``self_attn`` (Llama-style families); ValueError for other layouts."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"TRIM-KV needs a decoder with layers[i].self_attn, not {type(model).__name__}")
    return [layer.self_attn for layer in layers]


def _running_trimkv(cache: object) -> TrimKV | None:
    """The TrimKV a ``RefCache`` runs, looking through wrappers that hold a policy as ``.inner``
    (``plaintext_ref.eval.meter.Metered``); None when it runs another policy or there is no cache."""
    policy = getattr(cache, "policy", None)
    while policy is not None and not isinstance(policy, TrimKV):
        policy = getattr(policy, "inner", None)
    return policy


def _gate_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of ``self_attn``: the gates' log β of this forward's tokens, for the policy to take."""
    policy = _running_trimkv(kwargs.get("ref_cache"))
    if policy is not None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            policy.pending[module.layer_idx] = policy.gates(module.layer_idx, hidden)


@dataclass
class TrimKV(TopKEviction):
    """TRIM-KV: keep the M slots of highest learned retention (t − i)·log β_i per KV head, at every step.

    Parameters
    ----------
    budget : int M (default 512), float fraction of the prompt kept, or Budget (a protected window or sinks
        go through ``Budget.protect_recent`` / ``protect_sink``).
    strategy : "alpha" (default) ranks by log ᾱ; "knorm_alpha" by log ᾱ + log‖k‖.
    gates : RetentionGates, or None to load ``weights``.
    weights : path of saved gates, default the shipped SmolLM2 gates.
    """

    budget: Budget | int | float | None = 512
    evict_on: Literal["prefill", "decode", "both"] = "both"
    strategy: Strategy = "alpha"
    gates: RetentionGates | None = None
    weights: str | Path = GATES_FILE
    pending: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)   # layer -> (B, Hkv, S)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in ("alpha", "knorm_alpha"):
            raise ValueError(f"TrimKV.strategy must be alpha or knorm_alpha, got {self.strategy!r}")
        if self.gates is None:
            self.gates = RetentionGates.load(self.weights)

    def post_init_from_model(self, model: nn.Module) -> None:
        """Check the gates fit ``model``, move them to its device and hook its attention layers (once)."""
        modules = attention_modules(model)
        want = RetentionGates.for_config(model.config).weight.shape
        if self.gates.weight.shape != want:
            raise ValueError(f"TRIM-KV gates of shape {tuple(self.gates.weight.shape)} do not fit "
                             f"{type(model).__name__} (needs (L, Hkv, E) = {tuple(want)})")
        self.gates.to(model.device)
        for module in modules:
            if module not in _HOOKED:
                module.register_forward_pre_hook(_gate_hook, with_kwargs=True)
                _HOOKED.add(module)

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        kv.aux[LOG_BETA] = self._take(ctx, kv)
        return super().on_prefill(ctx, kv)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        kv.aux[LOG_BETA] = torch.cat([kv.aux[LOG_BETA], self._take(ctx, kv)], dim=2)
        return super().on_append(ctx, kv)

    def _take(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """log β (B, h, S) of this forward's S tokens, taken from the hook (heads repeated for "q_head")."""
        assert ctx.layer_idx in self.pending, f"layer {ctx.layer_idx}: no gate output (post_init_from_model hooks it)"
        log_beta = self.pending.pop(ctx.layer_idx)
        assert log_beta.shape[2] == ctx.q.shape[2], f"gate saw {log_beta.shape[2]} tokens, attention {ctx.q.shape[2]}"
        return log_beta.repeat_interleave(kv.k.shape[1] // log_beta.shape[1], dim=1)

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, Hkv, T) log ᾱ_{t,i} (+ log‖k_i‖ for "knorm_alpha")."""
        score = retention_scores(kv.aux[LOG_BETA], kv.pos)
        if self.strategy == "knorm_alpha":
            score = score + kv.k.float().norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny).log()
        return score
