"""ProtocolConfig: defaults, validation, the one crypten.cfg override point, and the knobs reaching
the protocols (explicit ``cfg=`` and the enclosing ``protocol_context``)."""
from __future__ import annotations

import math

import pytest
import torch

from protocols.compat import crypten
from protocols.config import ProtocolConfig, active_config, protocol_context
from tests.protocols.conftest import run_on

# protocols.nonlinear's module constants before they moved into ProtocolConfig
PREVIOUS_CONSTANTS = {
    "exp_clamp_min": -32.0, "exp_halvings": 5, "exp_taylor_degree": 8, "recip_nr_iters": 4,
    "sigmoid_clamp": 32.0, "sigmoid_nr_iters": 2, "inv_sqrt_range_log2": (-12, 12), "inv_sqrt_nr_iters": 3,
    "norm_fine_log2": 2, "norm_coarse_log2": 6, "norm_switch": 16.0, "norm_ms_gain_log2": 1,
    "norm_fine_octaves": (-8, 11), "norm_coarse_octaves": (-7, 15), "coef_frac_bits": 20, "mask_fill": 1024.0,
}


def test_defaults_equal_previous_constants():
    cfg = ProtocolConfig()
    assert {k: getattr(cfg, k) for k in PREVIOUS_CONSTANTS} == PREVIOUS_CONSTANTS
    assert (cfg.precision_bits, cfg.count_communication, cfg.validation_mode) == (16, True, False)


@pytest.mark.parametrize("bad, message", [
    ({"precision_bits": 40}, r"precision_bits must be in \[8, 30\], got 40"),
    ({"recip_nr_iters": 0}, "recip_nr_iters must be >= 1, got 0"),
    ({"exp_taylor_degree": 0}, "exp_taylor_degree must be >= 1"),
    ({"norm_coarse_log2": -1}, "norm_coarse_log2 must be >= 0"),
    ({"inv_sqrt_range_log2": (3, 3)}, r"inv_sqrt_range_log2 must be \(lo, hi\) with lo < hi, got \(3, 3\)"),
    ({"exp_clamp_min": -40.0}, r"exp_clamp_min must be in \[-2\^exp_halvings, 0\) = \[-32.0, 0\), got -40.0"),
    ({"exp_clamp_min": 0.0}, "exp_clamp_min must be in"),
    ({"sigmoid_clamp": 40.0}, r"sigmoid_clamp must be in \(0, 2\^exp_halvings\]"),
    ({"norm_ms_gain_log2": 9}, r"norm_ms_gain_log2 must be in \[0, precision_bits // 2\]"),
    ({"norm_switch": 0.0}, "norm_switch must be > 0"),
    ({"norm_fine_octaves": (-8, 10)}, r"norm_fine_octaves must contain the gained switch point 2\^10"),
    ({"norm_switch": 2.0}, r"norm_coarse_octaves must contain the gained switch point 2\^-9"),
    ({"coef_frac_bits": 47}, r"coef_frac_bits must be in \[1, 62 - precision_bits\], got 47"),
    ({"mask_fill": -1.0}, "mask_fill must be > 0"),
    ({"nonlinear": "fss"}, 'nonlinear must be "lut" or "poly"'),
])
def test_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(**bad)


def test_constraints_follow_the_fields_they_relate():
    ProtocolConfig(exp_halvings=6, exp_clamp_min=-64.0, sigmoid_clamp=64.0)  # a wider Taylor domain
    ProtocolConfig(precision_bits=20, nonlinear="poly", norm_ms_gain_log2=10, norm_fine_octaves=(-8, 30),
                   norm_coarse_octaves=(-7, 15))
    with pytest.raises(ValueError, match="needs precision_bits=16"):
        ProtocolConfig(precision_bits=20)  # the look-up tables are built for the 2^16 encoding
    with pytest.raises(TypeError):
        ProtocolConfig(softmax="crypten")  # removed: nothing read it


def test_context_overrides_and_restores():
    before = crypten.cfg.encoder.precision_bits, crypten.cfg.communicator.verbose
    cfg = ProtocolConfig(precision_bits=20, nonlinear="poly", count_communication=False)
    inner = ProtocolConfig(recip_nr_iters=2)
    assert active_config() == ProtocolConfig()
    with protocol_context(cfg, dealer=True):
        assert crypten.cfg.encoder.precision_bits == 20
        assert crypten.cfg.communicator.verbose is False
        assert crypten.cfg.mpc.provider == "TTP"
        assert crypten.mpc.ttp_required()
        assert active_config() is cfg
        with protocol_context(inner):
            assert active_config() is inner
        assert active_config() is cfg
    assert (crypten.cfg.encoder.precision_bits, crypten.cfg.communicator.verbose) == before
    assert active_config() == ProtocolConfig()
    assert set(cfg.crypten_overrides()) == {"encoder.precision_bits", "communicator.verbose",
                                            "debug.validation_mode"}


def _knobs_job() -> dict[str, float]:
    """Errors against plaintext under the default and changed knobs, passed both ways."""
    from protocols import nonlinear as nl

    enc = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731
    # Σe ≈ 1.001: the octave guess is off by 1 − 1/√2 = 0.29, after k NR steps 0.29^(2^k)
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]])
    want = logits.softmax(-1)
    x = enc(logits)
    err = lambda p: (p.get_plain_text() - want).abs().max().item()  # noqa: E731
    poly = ProtocolConfig(nonlinear="poly")  # the Newton reciprocal whose steps are the knob
    one_step = ProtocolConfig(nonlinear="poly", recip_nr_iters=1)
    out = {"softmax": err(nl.softmax(x, cfg=poly)), "softmax_cfg": err(nl.softmax(x, cfg=one_step)),
           "softmax_lut": err(nl.softmax(x))}
    with protocol_context(one_step):
        out["softmax_context"] = err(nl.softmax(x))
        out["softmax_context_cfg"] = err(nl.softmax(x, cfg=poly))  # cfg= wins
    low = enc(torch.tensor([-40.0]))  # e^-40: 0 under the default clamp at -32, e^-4 clamped at -4
    out["exp"] = nl.exp(low).get_plain_text().item()
    out["exp_cfg"] = nl.exp(low, cfg=ProtocolConfig(exp_clamp_min=-4.0)).get_plain_text().item()
    with protocol_context(ProtocolConfig(exp_clamp_min=-4.0)):
        out["exp_context"] = nl.exp(low).get_plain_text().item()
    return out


@pytest.mark.mpc
def test_knobs_change_the_protocols():
    out = run_on("TFP", _knobs_job)[0]
    assert out["softmax"] < 2e-3 and out["softmax_context_cfg"] < 2e-3 and out["softmax_lut"] < 2e-3, out
    assert out["softmax_cfg"] > 2e-2 and out["softmax_context"] > 2e-2, out  # 0.29² = 0.085 relative
    assert abs(out["exp"]) < 1e-4, out
    assert out["exp_cfg"] == pytest.approx(math.exp(-4), abs=1e-4), out  # exp: |err| ≤ 2e-3·(e^x + 0.02)
    assert out["exp_context"] == pytest.approx(math.exp(-4), abs=1e-4), out
