"""Graph-KV: segments attend only to their designated source segments, through a graph-structured block mask over
segment caches (Wang et al., NeurIPS 2025, arXiv 2506.07334; repo Graph-COM/GraphKV, ``pcw.py: gapemp``).

Rule. Segments u_0..u_{m−1} (retrieved passages, papers) and directed edges E (source → target); N(j) = {i : (i, j)
∈ E} are target j's sources.
1. Parallel encoding: every source segment is prefilled on its own from position 0 (a store entry, pre-RoPE keys).
2. Positional allocation (gapemp): the sources are laid end to end over one shared range [0, L_src); *every* target
   is then placed right after it, at [L_src, L_src + |u_j|) — targets share one range instead of being chained, which
   is what keeps positional bias and context consumption low.
3. Structure-aware pass: target j is re-encoded with the block mask
   ``softmax(Q_j [K_{N(j)}; K_j]ᵀ/√d + M)``: its queries see the independent KV of its sources N(j) (at their
   positions in the source range) and its own tokens causally, nothing else.
4. Final cache: [prefix][sources (independent KV)][targets (structure-aware KV)], every key re-positioned to
   contiguous positions; the query is then decoded normally (it attends everything).
Segments without incoming edges are sources only; a segment that has sources and is itself a source of another
appears in both parts (gapemp's RAG mode, where every passage is both, doubles the context in the same way).

Defaults: ``gapemp`` (every passage a target of all passages) via :func:`rag_graph`; ``top_k`` restricts the
sources to the last k passages (``gapemp_appr``).

Deviations:
1. A target's sources are the *independent* caches of N(j) even when a source is itself a target (the released code
   has one hop; multi-hop graphs would re-encode in topological order). :func:`block_mask` gives the one-pass mask
   over a single layout for any DAG, which for a chain graph with contiguous positions is the causal mask.
2. Keys are kept pre-RoPE and rotated at use instead of rotate / un-rotate round trips (exact in float).
3. The prefix is encoded alone from position 0, as in gapemp (segments do not attend it).

Checks: :func:`block_mask` equals the graph exactly; a chain graph reproduces causal prefill; the two-stage pass
(store + re-encode) equals one masked forward over the gapemp layout.
GQA: the mask is shared by all heads and layers. Needs: explicit positions and an (S, T) mask per forward.
MPC: not ported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plaintext_ref.reuse.runner import LayerRunner, SeqKV, causal_rows
from plaintext_ref.reuse.store import KVStore, content_key, model_fingerprint

Edges = set[tuple[int, int]]


def rag_graph(m: int, top_k: int | None = None) -> Edges:
    """gapemp's RAG graph: every passage is a target of every passage (or of the last ``top_k``)."""
    srcs = range(m) if top_k is None else range(max(0, m - top_k), m)
    return {(i, j) for j in range(m) for i in srcs}


def sources_of(m: int, edges: Edges) -> list[list[int]]:
    for i, j in edges:
        if not (0 <= i < m and 0 <= j < m):
            raise ValueError(f"edge {(i, j)} names a segment outside 0..{m - 1}")
    return [sorted(i for i, jj in edges if jj == j) for j in range(m)]


def segment_ids(lengths: list[int]) -> Tensor:
    """(sum(lengths),) segment index of every token."""
    return torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(lengths)])


def block_mask(lengths: list[int], edges: Edges, prefix: int = 0, query: int = 0) -> Tensor:
    """One-layout structured mask (T, T) bool over [prefix][u_0]…[u_{m−1}][query], T = prefix + Σ|u| + query.

    A token of u_j sees the prefix, every token of u_i for (i, j) ∈ E with i < j, and u_j's tokens up to itself; the
    prefix and the query are causal over everything before them. Edges must point forward (i < j) so the mask stays
    causal.
    """
    for i, j in edges:
        if i >= j:
            raise ValueError(f"block_mask needs forward edges (i < j); got {(i, j)}")
    m = len(lengths)
    seg = segment_ids(lengths) if m else torch.zeros(0, dtype=torch.long)
    src = torch.zeros(m, m, dtype=torch.bool)
    for i, j in edges:
        src[j, i] = True
    src |= torch.eye(m, dtype=torch.bool)
    body = src[seg[:, None], seg[None, :]] & causal_rows(torch.arange(seg.numel()), seg.numel())   # (N, N)
    t = prefix + seg.numel() + query
    mask = causal_rows(torch.arange(t), t)
    mask[prefix:prefix + seg.numel(), prefix:prefix + seg.numel()] = body
    return mask


@dataclass
class GraphLayout:
    """Where every part sits in the structure-aware pass (gapemp allocation)."""

    sources: list[int]          # segments in the source part, in order
    targets: list[int]          # segments re-encoded (those with sources), in order
    src_offset: list[int]       # start position of each source (contiguous, from 0)
    l_src: int                  # length of the source range; every target starts here

    @staticmethod
    def of(lengths: list[int], srcs: list[list[int]]) -> GraphLayout:
        targets = [j for j, n in enumerate(srcs) if n]
        used = {i for n in srcs for i in n}
        sources = [j for j in range(len(lengths)) if j in used or not srcs[j]]
        offsets, acc = [], 0
        for j in sources:
            offsets.append(acc)
            acc += lengths[j]
        return GraphLayout(sources, targets, offsets, acc)


