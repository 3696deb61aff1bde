"""Parity with kvpress 0.5.5: identical kept indices per layer, batch row and KV head.

How it runs: kvpress is installed with ``--no-deps`` (it pins transformers<5.3) and imported through
``kvpress_shim.load_kvpress`` (``datasets`` stub + the ``cache_position`` / ``past_key_values`` shim); the
module is skipped when kvpress cannot be imported. Each case runs kvpress's press (its forward hook, after the
prompt forward) and our policy (``plaintext_ref.runtime``, on_prefill) on the same random tiny
LlamaForCausalLM with GQA and the same prompt, in kvpress's conventions (compression_ratio, window, kernel,
GQA mean). kvpress returns compressed keys, not indices: each kept key row is located in the full cache (the
prompt forward is the same with and without compression, so kept rows equal full rows up to fp32 rounding).
Methods: SnapKV, TOVA (kvpress force-keeps the last token: ``protect_recent=1``), StreamingLLM, PyramidKV
(ratio mode), KNorm, ExpectedAttention, and ThinK (same pruned key channels).
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from plaintext_ref.policies import KNorm, PyramidKV, SnapKV, StreamingLLM, TOVA, Budget
from plaintext_ref.runtime import RefCache, attach, step
from tests.plaintext_ref.helpers import prefill
from tests.plaintext_ref.kvpress_shim import load_kvpress

try:
    kvpress = load_kvpress()
except ImportError as err:
    pytest.skip(f"kvpress is not importable ({err}); install it with `pip install --no-deps kvpress==0.5.5` "
                "and the test extra", allow_module_level=True)

N_LAYERS, BATCH, N = 4, 2, 64
WINDOW, KERNEL = 8, 5


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    """Random 4-layer Llama, 4 query heads over 2 KV heads (G = 2), D = 16; a model kvpress supports."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt() -> Tensor:
    return torch.randint(0, 256, (BATCH, N), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _kvpress_kept(model, ids: Tensor, press) -> list[Tensor]:
    """Per layer (B, Hkv, K) ascending slot indices kvpress kept."""
    full, pressed = DynamicCache(), DynamicCache()
    model(ids, cache=full)
    with press(model):
        model(ids, cache=pressed)
    kept = []
    for layer in range(N_LAYERS):
        dist = torch.cdist(pressed.layers[layer].keys, full.layers[layer].keys,
                           compute_mode="donot_use_mm_for_euclid_dist")           # (B, Hkv, K, T)
        nearest = dist.min(dim=-1)
        assert nearest.values.max() < 1e-5, f"layer {layer}: a kept key is not in the full cache"
        kept.append(nearest.indices.sort(dim=-1).values)
    return kept


def _our_kept(model, ids: Tensor, policy) -> list[Tensor]:
    """Per layer (B, Hkv, K) positions our policy kept after the prompt (positions = slots, no padding)."""
    cache = prefill(model, ids, policy)
    return [cache.kv(layer).pos for layer in range(N_LAYERS)]


CASES = {
    "snapkv": (lambda r: kvpress.SnapKVPress(r, window_size=WINDOW, kernel_size=KERNEL),
               lambda r: SnapKV(budget=Budget(ratio=r), window_size=WINDOW, kernel_size=KERNEL)),
    "tova": (lambda r: kvpress.TOVAPress(r),
             lambda r: TOVA(budget=Budget(ratio=r, protect_recent=1), evict_on="prefill")),
    "streaming_llm": (lambda r: kvpress.StreamingLLMPress(r, n_sink=4),
                      lambda r: StreamingLLM(n_sink=4, budget=Budget(ratio=r))),
    "pyramidkv": (lambda r: kvpress.PyramidKVPress(r, window_size=WINDOW, kernel_size=KERNEL, beta=20),
                  lambda r: PyramidKV(budget=Budget(ratio=r), window_size=WINDOW, kernel_size=KERNEL, beta=20)),
    "knorm": (lambda r: kvpress.KnormPress(r), lambda r: KNorm(budget=Budget(ratio=r))),
}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_kept_indices_as_kvpress(llama, prompt, name, ratio):
    make_press, make_policy = CASES[name]
    theirs = _kvpress_kept(llama, prompt, make_press(ratio))
    ours = _our_kept(llama, prompt, make_policy(ratio))
    for layer, (a, b) in enumerate(zip(theirs, ours)):
        assert a.shape == b.shape, (name, layer, tuple(a.shape), tuple(b.shape))
        assert torch.equal(a, b), (name, layer, a[0, 0].tolist(), b[0, 0].tolist())


@pytest.mark.parametrize("name", ["snapkv", "tova", "pyramidkv"])
def test_same_kept_indices_as_kvpress_eager_attentions(llama, prompt, name):
    """kvpress reads the layer's attention weights under eager attention instead of recomputing the window."""
    make_press, make_policy = CASES[name]
    llama.set_attn_implementation("eager")
    try:
        theirs = _kvpress_kept(llama, prompt, make_press(0.5))
    finally:
        llama.set_attn_implementation("sdpa")
    ours = _our_kept(llama, prompt, make_policy(0.5))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_pyramid_parity_case_is_a_real_pyramid(llama, prompt):
    """The pyramidkv case at ratio 0.5 exercises the pyramid, not the SnapKV fallback."""
    assert [k.shape[-1] for k in _our_kept(llama, prompt, CASES["pyramidkv"][1](0.5))] == [56, 40, 24, 8]


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_expected_attention_same_kept_indices(llama, prompt, ratio):
    ea = pytest.importorskip("plaintext_ref.policies.expected_attention")
    theirs = _kvpress_kept(llama, prompt, kvpress.ExpectedAttentionPress(ratio, n_future_positions=64))
    ours = _our_kept(llama, prompt, ea.ExpectedAttention(budget=Budget(ratio=ratio), n_future_positions=64))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_think_same_pruned_channels(llama, prompt, ratio):
    """ThinK prunes key channels: kvpress zeroes them in every prompt key (our recent_size=0)."""
    think = pytest.importorskip("plaintext_ref.policies.think")
    pressed = DynamicCache()
    with torch.no_grad(), kvpress.ThinKPress(key_channel_compression_ratio=ratio, window_size=WINDOW)(llama):
        llama(prompt, cache=pressed)
    previous = llama.config._attn_implementation
    cache = RefCache(llama, think.ThinK(pruning_ratio=ratio, window_size=WINDOW, recent_size=0))
    attach(llama)
    try:
        with torch.no_grad():
            step(llama, cache, prompt, torch.arange(N)[None].expand_as(prompt))
    finally:
        llama.set_attn_implementation(previous)
    for layer in range(N_LAYERS):
        theirs = (pressed.layers[layer].keys == 0).all(dim=2)                          # (B, Hkv, D) pruned
        ours = ~cache.kv(layer).aux[think.KEEP][:, :, 0]
        assert int(theirs.sum()) == BATCH * 2 * int(16 * ratio) and torch.equal(theirs, ours), layer
