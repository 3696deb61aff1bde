"""SnapKV on shares: the last prompt queries vote for the prefix (Li et al., NeurIPS 2024, arXiv 2404.14469).

Rule: once after the prompt, the window is the last w prompt queries; each prefix token j < T0 − w gets
s_j = Σ_h Σ_{i ∈ window} P[h, i, j], smoothed by average pooling (kernel 7, stride 1, zero padding 3)
over the prefix; keep the whole window (public, protected) plus the top prefix tokens, K in all, in
position order (MPCache's oblivious top-K and one-hot compaction). Decode attends the kept tokens plus
generated ones (generated tokens are never evicted).
Defaults: window 32, kernel 7 (SnapKV LongBench configs), budget 2048 tokens (an int) or a fraction of
the prompt (a float ≤ 1).
Deviations from the twin ``plaintext_ref.policies.snapkv``:
1. Average pooling instead of the configs' max pooling: a max over 7 secret neighbours costs 3 levels of
   comparisons per token, the average is local (and its 1/7 is omitted: ranking-invariant).
2. One kept set per layer (Σ over all heads), not per KV head.
Public: T0, w, K. Secret: [s], [E]. Cost: as MPCache's static step with W = w.
"""
from __future__ import annotations

import torch

from mpcache.budget import check_budget, kept_tokens
from mpcache.policy.base import Meter, StaticEviction, register, window_scores
from protocols.compat import crypten
from protocols.types import Secret


class SnapKV(StaticEviction):
    name = "snapkv"

    def __init__(self, meter: Meter | None = None, budget: float = 2048, window_size: int = 32,
                 kernel_size: int = 7) -> None:
        check_budget(budget)
        if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"need window_size >= 1 and an odd kernel_size, got {window_size}, {kernel_size}")
        self.budget, self.window_size, self.kernel_size = budget, window_size, kernel_size
        super().__init__(meter)

    def window(self, prompt_len: int) -> int:
        return min(self.window_size, prompt_len)

    def n_keep(self, prompt_len: int) -> int:
        k = kept_tokens(self.budget, prompt_len)
        return max(self.window(prompt_len), min(prompt_len, k))

    def protected(self, prompt_len: int) -> torch.Tensor:
        return (torch.arange(prompt_len) >= prompt_len - self.window(prompt_len)).long()

    def pool_width(self) -> int:
        return self.kernel_size

    def score(self, p_win: Secret) -> Secret:
        s = window_scores(p_win)  # (B, T0)
        n = s.shape[-1] - p_win.shape[-2]  # prefix length
        if n < 1:
            return s
        half = self.kernel_size // 2
        zero = s[..., :1] * 0
        padded = crypten.cat([zero] * half + [s[..., :n]] + [zero] * half, dim=-1)
        pooled = padded[..., :n]
        for j in range(1, self.kernel_size):
            pooled = pooled + padded[..., j:j + n]
        return crypten.cat([pooled, s[..., n:]], dim=-1)


register("snapkv", SnapKV)
