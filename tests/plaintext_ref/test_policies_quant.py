"""Invariants of the quantization policies KIVI, MiKV and VidKV (kv_methods.md §6).

Every check against the cache uses the exact keys and values the runtime appended (recorded before each
hook), so error bounds and bit-exactness are checked slot by slot, at every forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from benchmarks import kv_quality
from plaintext_ref.eval.runner import policy_factory
from plaintext_ref.policies import H2O, KIVI, POLICIES, LayerKV, MiKV, SnapKV, StepCtx, VidKV, get_policy
from plaintext_ref.policies import kivi as kivi_mod
from plaintext_ref.policies import mikv as mikv_mod
from plaintext_ref.policies import vidkv as vidkv_mod
from plaintext_ref.policies.quant import FP_BITS, KVMemory, cache_bytes, dequantize_groups, full_memory, quantize_groups
from plaintext_ref.runtime import generate, teacher_forced_logits
from tests.plaintext_ref.helpers import eager_attentions, interleaved, prefill, prompt, same_snapshots

EPS = 1e-5  # fp32 slack on the |x − x̂| <= s/2 bounds (values are O(1))


# ---------------------------------------------------------------- recording: the exact K/V each slot was appended with


@dataclass
class Record:
    layer: int
    phase: str
    raw_k: Tensor      # (B, Hkv, T, D) exact keys of every slot
    raw_v: Tensor
    after: LayerKV     # what the hook returned (aux shallow-copied: the policies never mutate aux values)


def recording(cls):
    @dataclass
    class Recording(cls):
        log: list = field(default_factory=list)
        raw: dict = field(default_factory=dict)

        def _hook(self, hook, ctx: StepCtx, kv: LayerKV) -> LayerKV:
            old_k, old_v = self.raw.get(ctx.layer_idx, (kv.k[:, :, :0], kv.v[:, :, :0]))
            n_old = old_k.shape[2]
            raw = (torch.cat([old_k, kv.k[:, :, n_old:]], 2).clone(), torch.cat([old_v, kv.v[:, :, n_old:]], 2).clone())
            self.raw[ctx.layer_idx] = raw
            out = hook(ctx, kv)
            self.log.append(Record(ctx.layer_idx, ctx.phase, *raw,
                                   LayerKV(out.k.clone(), out.v.clone(), out.pos, out.valid, aux=dict(out.aux))))
            return out

        def on_prefill(self, ctx, kv):
            return self._hook(super().on_prefill, ctx, kv)

        def on_append(self, ctx, kv):
            return self._hook(super().on_append, ctx, kv)
    return Recording


def _run(model, policy, b=2, n=30, prefix=22, seed=3):
    teacher_forced_logits(model, prompt(b, n, seed=seed), prefix, policy)
    return policy.log


def _per_group(x: Tensor, group: int, dim: int) -> Tensor:
    """Scale / zero (B, Hkv, N/G, C) or (B, Hkv, N, C/G) broadcast back to the elements."""
    return x.repeat_interleave(group, dim=dim)


# ---------------------------------------------------------------- registry and validation


def test_registry():
    for name, cls in [("kivi", KIVI), ("mikv", MiKV), ("vidkv", VidKV)]:
        assert POLICIES[name] is cls
    assert isinstance(get_policy("mikv", budget=0.1), MiKV)
    assert get_policy("mikv", budget=0.1).budget.ratio == pytest.approx(0.9)
    for name in ("kivi", "vidkv"):
        policy_factory(name)
        with pytest.raises(ValueError, match="rejects"):   # fixed bit widths, no budget
            policy_factory(name, budget=0.5)


@pytest.mark.parametrize("cls,kwargs", [
    (KIVI, dict(bits=0)), (KIVI, dict(bits=17)), (KIVI, dict(group_size=32, residual_length=48)),
    (KIVI, dict(residual_length=0)), (MiKV, dict(low_bits=-1)), (MiKV, dict(recent_fraction=2.0)),
    (MiKV, dict(group_size=0)), (MiKV, dict(budget=1.5)), (VidKV, dict(key_bits=2.5)), (VidKV, dict(value_bits=1.5)),
    (VidKV, dict(value_bits=0)), (VidKV, dict(stp_ratio=1.0)), (VidKV, dict(difficult_bits=0)),
    (VidKV, dict(group_size=32, residual_length=40)),
])
def test_invalid_config_raises(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


# ---------------------------------------------------------------- quantizer units (random tensors)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("dim,group", [(2, 4), (2, 12), (3, 4), (3, 16)])
def test_group_rtn_error_within_half_step(bits, dim, group):
    x = torch.randn(2, 3, 24, 16, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, :, 0] = 0.7                               # a constant group is exact
    codes, scale, zero = quantize_groups(x, bits, group, dim)
    assert codes.shape == x.shape and int(codes.max()) <= 2 ** bits - 1 and int(codes.min()) >= 0
    assert codes.dtype == (torch.uint8 if bits <= 8 else torch.int32)
    x_hat = dequantize_groups(codes, scale, zero, group, dim)
    s = _per_group(scale, group, dim)
    assert bool(((x - x_hat).abs() <= s / 2 + EPS).all())
    assert bool((x_hat.amin() >= x.amin() - EPS) & (x_hat.amax() <= x.amax() + EPS))
    if dim == 2:
        assert torch.equal(x_hat[0, 0, :, 0], x[0, 0, :, 0])


def test_per_channel_keys_and_per_token_values_win_on_planted_outliers():
    """KIVI's premise: an outlier channel favours per-channel grouping, an outlier token per-token grouping."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 32, generator=g)
    k[..., 5] += 20.0
    v = torch.randn(1, 2, 64, 32, generator=g)
    v[:, :, 9] *= 20.0

    def mse(x, dim):
        return float((dequantize_groups(*quantize_groups(x, 2, 32, dim), 32, dim) - x).pow(2).mean())
    assert mse(k, 2) < mse(k, 3)
    assert mse(v, 3) < mse(v, 2)


