"""Query-aware selection without eviction: Quest, TokenSelect, ShadowKV, DELTA (kv_methods.md §3).

Invariants (catalogue item (e)): a budget covering the cache is the full cache (identical greedy tokens);
the selected set is the top-k of the method's score, recomputed here independently; forced slots (sinks,
local windows, recent pages, outliers) are always attended; the selected count equals the budget at every
decode step; gather ≡ mask; Quest's bound ≥ the true max q·k of its page; ShadowKV's RoPE(U·SV) rebuilds
the keys up to the SVD residual; DELTA's sparse layers use the Δ-layer's pages.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from plaintext_ref.kernels import page_minmax, sparse_decode_attention
from plaintext_ref.policies import DELTA, POLICIES, KVPolicy, LayerKV, Quest, ShadowKV, StepCtx, TokenSelect, get_policy
from plaintext_ref.policies.quest import AUX_KEY as QUEST_KEY
from plaintext_ref.policies.shadowkv import AUX_KEY as SHADOW_KEY
from plaintext_ref.runtime import generate, teacher_forced_logits

PROMPT, TOTAL = 40, 48          # teacher-forced runs: 40-token prompt, 7 decode steps


def _ids(batch: int, length: int, seed: int = 0) -> Tensor:
    return torch.randint(3, 5000, (batch, length), generator=torch.Generator().manual_seed(seed))


class _Spy(KVPolicy):
    """Wraps a policy and records what it sees and returns at every hook."""

    def __init__(self, inner: KVPolicy) -> None:
        self.inner, self.selects, self.reads, self.prefills, self.appends = inner, [], [], [], []

    @property
    def needs(self) -> frozenset[str]:
        return self.inner.needs

    def shares_with(self, layer_idx, num_layers):
        return self.inner.shares_with(layer_idx, num_layers)

    def select(self, ctx, kv):
        mask = self.inner.select(ctx, kv)
        self.selects.append((ctx.layer_idx, ctx.phase, ctx.q.clone(), kv.k.clone(), kv.v.clone(), mask))
        return mask

    def read(self, ctx, kv):
        out = self.inner.read(ctx, kv)
        self.reads.append((ctx.layer_idx, ctx.phase, out[0].clone(), out[1].clone()))
        return out

    def on_prefill(self, ctx, kv):
        self.prefills.append((ctx.layer_idx, kv.k.clone(), kv.v.clone(), kv.pos.clone(), ctx.rope))
        out = self.inner.on_prefill(ctx, kv)
        self.prefills[-1] += (out,)
        return out

    def on_append(self, ctx, kv):
        self.appends.append((ctx.layer_idx, ctx.attn))
        return self.inner.on_append(ctx, kv)


_FULL: dict[tuple[int, int], Tensor] = {}


def _spy_run(model, policy: KVPolicy, seed: int = 1) -> tuple[_Spy, Tensor]:
    ids = _ids(2, TOTAL, seed)
    spy = _Spy(policy)
    logits = teacher_forced_logits(model, ids, PROMPT, spy)
    if (id(model), seed) not in _FULL:
        _FULL[id(model), seed] = teacher_forced_logits(model, ids, PROMPT)
    full = _FULL[id(model), seed]
    assert (logits - full).abs().max() > 1e-3, "the small budget changed nothing: the test would be vacuous"
    return spy, logits


def _decode_selects(spy: _Spy, layer: int) -> list[tuple]:
    return [s for s in spy.selects if s[0] == layer and s[1] == "decode"]


# ---------------------------------------------------------------- full budget ≡ full cache

FULL_BUDGET = {
    "quest": dict(budget=10_000, page_size=4, dense_layers=0),
    "tokenselect": dict(n_init=2, n_local=4, top_k=10_000),
    "shadowkv": dict(budget=10_000, min_prompt=0, chunk_size=4, local_chunks=1, outlier_chunks=2),
    "delta": dict(budget=10_000, full_layers=(0,), page_size=4, recent_pages=2),
    "delta_all_full": dict(budget=4, full_layers=(0, 1), page_size=4, recent_pages=1),
}


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_is_full_cache(tiny_model, name):
    model = tiny_model.model
    ids = _ids(2, 30, seed=2)
    policy = get_policy(name.split("_")[0], **FULL_BUDGET[name])
    assert torch.equal(generate(model, ids, policy, max_new_tokens=6), generate(model, ids, None, max_new_tokens=6))


def test_registry_and_validation():
    assert {"quest", "tokenselect", "shadowkv", "delta"} <= set(POLICIES)
    assert get_policy("quest", budget=0.25).budget.ratio == 0.75
    assert get_policy("tokenselect", budget=64, n_init=4, n_local=8).budget.protect_recent == 8
    for cls, bad in [(Quest, dict(page_size=0)), (Quest, dict(granularity="layer")), (Quest, dict(budget=1.5)),
                     (TokenSelect, dict(top_k=-1)), (TokenSelect, dict(pool_kernel=0)),
                     (ShadowKV, dict(rank=0)), (ShadowKV, dict(chunk_size=0)),
                     (DELTA, dict(full_layers=(1, 2))), (DELTA, dict(page_size=0))]:
        with pytest.raises(ValueError):
            cls(**bad)
    assert DELTA().full_set(28) == {0, 1, 2, 14, 22} and DELTA().full_set(30) == {0, 1, 2, 15, 24}


# ---------------------------------------------------------------- Quest


def test_quest_bound_and_incremental_pages():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 37, 8, generator=g)      # G = 2, T = 37
    lo, hi = page_minmax(k, 5)
    true_max = (q.view(2, 2, 2, 1, 8) @ k[:, :, None].transpose(-1, -2)).squeeze(-2)      # (B, Hkv, G, T)
    true_max = torch.nn.functional.pad(true_max, (0, 3), value=-math.inf).view(2, 2, 2, 8, 5).amax(-1)
    for granularity in ("q_head", "kv_head"):
        bound = Quest(page_size=5, granularity=granularity).page_scores(q, lo, hi)
        expect = true_max.flatten(1, 2) if granularity == "q_head" else true_max.amax(2)
        assert bound.shape == expect.shape and (bound >= expect - 1e-5).all()
    policy, kv = Quest(page_size=5), LayerKV(k[:, :, :3], k[:, :, :3], torch.arange(3).expand(2, 2, 3))
    for t in range(3, 38):                                      # grow one slot at a time, as decode does
        kv = kv if t == 3 else kv.append(LayerKV(k[:, :, t - 1:t], k[:, :, t - 1:t], torch.full((2, 2, 1), t - 1)))
        policy.page_summaries(kv)
    assert kv.aux[QUEST_KEY][3] == 37
    torch.testing.assert_close(kv.aux[QUEST_KEY][0], lo, rtol=0, atol=0)
    torch.testing.assert_close(kv.aux[QUEST_KEY][1], hi, rtol=0, atol=0)


def _select(policy: KVPolicy, q: Tensor, kv: LayerKV, layer: int = 0) -> Tensor:
    ctx = StepCtx(layer, 2, "decode", torch.nn.Identity(), torch.zeros(q.shape[0], 1, dtype=torch.long),
                  q.shape[-1] ** -0.5, q)
    return policy.select(ctx, kv)


def _kv(t: int, b: int = 2, hkv: int = 2, d: int = 8, seed: int = 4) -> LayerKV:
    g = torch.Generator().manual_seed(seed)
    return LayerKV(torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
                   torch.arange(t).expand(b, hkv, t).clone())


def test_quest_page_size_one_is_exact_topk():
    kv = _kv(30)
    q = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(5))
    mask = _select(Quest(budget=7, page_size=1, dense_layers=0), q, kv)                    # (B, H, 1, T)
    logits = q.view(2, 2, 2, 1, 8) @ kv.k[:, :, None].transpose(-1, -2)                 # (B, Hkv, G, 1, T)
    top = logits.flatten(1, 2)[:, :, 0].topk(7, -1).indices
    expect = torch.zeros(2, 4, 30, dtype=torch.bool).scatter_(-1, top, True)
    assert torch.equal(mask[:, :, 0], expect)


def test_quest_gqa_modes_agree_on_duplicated_heads_and_match_sparse_kernel():
    kv = _kv(45)
    q = torch.randn(2, 2, 1, 8, generator=torch.Generator().manual_seed(6)).repeat_interleave(2, dim=1)
    per_q = _select(Quest(budget=16, page_size=4, dense_layers=0), q, kv)                  # (B, H, 1, T)
    for mode in ("mean", "max", "sum"):
        per_kv = _select(Quest(budget=16, page_size=4, dense_layers=0, granularity="kv_head", gqa_agg=mode), q, kv)
        assert torch.equal(per_kv.repeat_interleave(2, dim=1), per_q), mode
        assert (per_kv.sum(-1) == 16).all()                                              # 4 pages of 4
    pages = per_kv[:, :, 0, ::4].nonzero()[:, 2].view(2, 2, 4).int()                    # (B, Hkv, P)
    sparse = sparse_decode_attention(q[:, :, 0], kv.k, kv.v, pages, page_size=4, backend="torch")
    torch.testing.assert_close(sparse, _attend(q, kv.k, kv.v, per_kv)[:, :, 0], atol=1e-5, rtol=0)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """fp32 attention of q (B, H, S, D) over k, v (B, Hkv, T, D) with mask (B, H or Hkv, S, T)."""
    g = q.shape[1] // k.shape[1]
    mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    logits = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return logits.masked_fill(~mask, -math.inf).softmax(-1) @ v.repeat_interleave(g, 1)


def _gathered(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The same attention over physically gathered slots (every head has the same count)."""
    mask = mask[:, :, -1]                                                                # (B, h, T) last query
    h = q.shape[1]
    k, v = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v))
    mask = mask.repeat_interleave(h // mask.shape[1], dim=1)
    idx = mask.nonzero()[:, 2].view(*mask.shape[:2], -1)                                 # (B, H, K)
    ks, vs = (x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1])) for x in (k, v))
    return ((q[:, :, -1:] @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ vs)[:, :, 0]


SMALL = {
    "quest": lambda: Quest(budget=12, page_size=4, dense_layers=1),
    "tokenselect": lambda: TokenSelect(n_init=2, n_local=4, top_k=6),
    "shadowkv": lambda: ShadowKV(budget=8, min_prompt=16, chunk_size=4, local_chunks=1, outlier_chunks=2),
    "delta": lambda: DELTA(budget=12, full_layers=(0,), page_size=4, recent_pages=2),
}


@pytest.fixture(scope="module")
def spied(tiny_llama) -> dict[str, _Spy]:
    """One teacher-forced run of each method at a small budget on tiny-llama (2 layers, H=4, Hkv=2)."""
    return {name: _spy_run(tiny_llama.model, make())[0] for name, make in SMALL.items()}


def test_gather_equals_mask(spied):
    for name in ("quest", "tokenselect", "delta"):
        layer, _, q, k, v, mask = _decode_selects(spied[name], 1)[-1]
        torch.testing.assert_close(_gathered(q, k, v, mask), _attend(q, k, v, mask)[:, :, -1], atol=1e-5, rtol=0)


def test_quest_selects_top_pages_every_step(spied):
    steps = _decode_selects(spied["quest"], 1)
    assert len(steps) == TOTAL - PROMPT - 1
    assert all(s[5] is None for s in spied["quest"].selects if s[0] == 0 or s[1] == "prefill")   # dense
    for _, _, q, k, _, mask in steps:
        t = k.shape[2]
        lo, hi = page_minmax(k, 4)
        qg = q[:, :, 0].view(2, 2, 2, 1, -1)
        bound = qg.clamp(min=0) @ hi[:, :, None].transpose(-1, -2) + qg.clamp(max=0) @ lo[:, :, None].transpose(-1, -2)
        top = bound.flatten(1, 2)[:, :, 0].topk(3, -1).indices                           # k_p = max(3, 12 // 4)
        expect = torch.zeros(2, 4, lo.shape[2], dtype=torch.bool).scatter_(-1, top, True)
        assert torch.equal(mask[:, :, 0], expect.repeat_interleave(4, -1)[..., :t])


# ---------------------------------------------------------------- TokenSelect


def test_tokenselect_soft_voting():
    k = torch.tensor([[20.0, 19.0, 0.0], [0.0, 0.0, 5.0]]).view(1, 2, 3, 1)             # Hkv = H = 2, D = 1
    q = torch.ones(1, 2, 1)
    every = torch.ones(1, 3, dtype=torch.bool)
    assert TokenSelect().vote(q, k, every, 2).tolist() == [[True, False, True]]          # head 1 is heard
    assert (k[..., 0].sum(1) * q[0, 0]).topk(2).indices.sort().values.tolist() == [[0, 1]]   # raw sum is not
    k1, q1 = torch.randn(1, 1, 20, 4), torch.randn(1, 1, 4)                              # one head: top-k of q·k
    chosen = TokenSelect().vote(q1, k1, torch.ones(1, 20, dtype=torch.bool), 5)
    assert chosen[0].nonzero()[:, 0].tolist() == sorted((k1[0, 0] @ q1[0, 0]).topk(5).indices.tolist())


def test_tokenselect_selects_votes_sinks_and_window(spied):
    for layer in (0, 1):
        for _, _, q, k, _, mask in _decode_selects(spied["tokenselect"], layer):
            t = k.shape[2]
            assert mask.shape == (2, 2, 1, t) and (mask.sum(-1) == 12).all()             # 2 + 6 + 4 every step
            assert mask[..., :2].all() and mask[..., t - 4:].all()
            logits = (q[:, :, 0].view(2, 2, 2, 1, -1) @ k[:, :, None].transpose(-1, -2)).flatten(1, 3)  # (B, H, T)
            votes = logits[..., 2:t - 4].softmax(-1).sum(1)
            expect = torch.zeros(2, t, dtype=torch.bool)
            expect[:, 2:t - 4] = torch.zeros_like(votes, dtype=torch.bool).scatter_(-1, votes.topk(6).indices, True)
            assert torch.equal(mask[:, 0, 0, 2:t - 4], expect[:, 2:t - 4])


def test_tokenselect_selection_cache(tiny_llama):
    runs = {theta: _spy_run(tiny_llama.model, TokenSelect(n_init=2, n_local=4, top_k=6, reuse_threshold=theta))[0]
            for theta in (None, 1.5, -1.0)}
    never, always = _decode_selects(runs[1.5], 1), _decode_selects(runs[-1.0], 1)
    assert all(torch.equal(a[5], b[5]) for a, b in zip(_decode_selects(runs[None], 1), never))
    first = always[0][5][0, 0, 0]
    for _, _, _, k, _, mask in always[1:]:
        t = k.shape[2]
        assert torch.equal(mask[0, 0, 0, :first.shape[-1] - 4], first[:-4])             # the same voted slots
        assert mask[..., :2].all() and mask[..., t - 4:].all()


# ---------------------------------------------------------------- ShadowKV


def test_shadowkv_low_rank_keys_outliers_and_selection(spied):
    spy = spied["shadowkv"]
    for layer, k, v, pos, rope, out in spy.prefills:
        st = out.aux[SHADOW_KEY]
        n = st.u.shape[1]
        assert n == 36 and st.outlier.sum(-1).eq(2).all() and st.landmark_ids.shape[-1] == 7
        assert (out.k[:, :, :n] == 0).any(-1).sum() == 2 * 2 * 7 * 4                     # landmark keys dropped
        assert torch.equal(out.k[:, :, n:], k[:, :, n:]) and torch.equal(out.v, v)      # values stay on CPU
        rebuilt = st.u[:, None] @ st.sv                                                  # (B, Hkv, N, D) pre-RoPE
        torch.testing.assert_close(rope(rebuilt, pos[:, :, :n]), k[:, :, :n].float(), atol=1e-4, rtol=0)  # full rank
    for layer in (0, 1):
        for _, _, q, k, _, mask in _decode_selects(spy, layer):
            st = spy.prefills[layer][-1].aux[SHADOW_KEY]
            chunks = mask[:, :, 0, :36].view(2, 2, 9, 4)
            assert (chunks.all(-1) | ~chunks.any(-1)).all() and mask[:, :, 0, 36:].all()  # whole chunks, local kept
            kept = chunks.all(-1)
            assert kept[st.outlier].all() and (kept.sum(-1) == 4).all()                  # 2 outliers + 8 // 4
            qg = q.view(2, 2, 2, 1, -1)
            score = (qg @ st.landmarks[:, :, None].transpose(-1, -2) * 0.25).softmax(-1).sum(3).amax(2)
            top = st.landmark_ids.gather(-1, score.topk(2).indices)
            assert torch.equal(kept & ~st.outlier, torch.zeros_like(kept).scatter_(-1, top, True))
    for layer, k, *_ in spy.prefills:                            # attention reads RoPE(U·SV) = the exact keys
        reads = [r for r in spy.reads if r[0] == layer and r[1] == "decode"]
        for (*_, k_read, _), (*_, mask) in zip(reads, _decode_selects(spy, layer), strict=True):
            attended = mask[:, :, 0, :PROMPT, None].expand_as(k)
            torch.testing.assert_close(k_read[:, :, :PROMPT][attended], k[attended], atol=1e-4, rtol=0)


def test_shadowkv_low_rank_error_is_svd_residual(tiny_llama):
    spy, _ = _spy_run(tiny_llama.model, ShadowKV(budget=8, rank=5, min_prompt=16, chunk_size=4, local_chunks=1,
                                                 outlier_chunks=2))
    for _, k, _, pos, rope, out in spy.prefills:
        st = out.aux[SHADOW_KEY]
        pre = rope(k[:, :, :36], -pos[:, :, :36])
        sing = torch.linalg.svdvals(pre.transpose(1, 2).reshape(2, 36, -1))
        err = (rope(st.u[:, None] @ st.sv, pos[:, :, :36]) - k[:, :, :36]).flatten(1).norm(dim=-1)
        torch.testing.assert_close(err, sing[:, 5:].norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_shadowkv_offload_round_trip(tiny_model):
    model = tiny_model.model
    ids = _ids(2, TOTAL, seed=7)
    kw = dict(budget=8, min_prompt=16, chunk_size=4, local_chunks=1, outlier_chunks=2)
    spy = _Spy(ShadowKV(offload_values=True, **kw))
    offloaded = teacher_forced_logits(model, ids, PROMPT, spy)
    assert all((out.v[:, :, :36] == 0).any(-1).sum() == 2 * out.k.shape[1] * 7 * 4 for *_, out in spy.prefills)
    torch.testing.assert_close(offloaded, teacher_forced_logits(model, ids, PROMPT, ShadowKV(**kw)), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- DELTA


def test_delta_sparse_layers_use_delta_pages(spied):
    spy = spied["delta"]
    delta_attn = [attn for layer, attn in spy.appends if layer == 0][-(TOTAL - PROMPT - 1):]   # decode steps
    steps = _decode_selects(spy, 1)
    assert len(steps) == len(delta_attn) and all(s[5] is None for s in _decode_selects(spy, 0))
    for attn, (_, _, _, k, _, mask) in zip(delta_attn, steps):
        t = k.shape[2]
        n_pages = -(-t // 4)
        pages = mask[:, :, 0]                                                            # (B, Hkv, T)
        assert torch.equal(pages[:, 0], pages[:, 1])                                    # one set for all heads
        picked = torch.nn.functional.pad(pages[:, 0], (0, n_pages * 4 - t)).view(2, n_pages, 4).any(-1)
        assert (picked.sum(-1) == 3).all() and picked[:, -2:].all()                      # budget, recent pages
        per_token = torch.nn.functional.pad(attn[:, :, -1].amax(1), (0, n_pages * 4 - t))   # max over heads
        score = per_token.view(2, n_pages, 4).sum(-1)
        score[:, -2:] = math.inf
        expect = torch.zeros_like(picked).scatter_(-1, score.topk(3).indices, True)
        assert torch.equal(picked, expect)


# ---------------------------------------------------------------- CUDA: Triton scoring, value offload


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selection_on_cuda_matches_cpu():
    kv, q = _kv(300, d=64), torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(8))
    gpu = LayerKV(kv.k.cuda(), kv.v.cuda(), kv.pos.cuda())
    for policy in (Quest(budget=64, dense_layers=0), Quest(budget=64, dense_layers=0, granularity="kv_head"),
                   TokenSelect(n_init=4, n_local=16, top_k=32)):
        assert torch.equal(_select(policy, q.cuda(), gpu).cpu(), _select(policy, q, kv)), policy
    ctx = StepCtx(0, 2, "prefill", torch.nn.Identity(), torch.zeros(2, 1, dtype=torch.long), 0.125, q.cuda())
    policy = ShadowKV(budget=64, min_prompt=0, outlier_chunks=8)                     # 33 chunks: 8 outliers, 25 indexed
    out = policy.on_prefill(ctx, gpu)
    state = out.aux[SHADOW_KEY]
    assert state.v_host.device.type == "cpu" and state.v_host.is_pinned()
    assert torch.equal(state.v_host, kv.v[:, :, :264])
    mask = policy.select(replace(ctx, phase="decode"), out)[:, :, 0]
    k, v, _ = policy.read(replace(ctx, phase="decode"), out)
    assert (out.v[:, :, :264] == 0).any(-1).sum() > 0 and (mask.sum(-1) == (8 + 8) * 8 + 36).all()
    torch.testing.assert_close(v[mask].cpu(), kv.v[mask.cpu()], atol=0, rtol=0)
    torch.testing.assert_close(k[mask].cpu(), kv.k[mask.cpu()], atol=1e-4, rtol=1e-4)   # rank 128 = Hkv·D: exact
