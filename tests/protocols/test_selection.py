"""protocols.selection vs its plaintext twin (torch) on fresh random inputs, on real parties."""
import pytest
import torch
import torch.nn.functional as F

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

# (n, k): lengths that are and are not multiples of the cluster size 32; k ∈ {1, mid, n}
# n ≤ PAIRWISE_MAX (256) ranks pairwise, n = 300 takes the bitonic path
CASES = [(1, 1), (2, 1), (7, 3), (31, 5), (32, 32), (33, 8), (64, 13), (100, 1), (100, 100), (300, 77)]


def _distinct(gen, *shape):
    """Random values, pairwise distinct (a random permutation scaled), so torch.topk is unique."""
    return torch.stack([torch.randperm(shape[-1], generator=gen).float() * 0.37 - 5
                        for _ in range(int(torch.tensor(shape[:-1]).prod()))]).view(*shape)


def _job(seed: int, cases) -> dict[str, float]:
    from protocols import selection as sel
    from protocols.compat import crypten

    gen = torch.Generator().manual_seed(seed)
    enc = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731
    dec = lambda s: s.get_plain_text()  # noqa: E731
    err = {}
    for n, k in cases:
        x = _distinct(gen, 2, 3, n)  # (B, H, n)
        sx = enc(x)
        top = x.topk(k, dim=-1).indices  # by value
        ref_mask = torch.zeros_like(x).scatter(-1, top, 1)
        err[f"mask n={n} k={k}"] = (dec(sel.topk_mask(sx, k)) - ref_mask).abs().max().item()
        by_pos = F.one_hot(top.sort(-1).values, n).float()  # (B, H, k, n)
        err[f"onehot pos n={n} k={k}"] = (dec(sel.topk_onehot(sx, k)) - by_pos).abs().max().item()
        by_val = F.one_hot(top, n).float()
        got = dec(sel.topk_onehot(sx, k, sort_by_index=False))
        err[f"onehot val n={n} k={k}"] = (got - by_val).abs().max().item()
        v = torch.randn(2, 3, n, 4, generator=gen)
        kept = dec(sel.onehot_gather(sel.topk_onehot(sx, k), enc(v)))
        ref = torch.gather(v, 2, top.sort(-1).values.unsqueeze(-1).expand(-1, -1, -1, 4))
        err[f"onehot_gather n={n} k={k}"] = (kept - ref).abs().max().item() - 2e-5  # encoding of v
        err[f"argmax n={n}"] = (dec(sel.argmax_onehot(sx)) - F.one_hot(x.argmax(-1), n).float()).abs().max().item()
        err[f"tree_max n={n}"] = (dec(sel.tree_max(sx, dim=-1)) - x.amax(-1)).abs().max().item() - 2e-5
    # ties: exactly one 1 at the lowest tied index; exactly k ones in the mask
    t = torch.randint(0, 3, (4, 17), generator=gen).float()
    oh = dec(sel.argmax_onehot(enc(t)))
    first = (t == t.amax(-1, keepdim=True)).float().argmax(-1)
    err["argmax ties"] = (oh - F.one_hot(first, 17).float()).abs().max().item()
    err["topk ties count"] = (dec(sel.topk_mask(enc(t), 6)).sum(-1) - 6).abs().max().item()
    err["tree_max ties"] = (dec(sel.tree_max(enc(t))) - t.amax(-1)).abs().max().item()
    # dims other than the last, and a 0-d input
    x = _distinct(gen, 5, 9).T.contiguous()  # (9, 5): argmax over dim 0
    err["argmax dim0"] = (dec(sel.argmax_onehot(enc(x), dim=0)) - F.one_hot(x.argmax(0), 9).float().T).abs().max().item()
    err["tree_max dim0"] = (dec(sel.tree_max(enc(x), dim=0, keepdim=True)) - x.amax(0, keepdim=True)).abs().max().item() - 2e-5
    err["topk dim0"] = (dec(sel.topk_mask(enc(x), 4, dim=0)) - torch.zeros_like(x).scatter(0, x.topk(4, 0).indices, 1)).abs().max().item()
    err["argmax 0-d"] = abs(dec(sel.argmax_onehot(enc(torch.tensor(3.0)))).item() - 1)
    return err


