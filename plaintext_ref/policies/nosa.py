"""NOSA-style block selection with host-offload accounting, training-free (after Huang et al., arXiv 2510.13602,
"NOSA: Native and Offloadable Sparse Attention"; repo thunlp/NOSA).

Based on https://arxiv.org/abs/2510.13602, as summarised in kv_methods.md §8.2.

NOSA pretrains a model whose sparse attention splits each step's block selection into a query-aware part and a
query-agnostic part, so that most selected blocks were already selected at the previous step and the KV cache
can live in host memory. The published checkpoints are 1B–8B NOSA pretrains; this module applies the same
selection and offload rule, training-free, to a model trained with dense attention (SmolLM2).

Rule, per layer and KV head at each decode step (the prompt attends densely). Slots are cut into blocks of P,
block b = slots [bP, (b+1)P); k = budget // P blocks are attended:
1. forced: the last ``local_blocks`` blocks (sliding window, the current slot's block included) and the first
   ``init_blocks`` (attention sink);
2. query-aware Γ_q: the top ``query_blocks`` other blocks by s_q(b) = max_{w ∩ b ≠ ∅} Σ_{g,s} softmax_w(q_{g,s}·k̄_w·scaling),
   k̄_w the mean key of window w (``compress_kernel`` slots, stride ``compress_stride``): InfLLM-v2's stage-1
   compressed attention, max-pooled per block;
3. query-agnostic Γ_a: the other k − |forced| − |Γ_q| blocks by a score that never changes once a block is full:
   s_a(b) = mean_{j∈b} ‖v_j‖ (``agnostic="value_norm"``) or s_a(b) = b (``"recency"``).
Attention reads only the selected blocks (a key mask); nothing is evicted.

Locality (the paper's constraint): as s_a is fixed, R = the top-|Γ_a| non-forced blocks by s_a is contained in
every step's selection (each block of R is in Γ_q or among the top-|Γ_a| of the rest), and a block leaving the
window was selected the step before. Hence with an int budget at most ``query_blocks`` selected blocks per step
and KV head were neither selected at the previous step nor created since: the transfer from host memory is
bounded by ``query_blocks`` blocks, and γ(t) = |Γ(t) ∩ Γ(t−1)| / |Γ(t)| ≥ 1 − (query_blocks + 1)/|Γ(t)|.

Offload accounting (nothing is moved; the host store is modelled): blocks live in host memory; the device holds
the blocks selected at the previous step plus blocks created since (written on the device). A step fetches
fetched(t) = |Γ(t) ∖ (Γ(t−1) ∪ created)| blocks per KV head, P·D·2·element_size bytes each (K and V). At the
first decode step the device holds only the forced blocks (the prompt has just been offloaded), so that step
is the initial fill. Every sparse step appends (selected, overlap, fetched) to ``LayerKV.aux["nosa"]``;
:func:`transfer_stats` summarises a cache (γ, bytes and blocks fetched per step, the worst step).

Training-free, and what that changes: NOSA's model learned to answer from a selection that is half query-
agnostic, and its eviction head (cis = A ⊙ softplus(W_δ·v)) and compressed keys (CompressK) were trained for
it. Here the model never saw sparse attention, the agnostic half is a heuristic (‖v‖ or recency) and the
compressed keys are plain means, so quality at a given budget should sit below NOSA's and below a purely
query-aware selector of the same budget (Quest, InfLLM); the transfer bound is a property of the rule and holds
exactly. This is a "NOSA-style policy", not NOSA.

Defaults (``benchmarks/Efficiency/proxy_modeling_nosa.py`` per kv_methods.md §8.2): P = 64, init_blocks 1,
local window 1024 tokens (16 blocks), query_blocks 16 (``select_blocks``), topk 64 blocks (budget 4096 tokens),
compress kernel 32, stride 16.

Deviations:
1. Learned CompressK → mean keys; learned eviction head → ‖v‖ (or recency); blocks are scored from the windows
   overlapping them (max), the released code max-pools compressed scores per block.
2. A float budget is the fraction of the current cache (``Budget.of``); k may then grow by a block between
   steps, which can add one fetch beyond the bound. When k is below the forced part, blocks go in the order
   window (at least the current block, even for k = 0), sink, query-aware, query-agnostic.
3. Prefill and chunked forwards attend densely; decode steps whose budget covers every block attend densely
   too and are not counted in the statistics.
4. Blocks are cut over slots; under left padding a block without a real slot is never selected or counted.

GQA: one block set per KV head; s_q sums the softmax over the G query heads of the group (InfLLM-v2 shares the
selection within a group). Needs: post-RoPE queries (``needs = {"q"}``), cached keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import NEG_INF, Budget, KVPolicy, LayerKV, StepCtx

AUX_KEY = "nosa"
Agnostic = Literal["value_norm", "recency"]


@dataclass
class NOSAState:
    """One layer's offload record. prev: (B, Hkv, C) bool blocks selected at the last sparse step; history: per
    sparse step (selected, overlap, fetched) block counts, each (B, Hkv) int64; bytes_per_block: K and V
    bytes of one block of one KV head, P·2D·element_size."""

    prev: Tensor
    bytes_per_block: int
    history: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


def transfer_step(prev: Tensor, sel: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Block counts of one step: prev (B, Hkv, C_prev) and sel (B, Hkv, C) bool selections, real (B, Hkv, C)
    blocks holding a real slot; blocks C_prev..C−1 were created since. Returns selected |Γ(t)|, overlap
    |Γ(t) ∩ Γ(t−1)| and fetched |Γ(t) ∖ (Γ(t−1) ∪ created)|, each (B, Hkv) int64."""
    c, c_prev = sel.shape[-1], prev.shape[-1]
    created = torch.arange(c, device=sel.device) >= c_prev
    prev = F.pad(prev, (0, c - c_prev), value=False)
    sel = sel & real
    return sel.sum(-1), (sel & prev).sum(-1), (sel & ~prev & ~created).sum(-1)


