"""Full cache: every decode step attends every cached token (the baseline every policy is compared to).

Rule: softmax([q] [K]ᵀ + causal mask) [V] over the whole cache; nothing is evicted or selected.
Public: T. Cost per step and layer: two fixed-mask matmuls (open |q| + |P| elements) and one softmax
over T (≈ 1.25 kB per element and 9·⌈log2 T⌉ + 34 rounds). This is ``MPCPolicy``'s default prefill and decode (``full_attention``).
"""
from __future__ import annotations

from mpcache.policy.base import MPCPolicy, register


class FullCache(MPCPolicy):
    """Attend over every cached token (``MPCPolicy``'s default prefill and decode)."""

    name = "full"


register("full", FullCache)
