"""Invariants of Keyformer, Expected Attention, ThinK, RazorAttention and WindowKV (kv_methods.md §2.6, §12.1,
§5.1, §4.1, §7.2, item (e) of each).

Kept-index checks recompute each score independently of the policy (q_proj hooks, HF eager attention, an
explicit RoPE matrix, a Python re-accumulation of recorded logits) and compare index sets exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from plaintext_ref.policies import (
    POLICIES,
    H2O,
    Budget,
    ExpectedAttention,
    Keyformer,
    LayerKV,
    RazorAttention,
    SnapKV,
    StepCtx,
    ThinK,
    WindowKV,
    get_policy,
)
from plaintext_ref.policies.expected_attention import average_rotation, expected_logits
from plaintext_ref.policies.razor_attention import head_scores
from plaintext_ref.policies.think import KEEP, PRUNED
from plaintext_ref.policies.windowkv import group_budgets, window_scores
from plaintext_ref.runtime import RefCache, generate, teacher_forced_logits
from tests.plaintext_ref.helpers import eager_attentions as _eager_attentions
from tests.plaintext_ref.helpers import group_duplicated as _group_duplicated
from tests.plaintext_ref.helpers import prefill as _prefill
from tests.plaintext_ref.helpers import prompt as _prompt


@torch.no_grad()
def _prerope_queries(model, ids: Tensor) -> dict[int, Tensor]:
    """q_proj outputs per layer as (B, H, S, D)."""
    cfg, out = model.config, {}
    d = cfg.hidden_size // cfg.num_attention_heads

    def keep(idx: int):
        def hook(module, inputs, output) -> None:
            out[idx] = output.view(*output.shape[:2], -1, d).transpose(1, 2)
        return hook
    hooks = [layer.self_attn.q_proj.register_forward_hook(keep(idx)) for idx, layer in enumerate(model.model.layers)]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def _rope_matrices(model, positions: Tensor, d: int) -> Tensor:
    """(F, D, D) explicit R_t = diag(cos_t) + diag(sin_t)·P, P x = rotate_half(x)."""
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1, d), positions[None])
    p = torch.zeros(d, d)
    p[: d // 2, d // 2:], p[d // 2:, : d // 2] = -torch.eye(d // 2), torch.eye(d // 2)
    return torch.diag_embed(cos[0]) + torch.diag_embed(sin[0]) @ p


@dataclass
class Record:
    layer: int
    phase: str
    logits: Tensor | None
    pos_before: Tensor
    after: LayerKV


def recording(cls):
    """``cls`` with every on_prefill / on_append call logged as a Record."""
    @dataclass
    class Recording(cls):
        log: list = field(default_factory=list)
        ctx: dict = field(default_factory=dict)                 # layer -> its prefill StepCtx

        def _hook(self, hook, ctx: StepCtx, kv: LayerKV) -> LayerKV:
            self.ctx.setdefault(ctx.layer_idx, ctx)
            before = kv.pos.clone()
            out = hook(ctx, kv)
            aux = {k: v.clone() for k, v in out.aux.items() if isinstance(v, Tensor)}
            self.log.append(Record(ctx.layer_idx, ctx.phase, ctx.logits, before,
                                   LayerKV(out.k.clone(), out.v, out.pos.clone(), out.valid, out.bias, aux=aux)))
            return out

        def on_prefill(self, ctx, kv):
            return self._hook(super().on_prefill, ctx, kv)

        def on_append(self, ctx, kv):
            return self._hook(super().on_append, ctx, kv)
    return Recording


# ---------------------------------------------------------------- registry, validation, full cache


def test_registry():
    for name, cls in [("keyformer", Keyformer), ("expected_attention", ExpectedAttention), ("think", ThinK),
                      ("razor_attention", RazorAttention), ("windowkv", WindowKV)]:
        assert POLICIES[name] is cls
    assert get_policy("keyformer", budget=0.5).budget == Budget(ratio=0.5)
    assert get_policy("expected_attention", budget=10).budget == Budget(tokens=10, protect_sink=4)
    assert get_policy("think", budget=0.75).pruning_ratio == 0.25
    assert get_policy("windowkv", strategy="average").suffix_size == 16


@pytest.mark.parametrize("cls,kwargs", [
    (Keyformer, dict(recent_fraction=1.5)), (Keyformer, dict(tau_init=0.0)), (Keyformer, dict(granularity="q_head")),
    (ExpectedAttention, dict(n_future_positions=0)), (ExpectedAttention, dict(evict_on="both")),
    (ThinK, dict(pruning_ratio=1.0)), (ThinK, dict(budget=64)), (ThinK, dict(gqa_agg="median")),
    (RazorAttention, dict(echo_frac=2.0)), (RazorAttention, dict(retrieval_heads=torch.zeros(2, 2))),
    (WindowKV, dict(strategy="top")), (WindowKV, dict(review_window_size=0)), (WindowKV, dict(budget=None)),
])
def test_invalid_config_raises(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


FULL: dict[str, tuple[Tensor, Tensor]] = {}   # full-cache tokens and logits per tiny model


@pytest.mark.parametrize("make", [
    lambda: Keyformer(budget=64), lambda: ExpectedAttention(budget=1.0, n_future_positions=8),
    lambda: ThinK(pruning_ratio=0.0, window_size=4), lambda: RazorAttention(budget=0.2, min_window=64, calib_length=16),
    lambda: RazorAttention(budget=2, min_window=0, retrieval_heads=torch.ones(2, 4, dtype=torch.bool)),
    lambda: WindowKV(budget=64, review_window_size=4, suffix_size=4),
], ids=["keyformer", "expected_attention", "think", "razor_no_drop", "razor_all_retrieval", "windowkv"])
def test_large_budget_is_full_cache(tiny_model, make):
    model = tiny_model.model
    ids = _prompt(2, 12, seed=1)
    if model.config.model_type not in FULL:
        FULL[model.config.model_type] = (generate(model, ids, None, max_new_tokens=4),
                                         teacher_forced_logits(model, ids, 6))
    tokens, logits = FULL[model.config.model_type]
    assert torch.equal(generate(model, ids, make(), max_new_tokens=4), tokens)
    torch.testing.assert_close(teacher_forced_logits(model, ids, 6, make()), logits, atol=0, rtol=0)


# ---------------------------------------------------------------- Keyformer


def test_keyformer_without_noise_is_h2o(tiny_llama):
    ids, kept = _prompt(2, 15, seed=2), {}
    for cls, kw in [(Keyformer, dict(gumbel=False, tau_delta=0.0)), (H2O, {})]:
        policy = recording(cls)(budget=9, recent_fraction=1 / 3, **kw)
        generate(tiny_llama.model, ids, policy, max_new_tokens=6, eos_token_id=[])
        kept[cls] = [r.after.pos for r in policy.log]
    assert len(kept[H2O]) == 2 * 6 and all(torch.equal(a, b) for a, b in zip(kept[Keyformer], kept[H2O]))


def test_keyformer_reaccumulated_gumbel_scores_and_budget(tiny_llama):
    model, hkv = tiny_llama.model, tiny_llama.model.config.num_key_value_heads
    policy = recording(Keyformer)(budget=0.6, recent_fraction=0.3, tau_delta=0.5, seed=7)
    generate(model, _prompt(1, 20, seed=3), policy, max_new_tokens=6, eos_token_id=[])
    gen, acc, steps = torch.Generator().manual_seed(7), {}, {}
    for r in policy.log:                                      # the noise is drawn in call order, one draw per call
        tau = 1.0 + 0.5 * steps.get(r.layer, 0)
        steps[r.layer] = steps.get(r.layer, 0) + 1
        noise = -torch.empty(r.logits.shape).exponential_(generator=gen).log()
        probs = ((r.logits + noise) / tau).softmax(-1).nan_to_num(0.0).sum(dim=2)   # (B, H, T)
        h = probs.shape[1]
        for kvh in range(hkv):
            cand = r.pos_before[0, kvh].tolist()
            for slot, p in enumerate(cand):
                group = probs[0, kvh * h // hkv:(kvh + 1) * h // hkv, slot]             # (G,)
                acc[(r.layer, kvh, p)] = acc.get((r.layer, kvh, p), 0) + group
            kept = r.after.pos[0, kvh].tolist()
            assert len(kept) == min(len(cand), 12)            # K = int(20 · 0.6) at every step
            if len(cand) > 12:
                recent, older = cand[-3:], cand[:-3]          # ⌊12 · 0.3⌋ recent slots
                heavy = sorted(older, key=lambda p: float(acc[(r.layer, kvh, p)].mean()), reverse=True)[:9]
                assert kept == sorted(heavy + recent), (r.layer, r.phase)


def test_keyformer_seeded_noise_is_deterministic(tiny_llama):
    ids = _prompt(1, 24, seed=4)
    runs = []
    for seed in (0, 0, 1):
        policy = recording(Keyformer)(budget=0.5, seed=seed)
        generate(tiny_llama.model, ids, policy, max_new_tokens=3, eos_token_id=[])
        runs.append(torch.cat([r.after.aux["keyformer_acc"].flatten() for r in policy.log]))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


# ---------------------------------------------------------------- Expected Attention


def test_expected_attention_keeps_topk_of_recomputed_score(tiny_llama):
    model, cfg = tiny_llama.model, tiny_llama.model.config
    d, g, n, n_sink, fut = cfg.hidden_size // cfg.num_attention_heads, 2, 40, 4, 16
    ids = _prompt(2, n, seed=5)
    full, queries = _prefill(model, ids, None), _prerope_queries(model, ids)
    policy = recording(ExpectedAttention)(budget=0.5, n_future_positions=fut)
    cache = _prefill(model, ids, policy)
    r_bar = _rope_matrices(model, torch.arange(n, n + fut), d).mean(dim=0)            # (D, D)
    for layer in range(cfg.num_hidden_layers):
        q = queries[layer][:, :, n_sink:]
        mu = q.mean(dim=2)
        cov = (q - mu[:, :, None]).transpose(2, 3) @ (q - mu[:, :, None]) / q.shape[2]
        mu, cov = mu @ r_bar.T, r_bar @ cov @ r_bar.T
        k, v = full.kv(layer).k.repeat_interleave(g, 1)[:, :, n_sink:], full.kv(layer).v[:, :, n_sink:]
        logit = torch.einsum("bhtd,bhd->bht", k, mu) / math.sqrt(d) + torch.einsum(
            "bhtd,bhde,bhte->bht", k, cov, k) / d / 2
        score = logit.softmax(-1).view(2, 2, g, -1).mean(2) * v.norm(dim=-1)
        rest = score.topk(n // 2 - n_sink, dim=-1).indices + n_sink
        expected = torch.cat([torch.arange(n_sink).expand(2, 2, n_sink), rest], -1).sort(-1).values
        assert torch.equal(cache.kv(layer).pos, expected), layer
        got = policy.score(policy.ctx[layer], full.kv(layer)).view(2, 2, g, -1).mean(2)[..., n_sink:]
        torch.testing.assert_close(got, score, atol=1e-6, rtol=1e-4)                    # values, not just ranks


def test_expected_attention_closed_forms(tiny_llama):
    rope = RefCache(tiny_llama.model).rope
    d, start = 16, torch.tensor([9, 30])
    x = torch.randn(2, 3, 5, d)
    r1 = average_rotation(rope, start, 1, d)                                             # F = 1: R̄ = R_n
    torch.testing.assert_close(x @ r1.transpose(1, 2)[:, None], rope(x, start[:, None].expand(2, 5)))
    mu, k = torch.randn(2, 3, d), torch.randn(2, 3, 7, d)                                # Σ = 0: attention of μ
    torch.testing.assert_close(expected_logits(k, mu, None, 0.25).softmax(-1),
                               (0.25 * k @ mu[..., None]).squeeze(-1).softmax(-1))
    g = torch.Generator().manual_seed(0)                                                 # Monte-Carlo MGF
    a = torch.randn(4, 4, generator=g) * 0.5
    mu, cov, k = torch.randn(4, generator=g) * 0.5, a @ a.T, torch.randn(4, generator=g)
    q = torch.distributions.MultivariateNormal(mu, cov).sample((400_000,))
    mc = torch.exp(0.5 * q @ k).mean()
    closed = torch.exp(expected_logits(k[None, None, None], mu[None, None], cov[None, None], 0.5))
    assert abs(float(closed) / float(mc) - 1) < 0.02


def test_expected_attention_head_adaptive_budget(tiny_llama):
    cache = _prefill(tiny_llama.model, _prompt(1, 30, seed=6), ExpectedAttention(budget=10, head_adaptive=True,
                                                                                 epsilon=1e-2, n_future_positions=8))
    for layer in range(2):
        valid = cache.kv(layer).valid
        assert int(valid.sum()) == 10 * 2 and valid[..., :4].all()                     # sinks kept on every head


# ---------------------------------------------------------------- ThinK


def test_think_channels_match_frobenius_score(tiny_llama):
    model, cfg = tiny_llama.model, tiny_llama.model.config
    d, n, w, recent = 16, 30, 8, 5
    ids = _prompt(2, n, seed=8)
    policy = recording(ThinK)(pruning_ratio=0.5, window_size=w, recent_size=recent)
    generate(model, ids, policy, max_new_tokens=3, eos_token_id=[])
    full, queries = _prefill(model, ids, None), _prerope_queries(model, ids)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1, d), torch.arange(n)[None])
    for r in policy.log:
        k_full = full.kv(r.layer).k                                                      # (B, Hkv, T, D)
        if r.phase == "prefill":
            q = queries[r.layer]
            q = q * cos + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin          # post-RoPE
            per_q = torch.stack([torch.linalg.matrix_norm(
                q[:, h, -w:, c, None] @ k_full[:, h // 2, :, c, None].transpose(-1, -2)) ** 2
                for h in range(4) for c in range(d)], -1).view(2, 4, d)          # ‖Q_c K_cᵀ‖_F² per query head
            score = per_q.view(2, 2, 2, d).sum(2)
            expected = score.topk(d // 2, dim=-1).indices.sort(-1).values
            keep = r.after.aux[KEEP][:, :, 0]
            assert torch.equal(keep.nonzero()[:, -1].view(2, 2, d // 2), expected), r.layer
            zeroed = (r.after.k == 0) & ~(k_full == 0)
            assert torch.equal(zeroed[:, :, : n - recent], (~keep)[:, :, None].expand(-1, -1, n - recent, -1))
            assert not zeroed[:, :, n - recent:].any()                                    # recent keys full width
        else:
            assert torch.equal(r.after.k[:, :, -1], k_full[:, :, -1]) or r.after.n > n    # new keys full width
            assert not r.after.aux[PRUNED][..., n:].any() and r.after.aux[PRUNED].shape[-1] == r.after.n


def test_think_recent_zero_is_kvpress_and_gqa_modes_agree(tiny_llama):
    ids = _prompt(2, 24, seed=9)
    cache = _prefill(tiny_llama.model, ids, ThinK(pruning_ratio=0.25, window_size=6, recent_size=0))
    assert cache.kv(0).aux[PRUNED].all() and int((cache.kv(0).k == 0).sum()) == 2 * 2 * 24 * 4
    dup = _group_duplicated(tiny_llama.model)
    keeps = [_prefill(dup, ids, ThinK(pruning_ratio=0.5, window_size=6, gqa_agg=agg)).kv(1).aux[KEEP]
             for agg in ("mean", "max", "sum")]
    assert torch.equal(keeps[0], keeps[1]) and torch.equal(keeps[0], keeps[2])


# ---------------------------------------------------------------- RazorAttention


def _attend(q: Tensor, kv: LayerKV, scaling: float) -> Tensor:
    """Reference attention of q (B, Hkv, S, D) over kv (valid + bias honoured)."""
    logits = q @ kv.k.transpose(-1, -2) * scaling
    if kv.bias is not None:
        logits = logits + kv.bias[:, :, None]
    logits = logits.masked_fill(~kv.valid_mask()[:, :, None], -math.inf)
    return logits.softmax(-1) @ kv.v


def test_razor_compensation_is_exact_for_identical_dropped_keys():
    b, hkv, t, d, n_sink, window = 2, 2, 20, 8, 2, 5
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    k[:, :, n_sink:t - window] = torch.randn(b, hkv, 1, d, generator=g)                  # identical dropped keys
    kv = LayerKV(k, v, torch.arange(t).expand(b, hkv, t).clone())
    policy = RazorAttention(budget=window, min_window=0, n_sink=n_sink,
                            retrieval_heads=torch.zeros(1, hkv, dtype=torch.bool))
    ctx = StepCtx(0, 1, "prefill", nn.Identity(), torch.arange(t)[None].expand(b, t), 0.35, torch.zeros(b, hkv, t, d))
    out = policy.on_prefill(ctx, kv)
    assert out.n == n_sink + 1 + window and torch.equal(out.pos[0, 0], torch.tensor([0, 1, 2, 15, 16, 17, 18, 19]))
    torch.testing.assert_close(out.bias[:, :, n_sink], torch.full((b, hkv), math.log(t - n_sink - window)))
    q = torch.randn(b, hkv, 3, d, generator=g)
    torch.testing.assert_close(_attend(q, out, 0.35), _attend(q, kv, 0.35), atol=1e-6, rtol=1e-5)
    kv.k = torch.randn(b, hkv, t, d, generator=g)                                       # bias form ≡ explicit formula
    out = policy.on_prefill(ctx, kv)
    drop = slice(n_sink, t - window)
    e = lambda keys: torch.exp(q @ keys.transpose(-1, -2) * 0.35)                       # noqa: E731
    keep_k = torch.cat([kv.k[:, :, :n_sink], kv.k[:, :, t - window:]], 2)
    keep_v = torch.cat([kv.v[:, :, :n_sink], kv.v[:, :, t - window:]], 2)
    k_hat, v_hat = kv.k[:, :, drop].mean(2, keepdim=True), kv.v[:, :, drop].mean(2, keepdim=True)
    m = t - n_sink - window
    explicit = (e(keep_k) @ keep_v + m * e(k_hat) @ v_hat) / (e(keep_k).sum(-1, keepdim=True) + m * e(k_hat))
    torch.testing.assert_close(_attend(q, out, 0.35), explicit, atol=1e-6, rtol=1e-5)


def test_razor_ragged_heads_and_decode(tiny_llama):
    heads = torch.tensor([[True, False], [False, False]])
    policy = recording(RazorAttention)(budget=6, min_window=0, retrieval_heads=heads)
    generate(tiny_llama.model, _prompt(2, 20, seed=10), policy, max_new_tokens=4, eos_token_id=[])
    steps = {0: 0, 1: 0}
    for r in policy.log:                                                                 # 4 sinks + 1 + 6 window = 11
        extra = steps[r.layer]
        steps[r.layer] += 1
        counts = r.after.valid_mask().sum(-1)
        if r.layer == 0:                                                                 # ragged: valid mask
            assert r.after.n == 20 + extra and (counts[:, 0] == 20 + extra).all() and (counts[:, 1] == 11 + extra).all()
        else:                                                                            # compacted layer
            assert r.after.n == 11 + extra and r.after.valid_mask().all()
            assert torch.equal(r.after.pos[0, 0, :5], torch.tensor([0, 1, 2, 3, 4]))      # sinks + compensation slot
            assert torch.allclose(r.after.bias[:, :, 4], torch.tensor(math.log(10.0)))


def test_razor_head_scores_deterministic_and_find_planted_heads(tiny_llama):
    model = tiny_llama.model
    e1, i1 = head_scores(model, length=16, repeats=3, seed=3)
    e2, i2 = head_scores(model, length=16, repeats=3, seed=3)
    assert e1.shape == (2, 4) and torch.equal(e1, e2) and torch.equal(i1, i2)
    assert ((e1 >= 0) & (e1 <= 1 + 1e-6)).all() and ((i1 >= 0) & (i1 <= 1 + 1e-6)).all()
    policy = RazorAttention(budget=4, min_window=0, echo_frac=0.01, induction_frac=0.15, calib_length=16)
    policy.post_init_from_model(model)
    assert policy._heads.shape == (2, 2) and 1 <= int(policy._heads.sum()) <= 3


# ---------------------------------------------------------------- WindowKV


def test_windowkv_group_budget_schedule():
    sched = group_budgets(2048, 8, 14, 32)                                               # last 1170, first 2926
    assert sched[0] == 2926 and sched[8] == 2341 and sched[16] == 1756 and sched[31] == 1170
    assert abs(sum(sched) / 32 - 2048) < 1 and group_budgets(100, 8, 14, 2) == [100, 100]


@pytest.mark.parametrize("strategy", ["max", "average"])
def test_windowkv_keeps_whole_windows_shared_in_group(tiny_llama, strategy):
    model, n, w, size, budget = tiny_llama.model, 45, 5, 4, 17
    ids = _prompt(2, n, seed=11)
    cache = _prefill(model, ids, WindowKV(budget=budget, strategy=strategy, suffix_size=w, review_window_size=size,
                                          shared_layers=2))
    attn = _eager_attentions(model, ids)[0]                                              # the group leader
    votes = attn[:, :, -w:, : n - w].sum(dim=2)                                          # (B, H, 40)
    blocks = votes.view(2, 4, 10, size)
    score = blocks.mean(dim=(1, 3)) if strategy == "average" else blocks.topk(size // 2, -1).values.mean(dim=(1, 3))
    n_drop = math.ceil((n - w - budget) / size)
    kept_win = (-score).topk(10 - n_drop, dim=-1, largest=False).indices.sort(-1).values     # best windows
    windows = (kept_win[..., None] * size + torch.arange(size)).flatten(1)
    expected = torch.cat([windows, torch.arange(n - w, n).expand(2, w)], -1)
    for layer in range(2):
        pos = cache.kv(layer).pos
        assert torch.equal(pos[:, 0], expected) and torch.equal(pos[:, 0], pos[:, 1]), layer
    assert window_scores(torch.ones(1, 2, 5), 4, strategy).tolist() == [[1.0, 1.0]]     # partial last window


def test_windowkv_unit_windows_equal_snapkv_layer(tiny_llama):
    ids = _prompt(2, 30, seed=12)
    ours = _prefill(tiny_llama.model, ids, WindowKV(budget=10, strategy="average", suffix_size=6,
                                                    review_window_size=1, shared_layers=1, beta=1))
    snap = _prefill(tiny_llama.model, ids, SnapKV(budget=16, window_size=6, kernel_size=1, granularity="layer"))
    for layer in range(2):
        assert torch.equal(ours.kv(layer).pos, snap.kv(layer).pos), layer
