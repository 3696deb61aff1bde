"""Where MPCache loses a needle: per-stage survival of the answer tokens, and the ablation variants.

For a NIAH sample the answer's token range is known (``Sample.meta["answer_span"]``). At the first decode
step (the step that emits the answer's first token) :class:`TracedMPCache` records, per layer and KV head,
the fraction of answer tokens that

* ``static`` — survived look-once static eviction (are still in the compacted cache);
* ``level1`` — lie in a level-1 cluster picked by the α score (non-sharing layers only);
* ``attended`` — lie in the final selection (what attention sees; sharing layers use their partner's);
* ``level1_exact`` / ``attended_exact`` — the same with the exact bound Σ_i max(q_i r^max_i, q_i r^min_i)
  (paper Eq. 2) in place of the α linearisation, on the same cache.

:func:`select_levels` repeats the twin's :func:`~plaintext_ref.policies.mpcache.select_clusters` loop with a
choice of bound and returns every level's picks; with ``bound="alpha"`` its last level equals the twin's
selection (tests/plaintext_ref/test_eval.py checks this), so the trace measures the rule that runs.
:class:`ExactBoundMPCache` is the plaintext-only ablation that attends the exact-bound selection; it is a
diagnostic, not a policy of the registry (the exact bound needs 2·D products and D maxima per cluster in
MPC, which is what MPCache's linearisation avoids).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plaintext_ref.mpcache_config import MPCacheConfig
from plaintext_ref.policies.base import LayerKV, StepCtx
from plaintext_ref.policies.mpcache import (
    DYNAMIC,
    NEG,
    MPCache,
    cluster_minmax,
    cluster_scores,
    cluster_token_mask,
    forced_clusters,
    group_query,
    representative_keys,
)

TRACED = "mpcache_traced"  # LayerKV.aux flag: this layer's first decode step was traced


def exact_bound_scores(q_kv: Tensor, rmin: Tensor, rmax: Tensor) -> Tensor:
    """Σ_i max(q_i r^max_i, q_i r^min_i): (B, Hkv, D), (B, Hkv, C, D) x2 -> (B, Hkv, C)."""
    q = q_kv.float().unsqueeze(-2)                                           # (B, Hkv, 1, D)
    return torch.maximum(q * rmax.float(), q * rmin.float()).sum(-1)


def select_levels(q_kv: Tensor, k: Tensor, cfg: MPCacheConfig, bound: str = "alpha") -> list[Tensor]:
    """Picked clusters of every level, (B, Hkv, C_l) bool each, coarse to fine (see module docstring)."""
    if bound not in ("alpha", "exact"):
        raise ValueError(f"bound must be 'alpha' or 'exact', got {bound!r}")
    t = k.shape[-2]
    picks: list[Tensor] = []
    for level, s in enumerate(cfg.cluster_sizes):
        c = cfg.n_clusters(t, level)
        rmin, rmax = cluster_minmax(k, s)
        score = (cluster_scores(q_kv, representative_keys(rmin, rmax, cfg.alpha)) if bound == "alpha"
                 else exact_bound_scores(q_kv, rmin, rmax))                  # (B, Hkv, C)
        if not picks:
            candidate = torch.ones_like(score, dtype=torch.bool)
        else:
            fan = cfg.cluster_sizes[level - 1] // s
            candidate = picks[-1].repeat_interleave(fan, dim=-1)[..., :c]
        forced = forced_clusters(c, cfg)
        candidate[..., forced] = False
        n = cfg.n_topk(t, level)
        picked = torch.zeros_like(candidate)
        if n > 0:
            picked.scatter_(-1, score.masked_fill(~candidate, NEG).topk(n, dim=-1).indices, True)
        picked[..., forced] = True
        picks.append(picked)
    return picks


def token_masks(q: Tensor, k: Tensor, cfg: MPCacheConfig, bound: str) -> list[Tensor]:
    """Every level's picks expanded to (B, Hkv, T') token masks; q (B, H, D), k (B, Hkv, T', D)."""
    t = k.shape[-2]
    if t <= cfg.dynamic_min_tokens:
        return [torch.ones(k.shape[:2] + (t,), dtype=torch.bool, device=k.device)] * len(cfg.cluster_sizes)
    picks = select_levels(group_query(q, k.shape[1]), k, cfg, bound)
    return [cluster_token_mask(p, s, t) for p, s in zip(picks, cfg.cluster_sizes)]


@dataclass
class ExactBoundMPCache(MPCache):
    """MPCache attending the exact-bound (Eq. 2) selection instead of the α one (plaintext ablation)."""

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        if ctx.phase != "decode":
            return None
        if ctx.partner is not None:
            mask = ctx.partner.aux[DYNAMIC]
        else:
            mask = token_masks(ctx.q[:, :, -1], kv.k, self.config, "exact")[-1][:, :, None, :]
        kv.aux[DYNAMIC] = mask
        return mask if kv.valid is None else mask & kv.valid[:, :, None, :]


@dataclass
class TracedMPCache(MPCache):
    """The twin unchanged, plus answer-token survival at the first decode step of every layer.

    spans: (B, 2) int64 answer token ranges [start, end) of the batch rows. ``trace`` collects one dict
    per layer: {"layer", "shares", stage: (B, Hkv) fraction of answer tokens}.
    """

    spans: Tensor | None = None
    trace: list = field(default_factory=list)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        mask = super().select(ctx, kv)
        if ctx.phase != "decode" or TRACED in kv.aux or self.spans is None:
            return mask
        kv.aux[TRACED] = True
        spans = self.spans.to(kv.pos.device)
        ans = (kv.pos >= spans[:, 0, None, None]) & (kv.pos < spans[:, 1, None, None])   # (B, Hkv, T')
        n_ans = (spans[:, 1] - spans[:, 0]).clamp(min=1).float()[:, None]                # (B, 1)
        frac = lambda m: (ans & m).sum(-1).float() / n_ans                               # (B, Hkv)
        row = {"layer": ctx.layer_idx, "shares": ctx.partner is not None,
               "static": ans.sum(-1).float() / n_ans, "attended": frac(kv.aux[DYNAMIC][:, :, 0])}
        if ctx.partner is None:
            q = ctx.q[:, :, -1]
            alpha, exact = (token_masks(q, kv.k, self.config, b) for b in ("alpha", "exact"))
            row.update(level1=frac(alpha[0]), level1_exact=frac(exact[0]), attended_exact=frac(exact[-1]))
        self.trace.append({key: (val.cpu() if isinstance(val, Tensor) else val) for key, val in row.items()})
        return mask


class TraceFactory:
    """Policy factory for ``runner.evaluate``: call i returns a TracedMPCache for batch i's answer spans."""

    def __init__(self, config: MPCacheConfig, spans: list[tuple[int, int]], batch_size: int) -> None:
        self.config, self.spans, self.batch_size = config, spans, batch_size
        self.traces: list[list[dict]] = []

    def __call__(self) -> TracedMPCache:
        lo = len(self.traces) * self.batch_size
        spans = torch.tensor(self.spans[lo:lo + self.batch_size], dtype=torch.long)
        policy = TracedMPCache(config=self.config, spans=spans)
        self.traces.append(policy.trace)
        return policy

    def per_sample(self) -> list[dict[str, float]]:
        """Per sample: each stage's answer fraction, mean over layers and KV heads ("<stage>") and mean over
        layers of the best KV head ("<stage>_best"); level stages over non-sharing layers only."""
        out: list[dict[str, float]] = []
        for trace in self.traces:
            if not trace:
                continue
            rows = trace[0]["static"].shape[0]
            for b in range(rows):
                rec: dict[str, float] = {}
                for stage in ("static", "level1", "attended", "level1_exact", "attended_exact"):
                    vals = [t[stage][b] for t in trace if stage in t]
                    if vals:
                        stacked = torch.stack(vals)                            # (layers, Hkv)
                        rec[stage] = float(stacked.mean())
                        rec[f"{stage}_best"] = float(stacked.amax(-1).mean())
                out.append(rec)
        return out
