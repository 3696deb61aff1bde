"""protocols.compare vs its plaintext twin on fresh random ring integers, on real parties (TFP and
the separate dealer): exact at every |x| < 2^B, edges included; 2 rounds; 16 logged bytes per element
and opening per party."""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc


def _inputs(gen: torch.Generator, bits: int, n: int) -> torch.Tensor:
    bound = 1 << bits
    x = torch.randint(-bound + 1, bound, (n,), generator=gen)
    near = torch.randint(-300, 300, (n // 4,), generator=gen)  # around 0, where the borrow decides
    edges = torch.tensor([0, -1, 1, bound - 1, -bound + 1, bound // 2, -(bound // 2)])
    return torch.cat([x, near, edges])


def _job(seed: int, bits: int, n: int) -> dict:
    from protocols import compare
    from protocols.compat import comm, crypten
    from protocols.rounds import share_of

    gen = torch.Generator().manual_seed(seed)
    x = _inputs(gen, bits, n)
    w = torch.randint(-(1 << 40), 1 << 40, x.shape, generator=gen)
    sx = crypten.cryptensor(x.double(), src=0, precision=0)
    sw = crypten.cryptensor(w.double(), src=1, precision=0)
    crypten.reset_communication_stats()
    ((beta, _), (beta2, prod)) = compare.ge_zero_many([(share_of(sx), None), (share_of(sx), share_of(sw))], bits)
    stats = comm.get().get_communication_stats()
    opened = [t.long() for t in crypten.mpc.MPCTensor.from_shares(torch.stack([beta, beta2, prod]),
                                                                  precision=0).get_plain_text()]
    want = (x >= 0).long()
    return {"rounds": stats["rounds"], "bytes": stats["bytes"], "n": x.numel(),
            "bit": bool((opened[0] == want).all()), "bit_mult": bool((opened[1] == want).all()),
            "prod": bool((opened[2] == want * w).all()), "wrong": int((opened[0] != want).sum())}


@pytest.mark.parametrize("provider_name, bits, n", [("TFP", 32, 4000), ("TFP", 13, 3000), ("TFP", 38, 2000),
                                                    ("dealer", 24, 1000)])
def test_ge_zero_exact_two_rounds(provider_name, bits, n, seed):
    for r in run_on(provider_name, _job, seed, bits, n, timeout=300):
        assert r["bit"] and r["bit_mult"] and r["prod"], (seed, r)
        assert r["rounds"] == 2, r
        assert r["bytes"] == 16 * r["n"] * (2 + 3), r  # round 1: two inputs; round 2: two inputs + one multiplier


def test_digit_widths_cover_the_bound():
    from protocols.compare import digit_widths, material
    for bits in range(1, 63):
        widths = digit_widths(bits)
        assert sum(widths) == bits and max(widths) <= 8, (bits, widths)
    assert digit_widths(32) == (7, 7, 6, 6, 6) and material(32) == 2 * 128 + 3 * 64 + 1 + 512  # 5 digits beat 4 (1,281)
