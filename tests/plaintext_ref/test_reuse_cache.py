"""plaintext_ref.reuse: layer runner, KV store, CacheBlend, KVShare and Graph-KV invariants on tiny-llama.

Tolerance: the runner and HF both run fp32 sdpa on CPU; "equal" means max abs difference ≤ 1e-4 on logits and K/V
(measured ≤ 3e-7). Approximate reuse must differ measurably (> 1e-3), so an implementation that silently recomputed
everything would fail the reuse tests.
"""
from __future__ import annotations

import pytest
import torch

from plaintext_ref.reuse import CacheBlend, GraphKV, KVShare, KVStore, LayerRunner, SeqKV, block_mask, rag_graph
from plaintext_ref.reuse.graphkv import one_pass_reference
from plaintext_ref.reuse.kvshare import Request, align, simulate_schedule
from plaintext_ref.reuse.store import content_key
from tests.plaintext_ref.helpers import prompt

ATOL = 1e-4


@pytest.fixture(scope="module")
def runner(tiny_llama) -> LayerRunner:
    return LayerRunner(tiny_llama.model)


def kv_diff(a: SeqKV, b: SeqKV) -> float:
    assert a.n == b.n and torch.equal(a.pos.cpu(), b.pos.cpu())
    return max((x - y).abs().max().item() for x, y in zip(a.k + a.v, b.k + b.v))


def split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    return [ids[a:b] for a, b in zip([0] + cuts, cuts + [len(ids)])]


# ---------------------------------------------------------------- runner


def test_runner_prefill_equals_hf(tiny_llama, runner):
    ids = prompt(1, 37, seed=3)[0]
    with torch.no_grad():
        ref = tiny_llama.model(ids[None]).logits
    logits, kv = runner.prefill(ids, logits_rows=torch.arange(37))
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    half, rest = runner.prefill(ids[:20])[1], ids[20:]
    ext, kv2 = runner.extend(half, rest)
    torch.testing.assert_close(ext, ref[:, 20:], atol=ATOL, rtol=0)
    assert kv_diff(kv, kv2) < ATOL


def test_rerotation_round_trip(runner):
    k = torch.randn(1, 2, 9, runner.head_dim)
    old, new = torch.arange(9), torch.arange(100, 109)
    rot = runner.rope(k, old)
    torch.testing.assert_close(runner.rerotate(rot, old, new), runner.rope(k, new), atol=1e-5, rtol=0)
    torch.testing.assert_close(runner.rerotate(runner.rerotate(rot, old, new), new, old), rot, atol=1e-5, rtol=0)


def test_gpt2_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="RoPE"):
        LayerRunner(tiny_gpt2.model)


# ---------------------------------------------------------------- store


def test_store_content_addressing_lru_and_disk(tmp_path, runner):
    ids = prompt(1, 12, seed=4)[0].tolist()
    a = content_key("m", "chunk", [1, 2], ids)
    assert a == content_key("m", "chunk", [1, 2], list(ids))
    assert len({a, content_key("m", "chunk", [1], ids), content_key("other", "chunk", [1, 2], ids),
                content_key("m", "prefix", [1, 2], ids)}) == 4
    kvs = [runner.prefill(prompt(1, 10, seed=s)[0])[1] for s in range(3)]
    store = KVStore(capacity_bytes=2 * kvs[0].nbytes, disk_dir=tmp_path)
    for i, kv in enumerate(kvs):
        store.put(f"k{i}", kv, {"i": i})
    assert len(store) == 2 and store.stats.evictions == 1 and store.memory_bytes <= store.capacity_bytes
    back = store.get("k0")                                         # least recently used: spilled to disk
    assert back is not None and store.stats.disk_hits == 1 and back.meta == {"i": 0}
    assert kv_diff(back.kv, kvs[0]) == 0.0
    store.pin("k0", until=10.0)
    store.put("k3", kvs[1])
    assert "k0" in store._mem                                      # pinned entries survive eviction
    assert store.get("missing") is None and store.stats.misses == 1


# ---------------------------------------------------------------- CacheBlend


@pytest.fixture(scope="module")
def rag(runner):
    ids = prompt(1, 60, seed=5)[0].tolist()
    prefix, chunks, query = ids[:6], split(ids[6:50], [18, 32]), ids[50:]
    logits, kv = runner.prefill(torch.tensor(ids))
    return prefix, chunks, query, logits, kv


