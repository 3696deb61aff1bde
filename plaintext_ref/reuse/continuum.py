"""Continuum: tool-call-aware KV time-to-live and program-level FCFS for multi-turn agents (Li et al., arXiv
2511.02230; preview ``Hanchenli/vllm-continuum``); read from the paper, no code read.

Rule. When an agent's turn ends in a call to tool x, its KV (the whole context so far) is **pinned** in GPU memory
for a time-to-live
    τ* = argmax_τ [ P_x(D ≤ τ) · Benefit(r) − Cost(τ, r) ],
with P_x the empirical CDF of tool x's past durations (an exponential prior of mean ``prior_mean`` until
``min_samples`` durations are known), Benefit(r) the time saved if the program returns while pinned (re-prefill of
its context plus the queueing delay it skips), and Cost(τ, r) = ``cost_weight`` · (pinned tokens / memory) ·
E[min(D, τ)], the machine time lost to memory that is held but idle. On expiry the entry becomes an ordinary
evictable (LRU) cache entry; under memory pressure pinned entries are unpinned, latest expiry first (iterative
unpinning). Scheduling is **program-level FCFS**: a returning turn keeps its program's first arrival time as its
priority, so programs finish in the order they came.

Defaults: prior_mean 5 s, min_samples 5, cost_weight 1.0 (a fraction f of memory held for t seconds costs f·t
seconds of the whole machine) — ours; the paper states the form of the objective, not these constants.

Deviations:
1. Cost uses E[min(D, τ)] (a pin is released as soon as the tool returns) rather than τ.
2. τ* is searched over {0} ∪ the observed durations (the CDF only changes there) or, at cold start, prior quantiles.

Where it runs: :mod:`plaintext_ref.reuse.continuum_sim` (a deterministic discrete-event simulator of a serving
engine and multi-turn agent programs) calls :meth:`ToolTTL.ttl` at every turn end and :meth:`ToolTTL.observe` at
every tool return. Needs nothing from the model: tool names, timestamps, token counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ToolTTL:
    """Online per-tool TTL rule.

    Parameters
    ----------
    prior_mean : float > 0, seconds, mean of the exponential prior used at cold start.
    min_samples : int >= 1, durations needed before the empirical CDF replaces the prior.
    cost_weight : float >= 0, weight λ of the memory-time cost.
    """

    prior_mean: float = 5.0
    min_samples: int = 5
    cost_weight: float = 1.0
    history: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prior_mean <= 0 or self.min_samples < 1 or self.cost_weight < 0:
            raise ValueError(f"ToolTTL: prior_mean > 0, min_samples >= 1, cost_weight >= 0 required; got "
                             f"{self.prior_mean}, {self.min_samples}, {self.cost_weight}")

    def observe(self, tool: str, duration: float) -> None:
        self.history.setdefault(tool, []).append(float(duration))

    def _stats(self, tool: str, tau: float) -> tuple[float, float]:
        """(P(D ≤ τ), E[min(D, τ)]) under the empirical distribution or the exponential prior."""
        seen = self.history.get(tool, [])
        if len(seen) >= self.min_samples:
            return sum(d <= tau for d in seen) / len(seen), sum(min(d, tau) for d in seen) / len(seen)
        if math.isinf(tau):
            return 1.0, self.prior_mean
        p = 1.0 - math.exp(-tau / self.prior_mean)
        return p, self.prior_mean * p

    def candidates(self, tool: str) -> list[float]:
        seen = self.history.get(tool, [])
        if len(seen) >= self.min_samples:
            return [0.0] + sorted(set(seen))
        return [0.0] + [-self.prior_mean * math.log(1 - q) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)]

    def ttl(self, tool: str, benefit_s: float, memory_fraction: float) -> float:
        """τ* for a context worth ``benefit_s`` seconds holding ``memory_fraction`` of the KV memory."""
        best, best_value = 0.0, 0.0
        for tau in self.candidates(tool):
            p, held = self._stats(tool, tau)
            value = p * benefit_s - self.cost_weight * memory_fraction * held
            if value > best_value + 1e-12:
                best, best_value = tau, value
        return best
