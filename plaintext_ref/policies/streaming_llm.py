"""StreamingLLM: attention sinks plus a recent window (Xiao et al., ICLR 2024, arXiv 2309.17453).

Rule: keep S = {first n_sink tokens} ∪ {most recent tokens}, evicting the middle after the prompt and again
after every decode step, so each layer holds at most n_sink + n_recent slots between steps.
Defaults: n_sink = 4 (``start_size=4`` in mit-han-lab/streaming-llm), n_recent = 2000 (``recent_size`` in
its ``run_streaming_llama.py``). A ``budget`` (int tokens, float fraction kept, or Budget) replaces
n_sink + n_recent as the total kept; the sinks stay protected and the rest goes to the most recent tokens
(kvpress ``StreamingLLMPress(compression_ratio, n_sink)``).

Deviations:
1. Positions stay the original ones (kvpress ``StreamingLLMPress``); the paper re-rotates kept keys to
   in-cache positions 0..|cache|−1 (pos-shift), not done here.
2. Eviction follows the decode step's attention (the runtime's timing), so a step attends
   n_sink + n_recent kept slots plus the new token; the original evicts before appending (one fewer).

GQA: the same slots for every layer and head. Needs nothing (no q, no attention weights).
Built on ``TopKEviction``: score = recency (slot index), sinks protected.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from plaintext_ref.policies.base import Budget, LayerKV, StepCtx, TopKEviction


@dataclass
class StreamingLLM(TopKEviction):
    """StreamingLLM: keep the first ``n_sink`` and the most recent tokens.

    Parameters
    ----------
    n_sink : int, default 4, attention-sink tokens always kept.
    n_recent : int, default 2000, most recent tokens kept (the new token included); ignored if budget is given.
    budget : optional total kept (sinks included), see ``Budget.of``.
    """

    n_sink: int = 4
    n_recent: int = 2000

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.n_recent < 1:
            raise ValueError(f"StreamingLLM needs n_sink >= 0 and n_recent >= 1, got {self.n_sink}, {self.n_recent}")
        total = Budget(tokens=self.n_sink + self.n_recent) if self.budget is None else Budget.of(self.budget)
        self.budget = replace(total, protect_sink=self.n_sink, protect_recent=0)
        self.evict_on = "both"
        super().__post_init__()

    def score(self, ctx: StepCtx, kv: LayerKV) -> Tensor:
        """Recency: slot t scores t, so top-k keeps the latest slots after the protected sinks."""
        return torch.arange(kv.n, device=kv.k.device, dtype=torch.float32).expand(kv.k.shape[:3])
