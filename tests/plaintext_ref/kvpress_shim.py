"""Import kvpress 0.5.5 on our transformers (5.24) for the parity tests only; the package never imports it.

Why: kvpress 0.5.5 pins ``transformers<5.3`` and is installed with ``pip install --no-deps`` (the Makefile),
next to ``cachetools<6 fire<0.7 six termcolor`` (the ``test`` extra). On newer transformers two things break,
and :func:`load_kvpress` patches them in memory without editing kvpress's files:

1. ``import kvpress`` imports ``datasets`` (only DuoAttentionPress and ExpectedAttentionStatsPress load data
   with it). When ``datasets`` is not installed a stub module is registered whose ``load_dataset`` raises.
2. ``BasePress.forward_hook`` reads ``kwargs["past_key_values"]`` and ``kwargs["cache_position"]``. Since
   transformers 5.3 the attention layer receives the cache as ``cache`` and no ``cache_position``. The wrapper
   adds ``past_key_values = kwargs["cache"]`` and rebuilds ``cache_position = arange(L − q_len, L)``, L being
   the layer's cache length after this forward's append: the value older transformers passed for a
   contiguous cache, so ``is_prefilling`` (``cache_position[-1] + 1 == q_len``) keeps its meaning.

Not covered: presses that override ``forward_hook`` and read these keys themselves (DecodingPress,
PrefillDecodingPress, DMSPress, CAMPress, KVzipPress, FastKVzipPress). With the shim, results were identical
to kvpress on its pinned transformers 5.2 (/work/shared/research/env_probe.md §6).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import torch

_MARK = "_mpcache_shim"


def _stub_datasets() -> None:
    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return
    stub = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ImportError("datasets is stubbed for the kvpress parity tests (tests/plaintext_ref/kvpress_shim.py)")
    stub.load_dataset = load_dataset
    sys.modules["datasets"] = stub


def _with_legacy_kwargs(hook):
    """Wrap ``BasePress.forward_hook`` so it finds ``past_key_values`` and ``cache_position`` again."""
    @functools.wraps(hook)
    def forward_hook(self, module, input, kwargs, output):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and "cache_position" not in kwargs:
            q_len = kwargs["hidden_states"].shape[1]
            total = cache.layers[module.layer_idx].keys.shape[-2]
            position = torch.arange(total - q_len, total, device=kwargs["hidden_states"].device)
            kwargs = {**kwargs, "cache_position": position}
        return hook(self, module, input, {**kwargs, "past_key_values": cache}, output)
    setattr(forward_hook, _MARK, True)
    return forward_hook


def load_kvpress() -> types.ModuleType:
    """The patched ``kvpress`` module (idempotent). Raises ImportError when kvpress is not installed."""
    _stub_datasets()
    kvpress = importlib.import_module("kvpress")
    base = kvpress.BasePress
    if not getattr(base.forward_hook, _MARK, False):
        base.forward_hook = _with_legacy_kwargs(base.forward_hook)
    return kvpress