def test_fft_round_trip_and_sign_path_equals_full_fft_reference():
    """spectrum/from_spectrum is the identity; the 1-bit path equals the released full-FFT math (scaled)."""
    g = torch.Generator().manual_seed(1)
    for d_e in (1, 2, 7, 8):
        x = torch.randn(2, 2, 8, d_e, generator=g)
        torch.testing.assert_close(vidkv_mod.from_spectrum(vidkv_mod.spectrum(x), d_e), x, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.fft.ifft(torch.fft.fft(x, dim=-1), dim=-1).real, x, atol=1e-6, rtol=0)
        codes, scale = vidkv_mod.sign_quantize(vidkv_mod.spectrum(x), 4)
        ours = vidkv_mod.from_spectrum(vidkv_mod.sign_dequantize(codes, scale, 4), d_e)
        f = torch.view_as_real(torch.fft.fft(x, dim=-1)).flatten(-2)              # (B, H, N, 2·D_e) re/im
        grouped = f.transpose(2, 3).unflatten(-1, (-1, 4))                        # groups of 4 tokens
        q = torch.where(grouped >= 0, 1.0, -1.0) * grouped.abs().mean(dim=-1, keepdim=True)
        q = q.flatten(-2).transpose(2, 3).unflatten(-1, (d_e, 2))
        ref = torch.fft.ifft(torch.view_as_complex(q.contiguous()), dim=-1).real
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_ternary_rule():
    x = torch.tensor([0.0, 0.2, -0.2, 1.0, -1.0, 0.6, -0.6, 2.0]).view(1, 1, 8, 1)
    codes, scale = vidkv_mod.ternary_quantize(x, 8)
    s = float(x.abs().mean())
    assert scale.shape == (1, 1, 1, 1) and float(scale) == pytest.approx(s)
    want = [0 if abs(v) <= s / 2 else int(math.copysign(1, v)) for v in x.flatten().tolist()]
    assert (codes.flatten().long() - 1).tolist() == want
    torch.testing.assert_close(vidkv_mod.ternary_dequantize(codes, scale, 8).flatten(),
                               torch.tensor(want, dtype=torch.float32) * s)


