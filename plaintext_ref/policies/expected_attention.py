"""Expected Attention: score keys by the attention future queries are expected to pay
(Devoto, Jeblick, Jégou, arXiv 2510.00636).

Rule: model future queries as q ~ N(μ̄, Σ̄). μ, Σ are the mean and (biased) covariance of the prompt's
pre-RoPE queries, per head, without the first n_sink tokens; R̄ = (1/F) Σ_{t=n}^{n+F−1} R_t averages the RoPE
rotation over the next F positions, μ̄ = R̄μ, Σ̄ = R̄ΣR̄ᵀ. With s = 1/√D the Gaussian moment generating function
gives E[exp(s·q·k)] = exp(s·kᵀμ̄ + s²·kᵀΣ̄k/2), so per query head
    score_j = softmax_j( s·k_jᵀμ̄ + s²·k_jᵀΣ̄k_j / 2 )   over the non-sink slots,
optionally rescaled (score_j + ε)·‖v_j‖. The first n_sink slots are always kept; top-k keeps the rest.

Defaults: n_future_positions F = 512, n_sink = 4, use_covariance = True, use_vnorm = True, epsilon = 0
(kvpress ``ExpectedAttentionPress``); budget 0.5 kept (kvpress's evaluation default compression_ratio 0.5).
kvpress's registry wraps it in AdaKV with epsilon 1e-2: ``ExpectedAttention(head_adaptive=True,
epsilon=1e-2)`` (our AdaKV has no alpha_safeguard floor).

Deviations:
1. The pre-RoPE queries are the runtime's post-RoPE queries rotated back by their own positions,
   q = R(−p)·q_post / a² (a = the rotary ``attention_scaling``), instead of W_q·h recomputed from hidden
   states; equal up to float rounding (exact for the q_proj bias too).
2. Left padding: padded queries are left out of μ, Σ and padded keys out of the softmax; the future
   positions start after each row's last position (kvpress: the prompt length).
3. Prompt only (``evict_on="prefill"``); kvpress scores decode tokens through DecodingPress's buffers.

GQA: softmax per query head, then (s + ε)·‖v‖ per query head and the group reduction ``gqa_agg`` (mean =
kvpress's order; max equal; sum counts ε G times). Needs: the queries of the prompt (``StepCtx.q``, always
filled), ``StepCtx.rope`` (None on GPT-2: R̄ = I), keys and values; no attention weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from plaintext_ref.policies.base import NEG_INF, Budget, LayerKV, StepCtx, TopKEviction, protected_slots

Rope = Callable[[Tensor, Tensor], Tensor]


def average_rotation(rope: Rope | None, start: Tensor, n_future: int, d: int) -> Tensor:
    """R̄ (B, D, D) = mean over t ∈ [start_b, start_b + F) of R_t, with R_t x = rope(x, t); identity if rope is None."""
    b = start.shape[0]
    eye = torch.eye(d, device=start.device)
    if rope is None:
        return eye.expand(b, d, d)
    offsets = torch.arange(n_future, device=start.device).repeat_interleave(d)          # (F·D,)
    positions = start[:, None] + offsets[None]                                           # (B, F·D)
    basis = eye.repeat(n_future, 1).expand(b, 1, n_future * d, d)                         # row (t, i) = e_i
    cols = rope(basis, positions).view(b, n_future, d, d).mean(dim=1)                     # row i = R̄ e_i
    return cols.transpose(1, 2)


def query_statistics(q: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean μ (B, H, D) and biased covariance Σ (B, H, D, D) of q (B, H, S, D) over S; weight (B, S)."""
    w = (weight / weight.sum(dim=-1, keepdim=True).clamp(min=1.0))[:, None, :, None]     # (B, 1, S, 1)
    mu = (q * w).sum(dim=2)
    centred = q - mu[:, :, None]
    cov = (centred * w).transpose(2, 3) @ centred
    return mu, cov


