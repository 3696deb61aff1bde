"""Invariants of KVMerger and NOSA (kv_methods.md §7.1 and §8.2, item (e) of each).

KVMerger: merging sets are maximal runs of consecutive slots similar to their anchor; a merge's weights sum
to one and are Gaussian in the distance from the pivot (the set's best kept slot); identical keys with the
multiplicity bias give the unmerged attention exactly; ε > 1 is H2O's prefill eviction bit for bit, and a
budget covering the prompt is the full cache; every layer holds the budget.
NOSA: the selection is whole blocks, holds the budget, the sink and the window, and its query-aware and
query-agnostic parts are the top blocks of independently recomputed scores; after the first step at most
``query_blocks`` blocks per KV head are fetched; a budget covering the context is the full cache; the transfer
statistics match a hand-built example.
Both: greedy generation end to end, and two interleaved sequences through one policy object equal their solo
runs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies import H2O, NOSA, POLICIES, KVMerger, LayerKV, StepCtx, get_policy
from plaintext_ref.policies.h2o import ACC
from plaintext_ref.policies.kvmerger import COUNT, merge_into_pivots, merging_sets
from plaintext_ref.policies.nosa import AUX_KEY, NOSAState, transfer_stats, transfer_step
from plaintext_ref.runtime import RefCache, attached, generate, step, teacher_forced_logits
from tests.plaintext_ref.helpers import interleaved, prefill, prompt, same_snapshots


def _planted_keys(runs: list[int], b: int = 2, hkv: int = 2, d: int = 16, noise: float = 0.05,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """Keys (B, Hkv, T, D) made of runs of near-copies of orthogonal directions, and each slot's run id."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(b * hkv, d, d, generator=g)).Q.transpose(-1, -2)[:, :len(runs)]
    run_id = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(runs))            # (T,)
    k = bases[:, run_id].view(b, hkv, -1, d) * 3.0
    return k + noise * torch.randn(k.shape, generator=g), run_id


def _ctx(q: Tensor, phase: str = "decode") -> StepCtx:
    return StepCtx(0, 2, phase, torch.nn.Identity(), torch.zeros(q.shape[0], q.shape[2], dtype=torch.long),
                   q.shape[-1] ** -0.5, q)


def _kv(t: int, b: int = 2, hkv: int = 2, d: int = 8, seed: int = 4) -> LayerKV:
    g = torch.Generator().manual_seed(seed)
    return LayerKV(torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
                   torch.arange(t).expand(b, hkv, t).clone())


def test_registry_and_validation():
    assert POLICIES["kvmerger"] is KVMerger and POLICIES["nosa"] is NOSA
    assert get_policy("kvmerger", budget=0.35).budget.ratio == pytest.approx(0.65)
    assert get_policy("nosa", budget=256).budget.tokens == 256
    for cls, bad in [(KVMerger, dict(evict_on="both")), (KVMerger, dict(sigma=0.0)),
                     (KVMerger, dict(threshold=math.nan)), (NOSA, dict(local_blocks=0)),
                     (NOSA, dict(block_size=8, compress_kernel=16)), (NOSA, dict(compress_stride=0)),
                     (NOSA, dict(agnostic="random"))]:
        with pytest.raises(ValueError):
            cls(**bad)


# ---------------------------------------------------------------- KVMerger


def test_merging_sets_are_maximal_consecutive_runs_above_threshold():
    runs = [3, 1, 4, 2, 5, 1, 1, 3]
    k, run_id = _planted_keys(runs)
    eps = 0.8
    ids = merging_sets(k, eps)
    assert torch.equal(ids, run_id.expand_as(ids))                    # orthogonal runs are recovered
    k = k + 0.6 * torch.randn(k.shape, generator=torch.Generator().manual_seed(1))   # blur them
    ids = merging_sets(k, eps)
    assert (ids[..., 0] == 0).all() and ((ids.diff(dim=-1) == 0) | (ids.diff(dim=-1) == 1)).all()
    unit = F.normalize(k, dim=-1)
    for row_ids, row in zip(ids.flatten(0, 1), unit.flatten(0, 1)):
        for s in row_ids.unique():
            members = (row_ids == s).nonzero()[:, 0]
            anchor = int(members.max())
            assert (row[members] @ row[anchor] > eps).all()
            if members.min() > 0:                                       # maximal: the slot before fails
                assert row[members.min() - 1] @ row[anchor] <= eps
    t = k.shape[2]
    assert torch.equal(merging_sets(k, 1.5), torch.arange(t).expand_as(ids))    # ε > 1: all singletons
    valid = torch.ones(ids.shape, dtype=torch.bool)
    valid[:, :, :2] = False                                              # left padding of a planted run
    ids = merging_sets(_planted_keys(runs)[0], eps, valid)
    assert (ids[..., :3] == torch.arange(3)).all()


