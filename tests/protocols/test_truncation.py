"""2-party truncation: the local hazard CrypTen has, and the exact protocol that replaces it.

Local (``ProtocolConfig(truncation="local")``, CrypTen's): each party truncates its share, so a
product of value v fails with probability ≈ |v|/2^32 and is then off by exactly 2^32 (2^64 at scale
2^32, truncated by 2^16, read at 2^16) — the hazard model ``benchmarks.selection_agreement`` uses.
Exact (the default, ``protocols.truncation``): no wrap error in 2^24 products with |v| ≤ 2^20, on both
providers, every error within 2 ulps, at 1 round and 16·n bytes per truncation on top of the product.
"""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

CHUNK, MAG = 1 << 21, 1024.0  # |x|, |y| ≤ 2^10: E|xy| = MAG²/4 = 2^18


def _products(seed: int, chunks: int, truncation: str) -> tuple[list[float], list[dict]]:
    """``chunks`` × 2^21 fresh products under ``truncation``; per-chunk errors' summary and costs."""
    from protocols.compat import comm, crypten
    from protocols.config import ProtocolConfig, protocol_context

    gen = torch.Generator().manual_seed(seed)
    worst_small, wraps, costs = 0.0, 0, []
    with protocol_context(ProtocolConfig(truncation=truncation)):
        for _ in range(chunks):
            x = (torch.rand(CHUNK, generator=gen, dtype=torch.float64) * 2 - 1) * MAG
            y = (torch.rand(CHUNK, generator=gen, dtype=torch.float64) * 2 - 1) * MAG
            xe, ye = (torch.round(t * 2**16) / 2**16 for t in (x, y))  # what the encoder shares
            a, b = crypten.cryptensor(xe, src=0), crypten.cryptensor(ye, src=0)
            comm.get().reset_communication_stats()
            prod = a * b
            costs.append(dict(comm.get().get_communication_stats()))
            err = prod.reveal().double() / 2**16 - xe * ye  # the ring element, exactly
            n_wraps = (err.abs() / 2**32).round()
            wraps += int((n_wraps > 0).sum())
            small = err - n_wraps * 2**32 * err.sign()
            worst_small = max(worst_small, float(small.abs().max()))
    return [worst_small, wraps], costs


def test_local_truncation_fails_at_rate_v_over_2_32(seed):
    (worst, wraps), _ = run_on("TFP", _products, seed, 1, "local", timeout=300)[0]
    assert worst < 2**-15 * (1 + MAG**2 * 2**-16), f"seed {seed}: non-wrap error {worst}"
    expected = CHUNK * MAG**2 / 4 / 2**32  # 128
    assert 0.5 * expected < wraps < 1.6 * expected, f"seed {seed}: {wraps} wraps, expected ≈ {expected:.0f}"


def test_exact_truncation_never_wraps_in_2_24_products(seed):
    """2^24 products (8 chunks) on TFP: 0 wraps (local truncation would give ≈ 1024)."""
    (worst, wraps), costs = run_on("TFP", _products, seed, 8, "exact", timeout=900)[0]
    assert wraps == 0, f"seed {seed}: {wraps} wrapped products"
    assert worst <= 2 * 2**-16, f"seed {seed}: error {worst} > 2 ulps"
    # Beaver product (1 round, x − a and y − b: 2·16·n bytes) + truncation (1 round, 16·n bytes)
    assert costs[0]["rounds"] == 2 and costs[0]["bytes"] == 3 * 16 * CHUNK, costs[0]


def test_exact_truncation_with_the_dealer(seed):
    """Same protocol with the correlation from the separate dealer: no wraps, same online cost
    (party 0 also logs the dealer's answer: 2·n elements for truncation, n for the triple)."""
    (worst, wraps), costs = run_on("dealer", _products, seed, 1, "exact", timeout=300)[0]
    assert wraps == 0 and worst <= 2 * 2**-16, f"seed {seed}: {wraps} wraps, error {worst}"


