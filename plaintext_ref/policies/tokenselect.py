"""TokenSelect: token-level selection by per-head soft voting (Wu et al., arXiv 2411.02886).

Rule (repo pzs19/TokenSelect, ``patcher/token_retrieval.py``): for the mean query q̄_h of the current step
(or chunk), every candidate slot j ∈ [n_init, n − n_local) gets the per-head criticality
c_{h,j} = q̄_h·k_{h//G, j} (raw dot product, no 1/√D) and the soft vote S_j = Σ_h softmax_j(c_{h,j}) over
all H query heads (optionally max-pooled over j). The step attends [0, n_init) ∪ top_k(S) ∪ [n − n_local, n);
when n ≤ n_init + top_k + n_local it attends everything. Selection cache: if cos(q̄_t, q̄_{t−1}) ≥ θ the
previous top-k is reused. Nothing is evicted.

Defaults: n_init = 128, n_local = 512, top_k = 2048 (``config/llama-token-retrieval.yaml``); no pooling
(kernel sizes are per dataset in ``benchmark/config/dataset2ks_*.json``); selection cache off, as in the
released ``patch()`` (``QUERY_CACHE=False``; the paper's θ is 0.9).

Deviations:
1. Keys keep their original RoPE positions; the authors store un-rotated keys and rotate the retrieved
   sequence to compact positions (``QUERY_ROTATE=True``, InfLLM-style extrapolation). Within the model's
   context the original positions are the model's own.
2. ``budget`` (int tokens, float fraction of the cache, or Budget) is the total attended, n_init and n_local
   included: top_k = budget − n_init − n_local (a budget below n_init + n_local is raised to it).
3. The selection cache compares q̄ flattened over all heads (one cosine per sequence); the prompt itself
   (one-shot prefill here, chunks of 512 in the authors' SGLang code) attends densely.

GQA: one index set per layer shared by every head; query head h reads KV head h // G (the ``repeat_kv``
order). Needs: post-RoPE queries and keys (``kernels.head_logits``, Triton on CUDA); no attention weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.kernels import head_logits
from plaintext_ref.policies.base import NEG_INF, Budget, KVPolicy, LayerKV, StepCtx, protected_slots

AUX_KEY = "tokenselect"


def soft_votes(q_bar: Tensor, k: Tensor, candidates: Tensor) -> Tensor:
    """S_j = Σ_h softmax_j(q̄_h·k_{h//G, j}) over candidate slots: (B, H, D), (B, Hkv, T, D), (B, T) -> (B, T)."""
    logits = head_logits(q_bar, k).masked_fill(~candidates[:, None, :], NEG_INF)   # (B, H, T)
    return logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=1)


@dataclass
class TokenSelect(KVPolicy):
    """TokenSelect: sinks + local window + top-k slots by soft voting, one set per layer.

    Parameters
    ----------
    budget : optional total attended per step (see deviation 2); default n_init + top_k + n_local.
    n_init, n_local, top_k : int, defaults 128, 512, 2048: sink slots, local window, voted slots.
    pool_kernel : int, default 1 (off), width of the max-pool over S_j.
    reuse_threshold : float or None (default, off), θ of the selection cache.
    """

    budget: Budget | int | float | None = None
    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    pool_kernel: int = 1
    reuse_threshold: float | None = None
    needs = frozenset({"q"})

    def __post_init__(self) -> None:
        if min(self.n_init, self.n_local, self.top_k) < 0 or self.pool_kernel < 1:
            raise ValueError(f"TokenSelect needs n_init, n_local, top_k >= 0 and pool_kernel >= 1; got "
                             f"{self.n_init}, {self.n_local}, {self.top_k}, {self.pool_kernel}")
        default = Budget(tokens=self.n_init + self.top_k + self.n_local)
        total = default if self.budget is None else Budget.of(self.budget)
        self.budget = replace(total, protect_sink=self.n_init, protect_recent=self.n_local)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """(B, Hkv, S, T) bool after the prompt; None (dense) at prefill or when the budget covers the cache."""
        keep = self.budget.resolve(ctx.layer_idx, ctx.num_layers, kv.n)
        if ctx.phase == "prefill" or keep >= kv.n:
            return None
        b, hkv, t = kv.k.shape[:3]
        valid = kv.valid_mask()[:, 0]                                        # (B, T) token validity
        protect = protected_slots(valid, self.n_init, self.n_local)         # (B, T)
        q_bar = ctx.q.float().mean(dim=2)                                    # (B, H, D)
        chosen = self.vote(q_bar, kv.k, valid & ~protect, keep - self.n_init - self.n_local)
        state = kv.aux.get(AUX_KEY)
        if state is not None and self.reuse_threshold is not None:
            prev_q, prev_chosen = state
            reuse = F.cosine_similarity(q_bar.flatten(1), prev_q.flatten(1), dim=-1) >= self.reuse_threshold
            prev_chosen = F.pad(prev_chosen, (0, t - prev_chosen.shape[-1]), value=False)
            chosen = torch.where(reuse[:, None], prev_chosen, chosen)
        kv.aux[AUX_KEY] = (q_bar, chosen)
        mask = protect | chosen                                              # (B, T)
        return mask[:, None, None, :].expand(b, hkv, ctx.q.shape[2], t)

    def vote(self, q_bar: Tensor, k: Tensor, candidates: Tensor, top_k: int) -> Tensor:
        """(B, T) bool: the ``top_k`` candidates with the highest (pooled) soft vote."""
        score = soft_votes(q_bar, k, candidates)                             # (B, T)
        if self.pool_kernel > 1:
            pooled = F.max_pool1d(score[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
            score = pooled[:, 0, :score.shape[-1]]
        score = score.masked_fill(~candidates, NEG_INF)
        top = score.topk(min(top_k, score.shape[-1]), dim=-1).indices
        return torch.zeros_like(candidates).scatter_(-1, top, True) & candidates