def expected_logits(k: Tensor, mu: Tensor, cov: Tensor | None, scaling: float) -> Tensor:
    """log E[exp(s·q·k_j)] for q ~ N(μ, Σ): s·k_jᵀμ + s²·k_jᵀΣk_j/2. k (B, H, T, D), mu (B, H, D) -> (B, H, T)."""
    out = (k @ mu[..., None]).squeeze(-1) * scaling
    if cov is not None:
        out = out + ((k @ cov) * k).sum(dim=-1) * scaling ** 2 / 2
    return out


@dataclass
class ExpectedAttention(TopKEviction):
    """Expected Attention: keep the keys future queries are expected to attend most.

    Parameters
    ----------
    budget : float fraction kept (default 0.5), int tokens, or Budget; sinks count towards it.
    n_future_positions : int >= 1, default 512, positions F averaged in R̄.
    n_sink : int >= 0, default 4, first tokens excluded from the statistics and always kept.
    use_covariance : bool, default True, include the s²·kᵀΣ̄k/2 term.
    use_vnorm : bool, default True, rescale by the value norm.
    epsilon : float >= 0, default 0.0, added before the value-norm rescaling.
    """

    budget: Budget | int | float | None = 0.5
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.n_future_positions < 1 or self.n_sink < 0 or self.epsilon < 0:
            raise ValueError(f"ExpectedAttention needs n_future_positions >= 1, n_sink >= 0, epsilon >= 0; got "
                             f"{self.n_future_positions}, {self.n_sink}, {self.epsilon}")
        if self.evict_on != "prefill" or self.granularity == "q_head":
            raise ValueError("ExpectedAttention compresses the prompt (evict_on='prefill'), per KV head or layer")
        if self.budget is None:
            raise ValueError("ExpectedAttention: budget is required")
        self.budget = replace(Budget.of(self.budget), protect_sink=self.n_sink)
        super().__post_init__()

    def future_query_moments(self, ctx: StepCtx, kv: LayerKV) -> tuple[Tensor, Tensor | None]:
        """μ̄ (B, H, D) and Σ̄ (B, H, D, D) | None of the queries at the next F positions."""
        q, pos = ctx.q.float(), ctx.position_ids                                      # (B, H, S, D), (B, S)
        b, h, s, d = q.shape
        if ctx.rope is not None:
            gain = ctx.rope(torch.eye(1, d, device=q.device)[None, None], pos.new_zeros(1, 1))[0, 0, 0, 0]
            q = ctx.rope(q, -pos) / gain ** 2                                          # pre-RoPE queries
        real = kv.valid_mask()[:, 0, -s:]                                              # (B, S)
        weight = (real & ~protected_slots(real[:, None], self.n_sink, 0)[:, 0]).float()
        mu, cov = query_statistics(q, weight)
        rot = average_rotation(ctx.rope, pos[:, -1] + 1, self.n_future_positions, d)[:, None]   # (B, 1, D, D)
        mu = (rot @ mu[..., None]).squeeze(-1)
        return mu, (rot @ cov @ rot.transpose(-1, -2) if self.use_covariance else None)

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """(B, H, T) expected attention of each query head (sinks and padding score 0; sinks are protected)."""
        mu, cov = self.future_query_moments(ctx, kv)
        g = ctx.q.shape[1] // kv.k.shape[1]
        k = kv.k.float().repeat_interleave(g, dim=1)                                   # (B, H, T, D)
        valid = kv.valid_mask()
        scored = (valid & ~protected_slots(valid, self.n_sink, 0)).repeat_interleave(g, dim=1)
        logits = expected_logits(k, mu, cov, ctx.scaling).masked_fill(~scored, NEG_INF)
        scores = logits.softmax(dim=-1).nan_to_num(0.0)                               # (B, H, T)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * kv.v.float().norm(dim=-1).repeat_interleave(g, dim=1)
        return scores
