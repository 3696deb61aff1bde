"""The checkpoint layout (``mpcache.model``): HF state dict -> our fused tensors, plaintext only.

Models: tiny-llama (tied, no q/k/v bias), tiny-gpt2 (Conv1D weights) and a random Qwen2-style Llama
(q/k/v bias, untied LM head). ``shared_shapes``' order is pinned: ``share_model`` shares in that
order, which fixes the masks drawn and the bytes and rounds logged. The per-layer norms are folded
into the matrix each feeds (W·diag(w), and W·β into its bias), so they are not shared.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mpcache.model import ModelArgs, _fused, check_state_dict, expected_shapes, shared_shapes
from plaintext_ref.models import load_model

LLAMA_LAYER = ["wqkv", "wo", "w_in", "w_out"]
ORDER = {  # name -> (global keys, per-layer keys), in sharing order
    "tiny-llama": (["tok", "norm.w"], LLAMA_LAYER),
    "tiny-gpt2": (["tok", "norm.w", "pos", "norm.b"], LLAMA_LAYER + ["bqkv", "bo", "b_in", "b_out"]),
    "qwen2": (["tok", "norm.w", "output"], LLAMA_LAYER + ["bqkv"]),
}


def _qwen2() -> torch.nn.Module:
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module", params=list(ORDER))
def checkpoint(request) -> tuple[str, ModelArgs, dict[str, torch.Tensor]]:
    model = _qwen2() if request.param == "qwen2" else load_model(request.param).model
    return request.param, ModelArgs.from_hf(model.config), model.state_dict()


def test_qwen2_args():
    args = ModelArgs.from_hf(_qwen2().config)
    assert args.qkv_bias and not args.tie_embeddings, args


def test_expected_shapes_are_the_checkpoint(checkpoint):
    _, args, sd = checkpoint
    check_state_dict(sd, args)
    ignored = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers, as check_state_dict
    real = {k: tuple(v.shape) for k, v in sd.items()
            if not k.endswith(ignored) and not (args.tie_embeddings and k == "lm_head.weight")}
    assert expected_shapes(args) == real


def test_shared_shapes_order(checkpoint):
    name, args, _ = checkpoint
    head, layer = ORDER[name]
    assert list(shared_shapes(args)) == head + [f"{i}.{k}" for i in range(args.n_layers) for k in layer]


def test_fused_is_shared_shapes(checkpoint):
    _, args, sd = checkpoint
    fused = _fused(args, sd)
    assert list(fused) == list(shared_shapes(args))
    assert {k: tuple(v.shape) for k, v in fused.items()} == shared_shapes(args)


def test_fused_tensors(checkpoint):
    _, args, sd = checkpoint
    want = _llama_by_hand(args, sd) if args.family == "llama" else _gpt2_by_hand(args, sd)
    fused = _fused(args, sd)
    assert fused.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(fused[k], v, rtol=1e-6, atol=1e-7), k  # the folds round float64 products once


def _llama_by_hand(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout: q|k|v rows, then gate|up rows, every matrix nn.Linear (out, in) as HF has it."""
    want = {"tok": sd["model.embed_tokens.weight"], "norm.w": sd["model.norm.weight"]}
    if not args.tie_embeddings:
        want["output"] = sd["lm_head.weight"]
    for i in range(args.n_layers):
        p, q = f"model.layers.{i}.", f"{i}."
        a = p + "self_attn."
        n1, n2 = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
        want.update({
            q + "wqkv": torch.cat([sd[a + n + "_proj.weight"] * n1 for n in "qkv"]),
            q + "wo": sd[a + "o_proj.weight"],
            q + "w_in": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]) * n2,
            q + "w_out": sd[p + "mlp.down_proj.weight"]})
        if args.qkv_bias:
            want[q + "bqkv"] = torch.cat([sd[a + n + "_proj.bias"] for n in "qkv"])
    return want


def _gpt2_by_hand(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout: Conv1D (in, out) matrices transposed to (out, in), vectors as they are."""
    t = "transformer."
    want = {"tok": sd[t + "wte.weight"], "norm.w": sd[t + "ln_f.weight"], "pos": sd[t + "wpe.weight"],
            "norm.b": sd[t + "ln_f.bias"]}
    if not args.tie_embeddings:
        want["output"] = sd["lm_head.weight"]
    matrices = {"wqkv": "attn.c_attn", "wo": "attn.c_proj", "w_in": "mlp.c_fc", "w_out": "mlp.c_proj"}
    vectors = {"bqkv": "attn.c_attn.bias", "bo": "attn.c_proj.bias", "b_in": "mlp.c_fc.bias",
               "b_out": "mlp.c_proj.bias"}
    for i in range(args.n_layers):
        p, q = f"{t}h.{i}.", f"{i}."
        want.update({q + k: sd[p + m + ".weight"].t() for k, m in matrices.items()})
        want.update({q + k: sd[p + v] for k, v in vectors.items()})
        for ln, (mat, bias) in {"ln_1": ("wqkv", "bqkv"), "ln_2": ("w_in", "b_in")}.items():
            w, b = sd[p + ln + ".weight"].double(), sd[p + ln + ".bias"].double()
            m = want[q + mat].double()
            want[q + bias] = (want[q + bias].double() + m @ b).float()
            want[q + mat] = (m * w).float()
    return want
