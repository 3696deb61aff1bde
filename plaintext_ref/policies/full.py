"""Full cache: the baseline every KV method is compared against (kv_methods.md §1.1).

Keeps every slot and restricts nothing; with it ``plaintext_ref.runtime.generate`` must reproduce HF greedy
``model.generate`` token for token. Needs nothing from the model. kvpress equivalent: ``press=None``.
"""
from __future__ import annotations

from dataclasses import dataclass

from plaintext_ref.policies.base import KVPolicy


@dataclass
class FullCache(KVPolicy):
    """Full cache: keep all T slots at every layer and step (no parameters)."""
