"""protocols.similarity vs its plaintext twin (plaintext_ref.policies.mpcache) on real parties."""
import pytest
import torch

from tests.protocols.conftest import run_on

pytestmark = pytest.mark.mpc

LENGTHS = [1, 15, 31, 32, 33, 70, 96]  # multiples of the cluster size and not


def _job(seed: int, lengths) -> dict[str, float]:
    from plaintext_ref.policies import mpcache as twin
    from protocols import similarity as sim
    from protocols.compat import crypten

    gen = torch.Generator().manual_seed(seed)
    enc = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731
    dec = lambda s: s.get_plain_text()  # noqa: E731
    err = {}
    for t in lengths:
        for s in (16, 32):
            k = torch.randn(1, 2, t, 8, generator=gen) * 3  # (B, Hkv, T, D)
            rmin, rmax = sim.cluster_minmax(enc(k), s)
            pmin, pmax = twin.cluster_minmax(k, s)
            err[f"minmax T={t} s={s}"] = max((dec(rmin) - pmin).abs().max().item(),
                                             (dec(rmax) - pmax).abs().max().item())
    # incremental: grow a cache token by token from 30 to 70 (crosses two cluster boundaries)
    k = torch.randn(1, 2, 70, 8, generator=gen)
    sk = enc(k)
    rmin, rmax = sim.cluster_minmax(sk[..., :30, :], 16)
    for t in range(30, 70):
        rmin, rmax = sim.update_last_cluster(rmin, rmax, sk[..., t : t + 1, :], t, 16)
    pmin, pmax = twin.cluster_minmax(k, 16)
    err["incremental"] = max((dec(rmin) - pmin).abs().max().item(), (dec(rmax) - pmax).abs().max().item())
    # representative keys and scores, α = 0.6; equals the unreordered Σ α q r_max + (1−α) q r_min
    q = torch.randn(1, 2, 8, generator=gen)
    krep = sim.representative_keys(enc(pmin), enc(pmax), 0.6)
    ref_krep = twin.representative_keys(pmin, pmax, 0.6)
    err["krep"] = (dec(krep) - ref_krep).abs().max().item()
    scores = dec(sim.cluster_scores(enc(q), krep))
    unreordered = (0.6 * q.unsqueeze(-2) * pmax + 0.4 * q.unsqueeze(-2) * pmin).sum(-1)
    err["scores"] = (scores - twin.cluster_scores(q, ref_krep)).abs().max().item()
    err["reorder identity"] = (scores - unreordered).abs().max().item()
    return err


def _check(err, seed):
    # min/max/k̃ are exact up to the encoding (1.5e-5); a score is one fixed-point dot product
    bad = {k: v for k, v in err.items() if v > (2e-3 if "score" in k or "reorder" in k else 5e-5)}
    assert not bad, f"seed={seed}: similarity differs from the plaintext twin: {bad}"


def test_similarity_matches_twin(seed):
    _check(run_on("TFP", _job, seed, LENGTHS, timeout=300)[0], seed)


def test_similarity_with_dealer(seed):
    _check(run_on("dealer", _job, seed, [33], timeout=300)[0], seed)
