"""Invariants of the plaintext MPCache math (shared/research/mpcache.md §11)."""
import math

import pytest
import torch

from plaintext_ref.mpcache_config import MPCacheConfig, config_for_budget
from plaintext_ref.policies import mpcache as mm

LENGTHS = [1, 5, 31, 32, 33, 40, 777, 1000, 1013, 1024]


def _qk(t, seed=0, hkv=3, g=3, d=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, hkv * g, d, generator=gen), torch.randn(2, hkv, t, d, generator=gen)


@pytest.mark.parametrize("t", LENGTHS)
def test_upper_bound_and_reorder_identity(t):
    q, k = _qk(t)
    qk = mm.group_query(q, k.shape[1])
    for s in (32, 16):
        rmin, rmax = mm.cluster_minmax(k, s)
        bound = torch.maximum(qk[:, :, None] * rmax, qk[:, :, None] * rmin).sum(-1)   # Eq. 2
        c = math.ceil(t / s)
        exact = torch.stack([(k[:, :, i * s:(i + 1) * s] @ qk[..., None]).squeeze(-1).amax(-1)
                             for i in range(c)], dim=-1)
        assert (bound >= exact - 1e-4).all()
        alpha = 0.6
        unordered = (alpha * qk[:, :, None] * rmax + (1 - alpha) * qk[:, :, None] * rmin).sum(-1)
        torch.testing.assert_close(mm.cluster_scores(qk, mm.representative_keys(rmin, rmax, alpha)),
                                   unordered, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ratios", [(0.5, 0.2), (0.5, 0.5), (0.25, 0.25)])
@pytest.mark.parametrize("t", LENGTHS)
def test_selection_shape_budget_forced_and_hierarchy(t, ratios):
    cfg = MPCacheConfig(level_ratios=ratios)
    q, k = _qk(t, seed=t)
    qk = mm.group_query(q, k.shape[1])
    picked = mm.select_clusters(qk, k, cfg)
    c2 = cfg.n_clusters(t, 1)
    n_forced = len(mm.forced_clusters(c2, cfg))
    assert (picked.sum(-1) == cfg.n_topk(t, 1) + n_forced).all()          # exactly k2 + forced, distinct
    assert picked[..., 0].all() and picked[..., -1].all()                   # sink and local, also T' % 32 == 0
    mask = mm.dynamic_token_mask(q, k, cfg)
    assert mask[..., -1].all() and (mask.sum(-1) <= cfg.selected_tokens(t)).all()
    # every level-2 pick is a child of a level-1 pick (level 1 recomputed here)
    level1 = MPCacheConfig(cluster_sizes=(32,), level_ratios=(cfg.level_ratios[0],))
    parents = mm.select_clusters(qk, k, level1)
    assert (picked <= parents.repeat_interleave(2, dim=-1)[..., :c2]).all()


def test_full_budget_selects_everything():
    cfg = MPCacheConfig(level_ratios=(1.0, 1.0))
    for t in LENGTHS:
        q, k = _qk(t, seed=3)
        assert mm.dynamic_token_mask(q, k, cfg).all()


def test_static_keep_is_sorted_topk():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 100, generator=gen)
    kept = mm.static_keep(scores, 30)
    assert (kept.diff(dim=-1) > 0).all()
    top = scores.topk(30, dim=-1).indices.sort(-1).values
    assert torch.equal(kept, top)


def test_config_validation_and_sharing():
    with pytest.raises(ValueError, match="alpha"):
        MPCacheConfig(alpha=1.5)
    with pytest.raises(ValueError, match="cluster"):
        MPCacheConfig(cluster_sizes=(32, 12))
    cfg = MPCacheConfig()
    assert [cfg.shares_with(i) for i in range(6)] == [None, None, None, 2, None, 4]
    assert MPCacheConfig(share_layers=False).shares_with(3) is None
    assert cfg.n_keep(1000) == 300 and MPCacheConfig(static_keep=256).n_keep(1000) == 256


# ---- the policy inside HF generation (tiny random models) -------------------------------------
from dataclasses import fields  # noqa: E402

from plaintext_ref import runtime  # noqa: E402
from plaintext_ref.policies import get_policy  # noqa: E402
from plaintext_ref.policies.mpcache import DYNAMIC, STATIC, MPCache  # noqa: E402
from tests.plaintext_ref.helpers import interleaved, prefill, same_snapshots  # noqa: E402


def _prompt(tok, n=150, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tok), (1, n), generator=gen)


