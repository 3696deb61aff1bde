"""fixed_matmul vs plaintext on fresh inputs, and its cost, under TFP and the separate dealer."""
from __future__ import annotations

import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

PRECISION = 2.0 ** -16
D = 8  # inner dimension of every case below

# (name, x shape, W shape, transpose_w)
CASES = [
    ("vec", (D,), (D, 5), False),
    ("row", (1, D), (D, 5), False),
    ("odd", (3, D), (D, 1), False),
    ("batched_4d", (2, 3, 5, D), (D, 4), False),
    ("qkT", (2, 3, 5, D), (2, 3, 4, D), True),
    ("gqa_broadcast", (2, 3, 2, 1, D), (2, 3, 1, 7, D), True),
    ("attn_v", (2, 3, 5, 4), (2, 3, 4, D), False),
]


def _tolerance(x: torch.Tensor, w: torch.Tensor) -> float:
    """Fixed-point bound: inner·(|x|+|w|)·2^-17 input rounding + 2^-16 truncation, ×2 for margin."""
    inner = x.shape[-1]
    return 2 * (inner * (x.abs().max() + w.abs().max()).item() * PRECISION / 2 + PRECISION) + 1e-6


def _correctness_job(seed: int) -> list[tuple[str, float, float]]:
    from protocols.compat import crypten
    from protocols.fixed_mask import FixedMaskOperand, fixed_matmul

    gen = torch.Generator().manual_seed(seed)  # same draws on both parties
    out = []
    for name, xs, ws, transpose in CASES:
        x, w = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen)
        op = FixedMaskOperand(crypten.cryptensor(w, src=1))
        ref = x @ (w.transpose(-1, -2) if transpose else w)
        got = fixed_matmul(crypten.cryptensor(x, src=0), op, transpose_w=transpose).get_plain_text()
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        out.append((name, (got - ref).abs().max().item(), _tolerance(x, w)))

    # KV cache: grow along T one row, then three rows; q·Kᵀ and one-hot gather afterwards.
    k = torch.randn(2, 3, 4, D, generator=gen)
    cache = FixedMaskOperand(crypten.cryptensor(k, src=1), grow_dim=-2)
    for rows in (1, 3):
        new = torch.randn(2, 3, rows, D, generator=gen)
        cache.append(crypten.cryptensor(new, src=0))
        k = torch.cat([k, new], dim=2)
    assert tuple(cache.shape) == (2, 3, 8, D), cache.shape
    q = torch.randn(2, 3, 5, D, generator=gen)
    got = fixed_matmul(crypten.cryptensor(q), cache, transpose_w=True).get_plain_text()
    out.append(("appended_qkT", (got - q @ k.transpose(-1, -2)).abs().max().item(), _tolerance(q, k)))
    onehot = torch.nn.functional.one_hot(torch.randint(0, 8, (2, 3, 2), generator=gen), 8).float()
    got = fixed_matmul(crypten.cryptensor(onehot), cache).get_plain_text()
    out.append(("onehot_gather", (got - onehot @ k).abs().max().item(), _tolerance(onehot, k)))
    out.append(("secret", (cache.secret.get_plain_text() - k).abs().max().item(), PRECISION))
    kept = cache.select(2, [0, 5, 7])
    got = fixed_matmul(crypten.cryptensor(q), kept, transpose_w=True).get_plain_text()
    ref = q @ k[:, :, [0, 5, 7]].transpose(-1, -2)
    out.append(("select_qkT", (got - ref).abs().max().item(), _tolerance(q, k)))
    return out


def test_fixed_matmul_matches_plaintext(provider, seed):
    results = run_on(provider, _correctness_job, seed)
    assert results[0] == results[1], "parties disagree"
    bad = [(name, err, tol) for name, err, tol in results[0] if not err <= tol]
    assert not bad, f"seed={seed} provider={provider}: (case, max abs err, tol) {bad}"


def _stats():
    from protocols.compat import comm
    s = comm.get().get_communication_stats()
    return s["bytes"], s["rounds"]


def _delta(before):
    after = _stats()
    return after[0] - before[0], after[1] - before[1]


def _cost_job(seed: int, calls: int, widths: tuple[int, ...]) -> dict:
    """Per width F: set-up cost, k fixed_matmul calls, k stock CrypTen matmuls (secret W)."""
    from protocols.compat import comm, crypten
    from protocols.fixed_mask import FixedMaskOperand, fixed_matmul, fixed_matmul_raw, share_weight

    gen = torch.Generator().manual_seed(seed)
    x = crypten.cryptensor(torch.randn(2, D, generator=gen), src=0)
    costs = {}
    for f in widths:
        w = torch.randn(D, f, generator=gen)
        before = _stats()
        op = share_weight(w if comm.get().get_rank() == 1 else None, 1, (D, f))
        setup = _delta(before)
        before = _stats()
        for _ in range(calls):
            fixed_matmul(x, op)
        fixed = _delta(before)
        w_secret = op.secret
        before = _stats()
        for _ in range(calls):
            x.matmul(w_secret)
        stock = _delta(before)
        costs[f] = {"setup": setup, "fixed": fixed, "stock": stock}
    rows = crypten.cryptensor(torch.randn(1, 3, D, generator=gen))
    cache = FixedMaskOperand(crypten.cryptensor(torch.randn(1, 5, D, generator=gen)), grow_dim=1)
    before = _stats()
    cache.append(rows)
    costs["append"] = _delta(before)
    q = crypten.cryptensor(torch.randn(1, 2, D, generator=gen))
    before = _stats()
    fixed_matmul_raw(q, cache, transpose_w=True)  # (1, 2, D) x (1, 8, D)ᵀ with the 3 rows' opening
    costs["append_product"] = _delta(before)
    cache.append(rows)
    before = _stats()
    cache.secret  # any other read opens the pending rows on its own
    costs["append_read"] = _delta(before)
    return costs


