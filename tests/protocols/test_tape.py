"""The dealer's tape (``protocols.tape``): correct correlations, predicted steps, online cost of ``-n 2``.

A decode-like loop (a growing fixed-mask cache, weight products, comparisons, squares, exact
truncation) runs under TFP and under the separate dealer on fresh random inputs: the results match
plaintext on both, the parties' logged rounds and bytes are identical step by step, and from the
third step on every correlation comes from the tape (0 online requests, 1 dealer trip per step).
"""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

D, STEPS = 16, 6


def _loop(seed: int, device: str = "cpu") -> dict:
    from protocols import tape
    from protocols.compat import comm, crypten
    from protocols.fixed_mask import FixedMaskOperand, fixed_matmul

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=gen) / 4
    held = w if comm.get().get_rank() == 1 else torch.zeros(D, D)
    op = FixedMaskOperand(crypten.cryptensor(held.to(device), src=1, device=device))
    keys = [torch.randn(1, 3, D, generator=gen)]
    cache = FixedMaskOperand(crypten.cryptensor(keys[0], device=device), grow_dim=1)
    errors, costs, stats = [], [], []
    for _ in range(STEPS):
        x = torch.randn(1, 1, D, generator=gen)
        k = torch.randn(1, 1, D, generator=gen)
        before = comm.get().get_communication_stats()
        with tape.step("decode"):
            cache.append(crypten.cryptensor(k, device=device))
            keys.append(k)
            h = fixed_matmul(crypten.cryptensor(x, device=device), op)  # (1, 1, D)
            scores = fixed_matmul(h, cache, transpose_w=True)          # (1, 1, T)
            pos = scores.ge(0)
            out = (scores * pos + scores.square()).div(3)
            got = out.get_plain_text().cpu()
        after = comm.get().get_communication_stats()
        costs.append((after["bytes"] - before["bytes"], after["rounds"] - before["rounds"]))
        ref_s = (x @ w) @ torch.cat(keys, 1).transpose(-1, -2)
        ref = (ref_s * (ref_s >= 0) + ref_s**2) / 3
        errors.append(float((got - ref).abs().max()))
        active = tape.active()
        stats.append(dict(active.stats) if active is not None else {})
    return {"errors": errors, "costs": costs, "stats": stats}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_tape_predicts_steps_with_the_online_cost_of_two_parties(seed, device):
    tfp = run_on("TFP", _loop, seed, device)[0]
    dealer = run_on("dealer", _loop, seed, device)
    p0, p1 = dealer
    for run in (tfp, p0):
        assert max(run["errors"]) < 2e-2, f"seed {seed}: {run['errors']}"
    # online: the same rounds and bytes per step as without the dealer, on both parties
    assert p0["costs"] == tfp["costs"] and p1["costs"] == tfp["costs"], (seed, p0["costs"], tfp["costs"])
    misses = [s["misses"] for s in p0["stats"]]
    per_step = [b - a for a, b in zip([0] + misses, misses)]
    assert per_step[0] > 0 and per_step[2:] == [0] * (STEPS - 2), (seed, per_step)
    trips = [s["dealer_trips"] for s in p0["stats"]]
    assert [b - a for a, b in zip(trips[2:], trips[3:])] == [1] * (STEPS - 3), (seed, trips)
    hits = [s["hits"] for s in p0["stats"]]
    assert hits[-1] - hits[-2] > 10, (seed, hits)
    assert p1["stats"][-1]["dealer_bytes"] == 0 and p1["stats"][-1]["dealer_trips"] == 0


def test_prediction_extrapolates_growing_shapes():
    from protocols.tape import predict

    s1 = [("fm_pair", 7, (1, 1, 16), (1, 4, 16), True, "cpu"), ("square", (1, 1, 4), "cpu")]
    s2 = [("fm_pair", 7, (1, 1, 16), (1, 5, 16), True, "cpu"), ("square", (1, 1, 5), "cpu")]
    assert predict(s2, s1) == [("fm_pair", 7, (1, 1, 16), (1, 6, 16), True, "cpu"), ("square", (1, 1, 6), "cpu")]
    assert predict(s2, None) == s2 and predict(None, None) == []
    assert predict(s2, s1[:1]) == s2  # different lengths: repeat the last step