def test_balancer_preserves_scores_and_balances_maxima():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    q[..., 3] *= 30.0
    k[..., 6] *= 30.0
    b = mikv_mod.balance_factors(q, k)                                            # (B, Hkv, D)
    bq = b.repeat_interleave(2, dim=1)[:, :, None]                                 # per query head
    kk = k.repeat_interleave(2, dim=1)
    torch.testing.assert_close((q / bq) @ (kk * bq).transpose(-1, -2), q @ kk.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    q_max = (q / bq).abs().amax(dim=2).view(1, 2, 2, 8).amax(dim=2)
    torch.testing.assert_close(q_max, (k * b[:, :, None]).abs().amax(dim=2), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- memory accounting, exact


def test_memory_formulas_by_hand():
    # KIVI b=2, G=32, R=128, n=300, Hkv=2, D=64: Nk = 256 keys, Nv = 172 values quantized.
    codes = 2 * (2 * 64 * (256 + 172))
    params = 16 * 2 * 2 * (256 // 32 * 64 + 172 * 64 // 32)
    fp = 16 * 2 * 64 * ((300 - 256) + (300 - 172))
    m = KIVI().cache_memory(300, 2, 64)
    assert (m.code_bits, m.param_bits, m.fp_bits, m.elements) == (codes, params, fp, 2 * 2 * 300 * 64)
    assert m.bytes == (codes + params + fp) / 8 == 64576
    assert KIVI(bits=4, group_size=64).cache_memory(128 * 10_000, 8, 128).bits_per_element == pytest.approx(
        4 + 32 / 64, rel=1e-3)                                                     # ≈ b + 32/G
    # MiKV 25% high precision, INT3, one group per token, n=100, Hkv=2, D=64: 25 high + 75 low per head.
    m = MiKV(budget=0.25, low_bits=3).cache_memory(100, 2, 64)
    assert m.bits == 2 * (16 * 2 * 64 * 25 + 3 * 2 * 64 * 75 + 16 * 2 * 2 * 1 * 75 + 16 * 64) == 171648
    assert MiKV(budget=0.25, low_bits=0).cache_memory(100, 2, 64).bits == 2 * 16 * 2 * 64 * 25
    # VidKV defaults, n=100, Hkv=2, D=64: 96 quantized tokens (3 groups), 4 residual; 32 hard + 32 easy channels.
    keys = 2 * (2 * 96 * 32 + 2 * 16 * 3 * 32 + 96 * 32 + 16 * 3 * 32) + 64
    values = 2 * (1.6 * 96 * 64 + 16 * 3 * 64)
    assert VidKV().cache_memory(100, 2, 64).bits == pytest.approx(keys + values + 16 * 2 * 2 * 64 * 4, rel=1e-12)
    # STP 50% of 96 tokens -> ⌊48/32⌋·32 = 32 protected at 2 bits (+ a 96-bit token mask); 25% would give 0.
    values = 2 * (1.6 * 64 * 64 + 16 * 2 * 64 + 2 * 32 * 64 + 2 * 16 * 1 * 64) + 96
    assert VidKV(stp_ratio=0.5).cache_memory(100, 2, 64).bits == pytest.approx(
        keys + values + 16 * 2 * 2 * 64 * 4, rel=1e-12)
    assert VidKV(stp_ratio=0.25).cache_memory(100, 2, 64).bits == VidKV().cache_memory(100, 2, 64).bits
    assert full_memory(100, 2, 64).bits == 16 * 2 * 2 * 100 * 64


def test_cache_bytes_and_kv_quality_column(tiny_llama):
    cfg = tiny_llama.config                                                       # 2 layers, Hkv 2, D 16
    assert cache_bytes(None, cfg, 100) == 2 * (2 * 2 * 100 * 16 * FP_BITS // 8)
    assert cache_bytes(KIVI(group_size=4, residual_length=8), cfg, 100) == 2 * KIVI(
        group_size=4, residual_length=8).cache_memory(100, 2, 16).bytes
    assert cache_bytes(SnapKV(budget=0.5), cfg, 100) is None
    args = type("Args", (), {"policies": "kivi,mikv,vidkv", "budgets": "0.1,0.2", "lengths": "4096",
                             "other_lengths": "first"})()
    assert kv_quality.cells(args) == [(4096, "full", None), (4096, "kivi", None), (4096, "mikv", 0.1),
                                      (4096, "mikv", 0.2), (4096, "vidkv", None)]
    from plaintext_ref.eval.report import _length_table
    niah = {"metric": "niah", "n": 2, "score": [1.0, 0.0], "kept": [10.0, 12.0], "attended": [10.0, 12.0]}
    rows = [{"policy": "full", "budget": None, "results": {}, "kv_bytes": 8192.0},
            {"policy": "kivi", "budget": None, "results": {}, "kv_bytes": 2000.25},
            {"policy": "snapkv", "budget": 0.1, "results": {}, "kv_bytes": None},
            {"policy": "h2o", "budget": 0.1, "results": {"niah": niah}, "kv_bytes": None}]
    table = "\n".join(_length_table(64, rows))  # prompt = 64 − 12 = 52 tokens; full: 8192 / 64 B per slot
    assert "| kv bytes (per token) |" in table and "| full | full | – | – | 8,192 (128) |" in table, table
    assert "| kivi | – | – | – | 2,000 (31) |" in table and "| snapkv | 10% | – | – | – |" in table, table
    assert "| h2o | 10% | 11 (21.2%) ⚠ | 11 (21%) | ≈ 1,408 (27) |" in table, table  # 11 kept × 128 B


# ---------------------------------------------------------------- KIVI on tiny-llama


def test_kivi_blocks_residual_error_and_memory(tiny_llama):
    g, r = 4, 8
    log = _run(tiny_llama.model, recording(KIVI)(bits=2, group_size=g, residual_length=r))
    assert {rec.phase for rec in log} == {"prefill", "decode"}
    for rec in log:
        kv, t = rec.after, rec.after.n
        (kc, ks, kz), (vc, vs, vz) = kv.aux[kivi_mod.KEYS], kv.aux[kivi_mod.VALUES]
        nk, nv = kc.shape[2], vc.shape[2]
        assert nk % r == 0 and t - nk < r and nv == max(t - r, 0), (t, nk, nv)
        assert torch.equal(kv.k[:, :, nk:], rec.raw_k[:, :, nk:]) and torch.equal(kv.v[:, :, nv:], rec.raw_v[:, :, nv:])
        k_hat, v_hat = dequantize_groups(kc, ks, kz, g, 2), dequantize_groups(vc, vs, vz, g, 3)
        assert torch.equal(kv.k[:, :, :nk], k_hat) and torch.equal(kv.v[:, :, :nv], v_hat)
        assert bool(((rec.raw_k[:, :, :nk] - k_hat).abs() <= _per_group(ks, g, 2) / 2 + EPS).all())
        assert bool(((rec.raw_v[:, :, :nv] - v_hat).abs() <= _per_group(vs, g, 3) / 2 + EPS).all())
        b, h, _, d = kv.k.shape
        want = b * h * (2 * d * (nk + nv) + 32 * (d * nk // g + nv * d // g) + 16 * d * (2 * t - nk - nv))
        assert KIVI(bits=2, group_size=g, residual_length=r).memory(kv).bits == want
        if rec.phase == "prefill":
            assert KIVI(bits=2, group_size=g, residual_length=r).cache_memory(t, h, d).bits * b == want


# ---------------------------------------------------------------- MiKV on tiny-llama


def test_mikv_precision_split_error_and_memory(tiny_llama):
    policy = recording(MiKV)(budget=0.3, low_bits=2, group_size=8)
    log = _run(tiny_llama.model, policy)
    prev: dict[int, Tensor] = {}
    for rec in log:
        kv, t = rec.after, rec.after.n
        high = kv.aux[mikv_mod.HIGH]
        cap = int(22 * (1 - 0.7))                                                 # fixed from the prompt, like H2O
        assert bool((high.sum(-1) == min(t, cap)).all()), high.sum(-1)
        if rec.layer in prev:                                                     # a demoted slot never comes back
            old = prev[rec.layer]
            assert not bool((high[:, :, : old.shape[2]] & ~old).any())
        prev[rec.layer] = high
        hm = high[..., None].expand_as(kv.k)
        assert torch.equal(kv.k[hm], rec.raw_k[hm]) and torch.equal(kv.v[hm], rec.raw_v[hm])
        kc, ks, kz, vc, vs, vz = (kv.aux[key] for key in mikv_mod.CODES)
        bal = kv.aux[mikv_mod.BALANCE]
        low = ~hm
        k_hat = dequantize_groups(kc, ks, kz, 8, 3) / bal
        v_hat = dequantize_groups(vc, vs, vz, 8, 3)
        assert torch.equal(kv.k[low], k_hat[low]) and torch.equal(kv.v[low], v_hat[low])
        k_bound = (_per_group(ks, 8, 3) / 2 / bal + EPS)[low]
        assert bool(((rec.raw_k - k_hat).abs()[low] <= k_bound).all())
        assert bool(((rec.raw_v - v_hat).abs()[low] <= (_per_group(vs, 8, 3) / 2 + EPS)[low]).all())
        b, h, _, d = kv.k.shape
        n_high, n_low = int(high.sum()), b * h * t - int(high.sum())
        want = 16 * 2 * d * n_high + 2 * 2 * d * n_low + 16 * 2 * 2 * (d // 8) * n_low + 16 * b * h * d
        assert policy.memory(kv).bits == want


def test_mikv_prefill_high_set_is_h2o_kept_set(tiny_llama):
    ids = prompt(2, 24, seed=4)
    h2o = prefill(tiny_llama.model, ids, H2O(budget=0.25))
    mikv = prefill(tiny_llama.model, ids, MiKV(budget=0.25, low_bits=2))
    for i in range(h2o.num_layers):
        high = mikv.kv(i).aux[mikv_mod.HIGH]
        kept = mikv.kv(i).pos.masked_select(high).view(*high.shape[:2], -1)
        assert torch.equal(kept, h2o.kv(i).pos)


def test_mikv_zero_bits_is_h2o(tiny_llama):
    model, ids = tiny_llama.model, prompt(2, 30, seed=5)
    ours = teacher_forced_logits(model, ids, 20, MiKV(budget=0.3, low_bits=0))
    torch.testing.assert_close(ours, teacher_forced_logits(model, ids, 20, H2O(budget=0.3)), atol=0, rtol=0)


# ---------------------------------------------------------------- VidKV on tiny-llama


def test_vidkv_blocks_rules_and_memory(tiny_llama):
    g, r = 4, 8
    policy = recording(VidKV)(group_size=g, residual_length=r, stp_ratio=0.3, stp_window=4)
    log = _run(tiny_llama.model, policy)
    for rec in log:
        kv, t = rec.after, rec.after.n
        nq, blocks = kv.aux[vidkv_mod.N_Q], kv.aux[vidkv_mod.BLOCKS]
        first = 22 - 22 % g
        assert blocks[0].n == first and nq == first + r * (len(blocks) - 1)
        assert t - nq < (g if rec.phase == "prefill" else r)
        assert torch.equal(kv.k[:, :, nq:], rec.raw_k[:, :, nq:]) and torch.equal(kv.v[:, :, nq:], rec.raw_v[:, :, nq:])
        for block in blocks:
            lo, n = block.lo, block.n
            raw_k, raw_v = rec.raw_k[:, :, lo:lo + n], rec.raw_v[:, :, lo:lo + n]
            k_hat, v_hat = policy.dequantize(block, n, raw_k.shape[-1])
            assert torch.equal(kv.k[:, :, lo:lo + n], k_hat) and torch.equal(kv.v[:, :, lo:lo + n], v_hat)
            # Keys: the widest-range channels (over heads and tokens) are the 2-bit ones, within s/2.
            span = raw_k.amax(dim=(1, 2)) - raw_k.amin(dim=(1, 2))                  # (B, D)
            assert bool((block.hard.sum(-1) == 8).all())
            narrowest_hard = span.masked_fill(~block.hard, math.inf).amin(-1)
            assert bool((narrowest_hard >= span.masked_fill(block.hard, -math.inf).amax(-1)).all())
            hard = block.hard[:, None, None, :].expand_as(raw_k)
            bound = _per_group(block.k_hard[1], g, 2) / 2 + EPS
            assert bool(((raw_k - k_hat)[hard].view(bound.shape).abs() <= bound).all())
            # Values: ternary rule on the other tokens, min-max within s/2 on the STP tokens.
            assert block.salient.shape[1] == (int(first * 0.3) // g * g if lo == 0 else 0)
            rest = policy._rest(block.salient, n)
            v_rest = vidkv_mod._take(raw_v, rest)
            s = _per_group(block.v_rest[1], g, 2)
            q = torch.where(v_rest > s / 2, 1, torch.where(v_rest < -s / 2, -1, 0))
            assert torch.equal(block.v_rest[0].long() - 1, q)
            torch.testing.assert_close(vidkv_mod._take(v_hat, rest), q * s, atol=0, rtol=0)
            v_sal = vidkv_mod._take(raw_v, block.salient)
            bound = _per_group(block.v_salient[1], g, 2) / 2 + EPS
            assert bool(((v_sal - vidkv_mod._take(v_hat, block.salient)).abs() <= bound).all())
        b, h, _, d = kv.k.shape
        want = 16 * 2 * b * h * d * (t - nq)
        for block in blocks:
            groups, sal = block.n // g, block.salient.shape[1]
            rest_n = block.n - sal
            want += b * h * (2 * block.n * 8 + 16 * 2 * groups * 8 + block.n * 8 + 16 * groups * 8) + b * d
            want += b * h * (1.6 * rest_n * d + 16 * (rest_n // g) * d + 2 * sal * d + 32 * (sal // g) * d)
            want += b * block.n if sal else 0
        assert policy.memory(kv).bits == pytest.approx(want, rel=1e-12)
        if rec.phase == "prefill":
            formula = VidKV(group_size=g, residual_length=r, stp_ratio=0.3).cache_memory(t, h, d)
            assert b * formula.bits == pytest.approx(want, rel=1e-12)


def test_vidkv_stp_tokens_are_the_most_attended(tiny_llama):
    """STP's text analogue: the protected tokens are the top of the last window's attention (HF eager), per row."""
    ids = prompt(2, 24, seed=6)
    cache = prefill(tiny_llama.model, ids, VidKV(group_size=4, residual_length=8, stp_ratio=0.4, stp_window=4))
    for i, attn in enumerate(eager_attentions(tiny_llama.model, ids)):         # (B, H, S, S)
        saliency = attn[:, :, -4:].mean(dim=(1, 2))                              # (B, S)
        block = cache.kv(i).aux[vidkv_mod.BLOCKS][0]
        assert block.salient.shape == (2, 8)                                     # ⌊24·0.4 / 4⌋·4
        assert torch.equal(block.salient, saliency.topk(8, dim=-1).indices.sort(dim=-1).values)


# ---------------------------------------------------------------- whole-model equivalences


HIGH_BITS = {
    "kivi": lambda: KIVI(bits=16, group_size=4, residual_length=8),
    "mikv": lambda: MiKV(budget=0.25, low_bits=16),
    "vidkv": lambda: VidKV(key_bits=2.0, difficult_bits=16, value_bits=16, group_size=4, residual_length=8),
}
LOW_BITS = {
    "kivi": lambda: KIVI(bits=2, group_size=4, residual_length=8),
    "mikv": lambda: MiKV(budget=0.25, low_bits=2),
    "vidkv": lambda: VidKV(group_size=4, residual_length=8, stp_ratio=0.3, stp_window=4),
}
NOTHING_QUANTIZED = {   # residual / budget longer than the whole run: the full cache, bit for bit
    "kivi": lambda: KIVI(group_size=4, residual_length=64),
    "mikv": lambda: MiKV(budget=64),
    "vidkv": lambda: VidKV(group_size=32, residual_length=64),
}


@pytest.fixture(scope="module")
def full_run(tiny_llama):
    ids = prompt(2, 30, seed=7)
    model = tiny_llama.model
    return ids, teacher_forced_logits(model, ids, 20), generate(model, ids[:, :20], None, max_new_tokens=6)


@pytest.mark.parametrize("name", sorted(HIGH_BITS))
def test_high_bit_width_reproduces_full_cache(tiny_llama, full_run, name):
    ids, full_logits, full_tokens = full_run
    model = tiny_llama.model
    torch.testing.assert_close(teacher_forced_logits(model, ids, 20, HIGH_BITS[name]()), full_logits, atol=1e-4, rtol=0)
    assert torch.equal(generate(model, ids[:, :20], HIGH_BITS[name](), max_new_tokens=6), full_tokens)
    exact = teacher_forced_logits(model, ids, 20, NOTHING_QUANTIZED[name]())
    torch.testing.assert_close(exact, full_logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(LOW_BITS))
def test_low_bit_generate_runs_end_to_end(tiny_llama, full_run, name):
    ids = full_run[0][:, :20]
    out = generate(tiny_llama.model, ids, LOW_BITS[name](), max_new_tokens=12)
    assert out.shape == (2, 32) and torch.equal(out[:, :20], ids)
    assert int(out.max()) < tiny_llama.model.config.vocab_size


@pytest.mark.parametrize("name", sorted(LOW_BITS))
def test_interleaved_sequences_match_solo(tiny_llama, full_run, name):
    """One policy object, two sequences advanced in turn: each equals its solo run, bit for bit."""
    model, policy = tiny_llama.model, LOW_BITS[name]()
    runs = [(prompt(2, 30, seed=1), 22), (prompt(1, 26, seed=2), 17)]
    for (ids, p), (logits, snaps) in zip(runs, interleaved(model, policy, runs)):
        alone_logits, alone_snaps = interleaved(model, policy, [(ids, p)])[0]
        assert torch.equal(logits, alone_logits) and same_snapshots(snaps, alone_snaps)
    ids, full_logits, _ = full_run
    assert (teacher_forced_logits(model, ids, 20, LOW_BITS[name]()) - full_logits).abs().max() > 1e-3


def test_kvmemory_adds_up():
    a, b = KVMemory(1, 2, 3, 4), KVMemory(10, 20, 30, 40)
    assert a + b == KVMemory(11, 22, 33, 44) and (a + b).bits == 66 and (a + b).bits_per_element == 66 / 44


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_runs_and_high_bits_match_full(dtype):
    from plaintext_ref.models import load_model
    model = load_model("tiny-llama", device="cuda", dtype=dtype).model
    ids = prompt(2, 30, seed=7).cuda()
    full = teacher_forced_logits(model, ids, 20)
    for name in sorted(LOW_BITS):
        assert torch.isfinite(teacher_forced_logits(model, ids, 20, LOW_BITS[name]())).all(), name
        assert generate(model, ids[:, :20], LOW_BITS[name](), max_new_tokens=4).shape == (2, 24)
        if dtype == torch.float32:
            high = teacher_forced_logits(model, ids, 20, HIGH_BITS[name]())
            torch.testing.assert_close(high, full, atol=1e-3, rtol=0)