def test_full_budget_mpcache_equals_full_cache(tiny_llama):
    model, tok, _ = tiny_llama
    ids = _prompt(tok)
    cfg = MPCacheConfig(static_keep=1.0, level_ratios=(1.0, 1.0), share_layers=False)
    full = runtime.generate(model, ids, None, max_new_tokens=12)
    ours = runtime.generate(model, ids, MPCache(config=cfg), max_new_tokens=12)
    assert torch.equal(full, ours)


def test_static_eviction_keeps_public_count_and_shares_indices(tiny_llama):
    model, tok, _ = tiny_llama
    ids = _prompt(tok, n=200, seed=1)
    cfg = MPCacheConfig(static_keep=0.3, share_start=0)     # tiny model: layers (0, 1) share
    cache = prefill(model, ids, MPCache(config=cfg))
    kept = [cache.kv(layer).aux[STATIC] for layer in range(2)]
    assert kept[0].shape == (1, cfg.n_keep(200)) and torch.equal(cache.kv(0).pos[:, 0], kept[0])
    assert torch.equal(kept[0], kept[1]) and (kept[0].diff(dim=-1) > 0).all()


def test_decode_selection_matches_math_and_budget(tiny_llama):
    model, tok, _ = tiny_llama
    ids = _prompt(tok, n=305, seed=2)
    policy = MPCache(config=MPCacheConfig(share_layers=False))
    (_, snaps), = interleaved(model, policy, [(ids, 300)])
    for j, snap in enumerate(snaps[1:], start=1):             # the decode steps
        for layer in snap:
            mask = layer[DYNAMIC]
            t = mask.shape[-1]
            assert t == policy.config.n_keep(300) + j          # compacted prompt + tokens fed so far
            assert (mask.sum(-1) <= policy.config.selected_tokens(t)).all()
            assert mask[..., 0].all() and mask[..., -1].all()


def test_interleaved_sequences_match_separate_runs(tiny_llama):
    """One MPCache object, two sequences advanced in turn: each gets exactly its lone run's selections and logits."""
    model, tok, _ = tiny_llama
    policy = MPCache(config=MPCacheConfig(share_start=0))    # tiny-llama: layer 1 reuses layer 0's choices
    runs = [(_prompt(tok, n=308, seed=3), 300), (_prompt(tok, n=262, seed=4), 256)]
    together = interleaved(model, policy, runs)
    for (ids, p), (logits, snaps) in zip(runs, together):
        alone_logits, alone_snaps = interleaved(model, policy, [(ids, p)])[0]
        assert torch.equal(logits, alone_logits)
        assert torch.equal(logits, runtime.teacher_forced_logits(model, ids, p, policy))
        assert same_snapshots(snaps, alone_snaps)
        for snap in snaps:
            assert torch.equal(snap[0][STATIC], snap[1][STATIC])
            assert DYNAMIC not in snap[0] or torch.equal(snap[0][DYNAMIC], snap[1][DYNAMIC])
        assert not snaps[-1][0][DYNAMIC].all()                      # the dynamic selection is not vacuous
    assert {f.name for f in fields(policy)} == set(vars(policy))   # no per-sequence state on the policy


def test_registry_and_budget_mapping():
    p = get_policy("mpcache", budget=0.1)
    assert isinstance(p, MPCache)
    cfg = config_for_budget(0.05)
    assert cfg.static_keep == 0.3 and abs(cfg.level_ratios[1] - 0.05 / 0.3) < 1e-9
    # deviation 7: a budget observes the last 32 prompt tokens; the authors' mapping keeps the last 20 %
    assert cfg.window_tokens == 32 and cfg.window(4084) == 32 and cfg.window(20) == 20
    authors = config_for_budget(0.05, mapping="authors")
    assert authors.window_tokens is None and authors.window(4084) == 816
    assert authors == MPCacheConfig(static_keep=0.3, level_ratios=(0.5, 0.05 / 0.3))
    keep2b = config_for_budget(0.05, mapping="keep2b")
    assert keep2b.static_keep == pytest.approx(0.1) and keep2b.level_ratios == (0.5, 0.5)
    assert get_policy("mpcache", budget=0.05).config == cfg
    with pytest.raises(ValueError):
        config_for_budget(0.0)
    with pytest.raises(ValueError, match="mapping"):
        config_for_budget(0.05, mapping="nope")
    with pytest.raises(ValueError, match="window_tokens"):
        MPCacheConfig(window_tokens=0)