def _divide(seed: int) -> list[list[float]]:
    """Exact public division by several integers (means, powers of two, odd) of large values."""
    from protocols.compat import comm, crypten

    gen = torch.Generator().manual_seed(seed)
    out = []
    for d in (2, 3, 7, 576, 1 << 16, 1 << 30):
        x = (torch.rand(4096, generator=gen, dtype=torch.float64) * 2 - 1) * 2**40  # ring ints
        xi = x.round().long()
        share = crypten.cryptensor(torch.zeros(4096), src=0)
        share._tensor.share = xi.clone() if comm.get().get_rank() == 0 else torch.zeros_like(xi)
        share._tensor.div_(d)
        got = share._tensor.reveal()
        out.append([float((got - torch.div(xi, d, rounding_mode="floor")).abs().max())])
    return out


def test_exact_division_by_any_public_integer(seed):
    worst = run_on("TFP", _divide, seed, timeout=120)[0]
    assert max(w[0] for w in worst) <= 2, f"seed {seed}: {worst}"


def _square_job(seed: int) -> dict:
    """``trunc_step(square=True)``: ⌊x/d⌋ and its square from one opening."""
    from protocols.compat import comm, crypten
    from protocols.rounds import open_many, share_of, together
    from protocols.truncation import trunc_step

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for d in (1 << 16, 576, 3):
        x = ((torch.rand(50_000, generator=gen, dtype=torch.float64) * 2 - 1) * 2**47).round().long()
        xs = crypten.cryptensor(x.double(), src=0, precision=0)
        comm.get().reset_communication_stats()
        ((t, sq),) = together(trunc_step([(share_of(xs), d)], square=True))[0]
        stats = dict(comm.get().get_communication_stats())
        got_t, got_sq = open_many([t, sq])
        ref = torch.div(x, d, rounding_mode="floor")
        out[d] = {"t_err": int((got_t - ref).abs().max()), "sq_exact": bool((got_sq == got_t * got_t).all()),
                  "rounds": stats["rounds"], "bytes": stats["bytes"], "n": x.numel()}
    return out


@pytest.mark.parametrize("provider_name", ["TFP", "dealer"])
def test_truncation_with_its_square_in_one_round(provider_name, seed):
    """The square of the truncated value comes out of the truncation's own opening (no product round):
    the computed ⌊x/d⌋ within 2 of the floor, its square exact in the ring, 1 round, 16·n bytes."""
    for d, r in run_on(provider_name, _square_job, seed, timeout=300)[0].items():
        assert r["t_err"] <= 2 and r["sq_exact"], (seed, d, r)
        assert r["rounds"] == 1 and r["bytes"] == 16 * r["n"], (d, r)


def _mul_job(seed: int) -> dict:
    """``trunc_mul_step``: ⌊z/d⌋ and ⌊z/d⌋·y (broadcast) from one round."""
    from protocols.compat import comm, crypten
    from protocols.rounds import open_many, share_of, together
    from protocols.truncation import trunc_mul_step

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for d, zs, ys in ((1 << 20, (64, 1), (64, 33)), (7, (500,), (500,)), (1 << 36, (3, 5, 1), (1, 5, 9))):
        z = ((torch.rand(zs, generator=gen, dtype=torch.float64) * 2 - 1) * 2**52).round().long()
        y = ((torch.rand(ys, generator=gen, dtype=torch.float64) * 2 - 1) * 2**20).round().long()
        zsh = crypten.cryptensor(z.double(), src=0, precision=0)
        ysh = crypten.cryptensor(y.double(), src=1, precision=0)
        comm.get().reset_communication_stats()
        ((t, ty),) = together(trunc_mul_step(share_of(zsh), d, share_of(ysh)))
        stats = dict(comm.get().get_communication_stats())
        got_t, got_ty = open_many([t, ty])
        out[d] = {"t_err": int((got_t - torch.div(z, d, rounding_mode="floor")).abs().max()),
                  "prod_exact": bool((got_ty == got_t * y).all()), "rounds": stats["rounds"],
                  "bytes": stats["bytes"], "n": z.numel() + y.numel()}
    return out


@pytest.mark.parametrize("provider_name", ["TFP", "dealer"])
def test_truncation_fused_with_a_product_in_one_round(provider_name, seed):
    """A product whose operand is a truncation's result, in the truncation's round: ⌊z/d⌋ within 2,
    the product exactly ⌊z/d⌋·y in the ring, 1 round, 16·(|z| + |y|) bytes."""
    for d, r in run_on(provider_name, _mul_job, seed, timeout=300)[0].items():
        assert r["t_err"] <= 2 and r["prod_exact"], (seed, d, r)
        assert r["rounds"] == 1 and r["bytes"] == 16 * r["n"], (d, r)
