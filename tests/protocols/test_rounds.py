"""``protocols.rounds.mul3_step``: a three-factor product in one round, against the plaintext product."""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc


def _mul3_job(seed: int) -> dict:
    """x·y·z (broadcast) of ring integers from one opening round; exact in the ring."""
    from protocols.compat import comm, crypten
    from protocols.rounds import mul3_step, open_many, share_of, together

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for shapes in (((64, 1), (64, 33), (1, 33)), ((500,), (500,), (500,)), ((3, 5, 1), (1, 5, 9), (3, 1, 9))):
        xs = [((torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1) * 2**20).round().long() for s in shapes]
        sh = [share_of(crypten.cryptensor(x.double(), src=i % 2, precision=0)) for i, x in enumerate(xs)]
        comm.get().reset_communication_stats()
        ((p,),) = together(mul3_step([tuple(sh)]))
        stats = dict(comm.get().get_communication_stats())
        (got,) = open_many([p])
        out[str(shapes)] = {"exact": bool((got == xs[0] * xs[1] * xs[2]).all()), "rounds": stats["rounds"],
                            "bytes": stats["bytes"], "n": sum(x.numel() for x in xs)}
    return out


@pytest.mark.parametrize("provider_name", ["TFP", "dealer"])
def test_three_factor_product_in_one_round(provider_name, seed):
    """[x·y·z] exactly in the ring (|x|, |y|, |z| ≤ 2^20), 1 round, 16·(|x| + |y| + |z|) bytes."""
    for shapes, r in run_on(provider_name, _mul3_job, seed, timeout=300)[0].items():
        assert r["exact"], (seed, shapes, r)
        assert r["rounds"] == 1 and r["bytes"] == 16 * r["n"], (shapes, r)
