"""plaintext_ref.kernels: torch fallbacks vs plain fp32 references (CPU), Triton vs fallback.

Triton runs on CUDA (``gpu`` tests, flash-attention's rule: error vs fp32 at most 2× that of a
same-dtype torch implementation), and on CPU in Triton's interpreter when triton is installed.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plaintext_ref import kernels
from plaintext_ref.policies import mpcache as mm

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]


def _inputs(t: int, b: int = 2, hkv: int = 2, g: int = 3, d: int = 16, seed: int = 0, device: str = "cpu",
            dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((b, hkv * g, d), (b, hkv, t, d), (b, hkv, t, d)))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def _random_pages(b: int, hkv: int, c: int, p: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """(B, Hkv, P) distinct random pages, the last (possibly partial) page always among them."""
    gen = torch.Generator().manual_seed(seed)
    last = torch.tensor([c - 1])
    idx = torch.stack([torch.cat([torch.randperm(c - 1, generator=gen)[:p - 1], last]) for _ in range(b * hkv)])
    return idx.view(b, hkv, p).to(device=device, dtype=torch.int32)


def _page_mask(page_idx: torch.Tensor, page_size: int, t: int) -> torch.Tensor:
    """(B, Hkv, P) pages -> (B, Hkv, T) token mask, by a Python loop."""
    mask = torch.zeros(page_idx.shape[:2] + (t,), dtype=torch.bool)
    for (bi, hi), pages in zip(torch.cartesian_prod(*map(torch.arange, page_idx.shape[:2])).tolist(),
                               page_idx.flatten(0, 1).cpu().tolist()):
        for p in pages:
            mask[bi, hi, p * page_size:(p + 1) * page_size] = True
    return mask.to(page_idx.device)


def _attention_ref(q, k, v, mask, scale, dtype=torch.float32):
    """Dense masked softmax attention computed in ``dtype``, GQA by repeat_interleave: -> (B, H, D)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(g, dim=1).to(dtype) for x in (k, v))                  # (B, H, T, D)
    logits = (q.to(dtype)[:, :, None] @ kk.transpose(-1, -2)).squeeze(2) * scale       # (B, H, T)
    logits = logits.masked_fill(~mask.repeat_interleave(g, dim=1), float("-inf"))
    return (logits.softmax(-1)[:, :, None] @ vv).squeeze(2)


# ---- CPU: torch fallbacks vs plain references ---------------------------------------------------
@pytest.mark.parametrize("t,s", [(1, 16), (31, 16), (64, 16), (100, 32), (7, 1)])
def test_page_minmax_matches_loop(t, s):
    _, k, _ = _inputs(t)
    lo, hi = kernels.page_minmax(k.to(torch.float16), s)
    assert lo.dtype == torch.float16 and lo.shape == (2, 2, math.ceil(t / s), 16)
    for c in range(math.ceil(t / s)):
        chunk = k.to(torch.float16)[:, :, c * s:(c + 1) * s]
        assert torch.equal(lo[:, :, c], chunk.amin(2)) and torch.equal(hi[:, :, c], chunk.amax(2))