@pytest.mark.parametrize("sigma", [None, 0.7])
def test_merge_weights_sum_to_one_and_are_gaussian_in_distance_from_pivot(sigma):
    k, _ = _planted_keys([4, 6, 3, 5, 2, 4], noise=0.4, seed=2)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(k.shape, generator=g)
    score, kept = torch.rand(k.shape[:3], generator=g), torch.rand(k.shape[:3], generator=g) < 0.3
    set_id = merging_sets(k, 0.5)
    k2, v2, target, weight = merge_into_pivots(k, v, kept, score, set_id, sigma)
    folded_any = False
    for r in range(4):
        ki, vi, k2i, v2i, kp, sc, sid, tg, w = (x.flatten(0, 1)[r] for x in (k, v, k2, v2, kept, score, set_id,
                                                                                target, weight))
        for s in sid.unique():
            members = (sid == s).nonzero()[:, 0]
            held = members[kp[members]]
            if len(held) == 0:                                          # no kept slot: dropped
                assert (tg[members] == -1).all() and (w[members] == 0).all()
                continue
            p = int(held[sc[held].argmax()])
            folded = members[~kp[members]]
            assert (tg[folded] == p).all() and torch.equal(tg[held], held)
            for other in held[held != p]:                               # other kept slots are untouched
                assert w[other] == 1 and torch.equal(k2i[other], ki[other]) and torch.equal(v2i[other], vi[other])
            group = torch.cat([torch.tensor([p]), folded])
            wg = w[group]
            torch.testing.assert_close(wg.sum(), torch.tensor(1.0))
            if len(folded) == 0:
                assert w[p] == 1 and torch.equal(k2i[p], ki[p]) and torch.equal(v2i[p], vi[p])
                continue
            folded_any = True
            d2 = (ki[p] - ki[group]).pow(2).sum(-1)
            s2 = d2[1:].mean() if sigma is None else torch.tensor(sigma ** 2)
            torch.testing.assert_close(wg / wg[0], torch.exp(-d2 / (2 * s2)))
            torch.testing.assert_close(k2i[p], (wg[:, None] * ki[group]).sum(0))
            torch.testing.assert_close(v2i[p], (wg[:, None] * vi[group]).sum(0))
    assert folded_any, "no set folded a slot: the test would be vacuous"


def test_identical_keys_with_multiplicity_bias_give_the_unmerged_attention():
    kv = _kv(12, b=1, hkv=1, seed=5)
    kv.k[:, :, 3:8] = kv.k[:, :, 3:4].clone()                          # one run of 5 identical keys
    acc = torch.zeros(1, 1, 12, 2)
    acc[:, :, [0, 1, 2, 5]] = 1.0                                      # heavy hitters; slots 8..11 are recent
    kv.aux[ACC] = acc
    q = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(6))
    out = KVMerger(budget=8, threshold=0.999, multiplicity_bias=True).compress(_ctx(q, "prefill"), kv, 8)
    assert torch.equal(out.pos[0, 0], torch.tensor([0, 1, 2, 5, 8, 9, 10, 11]))
    assert torch.equal(out.aux[COUNT][0, 0], torch.tensor([1, 1, 1, 5, 1, 1, 1, 1.0]))
    torch.testing.assert_close(out.v[:, :, 3], kv.v[:, :, 3:8].mean(2))

    def attend(k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        logits = q @ k.transpose(-1, -2) / math.sqrt(8) + (0 if bias is None else bias[:, :, None])
        return logits.softmax(-1) @ v
    torch.testing.assert_close(attend(out.k, out.v, out.bias), attend(kv.k, kv.v, None), rtol=0, atol=1e-6)


def test_threshold_above_one_is_h2o_and_covering_budget_is_full_cache(tiny_llama):
    model = tiny_llama.model
    ids = prompt(2, 40, seed=3)
    merged, evicted = prefill(model, ids, KVMerger(budget=20, threshold=1.5)), prefill(model, ids, H2O(budget=20,
                                                                                                     evict_on="prefill"))
    for i in range(merged.num_layers):
        a, b = merged.kv(i), evicted.kv(i)
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos) and a.bias is None
    assert torch.equal(generate(model, ids, KVMerger(budget=0.5, threshold=1.5), max_new_tokens=6),
                       generate(model, ids, H2O(budget=0.5, evict_on="prefill"), max_new_tokens=6))
    full = generate(model, ids, None, max_new_tokens=6)
    for policy in (KVMerger(budget=1.0, threshold=-1.0), KVMerger(budget=40, threshold=1.5)):
        assert torch.equal(generate(model, ids, policy, max_new_tokens=6), full)


