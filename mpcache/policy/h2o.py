"""H2O-style static eviction on shares (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

Rule: once after the prompt, s_j = Σ_{h} Σ_{i < T0} P[h, i, j] (attention accumulated from EVERY prompt
query, i.e. an observation window of the whole prompt); keep the ⌊K·recent_fraction⌋ most recent tokens
(public, protected) plus the top heavy hitters, K tokens in all, in position order (same oblivious top-K
and one-hot compaction as MPCache's static step). Decode attends the kept tokens plus generated ones.
Defaults: budget 0.2 of the prompt, recent_fraction 0.5 (FMInference/H2O heavy 10 % + recent 10 %).
Deviations from the twin ``plaintext_ref.policies.h2o``:
1. Static: evicts once after the prompt, not after every decode step (a per-step eviction needs a secure
   top-k per step and per layer; the cache then grows by one token per step).
2. One kept set per layer (granularity "layer": Σ over all heads), not per KV head.
Public: T0, K, the recent count. Secret: [s], [E]. Cost: as MPCache's static step, window W = T0.
"""
from __future__ import annotations

import math

import torch

from mpcache.budget import check_budget, kept_tokens
from mpcache.policy.base import Meter, StaticEviction, register


class H2O(StaticEviction):
    name = "h2o"

    def __init__(self, meter: Meter | None = None, budget: float = 0.2, recent_fraction: float = 0.5) -> None:
        check_budget(budget)
        if not 0 <= recent_fraction <= 1:
            raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction}")
        self.budget, self.recent_fraction = budget, recent_fraction
        super().__init__(meter)

    def n_keep(self, prompt_len: int) -> int:
        k = kept_tokens(self.budget, prompt_len)
        return max(1, min(prompt_len, k))

    def window(self, prompt_len: int) -> int:
        return prompt_len

    def protected(self, prompt_len: int) -> torch.Tensor:
        recent = math.floor(self.n_keep(prompt_len) * self.recent_fraction)
        return (torch.arange(prompt_len) >= prompt_len - recent).long()


register("h2o", H2O)
