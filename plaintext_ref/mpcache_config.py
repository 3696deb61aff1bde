"""MPCacheConfig: every MPCache knob, shared by the MPC policy and its plaintext twin.

Everything here is PUBLIC in the MPC protocol (it fixes shapes): the static keep count, the
observation window, cluster sizes, per-level top-k sizes, α and the layer-sharing pattern. What is
selected stays secret. Defaults follow the authors' code (see ``shared/research/mpcache.md`` §10).

Deliberate deviations from the authors' code, each because the code's behaviour cannot be run
obliviously or is a bug (mpcache.md §9):
1. Static eviction keeps a public count ``n_keep = ceil(static_keep · T0)`` (top-k of the
   window-accumulated attention) instead of a data-dependent threshold τ, whose count would leak.
2. The last (local) cluster is always forced, also when ``T' % 32 == 0`` (quirk 3).
3. Forced clusters are excluded from the top-k candidates, so the selection has exactly
   ``k + n_forced`` distinct clusters (quirk 4).
4. Static scores use the scaled, causal prefill attention probabilities (the code's scoring pass has
   neither 1/√D nor a causal mask, quirk 1).
5. GQA (not in the paper): selection is per KV head; the score of a cluster for a KV head is the mean
   over its G query heads, computed as ``mean_g(q_g) · k̃`` (linear, so one dot product per cluster).
6. The last, partial cluster of a level summarises its real tokens only (the authors pad it with
   copies of tokens of the previous cluster).
7. A budget (``config_for_budget``, what ``budget=`` gives both policies) observes the last 32 prompt
   tokens for static eviction (``window_tokens=32``, SnapKV's window) instead of the last 20 % of the
   prompt. The rule is unchanged (both sides read ``window()``); only the public window size differs.
   Reason, measured (benchmarks/reports/kv_quality.md, SmolLM2, NIAH at 5 % of 4K, 100 held-out
   samples): with the 20 % window (≈ 800 haystack queries) static eviction keeps the answer only when
   it lies inside the window, NIAH 0.29; with 32 tokens (the question) 0.88; α, the exact bound, the
   hierarchy and layer sharing each change it by ≤ 0.08. ``MPCacheConfig()`` itself keeps the
   authors' 20 %.

Owned by the plaintext side (no MPC imports); the MPC policy imports it, never the reverse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MPCacheConfig:
    """Knobs of MPCache (all public).

    static_keep: fraction of the prompt kept by look-once static eviction (0 < x <= 1), or an absolute
        token count when > 1. Generated tokens are never statically evicted.
    window_ratio: observation window = last ``window_ratio`` of the prompt (at least 1 token).
    window_tokens: if set, the observation window is the last ``window_tokens`` prompt tokens instead
        (SnapKV's 32-token window: the question, not the haystack before it).
    alpha: weight of r_max in the representative key k̃ = α·r_max + (1−α)·r_min.
    cluster_sizes: tokens per cluster at each level, coarse to fine; each divides the previous.
    level_ratios: level-1 keep fraction of level-1 clusters, then for each further level the fraction
        of *all* clusters of that level (authors' ratio1=0.5, ratio2=0.2).
    force_sink / force_local: always select the first / the last (current) cluster at every level.
    share_layers: cross-layer index sharing; layer ℓ >= share_start with ℓ - share_start odd reuses
        layer ℓ-1's static set and dynamic selection, except layers in ``share_exclude``.
    dynamic_min_tokens: below this cache length no dynamic selection is done (attend everything).
    """

    static_keep: float = 0.3
    window_ratio: float = 0.2
    window_tokens: int | None = None
    alpha: float = 0.6
    cluster_sizes: tuple[int, ...] = (32, 16)
    level_ratios: tuple[float, ...] = (0.5, 0.2)
    force_sink: bool = True
    force_local: bool = True
    share_layers: bool = True
    share_start: int = 2
    share_exclude: tuple[int, ...] = ()
    dynamic_min_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.static_keep > 0:
            raise ValueError(f"static_keep must be > 0 (a fraction or a token count), got {self.static_keep}")
        if self.static_keep > 1 and self.static_keep != int(self.static_keep):
            raise ValueError(f"static_keep > 1 must be a whole token count, got {self.static_keep}")
        if not 0 < self.window_ratio <= 1:
            raise ValueError(f"window_ratio must be in (0, 1], got {self.window_ratio}")
        if self.window_tokens is not None and self.window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1 or None, got {self.window_tokens}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.cluster_sizes or any(s < 1 for s in self.cluster_sizes):
            raise ValueError(f"cluster_sizes must be positive, got {self.cluster_sizes}")
        for coarse, fine in zip(self.cluster_sizes, self.cluster_sizes[1:]):
            if coarse % fine or coarse == fine:
                raise ValueError(f"each cluster size must be a proper multiple of the next, got {self.cluster_sizes}")
        if len(self.level_ratios) != len(self.cluster_sizes):
            raise ValueError(f"level_ratios {self.level_ratios} needs one entry per cluster size {self.cluster_sizes}")
        if any(not 0 < r <= 1 for r in self.level_ratios):
            raise ValueError(f"level_ratios must be in (0, 1], got {self.level_ratios}")
        if self.share_start < 0:
            raise ValueError(f"share_start must be >= 0, got {self.share_start}")

    # ---- public counts derived from public lengths -------------------------------------------
    def n_keep(self, prompt_len: int) -> int:
        """Static keep count K for a prompt of T0 tokens: ceil(static_keep·T0), capped at T0."""
        k = int(self.static_keep) if self.static_keep > 1 else math.ceil(self.static_keep * prompt_len)
        return max(1, min(prompt_len, k))

    def window(self, prompt_len: int) -> int:
        """Observation window W: the last window_tokens, else window_ratio of the prompt (10 % above 24000)."""
        if self.window_tokens is not None:
            return max(1, min(prompt_len, self.window_tokens))
        ratio = self.window_ratio if prompt_len <= 24000 else self.window_ratio / 2
        return max(1, int(prompt_len * ratio))

    def n_clusters(self, length: int, level: int) -> int:
        """C_level = ceil(T'/s_level)."""
        return math.ceil(length / self.cluster_sizes[level])

    def n_forced(self, length: int, level: int) -> int:
        """Forced clusters at a level (sink and local; one cluster if they coincide)."""
        c = self.n_clusters(length, level)
        return min(c, int(self.force_sink) + int(self.force_local)) if c > 1 else min(c, 1)

    def n_topk(self, length: int, level: int) -> int:
        """Clusters picked by top-k at a level, on top of the forced ones.

        Level 0: int(C1·ratio1); deeper levels: int(C_l·ratio_l). Capped so that picks + forced never
        exceed the candidates: at level 0 all C1 clusters, deeper the children of level-(l−1) picks.
        """
        c = self.n_clusters(length, level)
        k = int(c * self.level_ratios[level])
        forced = self.n_forced(length, level)
        if level == 0:
            cap = c - forced
        else:
            parents = self.n_topk(length, level - 1) + self.n_forced(length, level - 1)
            fan = self.cluster_sizes[level - 1] // self.cluster_sizes[level]
            if self.force_sink and self.force_local:
                # exact: the partial last parent (always picked) lacks C_{l-1}·fan − C_l children, and
                # the forced clusters of this level are children of the forced parents
                c_parent = self.n_clusters(length, level - 1)
                cap = parents * fan - (c_parent * fan - c) - forced
            else:
                cap = min(c, parents * fan) - forced
        return max(0, min(k, cap))

    def selected_tokens(self, length: int) -> int:
        """Upper bound on the tokens attended per KV head per decode step, |D_t| ≤ (k + forced)·s."""
        last = len(self.cluster_sizes) - 1
        if length <= self.dynamic_min_tokens:
            return length
        n = (self.n_topk(length, last) + self.n_forced(length, last)) * self.cluster_sizes[last]
        return min(length, n)

    def shares_with(self, layer: int) -> int | None:
        """The layer whose static set and dynamic selection ``layer`` reuses, or None (own selection)."""
        if not self.share_layers or layer < self.share_start or layer in self.share_exclude:
            return None
        if (layer - self.share_start) % 2 == 1 and (layer - 1) not in self.share_exclude:
            return layer - 1
        return None


MAPPINGS = ("authors", "window32", "keep2b", "keep2b_window32")
DEFAULT_MAPPING = "window32"  # deviation 7; "authors" reproduces the authors' mapping


def config_for_budget(budget: float, base: MPCacheConfig | None = None, mapping: str | None = None) -> MPCacheConfig:
    """An MPCacheConfig attending about ``budget``·T0 tokens per decode step (all knobs public).

    Mappings (:data:`MAPPINGS`; default :data:`DEFAULT_MAPPING`):

    * ``authors``: static_keep = max(base.static_keep, 2·budget) (capped at 1), level-1 ratio 0.5 and the
      level-2 ratio = budget / static_keep, so (k2 + forced)·16 ≈ budget·T0 (authors: 30 % × 20 % = 6 %);
      observation window as in ``base`` (the last 20 % of the prompt).
    * ``keep2b``: static_keep = 2·budget, so the level-2 ratio is 0.5 (static eviction does the coarse cut).
    * ``window32`` (default, deviation 7): ``authors`` with a 32-token observation window
      (``window_tokens``, SnapKV's window).
    * ``keep2b_window32``: both.

    benchmarks/reports/kv_quality.md (MPCache ablation) measures each at 5 % of 4K.
    """
    base = base or MPCacheConfig()
    mapping = mapping or DEFAULT_MAPPING
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown MPCache budget mapping {mapping!r}; choose from {', '.join(MAPPINGS)}")
    if not 0 < budget <= 1:
        raise ValueError(f"MPCache budget is the fraction attended, in (0, 1]; got {budget}")
    if mapping.startswith("keep2b"):
        keep = min(1.0, 2 * budget)
    else:
        keep = min(1.0, max(float(base.static_keep) if base.static_keep <= 1 else 0.3, 2 * budget))
    ratio2 = min(base.level_ratios[0], budget / keep)
    cfg = replace(base, static_keep=keep, level_ratios=(base.level_ratios[0], ratio2))
    return replace(cfg, window_tokens=base.window_tokens or 32) if mapping.endswith("window32") else cfg