@pytest.mark.parametrize("t", [16, 50, 129])
def test_cluster_scores_linear_and_quest(t):
    q, k, _ = _inputs(t, seed=t)
    lo, hi = kernels.page_minmax(k, 16)
    b, h, d = q.shape
    qg = q.view(b, 2, h // 2, d)                                                        # (B, Hkv, G, D)
    linear = (0.6 * qg.mean(2)[:, :, None] * hi + 0.4 * qg.mean(2)[:, :, None] * lo).sum(-1)
    torch.testing.assert_close(kernels.cluster_scores(q, lo, hi, "linear", 0.6), linear, rtol=1e-5, atol=1e-5)
    per_head = torch.maximum(qg[:, :, :, None] * hi[:, :, None], qg[:, :, :, None] * lo[:, :, None]).sum(-1)
    quest = kernels.cluster_scores(q, lo, hi, "quest")
    torch.testing.assert_close(quest, per_head.amax(2), rtol=1e-5, atol=1e-5)
    # Quest's bound: U_c >= q_g·k_j for every head g of the group and token j of page c
    qk = qg @ k.transpose(-1, -2)                                                       # (B, Hkv, G, T)
    exact = torch.nn.functional.pad(qk, (0, lo.shape[2] * 16 - t), value=-1e9).unflatten(-1, (-1, 16))
    assert (quest[:, :, None] >= exact.amax(-1) - 1e-4).all()


def test_fallbacks_match_policy_math():
    q, k, _ = _inputs(77, seed=5)
    lo, hi = kernels.page_minmax(k, 16)
    lo_m, hi_m = mm.cluster_minmax(k, 16)
    assert torch.equal(lo, lo_m) and torch.equal(hi, hi_m)
    krep = mm.representative_keys(lo, hi, 0.6)
    torch.testing.assert_close(kernels.cluster_scores(q, lo, hi, "linear", 0.6),
                               mm.cluster_scores(mm.group_query(q, 2), krep), rtol=1e-5, atol=1e-5)


def test_head_logits_and_soft_votes():
    q, k, _ = _inputs(40, seed=1)
    ref = (q[:, :, None] @ k.repeat_interleave(3, dim=1).transpose(-1, -2)).squeeze(2)  # (B, H, T)
    torch.testing.assert_close(kernels.head_logits(q, k), ref)
    torch.testing.assert_close(kernels.soft_votes(q, k), ref.softmax(-1).sum(1))
    q1, k1, _ = _inputs(40, hkv=1, g=1, seed=2)                                          # one head: ranks as q·k
    assert torch.equal(kernels.soft_votes(q1, k1).argsort(), kernels.head_logits(q1, k1)[:, 0].argsort())


@pytest.mark.parametrize("t,s,p", [(64, 16, 2), (77, 16, 3), (50, 8, 7), (33, 1, 9)])
def test_sparse_attention_matches_masked_dense(t, s, p):
    q, k, v = _inputs(t, seed=t)
    c = math.ceil(t / s)
    idx = _random_pages(2, 2, c, p, seed=t)
    mask = _page_mask(idx, s, t)
    out = kernels.sparse_decode_attention(q, k, v, idx, s, scale=0.3)
    torch.testing.assert_close(out, _attention_ref(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    tokens = torch.rand(2, 2, t, generator=torch.Generator().manual_seed(t)) < 0.4
    tokens[..., 0] = True
    out = kernels.sparse_decode_attention(q, k, v, None, s, mask=tokens)
    torch.testing.assert_close(out, _attention_ref(q, k, v, tokens, 1 / math.sqrt(16)), rtol=1e-5, atol=1e-5)


def test_all_pages_equal_sdpa_and_page1_topk_equals_token_topk():
    q, k, v = _inputs(45)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.view(2, 2, 3, 16), k, v).view(2, 6, 16)
    torch.testing.assert_close(kernels.sparse_decode_attention(q, k, v), sdpa, rtol=1e-5, atol=1e-5)
    lo, hi = kernels.page_minmax(k, 1)                                                  # page 1: lo = hi = k
    top = kernels.cluster_scores(q, lo, hi, "quest").topk(10, dim=-1).indices.int()
    exact = (q.view(2, 2, 3, 16) @ k.transpose(-1, -2)).amax(2).topk(10, dim=-1).indices.int()
    assert torch.equal(top.sort(-1).values, exact.sort(-1).values)


def test_dispatch_and_validation():
    q, k, v = _inputs(32)
    assert not kernels.use_triton(q) and not kernels.use_triton(q, "torch")
    with pytest.raises(ValueError, match="backend"):
        kernels.use_triton(q, "cuda")
    with pytest.raises(ValueError, match="mode"):
        kernels.cluster_scores(q, *kernels.page_minmax(k, 16), mode="mean")
    with pytest.raises(ValueError, match="page_idx"):
        kernels.sparse_decode_attention(q, k, v, torch.zeros(2, 3, 1, dtype=torch.int32))
    if not kernels.HAS_TRITON:
        with pytest.raises(RuntimeError, match="triton"):
            kernels.use_triton(q, "triton")


# ---- Triton in the interpreter (CPU) -------------------------------------------------------------
def _patch_interpreter_for_numpy2() -> None:
    """triton 3.6's interpreter calls int() on 1-element arrays (loop bounds), which numpy >= 2.3 rejects."""
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def interpreter_check() -> None:
    """Triton (interpreted) vs torch on small shapes, fp32 and fp16 (the interpreter has no bf16)."""
    _patch_interpreter_for_numpy2()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for t, s, hkv, g in ((70, 16, 2, 3), (64, 8, 1, 4)):
            q, k, v = _inputs(t, b=1, hkv=hkv, g=g, d=24, dtype=dtype, seed=t)
            lo, hi = kernels.page_minmax(k, s, backend="triton")
            lo_t, hi_t = kernels.page_minmax(k, s, backend="torch")
            assert torch.equal(lo, lo_t) and torch.equal(hi, hi_t)
            for mode in ("linear", "quest"):
                torch.testing.assert_close(kernels.cluster_scores(q, lo, hi, mode, backend="triton"),
                                           kernels.cluster_scores(q, lo, hi, mode, backend="torch"),
                                           rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(kernels.head_logits(q, k, backend="triton"),
                                       kernels.head_logits(q, k, backend="torch"), rtol=1e-5, atol=1e-4)
            idx = _random_pages(1, hkv, lo.shape[2], 3, seed=t)
            tokens = torch.rand(1, hkv, t) < 0.5
            tokens[..., -1] = True
            for pages, mask in ((idx, None), (None, tokens), (idx, tokens | _page_mask(idx, s, t))):
                out = kernels.sparse_decode_attention(q, k, v, pages, s, mask=mask, backend="triton")
                ref = kernels.sparse_decode_attention(q, k, v, pages, s, mask=mask, backend="torch")
                torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_matches_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tests.plaintext_ref.test_kernels import interpreter_check; interpreter_check()"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]


# ---- CUDA: Triton vs fp32 reference, flash-attention's rule --------------------------------------
needs_gpu = pytest.mark.skipif(not HAS_CUDA or not kernels.HAS_TRITON, reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t,s,p,hkv,g,d", [(4096, 16, 64, 8, 4, 128), (1000, 16, 7, 2, 3, 64),
                                           (777, 32, 5, 4, 8, 128), (300, 1, 40, 1, 16, 80)])
def test_triton_sparse_attention_flash_rule(dtype, t, s, p, hkv, g, d):
    q, k, v = _inputs(t, b=2, hkv=hkv, g=g, d=d, seed=t, device="cuda", dtype=dtype)
    idx = _random_pages(2, hkv, math.ceil(t / s), p, seed=t, device="cuda")
    scale = 1 / math.sqrt(d)
    mask = _page_mask(idx, s, t)
    ref = _attention_ref(q, k, v, mask, scale, torch.float64)
    same = _attention_ref(q, k, v, mask, scale, dtype).float()
    out = kernels.sparse_decode_attention(q, k, v, idx, s, scale).float()
    fallback = kernels.sparse_decode_attention(q, k, v, idx, s, scale, backend="torch").float()
    bound = 2 * (same - ref).abs().max() + 1e-6
    assert (out - ref).abs().max() <= bound and (fallback - ref).abs().max() <= bound
    tokens = torch.rand(2, hkv, t, device="cuda") < 0.3
    tokens[..., 0] = True
    out = kernels.sparse_decode_attention(q, k, v, None, s, scale, mask=tokens).float()
    ref = _attention_ref(q, k, v, tokens, scale, torch.float64)
    same = _attention_ref(q, k, v, tokens, scale, dtype).float()
    assert (out - ref).abs().max() <= 2 * (same - ref).abs().max() + 1e-6


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,s,hkv,g,d", [(4100, 16, 8, 4, 128), (333, 32, 2, 3, 64)])
def test_triton_scores_and_minmax(dtype, t, s, hkv, g, d):
    q, k, _ = _inputs(t, b=2, hkv=hkv, g=g, d=d, seed=t, device="cuda", dtype=dtype)
    lo, hi = kernels.page_minmax(k, s)
    lo_t, hi_t = kernels.page_minmax(k, s, backend="torch")
    assert torch.equal(lo, lo_t) and torch.equal(hi, hi_t)                                   # min/max are exact
    for mode in ("linear", "quest"):
        torch.testing.assert_close(kernels.cluster_scores(q, lo, hi, mode),
                                   kernels.cluster_scores(q, lo, hi, mode, backend="torch"), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(kernels.head_logits(q, k), kernels.head_logits(q, k, backend="torch"),
                               rtol=1e-4, atol=1e-3)
    krep = mm.representative_keys(lo.float(), hi.float(), 0.6)
    torch.testing.assert_close(kernels.cluster_scores(q, lo, hi, "linear"),
                               mm.cluster_scores(mm.group_query(q.float(), hkv), krep), rtol=1e-4, atol=1e-3)