def transfer_stats(layers: Iterable[LayerKV | None]) -> dict[str, float]:
    """Summary of the NOSA records of a cache's layers, e.g. ``transfer_stats(map(cache.kv, range(L)))``.

    overlap: mean γ(t) over layers, batch rows, KV heads and steps (the paper's selection overlap);
    fetched_fraction: Σ fetched / Σ selected; selected_blocks / fetched_blocks / bytes_per_step: per step and
    sequence, summed over layers and KV heads; max_fetched_after_first: the most blocks one KV head fetched in
    one step after the initial fill (≤ query_blocks for an int budget); steps: sparse steps of the longest layer.
    """
    states = [kv.aux[AUX_KEY] for kv in layers if kv is not None and AUX_KEY in kv.aux]
    states = [s for s in states if s.history]
    if not states:
        return {"steps": 0}
    steps = max(len(s.history) for s in states)
    rows = states[0].prev.shape[0]
    selected = fetched = n_bytes = overlap_sum = 0.0
    n_overlap, worst = 0, 0
    for s in states:
        sel, ov, fe = (torch.stack(x).double() for x in zip(*s.history))          # (steps, B, Hkv) each
        selected += float(sel.sum())
        fetched += float(fe.sum())
        n_bytes += float(fe.sum()) * s.bytes_per_block
        overlap_sum += float((ov / sel.clamp(min=1)).sum())
        n_overlap += sel.numel()
        worst = max(worst, int(fe[1:].max()) if len(fe) > 1 else 0)
    per_step = steps * rows
    return {"steps": steps, "overlap": overlap_sum / n_overlap, "fetched_fraction": fetched / max(selected, 1.0),
            "selected_blocks": selected / per_step, "fetched_blocks": fetched / per_step,
            "bytes_per_step": n_bytes / per_step, "max_fetched_after_first": worst}


def top_blocks(score: Tensor, n: int) -> Tensor:
    """(B, Hkv, C) bool: the ``n`` highest finite scores of each row."""
    top = score.topk(min(n, score.shape[-1]), dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True) & (score > NEG_INF)


