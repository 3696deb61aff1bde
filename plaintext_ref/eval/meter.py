"""Effective budget of a KV policy: the slots it keeps and the slots it attends, measured per decode step.

Budgets mean different things across methods (kv_methods.md §0 and §17): a "5 %" row may keep 5 % of the
prompt, attend 5 % of it, or attend a protected window that alone exceeds 5 %. :class:`Metered` wraps any
policy, delegates every hook to it unchanged, and counts at each decode step and layer, per batch row:

* ``kept`` — valid cache slots at attention time (the new token included), mean over KV heads;
* ``attended`` — slots the step's query may attend: valid ∧ the policy's ``select`` mask (causal is
  implied at decode), mean over the heads the mask is given for.

Counts are summed on the device and read once (:meth:`Metered.summary`), so metering adds no host syncs.
A policy whose ``read`` returns rewritten keys (merging, quantization) is counted by slots, not bytes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from plaintext_ref.policies.base import KVPolicy, LayerKV, StepCtx


class Metered(KVPolicy):
    """``inner`` with kept / attended slot counts per decode step (see module docstring)."""

    def __init__(self, inner: KVPolicy) -> None:
        self.inner = inner
        self.needs = inner.needs
        self._kept: Tensor | None = None       # (B,) sum over (step, layer) of mean-over-heads kept slots
        self._attended: Tensor | None = None   # (B,) same for attended slots
        self._events = 0                        # (step, layer) pairs counted

    def post_init_from_model(self, model: nn.Module) -> None:
        self.inner.post_init_from_model(model)

    def shares_with(self, layer_idx: int, num_layers: int) -> int | None:
        return self.inner.shares_with(layer_idx, num_layers)

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        return self.inner.on_prefill(ctx, kv)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        return self.inner.on_append(ctx, kv)

    def read(self, ctx: StepCtx, kv: LayerKV):
        return self.inner.read(ctx, kv)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        mask = self.inner.select(ctx, kv)
        if ctx.phase == "decode":
            self._count(kv, mask)
        return mask

    def _count(self, kv: LayerKV, mask: Tensor | None) -> None:
        valid = kv.valid_mask()                                              # (B, Hkv, T)
        b, hkv, t = valid.shape
        kept = valid.sum(-1).float().mean(-1)                                # (B,)
        if mask is None:
            attended = kept
        else:
            allowed = valid[:, :, None, None, :] & mask.reshape(b, hkv, -1, mask.shape[-2], t)
            attended = allowed[..., -1, :].sum(-1).float().flatten(1).mean(-1)   # last query row, (B,)
        self._kept = kept if self._kept is None else self._kept + kept
        self._attended = attended if self._attended is None else self._attended + attended
        self._events += 1

    def summary(self) -> list[dict[str, float]]:
        """Per batch row: mean kept and attended slots per (decode step, layer); empty dicts if none ran."""
        if self._events == 0:
            return []
        kept = (self._kept / self._events).tolist()
        attended = (self._attended / self._events).tolist()
        return [{"kept": k, "attended": a} for k, a in zip(kept, attended)]
