"""Invariants of the eviction policies H2O, TOVA, SnapKV, PyramidKV and KNorm (kv_methods.md §2.2–2.5, §12.2).

Every kept-index check recomputes the method's score independently of the policy (HF eager attention,
k_proj hooks, or a Python re-accumulation of the recorded attention rows) and compares index sets exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies import (
    H2O,
    POLICIES,
    TOVA,
    Budget,
    KNorm,
    LayerKV,
    PyramidKV,
    SnapKV,
    StepCtx,
    get_policy,
)
from plaintext_ref.policies.h2o import ACC
from plaintext_ref.policies.pyramidkv import pyramid_ratio, pyramid_tokens
from plaintext_ref.runtime import generate, teacher_forced_logits
from tests.plaintext_ref.helpers import eager_attentions as _eager_attentions
from tests.plaintext_ref.helpers import group_duplicated as _group_duplicated
from tests.plaintext_ref.helpers import prefill as _prefill
from tests.plaintext_ref.helpers import prompt as _prompt


@dataclass
class Record:
    layer: int
    phase: str
    attn: Tensor | None
    pos_before: Tensor
    after: LayerKV


def recording(cls):
    """``cls`` with every on_prefill / on_append call logged as a Record."""
    @dataclass
    class Recording(cls):
        log: list = field(default_factory=list)

        def _hook(self, hook, ctx: StepCtx, kv: LayerKV) -> LayerKV:
            before = kv.pos.clone()
            out = hook(ctx, kv)
            aux = {k: v.clone() for k, v in out.aux.items() if isinstance(v, Tensor)}
            self.log.append(Record(ctx.layer_idx, ctx.phase, ctx.attn, before,
                                   LayerKV(out.k, out.v, out.pos.clone(), out.valid, aux=aux)))
            return out

        def on_prefill(self, ctx, kv):
            return self._hook(super().on_prefill, ctx, kv)

        def on_append(self, ctx, kv):
            return self._hook(super().on_append, ctx, kv)
    return Recording


# ---------------------------------------------------------------- registry and validation


def test_registry_and_budget_shorthand():
    for name, cls in [("h2o", H2O), ("tova", TOVA), ("snapkv", SnapKV), ("pyramidkv", PyramidKV), ("knorm", KNorm)]:
        assert POLICIES[name] is cls
        assert isinstance(get_policy(name, budget=0.5), cls)
    assert get_policy("snapkv", budget=40, window_size=8).budget == Budget(tokens=40, protect_recent=8)
    assert get_policy("tova", budget=0.25).budget == Budget(ratio=0.75)
    assert get_policy("pyramidkv", budget=100, window_size=8).capacity == Budget(tokens=100)


@pytest.mark.parametrize("cls,kwargs", [
    (SnapKV, dict(kernel_size=4)), (SnapKV, dict(window_size=0)), (SnapKV, dict(pooling="mean")),
    (SnapKV, dict(evict_on="both")), (SnapKV, dict(budget=None)), (PyramidKV, dict(beta=0)),
    (PyramidKV, dict(budget=32, window_size=32)), (PyramidKV, dict(budget=Budget(per_layer=lambda i, n_l, n: n))),
    (H2O, dict(recent_fraction=1.5)), (H2O, dict(granularity="q_head")), (KNorm, dict(skip_layers=(-1,))),
    (TOVA, dict(budget=1.5)), (KNorm, dict(gqa_agg="median")),
])
def test_invalid_config_raises(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


# ---------------------------------------------------------------- budget >= length ≡ full cache


@pytest.fixture(scope="module")
def full_reference():
    """model -> (prompt (2, 12), full-cache greedy tokens, full-cache teacher-forced logits), computed once."""
    memo = {}

    def get(model):
        if id(model) not in memo:
            ids = _prompt(2, 12, seed=1)
            memo[id(model)] = (ids, generate(model, ids, None, max_new_tokens=6), teacher_forced_logits(model, ids, 8))
        return memo[id(model)]
    return get


@pytest.mark.parametrize("make", [
    lambda: H2O(budget=64), lambda: TOVA(budget=64), lambda: SnapKV(budget=64, window_size=4),
    lambda: PyramidKV(budget=64, window_size=4), lambda: KNorm(budget=1.0),
    lambda: SnapKV(budget=1.0, window_size=4, granularity="q_head"),
], ids=["h2o", "tova", "snapkv", "pyramidkv", "knorm", "snapkv_q_head"])
def test_large_budget_is_full_cache(tiny_model, make, full_reference):
    model = tiny_model.model
    ids, full_tokens, full_logits = full_reference(model)
    assert torch.equal(generate(model, ids, make(), max_new_tokens=6), full_tokens)
    torch.testing.assert_close(teacher_forced_logits(model, ids, 8, make()), full_logits, atol=0, rtol=0)


# ---------------------------------------------------------------- SnapKV / PyramidKV


def _snapkv_votes(attn: Tensor, window: int, kernel: int, hkv: int, pooling: str = "avg",
                  per_q_head: bool = False) -> Tensor:
    """Pooled window votes (B, h, S − W) from eager attention (B, H, S, S): the SnapKV rule written out."""
    b, h, s, _ = attn.shape
    votes = attn[:, :, -window:, : s - window].sum(dim=2)                       # (B, H, S − W), summed
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    votes = pool(votes, kernel, stride=1, padding=kernel // 2)
    return votes if per_q_head else votes.view(b, hkv, h // hkv, -1).mean(dim=2)


def _assert_window_and_topk(pos: Tensor, votes: Tensor, window: int, keep: int) -> None:
    """pos (B, h, K): the last ``window`` slots plus a top-(K − window) set of ``votes`` (ties may go either way)."""
    n = votes.shape[-1] + window
    assert pos.shape[-1] == keep and (pos[..., -window:] == torch.arange(n - window, n)).all()
    prefix = pos[..., : keep - window]
    kept = torch.zeros_like(votes, dtype=torch.bool).scatter_(-1, prefix, True)
    worst_kept = votes.masked_fill(~kept, float("inf")).amin(dim=-1)
    best_dropped = votes.masked_fill(kept, float("-inf")).amax(dim=-1)
    assert (worst_kept >= best_dropped - 1e-6).all(), (worst_kept - best_dropped).min()


@pytest.mark.parametrize("pooling,granularity", [("avg", "kv_head"), ("max", "kv_head"), ("avg", "q_head")])
def test_snapkv_keeps_topk_of_window_votes(tiny_llama, pooling, granularity):
    model = tiny_llama.model
    ids = _prompt(2, 40, seed=2)
    policy = SnapKV(budget=16, window_size=6, kernel_size=5, pooling=pooling, granularity=granularity)
    cache = _prefill(model, ids, policy)
    for layer, attn in enumerate(_eager_attentions(model, ids)):
        votes = _snapkv_votes(attn, 6, 5, model.config.num_key_value_heads, pooling, granularity == "q_head")
        _assert_window_and_topk(cache.kv(layer).pos, votes, 6, 16)


def test_snapkv_decode_never_evicts(tiny_llama):
    policy = recording(SnapKV)(budget=10, window_size=4)
    generate(tiny_llama.model, _prompt(1, 20, seed=3), policy, max_new_tokens=5)
    sizes = [(r.phase, r.after.n) for r in policy.log if r.layer == 0]
    assert sizes == [("prefill", 10), ("decode", 11), ("decode", 12), ("decode", 13), ("decode", 14)]


def test_snapkv_left_padding_keeps_only_real_slots(tiny_llama):
    ids, mask = _prompt(2, 16, seed=4), torch.ones(2, 16, dtype=torch.long)
    mask[0, :6] = 0
    policy = recording(SnapKV)(budget=8, window_size=3)
    generate(tiny_llama.model, ids, policy, max_new_tokens=2, attention_mask=mask)
    for r in policy.log:
        if r.phase == "prefill":
            assert r.after.valid.all() and r.after.n == 8
            assert (r.after.pos[0, :, -3:] == torch.tensor([7, 8, 9])).all()   # row 0 has positions 0..9


def test_pyramid_budget_schedule():
    # Hand-computed: C=512, w=32, β=20 → min 24, max 936, steps 912 // 31 = 29.
    sched = [pyramid_tokens(512, 32, 20, layer, 32, 4000) for layer in range(32)]
    assert sched[0] == 968 and sched[1] == 939 and sched[31] == 69
    assert all(a >= b for a, b in zip(sched, sched[1:]))
    assert abs(sum(sched) / 32 - 512) <= 31 / 2 + 1                               # floor(steps) shifts the mean
    assert pyramid_tokens(512, 32, 20, 5, 32, 300) == 300                         # n < C: no compression
    assert pyramid_tokens(512, 32, 20, 5, 32, 900) == 512                         # n < 2(C − w): SnapKV
    assert {pyramid_tokens(512, 32, 1, layer, 32, 4000) for layer in range(32)} == {512}   # β = 1: flat
    assert pyramid_tokens(512, 32, 20, 0, 1, 4000) == 968                         # L = 1
    for n in (100, 257, 1000):                                                    # kvpress: mean ≈ n(1 − r)
        for ratio in (0.1, 0.5, 0.8):
            kv_sched = [pyramid_ratio(ratio, 8, 20, layer, 8, n) for layer in range(8)]
            assert abs(sum(kv_sched) / 8 - n * (1 - ratio)) <= 1.0, (n, ratio, kv_sched)
            assert all(a >= b for a, b in zip(kv_sched, kv_sched[1:]))


def test_pyramidkv_applies_layer_budgets(tiny_llama):
    model = tiny_llama.model
    ids = _prompt(1, 48, seed=5)
    policy = PyramidKV(budget=20, window_size=4, kernel_size=3, beta=4)
    cache = _prefill(model, ids, policy)
    expected = [pyramid_tokens(20, 4, 4, layer, 2, 48) for layer in range(2)]
    assert [cache.kv(i).n for i in range(2)] == expected == [32, 8]
    for layer, attn in enumerate(_eager_attentions(model, ids)):
        votes = _snapkv_votes(attn, 4, 3, model.config.num_key_value_heads)
        _assert_window_and_topk(cache.kv(layer).pos, votes, 4, expected[layer])


# ---------------------------------------------------------------- H2O


def test_h2o_scores_and_kept_sets_match_reaccumulation(tiny_llama):
    model = tiny_llama.model
    hkv, h = model.config.num_key_value_heads, model.config.num_attention_heads
    policy = recording(H2O)(budget=9, recent_fraction=1 / 3)                      # 3 recent + 6 heavy
    generate(model, _prompt(2, 12, seed=6), policy, max_new_tokens=8, eos_token_id=[])
    acc: dict[tuple, Tensor] = {}                                                 # (layer, b, kv head, pos) -> (G,)
    for r in policy.log:
        b_n, _, s, t = r.attn.shape
        for b in range(b_n):
            for kvh in range(hkv):
                for slot in range(t):
                    key = (r.layer, b, kvh, int(r.pos_before[b, kvh, slot]))
                    got = r.attn[b, kvh * (h // hkv):(kvh + 1) * (h // hkv), :, slot].sum(dim=-1)
                    acc[key] = acc.get(key, 0) + got
                cand = r.pos_before[b, kvh].tolist()
                kept = r.after.pos[b, kvh].tolist()
                assert len(kept) == min(len(cand), 9), (r.layer, r.phase, len(kept))
                if len(cand) > 9:
                    recent, older = cand[-3:], cand[:-3]
                    score = {p: float(acc[(r.layer, b, kvh, p)].mean()) for p in older}
                    heavy = sorted(older, key=score.get, reverse=True)[:6]
                    assert kept == sorted(heavy + recent), (r.layer, r.phase, kept, heavy, recent)
                stored = r.after.aux[ACC][b, kvh]                                 # (K, G)
                want = torch.stack([acc[(r.layer, b, kvh, p)] for p in kept])
                torch.testing.assert_close(stored, want, atol=1e-5, rtol=0)
    assert len(policy.log) == 2 * 8                                               # prefill + 7 fed tokens, 2 layers


def test_h2o_planted_heavy_hitter_survives():
    policy = H2O(budget=4, recent_fraction=0.5)
    b, h, hkv, d, t = 1, 2, 1, 4, 8
    kv = LayerKV(torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d), torch.arange(t).expand(b, hkv, t).clone())

    def ctx_for(kv: LayerKV, s: int, phase: str) -> StepCtx:
        attn = torch.full((b, h, s, kv.n), 0.1 / (kv.n - 1))
        attn[..., (kv.pos[0, 0] == 2).nonzero().item()] = 0.9                    # the planted column: pos 2
        return StepCtx(0, 1, phase, torch.nn.Identity(), torch.zeros(b, s, dtype=torch.long), 0.5,
                       torch.zeros(b, h, s, d), attn=attn)
    kv = policy.on_prefill(ctx_for(kv, t, "prefill"), kv)
    for i in range(6):
        kv = kv.append(LayerKV(torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.full((b, hkv, 1), t + i)))
        kv = policy.on_append(ctx_for(kv, 1, "decode"), kv)
        assert kv.n == 4 and 2 in kv.pos[0, 0].tolist() and kv.pos[0, 0, -1] == t + i


# ---------------------------------------------------------------- TOVA


def test_tova_evicts_argmin_of_head_mean_and_shares_indices(tiny_llama):
    policy = recording(TOVA)(budget=10)
    generate(tiny_llama.model, _prompt(2, 10, seed=7), policy, max_new_tokens=6, eos_token_id=[])
    decodes = [r for r in policy.log if r.phase == "decode"]
    assert decodes and all(r.after.n == 10 for r in policy.log)                  # budget held at every step
    for r in decodes:
        score = r.attn[:, :, -1, :].mean(dim=1)                                   # (B, T)
        for b in range(score.shape[0]):
            evicted = set(r.pos_before[b, 0].tolist()) - set(r.after.pos[b, 0].tolist())
            assert evicted == {int(r.pos_before[b, 0, score[b].argmin()])}
        assert torch.equal(r.after.pos[:, 0], r.after.pos[:, 1])


def test_tova_protect_recent_keeps_last_token(tiny_llama):
    policy = recording(TOVA)(budget=Budget(tokens=5, protect_recent=1), evict_on="prefill")
    _prefill(tiny_llama.model, _prompt(1, 16, seed=8), policy)
    assert all(r.after.pos[0, 0, -1] == 15 and r.after.n == 5 for r in policy.log)


# ---------------------------------------------------------------- KNorm


def test_knorm_keeps_lowest_prerope_key_norms_and_skips_layers(tiny_llama):
    model = tiny_llama.model
    ids = _prompt(2, 20, seed=9)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    pre = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, idx=idx: pre.setdefault(idx, o))
             for idx, layer in enumerate(model.model.layers)]
    try:
        cache = _prefill(model, ids, KNorm(budget=0.3, skip_layers=(1,)))
    finally:
        for hook in hooks:
            hook.remove()
    norms = pre[0].view(2, 20, cfg.num_key_value_heads, d).transpose(1, 2).norm(dim=-1)   # RoPE keeps norms
    expected = (-norms).topk(int(20 * 0.3), dim=-1).indices.sort(dim=-1).values
    assert torch.equal(cache.kv(0).pos, expected)
    assert cache.kv(1).n == 20                                                     # layer 1 skipped


# ---------------------------------------------------------------- GQA aggregation


@pytest.mark.parametrize("cls,kwargs", [
    (SnapKV, dict(budget=12, window_size=4)), (H2O, dict(budget=10)), (TOVA, dict(budget=10, granularity="kv_head")),
], ids=["snapkv", "h2o", "tova_kv_head"])
def test_gqa_modes_agree_on_duplicated_heads(tiny_llama, cls, kwargs):
    dup = _group_duplicated(tiny_llama.model)
    ids = _prompt(2, 24, seed=10)
    kept = {}
    for agg in ("mean", "max", "sum"):
        policy = recording(cls)(gqa_agg=agg, **kwargs)
        generate(dup, ids, policy, max_new_tokens=4, eos_token_id=[])
        kept[agg] = [r.after.pos for r in policy.log]
    assert len(kept["mean"]) == 2 * 4
    assert all(torch.equal(a, b) for a, b in zip(kept["mean"], kept["max"]))
    assert all(torch.equal(a, b) for a, b in zip(kept["mean"], kept["sum"]))