def test_fixed_matmul_bytes(provider, seed):
    calls, widths, nx = 3, (4, 64), 2 * D
    p0, p1 = run_on(provider, _cost_job, seed, calls, widths)
    for f in widths:
        nw, nout = D * f, 2 * f
        for rank, c in enumerate((p0, p1)):
            # set-up opens W − B once: 16·|W| bytes (the dealer's traffic is counted apart, protocols.tape)
            assert c[f]["setup"] == (16 * nw, 1), (f, rank, c[f])
            # stock CrypTen opens x − a and W − b every call (+ the exact truncation of the output)
            assert c[f]["stock"] == (calls * 16 * (nx + nw + nout), 2 * calls), (f, rank, c[f])
            # fixed mask: 16·|x| per party and 1 round per call, + the exact truncation of the output
            # (16·|out|, 1 round): the same with the separate dealer as with TFP
            assert c[f]["fixed"] == (calls * 16 * (nx + nout), 2 * calls), (f, rank, c[f])
    # per-call cost is flat in |W| (only the output's truncation grows, with |out|); stock CrypTen's grows with |W|
    flat = [p1[f]["fixed"][0] - calls * 16 * 2 * f for f in widths]
    assert flat[0] == flat[1], flat
    grow = calls * 16 * D * (widths[1] - widths[0])
    assert p1[widths[1]]["stock"][0] >= p1[widths[0]]["stock"][0] + grow
    # appending 3 rows opens only them, in the round of the next product with the operand (or on its own)
    assert p1["append"] == (0, 0), p1["append"]
    assert p1["append_product"] == (16 * (3 + 2) * D, 1), p1["append_product"]
    assert p1["append_read"] == (16 * 3 * D, 1), p1["append_read"]


def _trunc_matmul_job(seed: int) -> dict:
    """⌊z/d⌋ @ W (or Wᵀ) from the truncation's one opening (``trunc_matmul_step``) vs the plaintext."""
    from protocols.compat import comm, crypten
    from protocols.config import ProtocolConfig, protocol_context
    from protocols.fixed_mask import FixedMaskOperand, append_all, fuses_truncation, trunc_matmul_step
    from protocols.rounds import open_many, share_of, together
    from protocols.truncation import Untruncated

    gen = torch.Generator().manual_seed(seed)

    def ints(shape, bits):
        return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 2**bits).round().long()

    out = {}
    # (z shape, W shape, transpose, d, rows appended to W just before the product)
    cases = [((1, 1, 64), (48, 64), True, 1 << 16, 0), ((3, 40), (40, 24), False, 1 << 32, 0),
             ((2, 3, 1, 16), (2, 3, 9, 16), True, 12345, 2)]
    for zs, ws, transpose, d, grow in cases:
        z = ints(zs, 44 if d >= 1 << 16 else 40)
        w = ints(ws, 16)
        op = FixedMaskOperand(crypten.cryptensor(w.double(), src=1, precision=0), grow_dim=-2 if grow else None)
        full = w
        if grow:
            rows = ints((*ws[:-2], grow, ws[-1]), 16)
            append_all([(op, crypten.cryptensor(rows.double(), src=1, precision=0))])
            full = torch.cat([w, rows], dim=-2)
        zsh = share_of(crypten.cryptensor(z.double(), src=0, precision=0))
        size = z.numel() * full.shape[-2 if transpose else -1]  # |z|·J
        fuses = {}
        for limit in (0, size - 1, size):  # ProtocolConfig.trunc_matmul_limit bounds |z|·J
            with protocol_context(ProtocolConfig(trunc_matmul_limit=limit)):
                fuses[limit] = fuses_truncation(Untruncated(zsh, d), op, transpose_w=transpose)
        comm.get().reset_communication_stats()
        (prod,) = together(trunc_matmul_step(zsh, d, op, transpose_w=transpose))
        stats = dict(comm.get().get_communication_stats())
        (got,) = open_many([prod])
        x = torch.div(z, d, rounding_mode="floor")
        wt = full.transpose(-1, -2) if transpose else full
        err = (got - torch.matmul(x, wt)).abs()
        bound = 2 * wt.abs().sum(-2, keepdim=True)  # each x_i within 2 of ⌊z_i/d⌋
        out[str((zs, ws, transpose, d, grow))] = {
            "ok": bool((err <= bound).all()), "max_err": int(err.max()), "rounds": stats["rounds"],
            "bytes": stats["bytes"], "want_bytes": 16 * (z.numel() + (rows.numel() if grow else 0)),
            "fuses": [fuses[0], fuses[size - 1], fuses[size]]}
    return out


@pytest.mark.parametrize("provider_name", ["TFP", "dealer"])
def test_truncation_fused_with_fixed_matmul(provider_name, seed):
    """⌊z/d⌋ @ W within the truncation's error (2 per element of ⌊z/d⌋), in 1 round and 16·|z| bytes
    (+ 16·|rows| for rows appended to W, whose opening rides along); powers of two and d = 12345."""
    for case, r in run_on(provider_name, _trunc_matmul_job, seed, timeout=300)[0].items():
        assert r["ok"], (seed, case, r)
        assert r["rounds"] == 1 and r["bytes"] == r["want_bytes"], (case, r)
        assert r["fuses"] == [False, False, True], (case, r["fuses"])  # limit 0 never fuses