def _reveal_job() -> tuple[list, int, list]:
    from protocols import selection as sel
    from protocols.compat import comm, crypten

    sel.reset_reveals()
    x = crypten.cryptensor(torch.arange(6.0), src=0)
    got = sel.reveal_to(x, dst=1)
    return [None if got is None else got.tolist()], sel.reveal_count(), sel.reveal_log() + [comm.get().get_rank()]


def _check(err, seed):
    bad = {k: v for k, v in err.items() if v > 1e-6}
    assert not bad, f"seed={seed}: selection differs from torch: {bad}"


@pytest.mark.parametrize("comparison", ["digits", "crypten"])
def test_selection_matches_torch(seed, comparison):
    """Both comparison paths (``protocols.compare``'s digits, the default, and CrypTen's) select exactly."""
    _check(run_on("TFP", _with_comparison, seed, CASES, comparison, timeout=300)[0], seed)


def _with_comparison(seed, cases, comparison):
    from protocols.config import ProtocolConfig, protocol_context
    with protocol_context(ProtocolConfig(comparison=comparison)):
        return _job(seed, cases)


def test_selection_with_dealer(seed):
    _check(run_on("dealer", _job, seed, CASES[:4], timeout=300)[0], seed)


def _max_rounds() -> dict[int, int]:
    from protocols import selection as sel
    from protocols.compat import comm, crypten

    out = {}
    for n in (2, 4, 8, 41, 256):
        x = crypten.cryptensor(torch.randn(3, n), src=0)
        comm.get().reset_communication_stats()
        sel.tree_max(x)
        out[n] = comm.get().get_communication_stats()["rounds"]
    return out


def test_tree_max_cost_formula():
    """4-ary levels (11 rounds each) and one binary level (9) when ⌈log2 n⌉ is odd."""
    import math
    got = run_on("TFP", _max_rounds)[0]
    want = {n: 11 * (math.ceil(math.log2(n)) // 2) + 9 * (math.ceil(math.log2(n)) % 2) for n in got}
    assert got == want, (got, want)


def test_reveal_to_one_party_is_counted():
    (r0, r1) = run_on("TFP", _reveal_job)
    assert r0[0] == [None] and r1[0] == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    assert r0[1] == r1[1] == 1
    assert r0[2][:1] == [(1, (6,))]


def _digit_costs() -> dict:
    from protocols.config import ProtocolConfig, protocol_context
    with protocol_context(ProtocolConfig(comparison="digits")):
        return _digit_cost_runs()


def _digit_cost_runs() -> dict:
    from protocols import selection as sel
    from protocols.compat import comm, crypten

    out = {}
    for n, k in ((2, 1), (37, 7), (75, 15)):
        x = crypten.cryptensor(torch.randn(3, n), src=0)
        for name, fn in (("mask", lambda: sel.topk_mask(x, k)), ("onehot", lambda: sel.topk_onehot(x, k))):
            comm.get().reset_communication_stats()
            fn()
            stats = comm.get().get_communication_stats()
            out[(name, n, k)] = (stats["rounds"], stats["bytes"])
    a, b = (crypten.cryptensor(torch.randn(4, 64), src=0) for _ in range(2))
    comm.get().reset_communication_stats()
    sel.maximum(a, b)
    stats = comm.get().get_communication_stats()
    out["maximum"] = (stats["rounds"], stats["bytes"])
    return out


def test_digit_selection_cost_formula():
    """Digit comparisons: the pairwise top-k mask in 2 + 1 rounds (32 B per pair, 16 per entry, per row),
    its by-position one-hot 1 round more (16 B per entry); ``maximum`` 2 rounds, 48 B per element."""
    got = run_on("TFP", _digit_costs)[0]
    for (name, n, k), cost in ((key, v) for key, v in got.items() if key != "maximum"):
        pairs = n * (n - 1) // 2
        want_bytes = 3 * (32 * pairs + 16 * n) + (3 * 16 * n if name == "onehot" else 0)
        assert cost == (3 + (name == "onehot"), want_bytes), (name, n, k, cost)
    assert got["maximum"] == (2, 48 * 4 * 64), got["maximum"]

