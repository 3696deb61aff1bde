"""plaintext_ref.kernels.quant_attention: packing, the torch fallback vs dequantize-then-attend (CPU), on random
caches and on real KIVI caches; the Triton kernel vs the same reference on CUDA (flash-attention's rule: error
vs fp64 at most 2× that of a same-dtype dequantize-then-attend) and in Triton's interpreter when installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plaintext_ref import kernels
from plaintext_ref.kernels.quant_attention import QuantKV, pack_codes, quant_decode_attention, unpack_codes
from plaintext_ref.policies import KIVI
from plaintext_ref.policies.quant import dequantize_groups
from tests.plaintext_ref.helpers import prompt

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
# (T, B, Hkv, G, D, bits, group, residual): residual-only, ragged Nk ≠ Nv, GQA groups 1..16
CASES = [(20, 1, 2, 3, 16, 2, 8, 32), (100, 2, 2, 3, 16, 2, 8, 32), (200, 1, 3, 4, 32, 4, 16, 32),
         (130, 2, 1, 16, 64, 2, 32, 64), (96, 1, 2, 1, 32, 1, 8, 16), (77, 1, 2, 2, 32, 8, 16, 16)]


def _qkv(t: int, b: int, hkv: int, g: int, d: int, seed: int, device: str = "cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((b, hkv * g, d), (b, hkv, t, d), (b, hkv, t, d)))
    k[..., 3] *= 8.0                                                        # a key outlier channel, as KIVI assumes
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def _attend(q, k, v, scale, dtype=torch.float32):
    """Dense softmax attention in ``dtype``, GQA by repeat_interleave: (B, H, D), (B, Hkv, T, D) x2 -> (B, H, D)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(g, dim=1).to(dtype) for x in (k, v))
    p = ((q.to(dtype)[:, :, None] @ kk.transpose(-1, -2)).squeeze(2) * scale).softmax(-1)
    return (p[:, :, None] @ vv).squeeze(2)


def _dequantize_then_attend(q, cache: QuantKV, scale, dtype=torch.float32):
    k, v = cache.dequantize()
    return _attend(q, k, v, scale, dtype)


