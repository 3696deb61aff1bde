"""CLI options of the KV policies: ``--kv-policy`` and its knobs, one to one onto policy arguments.

Light on purpose (no torch, no CrypTen), so ``--help`` and usage errors answer at once. A knob left
out takes the policy's own default (``mpcache.policy``); a knob the chosen policy does not read is
an error, never silently ignored. Every value here is public (it fixes shapes and budgets).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from mpcache.budget import check_budget
from plaintext_ref.mpcache_config import MPCacheConfig

POLICIES = ("full", "mpcache", "streaming_llm", "h2o", "snapkv", "quest")  # the registry's names (light import)
KNOBS: dict[str, tuple[str, ...]] = {  # the knobs each policy reads
    "full": (),
    "mpcache": ("static_keep", "alpha", "cluster_sizes", "level_ratios", "share", "budget"),
    "streaming_llm": ("n_sink", "n_recent"),
    "h2o": ("budget",),
    "snapkv": ("budget",),
    "quest": ("budget", "page_size"),
}
_FLAG = {"share": "--no-share"}


def flag(knob: str) -> str:
    """The command-line flag of a knob (``static_keep`` -> ``--static-keep``)."""
    return _FLAG.get(knob, "--" + knob.replace("_", "-"))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


@dataclass(frozen=True)
class PolicyOptions:
    """``--kv-policy`` plus the knobs given on the command line (None = the policy's default)."""

    kv_policy: str = "full"
    static_keep: float | None = None
    alpha: float | None = None
    cluster_sizes: tuple[int, ...] | None = None
    level_ratios: tuple[float, ...] | None = None
    share: bool | None = None
    budget: float | None = None
    n_sink: int | None = None
    n_recent: int | None = None
    page_size: int | None = None

    def __post_init__(self) -> None:
        if self.kv_policy not in POLICIES:
            raise ValueError(f"--kv-policy must be one of {POLICIES}, got {self.kv_policy!r}")
        stray = [k for k, v in self.given().items() if k not in KNOBS[self.kv_policy]]
        if stray:
            users = sorted({p for k in stray for p in POLICIES if k in KNOBS[p]})
            raise ValueError(f"{', '.join(flag(k) for k in stray)} does not apply to --kv-policy "
                             f"{self.kv_policy} (only to {', '.join(users)})")
        b = self.budget
        if b is not None:
            if self.kv_policy == "mpcache" and not 0 < b <= 1:
                raise ValueError(f"--budget for mpcache is the fraction attended per step, in (0, 1]; got {b:g}")
            if self.kv_policy == "quest" and not (b >= 1 and b == int(b)):
                raise ValueError(f"--budget for quest is a whole token count >= 1, got {b:g}")
            check_budget(b, "--budget")
        if self.kv_policy == "mpcache":
            self.mpcache_config()  # raises ValueError on a bad knob
        for knob, low in (("n_sink", 0), ("n_recent", 1), ("page_size", 1)):
            value = getattr(self, knob)
            if value is not None and value < low:
                raise ValueError(f"{flag(knob)} must be >= {low}, got {value}")

    def given(self) -> dict[str, object]:
        """The knobs set explicitly (public; part of the options every party must agree on)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "kv_policy" and getattr(self, f.name) is not None}

    def mpcache_config(self) -> MPCacheConfig:
        names = ("static_keep", "alpha", "cluster_sizes", "level_ratios")
        knobs = {k: v for k, v in self.given().items() if k in names}
        if self.share is not None:
            knobs["share_layers"] = self.share
        return MPCacheConfig(**knobs)

    def build(self, meter=None):
        """The configured ``MPCPolicy`` (imports the MPC stack)."""
        from mpcache.policy.base import get_policy
        knobs = self.given()
        if self.kv_policy == "mpcache":
            return get_policy("mpcache", meter, config=self.mpcache_config(), budget=self.budget)
        if self.kv_policy == "quest" and "budget" in knobs:
            knobs["budget"] = int(knobs["budget"])
        return get_policy(self.kv_policy, meter, **knobs)

    def public(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache policy (every budget is public; a knob of another policy is an "
                             "error; left out, a knob takes the policy's default)")
    d = MPCacheConfig()
    g.add_argument("--kv-policy", default="full", choices=POLICIES, help="which KV policy runs in MPC")
    g.add_argument("--static-keep", type=float, help="mpcache: prompt fraction (or token count if > 1) "
                   f"kept by look-once static eviction [default: {d.static_keep}]")
    g.add_argument("--alpha", type=float, help=f"mpcache: k̃ = α·r_max + (1−α)·r_min [default: {d.alpha}]")
    g.add_argument("--cluster-sizes", type=_ints, help="mpcache: tokens per cluster per level, coarse "
                   f"to fine [default: {','.join(map(str, d.cluster_sizes))}]")
    g.add_argument("--level-ratios", type=_floats, help="mpcache: top-k fraction of the clusters per "
                   f"level [default: {','.join(map(str, d.level_ratios))}]")
    g.add_argument("--no-share", dest="share", action="store_const", const=False, default=None,
                   help="mpcache: no cross-layer index sharing")
    g.add_argument("--budget", type=float,
                   help="mpcache: fraction attended per decode step (sets the static keep and the last "
                        "level ratio); h2o/snapkv: kept fraction or token count (defaults 0.2 / 2048); "
                        "quest: token count (default 1024)")
    g.add_argument("--n-sink", type=int, help="streaming_llm: sink tokens [default: 4]")
    g.add_argument("--n-recent", type=int, help="streaming_llm: recent tokens [default: 2000]")
    g.add_argument("--page-size", type=int, help="quest: tokens per page [default: 16]")


def policy_options(ns: argparse.Namespace) -> PolicyOptions:
    """The parsed flags as PolicyOptions (raises ValueError on a bad or stray knob)."""
    return PolicyOptions(**{f.name: getattr(ns, f.name) for f in fields(PolicyOptions)})