@dataclass
class NOSA(KVPolicy):
    """NOSA-style selection: window + sink + query-aware + query-agnostic blocks (see the module docstring).

    Parameters
    ----------
    budget : int tokens (default 4096 = 64 blocks), float fraction of the cache, or Budget: tokens attended per
        step, window and sink included; k = budget // block_size blocks.
    block_size : int, default 64, slots per block P.
    init_blocks, local_blocks, query_blocks : int, defaults 1, 16, 16: sink, window and query-aware blocks
        (local_blocks >= 1: the current block is always attended).
    compress_kernel, compress_stride : int, defaults 32, 16, windows of the mean keys (stride <= kernel <= P).
    agnostic : "value_norm" (default) or "recency", the query-agnostic block score.
    dense_layers : int, default 0, the first layers attend densely.
    """

    budget: Budget | int | float = 4096
    block_size: int = 64
    init_blocks: int = 1
    local_blocks: int = 16
    query_blocks: int = 16
    compress_kernel: int = 32
    compress_stride: int = 16
    agnostic: Agnostic = "value_norm"
    dense_layers: int = 0
    needs = frozenset({"q"})

    def __post_init__(self) -> None:
        self.budget = Budget.of(self.budget)
        if self.block_size < 1 or self.local_blocks < 1 or min(self.init_blocks, self.query_blocks,
                                                                 self.dense_layers) < 0:
            raise ValueError(f"NOSA needs block_size, local_blocks >= 1 and init_blocks, query_blocks, dense_layers "
                             f">= 0; got {self.block_size}, {self.local_blocks}, {self.init_blocks}, "
                             f"{self.query_blocks}, {self.dense_layers}")
        if not 1 <= self.compress_stride <= self.compress_kernel <= self.block_size:
            raise ValueError(f"NOSA needs 1 <= compress_stride <= compress_kernel <= block_size; got "
                             f"{self.compress_stride}, {self.compress_kernel}, {self.block_size}")
        if self.agnostic not in ("value_norm", "recency"):
            raise ValueError(f"NOSA.agnostic must be value_norm or recency, got {self.agnostic!r}")

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """(B, Hkv, 1, T) bool at sparse decode steps; None (dense) otherwise. Records the step in aux."""
        if ctx.phase != "decode" or ctx.layer_idx < self.dense_layers:
            return None
        b, hkv, t = kv.k.shape[:3]
        p = self.block_size
        n_blocks = -(-t // p)
        k = self.budget.resolve(ctx.layer_idx, ctx.num_layers, t) // p
        if k >= n_blocks:
            return None
        valid = kv.valid_mask()
        real = F.pad(valid, (0, n_blocks * p - t)).view(b, hkv, n_blocks, p).any(-1)    # (B, Hkv, C)
        n_local = min(self.local_blocks, max(k, 1))
        n_init = min(self.init_blocks, k - n_local) if k > n_local else 0
        n_query = min(self.query_blocks, max(k - n_local - n_init, 0))
        n_agnostic = max(k - n_local - n_init - n_query, 0)
        blocks = torch.arange(n_blocks, device=kv.k.device)
        forced = ((blocks < n_init) | (blocks >= n_blocks - n_local)) & real
        cand = real & ~forced
        chosen_q = top_blocks(self.query_scores(ctx, kv, n_blocks).masked_fill(~cand, NEG_INF), n_query)
        chosen_a = top_blocks(self.agnostic_scores(kv, n_blocks).masked_fill(~cand | chosen_q, NEG_INF), n_agnostic)
        sel = forced | chosen_q | chosen_a                                                 # (B, Hkv, C)
        self.record(kv, sel, real, forced)
        return (sel.repeat_interleave(p, dim=-1)[..., :t] & valid)[:, :, None, :]

    def query_scores(self, ctx: StepCtx, kv: LayerKV, n_blocks: int) -> Tensor:
        """s_q (B, Hkv, C): group-summed softmax over mean-key windows, max over the windows meeting each block."""
        b, hkv, t, d = kv.k.shape
        kern, stride, p = self.compress_kernel, self.compress_stride, self.block_size
        out = torch.full((b, hkv, n_blocks), NEG_INF, device=kv.k.device)
        if t < kern:
            return out
        valid = kv.valid_mask()
        sums = (kv.k.float() * valid[..., None]).unfold(2, kern, stride).sum(-1)        # (B, Hkv, W, D)
        counts = valid.float().unfold(2, kern, stride).sum(-1)                          # (B, Hkv, W)
        k_bar = sums / counts.clamp(min=1)[..., None]
        _, h, s, _ = ctx.q.shape
        qg = ctx.q.float().view(b, hkv, h // hkv, s, d)                                 # (B, Hkv, G, S, D)
        logits = (qg @ k_bar[:, :, None].transpose(-1, -2)) * ctx.scaling              # (B, Hkv, G, S, W)
        logits = logits.masked_fill((counts == 0)[:, :, None, None], NEG_INF)
        probs = logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=(2, 3))                  # (B, Hkv, W)
        probs = probs.masked_fill(counts == 0, NEG_INF)
        starts = torch.arange(probs.shape[-1], device=kv.k.device) * stride
        for block_of in (starts // p, (starts + kern - 1) // p):                        # kern <= P: <= 2 blocks
            out = out.scatter_reduce(2, block_of.expand_as(probs), probs, "amax")
        return out

    def agnostic_scores(self, kv: LayerKV, n_blocks: int) -> Tensor:
        """s_a (B, Hkv, C): mean ‖v‖ of each block's real slots, or the block index (``recency``)."""
        b, hkv, t, _ = kv.v.shape
        if self.agnostic == "recency":
            return torch.arange(n_blocks, device=kv.v.device, dtype=torch.float).expand(b, hkv, n_blocks)
        valid = kv.valid_mask()
        pad = n_blocks * self.block_size - t
        norms = F.pad(kv.v.float().norm(dim=-1) * valid, (0, pad)).view(b, hkv, n_blocks, -1).sum(-1)
        counts = F.pad(valid.float(), (0, pad)).view(b, hkv, n_blocks, -1).sum(-1)
        return norms / counts.clamp(min=1)

    def record(self, kv: LayerKV, sel: Tensor, real: Tensor, forced: Tensor) -> None:
        """Append this step's (selected, overlap, fetched) to ``kv.aux["nosa"]``."""
        state = kv.aux.get(AUX_KEY)
        if state is None:   # first sparse step: the device holds the forced blocks only
            state = NOSAState(forced, self.block_size * (kv.k.shape[-1] + kv.v.shape[-1]) * kv.k.element_size())
            kv.aux[AUX_KEY] = state
        state.history.append(transfer_step(state.prev, sel, real))
        state.prev = sel