@pytest.mark.parametrize("bits,d", [(1, 32), (2, 16), (2, 64), (4, 8), (8, 4)])
def test_pack_round_trip(bits, d):
    codes = torch.randint(0, 2 ** bits, (2, 3, 7, d), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 7, d * bits // 32)
    assert torch.equal(unpack_codes(words, bits), codes)
    for bad in ((codes[..., :1], bits), (codes, 3)):                      # D·b not a multiple of 32; 3 bits
        with pytest.raises(ValueError):
            pack_codes(*bad)


@pytest.mark.parametrize("t,b,hkv,g,d,bits,group,residual", CASES)
def test_cache_layout_is_kivis(t, b, hkv, g, d, bits, group, residual):
    _, k, v = _qkv(t, b, hkv, g, d, seed=t)
    policy = KIVI(bits=bits, group_size=group, residual_length=residual)
    cache = QuantKV.from_dense(k, v, policy)
    nk, nv = t // residual * residual, max(t - residual, 0)
    assert cache.k_words.shape[2] == nk and cache.v_words.shape[2] == nv and cache.n == t
    k_hat, v_hat = cache.dequantize()
    assert torch.equal(k_hat[:, :, nk:], k[:, :, nk:]) and torch.equal(v_hat[:, :, nv:], v[:, :, nv:])
    codes = unpack_codes(cache.k_words, bits)
    torch.testing.assert_close(k_hat[:, :, :nk], dequantize_groups(codes, cache.k_scale, cache.k_zero, group, 2))
    step = (k[:, :, :nk].unflatten(2, (-1, group)).amax(3) - k[:, :, :nk].unflatten(2, (-1, group)).amin(3))
    bound = (step / (2 ** bits - 1) / 2).repeat_interleave(group, dim=2) + 1e-5     # |k − k̂| <= s/2
    assert ((k_hat[:, :, :nk] - k[:, :, :nk]).abs() <= bound).all()


@pytest.mark.parametrize("t,b,hkv,g,d,bits,group,residual", CASES)
def test_torch_fallback_matches_dequantize_then_attend(t, b, hkv, g, d, bits, group, residual):
    q, k, v = _qkv(t, b, hkv, g, d, seed=t + 1)
    cache = QuantKV.from_dense(k, v, KIVI(bits=bits, group_size=group, residual_length=residual))
    scale = d ** -0.5
    out = quant_decode_attention(q, cache, backend="torch")
    torch.testing.assert_close(out, _dequantize_then_attend(q, cache, scale), rtol=1e-5, atol=1e-5)
    if bits == 8:                                                           # 8 bits: close to exact attention
        torch.testing.assert_close(out, _attend(q, k, v, scale), rtol=0, atol=0.05)


@torch.no_grad()
def test_fallback_on_a_real_kivi_cache_equals_the_runtime_attention(tiny_llama):
    """A KIVI cache after prefill and decode steps (Nk ≠ Nv): the kernel reads its codes, the runtime its x̂."""
    from plaintext_ref.runtime import RefCache, attached, step
    model = tiny_llama.model
    policy = KIVI(bits=2, group_size=8, residual_length=16)
    ids = prompt(2, 45, seed=3)
    cache = RefCache(model, policy)
    with attached(model):
        step(model, cache, ids[:, :37], torch.arange(37)[None].expand(2, 37))
        for j in range(37, 45):
            step(model, cache, ids[:, j:j + 1], torch.full((2, 1), j))
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(4))
    for layer in range(cache.num_layers):
        kv = cache.kv(layer)
        packed = QuantKV.from_kivi(kv, policy)
        assert packed.k_words.shape[2] == 32 and packed.v_words.shape[2] == 45 - 16
        torch.testing.assert_close(quant_decode_attention(q, packed, backend="torch"), _attend(q, kv.k, kv.v, 0.25),
                                   rtol=1e-5, atol=1e-5)


def interpreter_check() -> None:
    """Triton (interpreted on CPU) vs the torch fallback on every case; run with TRITON_INTERPRET=1."""
    from tests.plaintext_ref.test_kernels import _patch_interpreter_for_numpy2
    _patch_interpreter_for_numpy2()
    for t, b, hkv, g, d, bits, group, residual in CASES:
        q, k, v = _qkv(t, b, hkv, g, d, seed=t + 2)
        cache = QuantKV.from_dense(k, v, KIVI(bits=bits, group_size=group, residual_length=residual))
        out = quant_decode_attention(q, cache, backend="triton")
        torch.testing.assert_close(out, quant_decode_attention(q, cache, backend="torch"), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_matches_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests.plaintext_ref.test_kernels_quant import interpreter_check; interpreter_check()"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not kernels.HAS_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t,b,hkv,g,d,bits,group,residual",
                         CASES + [(4096, 1, 8, 4, 128, 2, 32, 128), (3000, 2, 2, 8, 64, 4, 32, 128)])
def test_triton_matches_dequantize_then_attend(dtype, t, b, hkv, g, d, bits, group, residual):
    q, k, v = _qkv(t, b, hkv, g, d, seed=t + 3, device="cuda", dtype=dtype)
    cache = QuantKV.from_dense(k, v, KIVI(bits=bits, group_size=group, residual_length=residual))
    scale = d ** -0.5
    ref = _dequantize_then_attend(q, cache, scale, torch.float64)
    same = _dequantize_then_attend(q, cache, scale, dtype).float()
    out = quant_decode_attention(q, cache).float()
    fallback = quant_decode_attention(q, cache, backend="torch").float()
    bound = 2 * (same - ref).abs().max() + 1e-6
    assert (out - ref).abs().max() <= bound
    # the fallback's fp32 sums q·s·code + q·z cancel (zero points are large): the CPU tests' 1e-5 in fp32
    assert (fallback - ref).abs().max() <= max(bound, 1e-5)
