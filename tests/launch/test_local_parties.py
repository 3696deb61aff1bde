import pytest
import torch

from launch.local import PartyError, run_parties

pytestmark = pytest.mark.mpc


def _matmul_job(seed: int):
    from protocols.compat import comm, crypten
    torch.manual_seed(seed)
    x, w = torch.randn(3, 8), torch.randn(8, 5)
    sx = crypten.cryptensor(x, src=0)
    sw = crypten.cryptensor(w, src=1)
    out = sx.matmul(sw).get_plain_text()
    return comm.get().get_rank(), (out - x @ w).abs().max().item()


def _fail_job():
    raise ValueError("boom on purpose")


@pytest.mark.parametrize("dealer", [False, True])
def test_two_parties_matmul(dealer):
    results = run_parties(_matmul_job, 1234, dealer=dealer, timeout=120)
    assert [r for r, _ in results] == [0, 1]
    assert all(err < 1e-2 for _, err in results)


def test_party_error_reports_traceback():
    with pytest.raises(PartyError, match="boom on purpose"):
        run_parties(_fail_job, timeout=60)


def _die_job():
    import os

    from protocols.compat import comm, crypten
    if comm.get().get_rank() == 1:
        os._exit(3)
    x = crypten.cryptensor(torch.ones(2, 2), src=0)
    return x.matmul(x).get_plain_text()  # needs party 1


def test_dead_party_is_named():
    with pytest.raises(PartyError) as info:
        run_parties(_die_job, timeout=120)
    text = str(info.value)
    assert "rank 1 exited with code 3 without reporting" in text
    assert "party 1 (model owner) died or disconnected" in text


def _pg_timeouts():
    import torch.distributed as dist

    from protocols.compat import comm
    c = comm.get()
    groups = [None, c.main_group, c.ttp_group]  # None: the default group
    return [(g or dist.group.WORLD)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for g in groups]


def test_gloo_waits_are_bounded_by_the_timeout():
    # crypten.init() creates every group without a timeout; gloo's default would be 30 min
    for per_rank in run_parties(_pg_timeouts, timeout=97):
        assert per_rank == [97.0, 97.0, 97.0]
