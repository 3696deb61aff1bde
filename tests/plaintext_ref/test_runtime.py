"""plaintext_ref.runtime + policies.base: the reference KV-policy hook on HF transformers.

Tolerances: our attention is fp32 eager math, HF's default is sdpa (fp32 on CPU), so logits agree to
float rounding (measured ≤ 3e-7 on the tiny models); we assert ``atol=1e-4`` (SmolLM2: ``1e-3``).
Greedy tokens must be identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from plaintext_ref.models import load_model
from plaintext_ref.policies import (
    DELTA,
    POLICIES,
    Budget,
    Keyformer,
    KVPolicy,
    LayerKV,
    StepCtx,
    StreamingLLM,
    TopKEviction,
    WindowKV,
    gather_kv,
    get_policy,
    gqa_aggregate,
    register,
    window_attention,
)
from plaintext_ref.runtime import ATTN_NAME, RefCache, generate, teacher_forced_logits
from tests.plaintext_ref.helpers import interleaved, prefill, same_snapshots

ATOL = 1e-4


def _prompt(batch: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 5000, (batch, length), generator=g)


def _hf_greedy(model, ids: Tensor, n: int, mask: Tensor | None = None) -> Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)


# ---------------------------------------------------------------- full cache ≡ HF


def test_full_generate_equals_hf(tiny_model):
    model = tiny_model.model
    ids = _prompt(2, 13)
    ours = generate(model, ids, None, max_new_tokens=12)
    assert torch.equal(ours, _hf_greedy(model, ids, 12))
    assert torch.equal(ours, generate(model, ids, get_policy("full"), max_new_tokens=12))
    assert model.config._attn_implementation != ATTN_NAME  # generate restores the implementation


def test_full_generate_left_padding_equals_hf(tiny_model):
    model = tiny_model.model
    ids = _prompt(2, 11, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    ours = generate(model, ids, None, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(ours, _hf_greedy(model, ids, 8, mask))


def test_teacher_forced_equals_one_shot(tiny_model):
    model = tiny_model.model
    ids = _prompt(2, 17, seed=2)
    with torch.no_grad():
        one_shot = model(ids).logits
    for prefix in (1, 9, 16):
        tf = teacher_forced_logits(model, ids, prefix)
        assert tf.shape == (2, 17 - prefix, model.config.vocab_size)
        torch.testing.assert_close(tf, one_shot[:, prefix - 1:16], atol=ATOL, rtol=0)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="prefix_len"):
            teacher_forced_logits(model, ids, bad)


def test_eos_stops_and_pads(tiny_llama):
    model = tiny_llama.model
    ids = _prompt(2, 8, seed=3)
    free = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert free.shape == (2, 14)
    eos = int(free[0, 9])                                  # row 0's second new token becomes "EOS"
    out = generate(model, ids, max_new_tokens=6, eos_token_id=eos)
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                        eos_token_id=eos)
    assert torch.equal(out, hf)
    assert (out[0, 10:] == eos).all()                      # finished row padded (pad = EOS here)


# ---------------------------------------------------------------- StreamingLLM


@dataclass
class _Recording(StreamingLLM):
    """StreamingLLM that records (layer, seen, pos) after every hook."""

    log: list | None = None

    def _rec(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        self.log.append((ctx.layer_idx, ctx.phase, int(ctx.position_ids[0, -1]) + 1, kv.pos.clone()))
        return kv

    def on_prefill(self, ctx, kv):
        return self._rec(ctx, super().on_prefill(ctx, kv))

    def on_append(self, ctx, kv):
        return self._rec(ctx, super().on_append(ctx, kv))


@pytest.mark.parametrize("n_sink,n_recent", [(2, 5), (0, 3)])
def test_streaming_llm_keeps_sink_and_recent(tiny_model, n_sink, n_recent):
    model = tiny_model.model
    policy = _Recording(n_sink=n_sink, n_recent=n_recent, log=[])
    generate(model, _prompt(2, 12, seed=4), policy, max_new_tokens=6)
    hkv = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else None
    assert len(policy.log) == model.config.num_hidden_layers * 6   # prefill + 5 fed tokens, every layer
    for layer, phase, seen, pos in policy.log:
        expected = list(range(n_sink)) + list(range(seen - n_recent, seen))
        assert pos.shape[-1] == n_sink + n_recent, (layer, phase, pos.shape)
        assert hkv is None or pos.shape[1] == hkv
        assert (pos == torch.tensor(expected)).all(), (layer, phase, pos[0, 0].tolist(), expected)


def test_streaming_llm_large_budget_is_full(tiny_model):
    model = tiny_model.model
    ids = _prompt(2, 10, seed=5)
    policy = StreamingLLM(n_sink=4, n_recent=30)
    assert torch.equal(generate(model, ids, policy, max_new_tokens=10), generate(model, ids, None, max_new_tokens=10))
    assert torch.equal(teacher_forced_logits(model, ids, 4, policy), teacher_forced_logits(model, ids, 4))


def test_streaming_llm_left_padding_protects_real_sinks(tiny_llama):
    model = tiny_llama.model
    ids, mask = _prompt(2, 12, seed=6), torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    policy = _Recording(n_sink=2, n_recent=3, log=[])
    generate(model, ids, policy, max_new_tokens=2, attention_mask=mask)
    _, _, _, pos = policy.log[0]                      # layer 0 after prefill
    assert pos[0, 0].tolist() == [0, 1, 4, 5, 6]      # row 0 has 7 real tokens (positions 0..6)
    assert pos[1, 0].tolist() == [0, 1, 9, 10, 11]


# ---------------------------------------------------------------- select() masks


@dataclass
class _MaskNothing(KVPolicy):
    def select(self, ctx, kv):
        b, h, s, _ = ctx.q.shape
        return torch.ones(b, h, s, kv.n, dtype=torch.bool)


def _subset(layer: int, kv: LayerKV, n_heads: int, keep: int) -> Tensor:
    """Deterministic random kept slots (B, n_heads, keep), ascending, per layer."""
    g = torch.Generator().manual_seed(100 + layer)
    b, t = kv.k.shape[0], kv.n
    return torch.rand(b, n_heads, t, generator=g).argsort(-1)[..., :keep].sort(-1).values


@dataclass
class _MaskSubset(KVPolicy):
    """After prefill, attend only a random prompt subset (plus every decode slot), by select()."""

    per_q_head: bool = False
    keep: int = 5

    def on_prefill(self, ctx, kv):
        heads = ctx.q.shape[1] if self.per_q_head else kv.k.shape[1]
        kv.aux["subset"] = _subset(ctx.layer_idx, kv, heads, self.keep)
        kv.aux["n_prompt"] = kv.n
        return kv

    def select(self, ctx, kv):
        if ctx.phase == "prefill":
            return None
        sub, n0 = kv.aux["subset"], kv.aux["n_prompt"]
        allow = torch.ones(*sub.shape[:2], kv.n, dtype=torch.bool)
        allow[..., :n0] = False
        allow.scatter_(-1, sub, True)
        return allow[:, :, None, :].expand(-1, -1, ctx.q.shape[2], -1)


@dataclass
class _GatherSubset(KVPolicy):
    """The same subset, physically gathered after prefill."""

    per_q_head: bool = False
    keep: int = 5

    def on_prefill(self, ctx, kv):
        if self.per_q_head:
            kv = kv.repeat_heads(ctx.q.shape[1] // kv.k.shape[1])
        return gather_kv(kv, _subset(ctx.layer_idx, kv, kv.k.shape[1], self.keep))


def test_select_nothing_masked_is_full(tiny_model):
    model = tiny_model.model
    ids = _prompt(2, 9, seed=7)
    assert torch.equal(generate(model, ids, _MaskNothing(), max_new_tokens=8), generate(model, ids, max_new_tokens=8))
    assert torch.equal(teacher_forced_logits(model, ids, 3, _MaskNothing()), teacher_forced_logits(model, ids, 3))


@pytest.mark.parametrize("per_q_head", [False, True])
def test_gather_equals_mask(tiny_model, per_q_head):
    model = tiny_model.model
    ids = _prompt(2, 16, seed=8)
    masked = teacher_forced_logits(model, ids, 10, _MaskSubset(per_q_head=per_q_head))
    gathered = teacher_forced_logits(model, ids, 10, _GatherSubset(per_q_head=per_q_head))
    full = teacher_forced_logits(model, ids, 10)
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)
    assert (masked[:, 1:] - full[:, 1:]).abs().max() > 1e-3   # the subset really changed something


# ---------------------------------------------------------------- what policies see


@dataclass
class _Probe(KVPolicy):
    needs = frozenset({"attn", "logits"})
    seen: list | None = None

    def on_prefill(self, ctx, kv):
        self.seen.append((ctx, kv))
        return kv


def test_ctx_q_attn_rope_and_window_attention(tiny_llama):
    model = tiny_llama.model
    ids = _prompt(1, 12, seed=9)
    probe = _Probe(seen=[])
    k_pre = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda m, i, o, idx=idx: k_pre.setdefault(idx, o)) for idx, layer in enumerate(model.model.layers)]
    try:
        generate(model, ids, probe, max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    for ctx, kv in probe.seen:
        b, h, s, d = ctx.q.shape
        assert (b, h, s) == (1, 4, 12) and ctx.attn.shape == (1, 4, 12, 12)
        torch.testing.assert_close(ctx.attn.sum(-1), torch.ones(1, 4, 12))
        assert ctx.attn.triu(1).abs().max() == 0                     # causal
        torch.testing.assert_close(ctx.logits.softmax(-1), ctx.attn)
        win = window_attention(ctx.q[:, :, -4:], kv.k, ctx.scaling)
        torch.testing.assert_close(win, ctx.attn[:, :, -4:], atol=1e-6, rtol=0)
        pre = k_pre[ctx.layer_idx].view(1, 12, 2, d).transpose(1, 2)  # (B, Hkv, T, D) before RoPE
        torch.testing.assert_close(ctx.rope(pre, kv.pos), kv.k, atol=1e-5, rtol=0)


def test_needs_unsupported_raises(tiny_llama):
    class NeedsHidden(KVPolicy):
        needs = frozenset({"hidden"})
    with pytest.raises(ValueError, match="hidden"):
        RefCache(tiny_llama.model, NeedsHidden())


@dataclass
class _Partnered(KVPolicy):
    """Layer 1 shares with layer ``src``; records the partner every select receives."""
    src: int = 0
    seen: list | None = None

    def shares_with(self, layer_idx, num_layers):
        return self.src if layer_idx == 1 else None

    def select(self, ctx, kv):
        self.seen.append((ctx.layer_idx, ctx.partner))
        return None


def test_partner_is_the_shared_layers_kv(tiny_llama):
    ids = _prompt(1, 12, seed=9)
    policy = _Partnered(seen=[])
    cache = prefill(tiny_llama.model, ids, policy)
    assert policy.seen[0] == (0, None) and policy.seen[1][0] == 1 and policy.seen[1][1] is cache.kv(0)
    with pytest.raises(AssertionError, match="shares with layer 1"):
        prefill(tiny_llama.model, ids, _Partnered(src=1, seen=[]))


SHARING = {   # tiny-llama (2 layers): layer 1 reads state that layer 0 keeps in its LayerKV.aux
    "keyformer": lambda: Keyformer(budget=0.5, seed=3),
    "delta": lambda: DELTA(budget=12, full_layers=(0,), page_size=4, recent_pages=2),
    "windowkv": lambda: WindowKV(budget=20, review_window_size=4, suffix_size=6, shared_layers=2),
}


@pytest.mark.parametrize("name", sorted(SHARING))
def test_interleaved_sequences_keep_their_shared_state(tiny_llama, name):
    """One policy object, two sequences advanced in turn: each run equals the same run alone, bit for bit."""
    model, policy = tiny_llama.model, SHARING[name]()
    runs = [(_prompt(2, 60, seed=1), 48), (_prompt(1, 45, seed=2), 36)]
    for (ids, p), (logits, snaps) in zip(runs, interleaved(model, policy, runs)):
        alone_logits, alone_snaps = interleaved(model, policy, [(ids, p)])[0]
        assert torch.equal(logits, alone_logits) and same_snapshots(snaps, alone_snaps)
        assert not torch.equal(logits, teacher_forced_logits(model, ids, p)), "the budget changed nothing"


# ---------------------------------------------------------------- TopKEviction / Budget units


def _kv(b=1, hkv=2, t=10, d=4, seed=0) -> LayerKV:
    g = torch.Generator().manual_seed(seed)
    return LayerKV(torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
                   torch.arange(t).expand(b, hkv, t).clone())


class _FixedScore:
    needs = frozenset()

    def __init__(self, scores: Tensor):
        self.scores = scores

    def score(self, ctx, kv):
        return self.scores


def _ctx(h=4, s=10) -> StepCtx:
    return StepCtx(0, 2, "prefill", torch.nn.Identity(), torch.arange(s)[None], 0.5, torch.zeros(1, h, s, 4))


def test_topk_keeps_highest_with_protection_and_gqa_modes():
    kv = _kv()
    scores = torch.rand(1, 4, 10, generator=torch.Generator().manual_seed(1))     # per query head
    for mode in ("mean", "max", "sum"):
        pol = TopKEviction(_FixedScore(scores), Budget(tokens=5, protect_sink=1, protect_recent=1), gqa_agg=mode)
        out = pol.compress(_ctx(), kv, 5)
        agg = gqa_aggregate(scores, 2, mode)
        agg[..., [0, 9]] = float("inf")
        expected = agg.topk(5, -1).indices.sort(-1).values
        assert torch.equal(out.pos, expected)
        assert torch.equal(out.k, kv.k.gather(2, expected[..., None].expand(-1, -1, -1, 4)))
    layer = TopKEviction(_FixedScore(scores), Budget(tokens=3), granularity="layer").compress(_ctx(), kv, 3)
    assert torch.equal(layer.pos[:, 0], layer.pos[:, 1])
    qh = TopKEviction(_FixedScore(scores), Budget(tokens=3), granularity="q_head").compress(_ctx(), kv, 3)
    assert torch.equal(qh.pos, scores.topk(3, -1).indices.sort(-1).values)
    ada = TopKEviction(_FixedScore(scores[:, ::2]), Budget(tokens=3), head_adaptive=True).compress(_ctx(), kv, 3)
    assert ada.valid.sum() == 6 and ada.n == 10


def test_budget_resolution_and_validation():
    assert Budget(ratio=0.75).resolve(0, 2, 100) == 25
    assert Budget(tokens=30).resolve(0, 2, 20) == 20
    assert Budget(tokens=1, protect_sink=2, protect_recent=3).resolve(0, 2, 100) == 5
    assert Budget(per_layer=lambda i, n_layers, n: n // (i + 1)).resolve(1, 2, 10) == 5
    assert Budget.of(0.25) == Budget(ratio=0.75) and Budget.of(64) == Budget(tokens=64)
    assert Budget(ratio=0.5).decode_cap(0, 2, 40) == 20 and Budget(tokens=8).decode_cap(0, 2, 40) == 8
    for bad in (dict(), dict(ratio=0.5, tokens=3), dict(ratio=1.0), dict(tokens=-1)):
        with pytest.raises(ValueError):
            Budget(**bad)
    with pytest.raises(ValueError):
        TopKEviction(_FixedScore(None))


# ---------------------------------------------------------------- registry and input checks


def test_registry():
    assert {"full", "streaming_llm"} <= set(POLICIES)
    assert isinstance(get_policy("streaming_llm", n_sink=1, n_recent=2), StreamingLLM)
    assert get_policy("streaming_llm", budget=16).budget.tokens == 16
    with pytest.raises(ValueError, match="known: .*full"):
        get_policy("no-such-policy")
    with pytest.raises(ValueError, match="already registered"):
        register("full", KVPolicy)


def test_over_long_prompt_raises(tiny_gpt2):
    model = tiny_gpt2.model                                    # n_positions = 1024
    ids = torch.zeros(1, 1025, dtype=torch.long)
    with pytest.raises(ValueError, match="maximum context of 1024"):
        generate(model, ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="maximum context of 1024"):
        teacher_forced_logits(model, ids, 10)
    with pytest.raises(ValueError, match="maximum context"):
        generate(model, ids[:, :1000], max_new_tokens=100)


def test_right_padding_rejected(tiny_llama):
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(tiny_llama.model, _prompt(1, 5), attention_mask=mask)


# ---------------------------------------------------------------- real model, GPU


@pytest.mark.slow
def test_smollm2_full_equals_hf(smollm2):
    model, tok, _ = smollm2
    text = "The history of the printing press begins in the fifteenth century. " * 20
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    ours = generate(model, ids, None, max_new_tokens=16)
    assert torch.equal(ours, _hf_greedy(model, ids, 16))
    with torch.no_grad():
        one_shot = model(ours[:, :204]).logits
    tf = teacher_forced_logits(model, ours[:, :204], 200)
    torch.testing.assert_close(tf, one_shot[:, 199:203], atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_generate_equals_hf_cuda():
    model = load_model("tiny-llama", device="cuda").model
    ids = _prompt(2, 13).cuda()
    ours = generate(model, ids, None, max_new_tokens=10)
    assert ours.is_cuda and torch.equal(ours, _hf_greedy(model, ids, 10))
    streamed = generate(model, ids, StreamingLLM(n_sink=2, n_recent=5), max_new_tokens=10)
    assert streamed.shape == ours.shape
