"""CrypTen's 2-party truncation, measured: the hazard model that ``benchmarks.selection_agreement``
uses to tell truncation faults from approximation error.

Each party truncates its share locally (CrypTen, world size 2), so a product of value v fails with
probability ≈ |v|/2^32 (the shares straddle the ring's wrap) and is then off by exactly 2^32 (2^64 at
scale 2^32, truncated by 2^16, read at 2^16). Rare per product, but the static eviction at 4K truncates
~10^9 products (SmolLM2, 16 selecting layers), so faults happen there (benchmarks/reports/
selection_agreement.md). Checked on fresh random products with |v| up to 2^20 (expected count
n·E|v|/2^32 = 128): every error is either ≤ 2^-15·(1 + |v|·2^-16) or a multiple of 2^32.
"""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

N, MAG = 1 << 21, 1024.0  # |x|, |y| ≤ 2^10: E|xy| = MAG²/4 = 2^18


def _job(seed: int) -> list[float]:
    from protocols.compat import crypten

    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * MAG
    y = (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * MAG
    xe, ye = (torch.round(t * 2**16) / 2**16 for t in (x, y))  # what the encoder shares
    prod = crypten.cryptensor(xe, src=0) * crypten.cryptensor(ye, src=0)  # float64: exact encoding
    got = prod.reveal().double() / 2**16  # the ring element, exactly (get_plain_text rounds to float32)
    return (got - xe * ye).tolist()


def test_two_party_truncation_fails_at_rate_v_over_2_32(seed):
    err = torch.tensor(run_on("TFP", _job, seed, timeout=300)[0], dtype=torch.float64)
    wraps = (err.abs() / 2**32).round()
    small = err - wraps * 2**32 * err.sign()
    assert small.abs().max() < 2**-15 * (1 + MAG**2 * 2**-16), f"seed {seed}: non-wrap error {small.abs().max()}"
    expected = N * MAG**2 / 4 / 2**32  # 128
    n_wraps = int((wraps > 0).sum())
    assert 0.5 * expected < n_wraps < 1.6 * expected, f"seed {seed}: {n_wraps} wraps, expected ≈ {expected:.0f}"
