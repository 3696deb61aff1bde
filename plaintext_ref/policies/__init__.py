"""KV-cache policies for the plaintext reference, one method per module, and their registry.

``POLICIES`` maps a name to a policy class and is built from explicit imports; ``get_policy(name, **kw)``
instantiates one. Registering a name twice raises ValueError.
"""
from __future__ import annotations

from plaintext_ref.policies.base import (
    Budget,
    KVPolicy,
    LayerKV,
    Scorer,
    StepCtx,
    TopKEviction,
    gather_kv,
    gqa_aggregate,
    keep_slots,
    protected_slots,
    window_attention,
)
from plaintext_ref.policies.delta import DELTA
from plaintext_ref.policies.expected_attention import ExpectedAttention
from plaintext_ref.policies.full import FullCache
from plaintext_ref.policies.h2o import H2O
from plaintext_ref.policies.keyformer import Keyformer
from plaintext_ref.policies.knorm import KNorm
from plaintext_ref.policies.mpcache import MPCache
from plaintext_ref.policies.pyramidkv import PyramidKV
from plaintext_ref.policies.quest import Quest
from plaintext_ref.policies.razor_attention import RazorAttention
from plaintext_ref.policies.shadowkv import ShadowKV
from plaintext_ref.policies.snapkv import SnapKV
from plaintext_ref.policies.streaming_llm import StreamingLLM
from plaintext_ref.policies.think import ThinK
from plaintext_ref.policies.tokenselect import TokenSelect
from plaintext_ref.policies.tova import TOVA
from plaintext_ref.policies.windowkv import WindowKV
from plaintext_ref.policies.kvmerger import KVMerger
from plaintext_ref.policies.nosa import NOSA
from plaintext_ref.policies.kivi import KIVI
from plaintext_ref.policies.mikv import MiKV
from plaintext_ref.policies.vidkv import VidKV
from plaintext_ref.policies.trim_kv import TrimKV

POLICIES: dict[str, type[KVPolicy]] = {}


def register(name: str, cls: type[KVPolicy]) -> None:
    """Add ``cls`` under ``name``; a duplicate name raises ValueError."""
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered ({POLICIES[name].__name__})")
    POLICIES[name] = cls


register("full", FullCache)
register("streaming_llm", StreamingLLM)
register("mpcache", MPCache)
register("h2o", H2O)
register("tova", TOVA)
register("snapkv", SnapKV)
register("pyramidkv", PyramidKV)
register("knorm", KNorm)
register("quest", Quest)
register("tokenselect", TokenSelect)
register("shadowkv", ShadowKV)
register("delta", DELTA)
register("keyformer", Keyformer)
register("expected_attention", ExpectedAttention)
register("think", ThinK)
register("razor_attention", RazorAttention)
register("windowkv", WindowKV)
register("kvmerger", KVMerger)
register("nosa", NOSA)
register("kivi", KIVI)
register("mikv", MiKV)
register("vidkv", VidKV)
register("trim_kv", TrimKV)


def get_policy(name: str, **kwargs) -> KVPolicy:
    """Instantiate the policy registered as ``name`` with ``kwargs`` (its dataclass fields)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


__all__ = ["Budget", "DELTA", "ExpectedAttention", "FullCache", "H2O", "KNorm", "KVPolicy", "Keyformer", "LayerKV",
           "MPCache", "POLICIES", "PyramidKV", "Quest", "RazorAttention", "Scorer", "ShadowKV", "SnapKV", "StepCtx",
           "StreamingLLM", "TOVA", "ThinK", "TokenSelect", "TopKEviction", "WindowKV", "gather_kv",
           "get_policy", "gqa_aggregate", "keep_slots", "protected_slots", "register", "window_attention"]
__all__ += ["KVMerger", "NOSA"]
__all__ += ["KIVI", "MiKV", "VidKV", "TrimKV"]
