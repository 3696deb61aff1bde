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
