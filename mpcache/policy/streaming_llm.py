"""StreamingLLM on shares: attention sinks plus a recent window (Xiao et al., ICLR 2024, arXiv 2309.17453).

Rule: keep the first ``n_sink`` and the last ``n_recent`` tokens. The kept positions depend only on
public lengths, so eviction is a PUBLIC row selection of the fixed-mask K/V (``FixedMaskOperand.select``:
no opening, no secret selection). As in the twin (``plaintext_ref.policies.streaming_llm``) a step
attends the kept tokens plus the new one, then evicts: after the prompt and after every decode step the
cache holds at most n_sink + n_recent tokens.
Defaults: n_sink 4, n_recent 2000 (mit-han-lab/streaming-llm). GQA: the same slots for every head.
Deviation: original positions are kept (no pos-shift re-rotation), as the twin.
Public: every kept position. Cost: full attention over ≤ n_sink + n_recent + 1 tokens; eviction is free
(one dealer message under the separate dealer).
"""
from __future__ import annotations

import torch

from mpcache.cache import SecretKVCache
from mpcache.policy.base import Meter, MPCPolicy, full_attention, register
from protocols.truncation import Untruncated
from protocols.types import Secret


class StreamingLLM(MPCPolicy):
    name = "streaming_llm"

    def __init__(self, meter: Meter | None = None, n_sink: int = 4, n_recent: int = 2000) -> None:
        if n_sink < 0 or n_recent < 1:
            raise ValueError(f"need n_sink >= 0 and n_recent >= 1, got {n_sink}, {n_recent}")
        self.n_sink, self.n_recent = n_sink, n_recent
        super().__init__(meter)

    def _evict(self, cache: SecretKVCache) -> None:
        t = cache.length
        if t <= self.n_sink + self.n_recent:
            return
        keep = torch.cat([torch.arange(self.n_sink), torch.arange(t - self.n_recent, t)])
        cache.replace(cache.keys.select(2, keep), cache.values.select(2, keep))

    def after_prefill(self, layer: int, cache: SecretKVCache, p_win: Secret | None,
                      partner: SecretKVCache | None) -> None:
        self._evict(cache)

    def decode(self, layer: int, q: Secret, cache: SecretKVCache, partner: SecretKVCache | None) -> Secret | Untruncated:
        out, _ = full_attention(q, cache, None, self.meter)
        self._evict(cache)
        return out

    def describe(self, prompt_len: int, n_new: int = 1) -> dict:
        kept = min(prompt_len, self.n_sink + self.n_recent)
        t = prompt_len + max(n_new - 1, 0)
        attended = min(t, self.n_sink + self.n_recent + (1 if n_new > 1 else 0))
        return {"policy": self.name, "cache_after_prefill": kept, "attended_last_step": attended,
                "budget": round(attended / t, 4), "n_sink": self.n_sink, "n_recent": self.n_recent}


register("streaming_llm", StreamingLLM)