def test_kvmerger_holds_the_budget_and_folds_slots(tiny_llama):
    model = tiny_llama.model
    ids = prompt(2, 40, seed=4)
    cache = prefill(model, ids, KVMerger(budget=24, threshold=0.0))
    counts = [cache.kv(i).aux[COUNT] for i in range(cache.num_layers)]
    assert all(cache.kv(i).n == 24 for i in range(cache.num_layers))
    assert all((c >= 1).all() and (c.sum(-1) <= 40).all() for c in counts)
    assert any((c > 1).any() for c in counts), "nothing was merged: the test would be vacuous"
    with attached(model):                                               # decode appends, never merges
        step(model, cache, ids[:, -1:], torch.full((2, 1), 40))
    assert all(cache.kv(i).n == 25 for i in range(cache.num_layers))


# ---------------------------------------------------------------- NOSA


def _nosa(**kw) -> NOSA:
    return NOSA(**{**dict(budget=24, block_size=4, init_blocks=1, local_blocks=2, query_blocks=2,
                          compress_kernel=4, compress_stride=2), **kw})


def test_nosa_selection_is_blocks_with_budget_forced_and_both_tops():
    kv = _kv(45)                                                        # 12 blocks of 4, the last holds 1 slot
    q = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(7))
    policy = _nosa(budget=32, query_blocks=3, compress_stride=4)        # windows = blocks
    mask = policy.select(_ctx(q), kv)[:, :, 0]                          # (B, Hkv, T)
    blocks = F.pad(mask, (0, 3)).view(2, 2, 12, 4)
    sel = blocks[..., 0]
    assert torch.equal(blocks[..., :11, :], sel[..., :11, None].expand(-1, -1, -1, 4))   # whole blocks
    assert (sel.sum(-1) == 8).all() and sel[..., 0].all() and sel[..., -2:].all()
    k_bar = kv.k[:, :, :44].reshape(2, 2, 11, 4, 8).mean(3)
    probs = (q.view(2, 2, 2, 1, 8) @ k_bar[:, :, None].transpose(-1, -2) / math.sqrt(8)).softmax(-1).sum((2, 3))
    top_q = probs[..., 1:10].topk(3, dim=-1).indices + 1                # candidates: blocks 1..9
    expect = torch.zeros(2, 2, 12, dtype=torch.bool).scatter_(-1, top_q, True)
    v_norm = kv.v[:, :, :44].norm(dim=-1).reshape(2, 2, 11, 4).mean(-1)[..., 1:10]
    top_a = v_norm.masked_fill(expect[..., 1:10], -math.inf).topk(2, dim=-1).indices + 1
    expect.scatter_(-1, top_a, True)
    expect[..., [0, 10, 11]] = True
    assert torch.equal(sel, expect)


def _teacher_forced_cache(model, policy, ids: Tensor, prefix: int) -> RefCache:
    """The cache after ``teacher_forced_logits``' forwards: the prefix prefilled, then one decode step per token."""
    cache = RefCache(model, policy)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with attached(model), torch.no_grad():
        step(model, cache, ids[:, :prefix], pos[:, :prefix], logits_to_keep=1)
        for j in range(prefix, ids.shape[1] - 1):
            step(model, cache, ids[:, j:j + 1], pos[:, j:j + 1], logits_to_keep=1)
    return cache


