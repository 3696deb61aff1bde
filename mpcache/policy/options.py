"""CLI options of the KV policies (``--kv-policy`` and its knobs), one to one onto policy arguments."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from mpcache.config import MPCacheConfig

DEFAULTS = MPCacheConfig()
POLICIES = ("full", "mpcache", "streamingllm", "h2o", "snapkv", "quest")  # the registry's names (light import)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


@dataclass(frozen=True)
class PolicyOptions:
    """``--kv-policy`` plus every knob (all public budgets). Fields not used by a policy are ignored."""

    kv_policy: str = "full"
    static_keep: float = DEFAULTS.static_keep
    alpha: float = DEFAULTS.alpha
    cluster_sizes: tuple[int, ...] = DEFAULTS.cluster_sizes
    level_ratios: tuple[float, ...] = DEFAULTS.level_ratios
    share: bool = True
    budget: float | None = None
    n_sink: int = 4
    n_recent: int = 2000
    page_size: int = 16

    def __post_init__(self) -> None:
        if self.kv_policy not in POLICIES:
            raise ValueError(f"--kv-policy must be one of {POLICIES}, got {self.kv_policy!r}")
        if self.kv_policy == "mpcache":
            self.mpcache_config()  # raises ValueError on a bad knob, before any party starts
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"--budget must be > 0, got {self.budget}")
        if self.n_sink < 0 or self.n_recent < 1 or self.page_size < 1:
            raise ValueError(f"need --n-sink >= 0, --n-recent >= 1, --page-size >= 1; got "
                             f"{self.n_sink}, {self.n_recent}, {self.page_size}")

    def mpcache_config(self) -> MPCacheConfig:
        return MPCacheConfig(static_keep=self.static_keep, alpha=self.alpha, cluster_sizes=self.cluster_sizes,
                             level_ratios=self.level_ratios, share_layers=self.share)

    def build(self, meter=None):
        """The configured ``MPCPolicy`` (imports the MPC stack)."""
        from mpcache.policy.base import get_policy
        name = self.kv_policy
        if name == "mpcache":
            return get_policy(name, meter, config=self.mpcache_config(), budget=self.budget)
        if name == "streamingllm":
            return get_policy(name, meter, n_sink=self.n_sink, n_recent=self.n_recent)
        if name == "h2o":
            return get_policy(name, meter, budget=0.2 if self.budget is None else self.budget)
        if name == "snapkv":
            return get_policy(name, meter, budget=2048 if self.budget is None else self.budget)
        if name == "quest":
            return get_policy(name, meter, budget=1024 if self.budget is None else int(self.budget),
                              page_size=self.page_size)
        return get_policy(name, meter)


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    d = PolicyOptions()
    g = p.add_argument_group("KV cache policy (every budget is public)")
    g.add_argument("--kv-policy", default=d.kv_policy, choices=POLICIES,
                   help="which KV policy runs in MPC")
    g.add_argument("--static-keep", type=float, default=d.static_keep,
                   help="mpcache: prompt fraction (or token count if > 1) kept by look-once static eviction")
    g.add_argument("--alpha", type=float, default=d.alpha, help="mpcache: k̃ = α·r_max + (1−α)·r_min")
    g.add_argument("--cluster-sizes", type=_ints, default=d.cluster_sizes,
                   help="mpcache: tokens per cluster per level, coarse to fine, e.g. 32,16")
    g.add_argument("--level-ratios", type=_floats, default=d.level_ratios,
                   help="mpcache: top-k fraction of the clusters per level, e.g. 0.5,0.2")
    g.add_argument("--no-share", dest="share", action="store_false",
                   help="mpcache: no cross-layer index sharing")
    g.add_argument("--budget", type=float, default=d.budget,
                   help="mpcache: fraction attended per decode step (overrides --static-keep/--level-ratios); "
                        "h2o/snapkv: kept fraction or tokens (defaults 0.2 / 2048); quest: tokens (1024)")
    g.add_argument("--n-sink", type=int, default=d.n_sink, help="streamingllm: sink tokens")
    g.add_argument("--n-recent", type=int, default=d.n_recent, help="streamingllm: recent tokens")
    g.add_argument("--page-size", type=int, default=d.page_size, help="quest: tokens per page")


def policy_options(ns: argparse.Namespace) -> PolicyOptions:
    """The parsed flags as PolicyOptions (raises ValueError on a bad knob)."""
    return PolicyOptions(ns.kv_policy, ns.static_keep, ns.alpha, tuple(ns.cluster_sizes), tuple(ns.level_ratios),
                         ns.share, ns.budget, ns.n_sink, ns.n_recent, ns.page_size)
