"""MPCache in MPC: Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient Private LLM
Inference", arXiv 2501.06807 (NeurIPS 2025). Plaintext twin: ``plaintext_ref.policies.mpcache``
(same ``MPCacheConfig``; the tests decode this module's one-hots and compare them with the twin's picks).

Rule. (1) Look-once static eviction after prefill: [s_j] = Σ_{window} Σ_h [P_{h,i,j}] over the last
W = cfg.window(T0) prompt queries; [E] = top-K one-hot rows (K = cfg.n_keep(T0) public) in position
order; [K] ← [E][K], [V] ← [E][V], once per layer. Generated tokens are never evicted.
(2) Every decode step, per KV head: clusters of s_l consecutive cached tokens summarised by secret
per-channel [r_min], [r_max] (built once after the eviction; afterwards only the newest cluster of each
level changes); [score_c] = q_kv·[k̃_c], k̃ = α r_max + (1−α) r_min (one dot product per cluster).
Level 0 ranks the middle clusters (sink 0 and local C−1 are forced publicly, so they never duplicate a
pick): [m] = top-k0 mask. Level l ranks its middle clusters with score + (cand − 1)·2^12, cand = 1 for
children of level-(l−1) picks (local: [m] is linear); the finest level gives one-hot rows [O]
(k × C_mid) in cluster order. (3) Layer ℓ with cfg.shares_with(ℓ) = ℓ−1 reuses ℓ−1's [E] and [O].

Attention on the selection (the MPC realisation of the paper's cluster-level one-hot gather). Gathering
the K and V clusters would cost a Beaver product that opens all of K (T'·D per KV head); with
fixed-mask K, V it is cheaper to gather SCORES and scatter PROBABILITIES with [O]:
    [z] = q·[K]ᵀ (B, Hkv, G, T')                       fixed mask: opens G·D
    sink [0, s) and local [(C−1)·s, T') are public slices of [z]
    [z_sel] = [z_mid]ᵀ-per-cluster · [O]ᵀ (B, Hkv, G·s, k)  O fixed-masked once (opens k·C_mid),
                                                          opens G·s·C_mid ≈ G·T'
    [P_sel] = softmax over the |D_t| = s·(k + #forced) selected logits of each query row
    [P] = [sink P ‖ P_sel·[O] ‖ local P] (B, Hkv, G, T') opens G·s·k; out = [P]·[V] opens G·T'
This is exactly attention restricted to D_t (the twin's mask). Cost per KV head and step, beyond full
attention's 2 opens: + G·s·(C_mid + k) opened elements + k·C_mid, while the softmax (≈ 1.25 kB per
element, the dominant term) runs over |D_t| instead of T'. The paper-literal K/V gather opens
k·C_mid + 2·T'·D per KV head (D = 64 ≫ G), so it is not implemented.

Selection cost per step and own layer: summaries 2·D·(#levels) element-wise maxima (one batched
``protocols.selection.maximum``: 2 rounds with digit comparisons), scores one Beaver product over Σ_l C_l·D,
then one top-k per level over C_mid (sequential; by pairwise ranks while C_mid ≤ ``PAIRWISE_MAX`` = 256:
3 rounds for a mask, 4 for the finest level's one-hot rows with digit comparisons).
Public: T0, T', K, W, C_l, k_l, the forced clusters, α, the sharing pattern. Secret: [s], [E],
every [score], [m], [O]. Nothing is revealed.

Deviations from the twin (ranking-invariant, so selections are identical up to fixed-point ties):
1. Static scores and the GQA query are sums, not means (public 1/H, 1/G omitted: no truncation).
2. Cluster scores use q scaled by 1/√D (the model's q); the twin uses the unscaled q.
Shapes: B batch · Hkv KV heads · G query heads per KV head · T' cache tokens · D head dim · C clusters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpcache.cache import SecretKVCache
from mpcache.policy.base import Meter, StaticEviction, full_attention, new_key, register
from plaintext_ref.mpcache_config import MPCacheConfig, config_for_budget
from protocols import lut_nonlinear
from protocols.compat import crypten
from protocols.fixed_mask import FixedMaskOperand, fixed_matmul
from protocols.config import active_config
from protocols.nonlinear import softmax
from protocols.selection import maximum, mul_public_int, topk_mask, topk_onehot, tree_max
from protocols.similarity import cluster_minmax, representative_keys
from protocols.truncation import Untruncated
from protocols.types import Secret

# Score penalty of a level-l cluster whose parent was not picked: it must exceed the spread of real
# scores (|score| < 2^11) and keep every biased score inside the pairwise top-k's digit-comparison
# domain (|x| < 2^13, ``protocols.selection.RANK_VALUE_LOG2``).
NOT_CANDIDATE = float(2**12)


def pad_logit() -> float:
    """Logit of padding slots, where the softmax's exp(·) is 0: −``ProtocolConfig.mask_fill`` for the
    polynomial softmax, ``lut_nonlinear.PAD_LOGIT`` (−128, inside its tables' domain) for the look-ups."""
    cfg = active_config()
    return lut_nonlinear.PAD_LOGIT if cfg.nonlinear == "lut" else -cfg.mask_fill


Summaries = list[tuple[Secret, Secret]]  # per level: ([r_min], [r_max]) (B, Hkv, C_l, D)


def middle(n_clusters: int, cfg: MPCacheConfig) -> tuple[int, int]:
    """Public range [lo, hi) of the clusters that compete in the top-k (all but the forced ones)."""
    last = n_clusters - 1
    forced = ({0} if cfg.force_sink else set()) | ({last} if cfg.force_local else set())
    lo = int(0 in forced)
    hi = last if last in forced and last >= lo else n_clusters
    return lo, hi


def merge_clusters(rmin: Secret, rmax: Secret, fan: int) -> tuple[Secret, Secret]:
    """Coarser summaries from groups of ``fan`` consecutive rows: (..., C, D) -> (..., ⌈C/fan⌉, D).

    Pads with copies of the last row (no effect on min/max). Cost: ⌈log2 fan⌉ comparison levels on
    2·C·D elements (fan = 2: 9 rounds).
    """
    c, d = rmin.shape[-2], rmin.shape[-1]
    n = -(-c // fan)
    pad = n * fan - c
    both = crypten.stack([-rmin, rmax])  # (2, ..., C, D)
    if pad:
        both = crypten.cat([both] + [both[..., c - 1:c, :]] * pad, dim=-2)
    blocks = both.view(*both.shape[:-2], n, fan, d).transpose(-1, -2)  # (2, ..., C', D, fan)
    m = tree_max(blocks, dim=-1)  # (2, ..., C', D)
    return -m[0], m[1]


def build_summaries(k: Secret, sizes: tuple[int, ...]) -> Summaries:
    """Summaries of every level from the cache keys (B, Hkv, T', D): the finest level from tokens,
    each coarser level from its children (one comparison per pair instead of s_l tokens).
    Equals the twin's ``cluster_minmax(k, s_l)`` at every level (partial clusters: real tokens only)."""
    levels = [cluster_minmax(k, sizes[-1])]
    for coarse, fine in zip(reversed(sizes[:-1]), reversed(sizes[1:])):
        levels.insert(0, merge_clusters(*levels[0], coarse // fine))
    return levels


def update_summaries(levels: Summaries, k_new: Secret, t: int, sizes: tuple[int, ...]) -> Summaries:
    """After appending token ``t`` (0-based) with [k_new] (B, Hkv, 1, D): a new cluster starts (free)
    or the last one takes min/max with k_new; all levels in one batched ``maximum`` (2·D per level;
    2 rounds with digit comparisons, keys |k| < 2^15)."""
    grow = [l for l, s in enumerate(sizes) if t % s]
    out = list(levels)
    if grow:
        last = crypten.stack([x for l in grow for x in (-levels[l][0][..., -1:, :], levels[l][1][..., -1:, :])])
        new = crypten.stack([x for _ in grow for x in (-k_new, k_new)])
        upd = maximum(last, new)  # (2·|grow|, B, Hkv, 1, D)
        for i, l in enumerate(grow):
            rmin, rmax = levels[l]
            out[l] = (crypten.cat([rmin[..., :-1, :], -upd[2 * i]], dim=-2),
                      crypten.cat([rmax[..., :-1, :], upd[2 * i + 1]], dim=-2))
    for l, s in enumerate(sizes):
        if t % s == 0:
            out[l] = (crypten.cat([levels[l][0], k_new], dim=-2), crypten.cat([levels[l][1], k_new], dim=-2))
    return out


@dataclass
class Selection:
    """One decode step's secret selection (shared with the paired layer).

    picks[l]: level l's [m] (B, Hkv, C_mid_l) 0/1 top-k mask, the finest level's [O] (B, Hkv, k, C_mid)
    one-hot rows, or None when k_l = 0 or no cluster competes. ranges[l]: the public middle [lo, hi).
    scores: the secret [score] of every level's middle clusters, concatenated (B, Hkv, Σ C_mid) (kept
    for audits: ``benchmarks.selection_agreement``). operand: [O] with a fixed mask (opened once,
    reused by the paired layer).
    """

    length: int
    ranges: list[tuple[int, int]]
    picks: list[Secret | None] = field(default_factory=list)
    scores: Secret | None = None
    operand: FixedMaskOperand | None = None


def _candidate_bias(parent: Secret | None, prange: tuple[int, int], fan: int, rng: tuple[int, int],
                    like: Secret) -> Secret:
    """(cand − 1)·2^12 for the middle clusters ``rng`` of a level, cand = parent picked (local).

    Children of forced parents are public candidates (bias 0); children of middle parents take the
    parent's secret [m]; when the parent level picked nothing by top-k they are never candidates.
    """
    lo, hi = rng
    plo, phi = prange
    parents = torch.arange(lo, hi, device=like.device) // fan
    secret_parent = (parents >= plo) & (parents < phi)
    bias = like * 0 + torch.where(secret_parent, -NOT_CANDIDATE, 0.0)
    if parent is None:
        return bias
    idx = (parents - plo).clamp(0, max(phi - plo - 1, 0))
    gated = mul_public_int(parent[..., idx], secret_parent.long() * int(NOT_CANDIDATE * like.encoder.scale))
    gated.encoder = like.encoder  # raw m·2^12·scale read at the score's scale: m·2^12
    return bias + gated


def select_clusters(q_kv: Secret, levels: Summaries, cfg: MPCacheConfig, length: int) -> Selection:
    """Hierarchical top-k over the clusters of a cache of ``length`` tokens; q_kv (B, Hkv, D).

    Steps: 1. [k̃_l] for the middle clusters of every level, one batched Beaver product for all
    scores. 2. level by level: bias the scores by the parent picks, [m] = top-k mask (coarse levels)
    or [O] = top-k one-hot rows in cluster order (finest level).
    Public: length, C_l, k_l = cfg.n_topk(length, l). Secret: scores, [m], [O].
    """
    ranges = [middle(cfg.n_clusters(length, l), cfg) for l in range(len(cfg.cluster_sizes))]
    reps = [representative_keys(rmin[..., lo:hi, :], rmax[..., lo:hi, :], cfg.alpha)
            for (rmin, rmax), (lo, hi) in zip(levels, ranges)]
    sizes = [r.shape[-2] for r in reps]
    scores = crypten.cat(reps, dim=-2).matmul(q_kv.unsqueeze(-1)).squeeze(-1)  # (B, Hkv, Σ C_mid)
    sel = Selection(length, ranges, scores=scores)
    start, parent = 0, None
    for l, n in enumerate(sizes):
        score, start = scores[..., start:start + n], start + n
        k = cfg.n_topk(length, l)
        last = l == len(sizes) - 1
        if n == 0 or k == 0:
            pick = None
        else:
            if l > 0:
                fan = cfg.cluster_sizes[l - 1] // cfg.cluster_sizes[l]
                score = score + _candidate_bias(parent, ranges[l - 1], fan, ranges[l], score)
            pick = topk_onehot(score, k, sort_by_index=True) if last else topk_mask(score, k)
        sel.picks.append(pick)
        parent = pick
    if sel.picks[-1] is not None:
        sel.operand = FixedMaskOperand(sel.picks[-1])
    return sel


def attend_selected(q: Secret, cache: SecretKVCache, sel: Selection, s: int, meter: Meter) -> Secret:
    """Attention of q (B, Hkv, G, D) over the sink, the picked middle clusters and the local tokens.

    See the module docstring (gather scores, scatter probabilities with the fixed-masked [O]).
    """
    b, hkv, g, _ = q.shape
    t = sel.length
    lo, hi = sel.ranges[-1]
    n_mid = hi - lo
    with meter.stage("attention"):
        z = fixed_matmul(q, cache.keys, transpose_w=True)  # (B, Hkv, G, D) x (B, Hkv, D, T') -> (B, Hkv, G, T')
        pad = max(0, hi * s - t)  # tokens missing from a partial, non-forced last cluster
        if pad:
            z = crypten.cat([z, z[..., :pad] * 0 + pad_logit()], dim=-1)
        parts = [z[..., : lo * s]]
        if sel.operand is not None:
            k = sel.operand.shape[-2]
            mid = z[..., lo * s: hi * s].view(b, hkv, g, n_mid, s).permute(0, 1, 2, 4, 3).reshape(b, hkv, g * s, n_mid)
            zsel = fixed_matmul(mid, sel.operand, transpose_w=True)  # (B,Hkv,G·s,C_mid) x (B,Hkv,C_mid,k)
            parts.append(zsel.view(b, hkv, g, s, k).permute(0, 1, 2, 4, 3).reshape(b, hkv, g, k * s))
        parts.append(z[..., hi * s: t])
        widths = [p.shape[-1] for p in parts]
    with meter.stage("softmax"):
        probs = softmax(crypten.cat(parts, dim=-1), dim=-1)  # (B, Hkv, G, |D_t|)
    with meter.stage("attention"):
        out_parts = [probs[..., : widths[0]]]
        if sel.operand is not None:
            psel = probs[..., widths[0]: widths[0] + widths[1]]
            psel = psel.view(b, hkv, g, k, s).permute(0, 1, 2, 4, 3).reshape(b, hkv, g * s, k)
            pmid = fixed_matmul(psel, sel.operand)  # (B,Hkv,G·s,k) x (B,Hkv,k,C_mid) -> (B,Hkv,G·s,C_mid)
            out_parts.append(pmid.view(b, hkv, g, s, n_mid).permute(0, 1, 2, 4, 3).reshape(b, hkv, g, n_mid * s))
        elif n_mid:
            out_parts.append(z[..., lo * s: hi * s] * 0)  # nothing picked in the middle: zero weight
        out_parts.append(probs[..., sum(widths[:-1]):])
        p = crypten.cat(out_parts, dim=-1)[..., :t]  # (B, Hkv, G, T') in token order
        return fixed_matmul(p, cache.values)  # (B, Hkv, G, T') x (B, Hkv, T', D) -> (B, Hkv, G, D)


class MPCache(StaticEviction):
    """MPCache policy on shares (see module docstring). ``budget`` overrides ``config`` via the shared
    ``config_for_budget`` (fraction of the prompt attended per decode step)."""

    name = "mpcache"

    def __init__(self, meter: Meter | None = None, config: MPCacheConfig | None = None,
                 budget: float | None = None) -> None:
        config = config or MPCacheConfig()
        self.config = config_for_budget(float(budget), config) if budget is not None else config
        super().__init__(meter)

    def n_keep(self, prompt_len: int) -> int:
        return self.config.n_keep(prompt_len)

    def window(self, prompt_len: int) -> int:
        return self.config.window(prompt_len)

    def shares_with(self, layer: int) -> int | None:
        return self.config.shares_with(layer)

    def after_prefill(self, layer: int, cache: SecretKVCache, p_win: Secret | None,
                      partner: SecretKVCache | None) -> None:
        """Static eviction, then the cluster summaries into ``cache.aux["levels"]`` (a layer that
        reuses its partner's selection never selects: no summaries)."""
        super().after_prefill(layer, cache, p_win, partner)
        if partner is None:
            with self.meter.stage("kv_select"):
                cache.aux["levels"] = build_summaries(cache.keys.secret, self.config.cluster_sizes)

    def decode(self, layer: int, q: Secret, cache: SecretKVCache, partner: SecretKVCache | None) -> Secret | Untruncated:
        """Select clusters (or reuse ``partner.aux["selection"]``), keep the selection in
        ``cache.aux["selection"]``, attend the selected tokens."""
        cfg, t = self.config, cache.length
        if partner is None:
            with self.meter.stage("kv_select"):
                cache.aux["levels"] = update_summaries(cache.aux["levels"], new_key(cache), t - 1,
                                                       cfg.cluster_sizes)
        if t <= cfg.dynamic_min_tokens:
            return full_attention(q, cache, None, self.meter)[0]
        if partner is not None:
            sel = partner.aux["selection"]
        else:
            with self.meter.stage("kv_select"):
                sel = select_clusters(q.sum(dim=2), cache.aux["levels"], cfg, t)  # q_kv: Σ_g q (B, Hkv, D)
        cache.aux["selection"] = sel
        return attend_selected(q, cache, sel, cfg.cluster_sizes[-1], self.meter)

    def describe(self, prompt_len: int, n_new: int = 1) -> dict:
        cfg = self.config
        keep = cfg.n_keep(prompt_len)
        t_cache = keep + max(n_new - 1, 0)
        t_full = prompt_len + max(n_new - 1, 0)
        attended = cfg.selected_tokens(t_cache)
        return {"policy": self.name, "cache_after_prefill": keep, "attended_last_step": attended,
                "budget": round(attended / t_full, 4), "static_keep": cfg.static_keep,
                "cluster_sizes": list(cfg.cluster_sizes), "level_ratios": list(cfg.level_ratios),
                "alpha": cfg.alpha, "share_layers": cfg.share_layers,
                "topk_per_level": [cfg.n_topk(t_cache, l) for l in range(len(cfg.cluster_sizes))]}


register("mpcache", MPCache)