def test_cacheblend_ratio_one_equals_full_prefill(runner, rag):
    prefix, chunks, query, logits, kv = rag
    res = CacheBlend(recompute_ratio=1.0).prefill(runner, KVStore(), prefix, chunks, query)
    assert res.stats["recomputed"] == kv.n
    torch.testing.assert_close(res.logits, logits, atol=ATOL, rtol=0)
    assert kv_diff(res.cache, kv) < ATOL


def test_cacheblend_ratio_zero_is_naive_concatenation(runner, rag):
    prefix, chunks, query, logits, _ = rag
    store = KVStore()
    blend = CacheBlend(recompute_ratio=0.0, check_layer=0)
    res = blend.prefill(runner, store, prefix, chunks, query)
    naive_logits, naive = runner.extend(blend.old_cache(runner, store, prefix, chunks), torch.tensor(query))
    torch.testing.assert_close(res.logits, naive_logits[:, -1:], atol=ATOL, rtol=0)
    assert kv_diff(res.cache, naive) < ATOL
    assert (res.logits - logits).abs().max() > 1e-3                # reuse is approximate here
    assert store.stats.hits >= len(chunks) + 1                     # the second lookup hit every chunk


def test_cacheblend_selects_top_deviation_and_improves(runner, rag):
    prefix, chunks, query, logits, kv = rag
    store = KVStore()
    errs = {}
    for r in (0.0, 0.3, 1.0):
        res = CacheBlend(recompute_ratio=r).prefill(runner, store, prefix, chunks, query)
        n_ctx = kv.n - len(query)
        assert res.stats["recomputed"] == int(n_ctx * r) + len(query)
        chosen = res.recomputed[res.recomputed < n_ctx]
        if 0 < len(chosen) < n_ctx:                                # chosen slots have the highest deviation
            rest = torch.ones(n_ctx, dtype=torch.bool)
            rest[chosen] = False
            assert res.deviation[chosen].min() >= res.deviation[:n_ctx][rest].max()
        errs[r] = kv_diff(res.cache, kv)
    assert errs[1.0] < ATOL < errs[0.3] < errs[0.0]


def test_cacheblend_single_chunk_has_no_deviation(runner):
    ids = prompt(1, 30, seed=6)[0].tolist()
    logits, kv = runner.prefill(torch.tensor(ids))
    res = CacheBlend(recompute_ratio=0.0).prefill(runner, KVStore(), ids[:5], [ids[5:24]], ids[24:])
    assert res.deviation.abs().max() < 1e-8
    torch.testing.assert_close(res.logits, logits, atol=ATOL, rtol=0)
    assert kv_diff(res.cache, kv) < ATOL


# ---------------------------------------------------------------- KVShare


def test_kvshare_identical_prompt_is_exact(runner):
    ids = prompt(1, 40, seed=7)[0].tolist()
    logits, kv = runner.prefill(torch.tensor(ids))
    store = KVStore()
    KVShare.remember(runner, store, ids, kv)
    res = KVShare().prefill(runner, store, ids)
    assert res.matched == len(ids) and res.source_key is not None
    torch.testing.assert_close(res.logits, logits, atol=ATOL, rtol=0)
    assert kv_diff(res.cache, kv) < ATOL


def test_kvshare_disjoint_prompt_recomputes_everything(runner):
    old, new = prompt(1, 30, seed=8)[0].tolist(), prompt(1, 30, seed=9)[0].tolist()
    store = KVStore()
    KVShare.remember(runner, store, old, runner.prefill(torch.tensor(old))[1])
    res = KVShare().prefill(runner, store, new)
    logits, kv = runner.prefill(torch.tensor(new))
    assert res.matched == 0 and res.stats["recomputed"] == len(new)
    torch.testing.assert_close(res.logits, logits, atol=ATOL, rtol=0)
    assert kv_diff(res.cache, kv) < ATOL