@dataclass
class GraphResult:
    logits: Tensor                  # (1, 1, V) last query token
    cache: SeqKV                    # [prefix][sources][targets][query], contiguous positions
    layout: GraphLayout
    stats: dict = field(default_factory=dict)


@dataclass
class GraphKV:
    """Graph-KV over a :class:`KVStore` of independently encoded segments (no fields: the graph is per request)."""

    @staticmethod
    def segment_cache(runner: LayerRunner, store: KVStore, ids: list[int]) -> SeqKV:
        """Segment encoded alone from position 0 (parallel encoding), from the store or computed once."""
        key = content_key(model_fingerprint(runner.model), "graphkv-segment", [], ids)
        return store.get_or_compute(key, lambda: runner.prefill(torch.tensor(ids, device=runner.device))[1],
                                    {"ids": ids, "context": []})

    @torch.no_grad()
    def encode_targets(self, runner: LayerRunner, store: KVStore, segments: list[list[int]], edges: Edges
                       ) -> tuple[SeqKV, list[SeqKV], GraphLayout]:
        """Steps 1–3: the source part (independent KV at [0, L_src)) and each target's structure-aware KV."""
        srcs = sources_of(len(segments), edges)
        lay = GraphLayout.of([len(s) for s in segments], srcs)
        dev = runner.device
        parts = []
        for j, off in zip(lay.sources, lay.src_offset):
            kv = self.segment_cache(runner, store, segments[j])
            parts.append(kv.at(torch.arange(off, off + kv.n, device=dev)))
        src_kv = SeqKV.cat(parts) if parts else None
        slot_seg = torch.cat([torch.full((len(segments[j]),), j, device=dev) for j in lay.sources])
        targets = []
        for j in lay.targets:
            keep = torch.isin(slot_seg, torch.tensor(srcs[j], device=dev)).nonzero().flatten()
            ctx = src_kv.take(keep)                                   # sources of j only, at their positions
            n = len(segments[j])
            _, kv = runner.extend(ctx, torch.tensor(segments[j], device=dev),
                                  torch.arange(lay.l_src, lay.l_src + n, device=dev))
            targets.append(kv.take(torch.arange(ctx.n, ctx.n + n, device=dev)))
        return src_kv, targets, lay

    @torch.no_grad()
    def prefill(self, runner: LayerRunner, store: KVStore, prefix: list[int], segments: list[list[int]],
                edges: Edges, query: list[int]) -> GraphResult:
        """Step 4: assemble [prefix][sources][targets] at contiguous positions and run the query over it."""
        if not query:
            raise ValueError("GraphKV needs a non-empty query")
        dev = runner.device
        src_kv, targets, lay = self.encode_targets(runner, store, segments, edges)
        parts = ([runner.prefill(torch.tensor(prefix, device=dev))[1]] if prefix else []) + [src_kv] + targets
        ctx = SeqKV.cat(parts)
        ctx = ctx.at(torch.arange(ctx.n, device=dev))
        logits, cache = runner.extend(ctx, torch.tensor(query, device=dev))
        stats = dict(context_slots=ctx.n, sources=len(lay.sources), targets=len(lay.targets),
                     reencoded_tokens=sum(t.n for t in targets))
        return GraphResult(logits[:, -1:], cache, lay, stats)


def one_pass_reference(runner: LayerRunner, segments: list[list[int]], edges: Edges) -> tuple[SeqKV, list[SeqKV]]:
    """Steps 1–3 as ONE masked forward over [sources][targets] with gapemp positions (for tests).

    Source tokens see only their own segment (causally); a target's tokens see its sources and itself causally.
    Returns the source part and each target's slice, to compare with :meth:`GraphKV.encode_targets`.
    """
    srcs = sources_of(len(segments), edges)
    lay = GraphLayout.of([len(s) for s in segments], srcs)
    dev = runner.device
    order = lay.sources + lay.targets
    ids = torch.tensor([t for j in order for t in segments[j]], device=dev)
    lens = [len(segments[j]) for j in order]
    slot_of = segment_ids(lens).to(dev)                                  # index into ``order``
    n_src = len(lay.sources)
    pos = torch.cat([torch.arange(o, o + len(segments[j])) for j, o in zip(lay.sources, lay.src_offset)]
                    + [torch.arange(lay.l_src, lay.l_src + len(segments[j])) for j in lay.targets]).to(dev)
    t = ids.numel()
    see = torch.zeros(len(order), len(order), dtype=torch.bool, device=dev)
    see |= torch.eye(len(order), dtype=torch.bool, device=dev)
    for a, j in enumerate(lay.targets):
        for i in srcs[j]:
            see[n_src + a, lay.sources.index(i)] = True
    allowed = see[slot_of[:, None], slot_of[None, :]] & causal_rows(torch.arange(t, device=dev), t)
    _, kv = runner.prefill(ids, pos, allowed)
    bounds = torch.tensor([0] + lens).cumsum(0)
    src_len = int(bounds[n_src])
    targets = [kv.take(torch.arange(int(bounds[n_src + a]), int(bounds[n_src + a + 1]), device=dev))
               for a in range(len(lay.targets))]
    return kv.take(torch.arange(src_len, device=dev)), targets
