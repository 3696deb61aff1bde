"""ProtocolConfig validation and the one crypten.cfg override point."""
from __future__ import annotations

import pytest

from protocols.compat import crypten
from protocols.config import ProtocolConfig, protocol_context


@pytest.mark.parametrize("bad", [{"precision_bits": 40}, {"exp_iterations": 0},
                                 {"softmax": "bogus"}, {"max_method": "argsort"}])
def test_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ProtocolConfig(**bad)


def test_context_overrides_and_restores():
    before = crypten.cfg.encoder.precision_bits, crypten.cfg.functions.exp_iterations
    cfg = ProtocolConfig(precision_bits=20, exp_iterations=6, count_communication=False)
    with protocol_context(cfg, dealer=True):
        assert crypten.cfg.encoder.precision_bits == 20
        assert crypten.cfg.functions.exp_iterations == 6
        assert crypten.cfg.communicator.verbose is False
        assert crypten.cfg.mpc.provider == "TTP"
        assert crypten.mpc.ttp_required()
    assert (crypten.cfg.encoder.precision_bits, crypten.cfg.functions.exp_iterations) == before
    assert set(cfg.crypten_overrides()) >= {"encoder.precision_bits", "communicator.verbose"}