def test_kvshare_similar_prompt_reuses_and_decode_stage_refreshes(runner):
    old = prompt(1, 48, seed=10)[0].tolist()
    new = old[:15] + [11, 12, 13] + old[18:40] + [14, 15] + old[40:]
    src = align(old, new, min_match=4)
    assert src[:15].tolist() == list(range(15)) and (src[15:18] == -1).all()
    store = KVStore()
    KVShare.remember(runner, store, old, runner.prefill(torch.tensor(old))[1])
    share = KVShare(recompute_ratio=0.2, decode_ratio=0.2, decode_every=2)
    res = share.prefill(runner, store, new)
    assert res.matched == len(new) - 5 and res.stats["recomputed"] == int(res.matched * 0.2) + 5
    answer = prompt(1, 6, seed=11)[0].tolist()
    logprobs, counts = share.decode(runner, res, new, answer)
    assert logprobs.shape == (6, runner.model.config.vocab_size) and counts["refreshes"] == 2
    full_logits, full = runner.prefill(torch.tensor(new))
    torch.testing.assert_close(logprobs[0], full_logits[0, -1].log_softmax(-1), atol=0.5, rtol=0)


def test_kvshare_scheduler_prefers_hits_and_ages():
    reqs = [Request("cold", 0.0, 1000, 0.0), Request("warm", 0.0, 1000, 0.9), Request("late", 0.1, 1000, 0.95)]
    by_hit = simulate_schedule(reqs, 1e-3, 0.16, "hit_rate", aging=0.0)
    fcfs = simulate_schedule(reqs, 1e-3, 0.16, "fcfs")
    assert by_hit.order == ["warm", "late", "cold"] and fcfs.order == ["cold", "warm", "late"]
    assert by_hit.mean_ttft < fcfs.mean_ttft
    aged = simulate_schedule(reqs, 1e-3, 0.16, "hit_rate", aging=10.0)   # strong aging: the cold one goes second
    assert aged.order == ["warm", "cold", "late"]


# ---------------------------------------------------------------- Graph-KV


def test_block_mask_is_exactly_the_graph():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        m = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(1, 5, (m,), generator=g).tolist()
        edges = {(i, j) for j in range(m) for i in range(j) if torch.rand(1, generator=g) < 0.4}
        pre, qry = trial % 3, (trial + 1) % 3
        mask = block_mask(lens, edges, pre, qry)
        seg = [-1] * pre + [s for s, n in enumerate(lens) for _ in range(n)] + [-2] * qry
        for a in range(len(seg)):
            for b in range(len(seg)):
                sa, sb = seg[a], seg[b]
                if sa >= 0 and sb >= 0:
                    want = (sa == sb and b <= a) or (sb, sa) in edges
                else:
                    want = b <= a
                assert bool(mask[a, b]) == want, (lens, edges, a, b)


def test_chain_graph_reproduces_causal_prefill(runner):
    ids = prompt(1, 33, seed=12)[0]
    lens = [7, 9, 11]
    chain = {(i, j) for j in range(3) for i in range(j)}
    mask = block_mask(lens, chain, prefix=3, query=3)
    assert torch.equal(mask, torch.ones(33, 33, dtype=torch.bool).tril())
    a, kv_a = runner.prefill(ids, allowed=mask)
    b, kv_b = runner.prefill(ids)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("edges", [rag_graph(3), {(0, 2), (1, 2)}, {(0, 1)}])
def test_graphkv_two_stage_equals_one_masked_forward(runner, edges):
    segs = [prompt(1, n, seed=13 + n)[0].tolist() for n in (7, 5, 9)]
    store = KVStore()
    src, targets, lay = GraphKV().encode_targets(runner, store, segs, edges)
    ref_src, ref_targets = one_pass_reference(runner, segs, edges)
    assert kv_diff(src, ref_src) < ATOL and len(targets) == len(ref_targets) == len(lay.targets)
    for t, r in zip(targets, ref_targets):
        assert kv_diff(t, r) < ATOL
    assert all(int(t.pos.min()) == lay.l_src for t in targets)          # gapemp: targets share one range


def test_graphkv_prefill_layout(runner):
    segs = [prompt(1, n, seed=20 + n)[0].tolist() for n in (6, 8)]
    prefix, query = [5, 6, 7], [8, 9]
    res = GraphKV().prefill(runner, KVStore(), prefix, segs, rag_graph(2), query)
    assert res.cache.n == 3 + 2 * 14 + 2 and torch.equal(res.cache.pos, torch.arange(res.cache.n))
    isolated = GraphKV().prefill(runner, KVStore(), prefix, segs, set(), query)      # parallel encoding only
    assert isolated.cache.n == 3 + 14 + 2 and isolated.stats["reencoded_tokens"] == 0