@pytest.mark.parametrize("agnostic", ["value_norm", "recency"])
def test_nosa_fetches_at_most_query_blocks_per_step(tiny_llama, agnostic):
    model, policy = tiny_llama.model, _nosa(agnostic=agnostic)
    cache = _teacher_forced_cache(model, policy, prompt(2, 60, seed=8), 40)
    fetched_later = 0
    for i in range(cache.num_layers):
        hist = cache.kv(i).aux[AUX_KEY].history
        assert len(hist) == 19
        for t, (sel, overlap, fetched) in enumerate(hist):
            assert (sel == 6).all() and (overlap <= sel).all()          # 24 // 4 blocks, all real
            if t > 0:
                assert (fetched <= policy.query_blocks).all() and (overlap >= sel - policy.query_blocks - 1).all()
                fetched_later += int(fetched.sum())
    assert fetched_later > 0, "no block was ever fetched: the bound would be vacuous"
    stats = transfer_stats(map(cache.kv, range(cache.num_layers)))
    assert stats["steps"] == 19 and stats["max_fetched_after_first"] <= policy.query_blocks
    assert stats["selected_blocks"] == 6 * 2 * 2                        # per sequence: 6 blocks × 2 KV heads × 2 layers
    assert stats["bytes_per_step"] == stats["fetched_blocks"] * 4 * 32 * 4   # P · (D_k + D_v) · fp32
    assert 0 < stats["overlap"] < 1 and 0 < stats["fetched_fraction"] < 1


def test_nosa_covering_budget_is_full_cache(tiny_model):
    model = tiny_model.model
    ids = prompt(2, 30, seed=9)
    full = generate(model, ids, None, max_new_tokens=6)
    for policy in (_nosa(budget=10_000), _nosa(budget=36)):             # 36 // 4 = 9 blocks ≥ the 36 slots
        assert torch.equal(generate(model, ids, policy, max_new_tokens=6), full)


def test_transfer_statistics_on_a_hand_built_example():
    kv = _kv(20, b=1, hkv=1)
    policy = _nosa()
    real = torch.ones(1, 1, 6, dtype=torch.bool)
    steps = [(torch.tensor([1, 0, 0, 0, 1]), torch.tensor([1, 1, 0, 1, 1])),       # forced, Γ(1): fetch 1 and 3
             (None, torch.tensor([1, 1, 1, 0, 1, 1]))]                              # Γ(2): fetch 2; 5 is new
    for forced, sel in steps:
        sel = sel.bool()[None, None]
        policy.record(kv, sel, real[..., :sel.shape[-1]], None if forced is None else forced.bool()[None, None])
    hist = [tuple(int(x) for x in h) for h in kv.aux[AUX_KEY].history]
    assert hist == [(4, 2, 2), (5, 3, 1)]
    assert torch.equal(torch.stack(transfer_step(sel.new_zeros(1, 1, 5), sel, real)), torch.tensor([[[5]], [[0]], [[4]]]))
    stats = transfer_stats([kv, None, LayerKV(kv.k, kv.v, kv.pos)])
    assert stats == pytest.approx({"steps": 2, "overlap": (2 / 4 + 3 / 5) / 2, "fetched_fraction": 3 / 9,
                                   "selected_blocks": 4.5, "fetched_blocks": 1.5, "bytes_per_step": 1.5 * 4 * 16 * 4,
                                   "max_fetched_after_first": 1})
    assert isinstance(kv.aux[AUX_KEY], NOSAState) and transfer_stats([]) == {"steps": 0}


# ---------------------------------------------------------------- both: end to end, interleaved

SMALL = {"kvmerger": lambda: KVMerger(budget=24, threshold=0.0), "nosa": lambda: _nosa()}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_greedy_generation_end_to_end(tiny_llama, name):
    model = tiny_llama.model
    ids = prompt(2, 40, seed=10)
    out = generate(model, ids, SMALL[name](), max_new_tokens=8)
    assert out.shape == (2, 48) and torch.equal(out[:, :40], ids)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_interleaved_sequences_equal_their_solo_runs(tiny_llama, name):
    model, policy = tiny_llama.model, SMALL[name]()
    runs = [(prompt(2, 60, seed=1), 48), (prompt(1, 45, seed=2), 36)]
    for (ids, p), (logits, snaps) in zip(runs, interleaved(model, policy, runs)):
        alone_logits, alone_snaps = interleaved(model, policy, [(ids, p)])[0]
        assert torch.equal(logits, alone_logits) and same_snapshots(snaps, alone_snaps)
        assert not torch.equal(logits, teacher_forced_logits(model, ids, p)), "the budget changed nothing"
