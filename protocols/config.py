"""``ProtocolConfig``: every MPC protocol knob, and the one place that touches CrypTen's global cfg.

Two kinds of field. CrypTen's (``precision_bits``, ``count_communication``, ``validation_mode``)
are read by CrypTen deep inside every product and truncation; ``protocol_context(cfg)`` scopes
them with ``crypten.cfg.temp_override``, and no other function in this repository reads or writes
``crypten.cfg``. Ours (every other field: the approximation constants of ``protocols.nonlinear``)
are read from the dataclass by our protocols: a ``cfg=`` argument, else ``active_config()``, the
config of the enclosing ``protocol_context`` (the defaults outside one). Every party (and the
dealer) must enter the same config: the fixed-point scale and iteration counts are part of the
protocol.

CrypTen's own approximations (exp, reciprocal, sqrt, max, sigmoid/tanh) are not used by any
protocol here, so their ``functions.*`` keys are left at CrypTen's defaults.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ProtocolConfig:
    """Fixed-point and approximation settings shared by all parties.

    Parameters
    ----------
    precision_bits : int, default 16
        Fraction bits of the Z_2^64 fixed-point encoding (CrypTen ``encoder.precision_bits``).
    count_communication : bool, default True
        Count bytes/rounds in the communicator (``communicator.verbose``); ``CostMeter`` needs it.
    validation_mode : bool, default False
        CrypTen re-checks every truncation against plaintext (debug only, reveals values).
    exp_clamp_min : float, default -32.0
        ``exp`` clamps its input below at this (e^−32 ≈ 1e-14 is 0 in fixed point); must be
        ≥ −2^exp_halvings, the Taylor base's domain.
    exp_halvings : int, default 5
        h: e^x = (e^(x/2^h))^(2^h); the Taylor base needs x/2^h ∈ [−1, 0.25].
    exp_taylor_degree : int, default 8
        Degree of the Taylor polynomial of e^(x/2^h).
    recip_nr_iters : int, default 4
        Newton–Raphson steps for softmax's 1/Σ: initial relative error ≤ 0.414 → 0.414^16 ≈ 7e-7.
    sigmoid_clamp : float, default 32.0
        B: σ(±B) is taken as 1 / 0 (σ(±32) = 1 − 1.3e-14 / 1.3e-14); must be ≤ 2^exp_halvings
        (sigmoid's exp of −min(|x|, B) is unclamped).
    sigmoid_nr_iters : int, default 2
        Newton–Raphson steps for 1/(1 + e^−|x|) on [1, 2]: relative error 1/17 → 1.2e-5.
    inv_sqrt_range_log2 : (int, int), default (-12, 12)
        ``inv_sqrt``'s domain [2^lo, 2^hi] (one octave threshold per power of two inside it).
    inv_sqrt_nr_iters : int, default 3
        Newton–Raphson steps for 1/√x (``inv_sqrt`` and the norms): relative error 0.19 → 3e-5.
    norm_fine_log2 : int, default 2
        f: the norms' fine path squares 2^f·x (precision for tiny activations).
    norm_coarse_log2 : int, default 6
        c: the coarse path squares x/2^c (safe for |x| ≤ 2^15).
    norm_switch : float, default 16.0
        The coarse path is used where mean(x²) > this.
    norm_ms_gain_log2 : int, default 1
        g: mean squares are kept G = 4^g times larger than u² (precision), and u·y is then ×2^g.
    norm_fine_octaves : (int, int), default (-8, 11)
        log2 octave range [lo, hi) of the fine path's inverse-square-root guess on its gained mean
        square G·4^f·mean(x²) (64·[1e-4, 16] by default); must contain G·4^f·norm_switch.
    norm_coarse_octaves : (int, int), default (-7, 15)
        The same for the coarse path's G·4^−c·mean(x²) (mean(x²)/1024 for mean(x²) ∈ [16, 2^24]);
        must contain G·4^−c·norm_switch.
    coef_frac_bits : int, default 20
        Public coefficients and weights are rounded to 2^−this (CrypTen truncates them to
        2^−precision_bits); their products use precision_bits + this of the 63 bits.
    mask_fill : float, default 1024.0
        Masked softmax logits become −this before the row max (real logits must be > −this).
    truncation : str, default "exact"
        2-party division by a public integer (every product's rescaling): ``"exact"`` =
        ``protocols.truncation`` (1 round, never a wrap error); ``"local"`` = CrypTen's local share
        truncation (0 rounds, off by 2^32 ulps w.p. ≈ |v|/2^32 per product of value v).
    nonlinear : str, default "lut"
        Softmax, the norms and SiLU: ``"lut"`` = ``protocols.lut_nonlinear`` (one-round table
        look-ups: softmax ⌈log2 n⌉ + 10 rounds, a norm 7, SiLU 3; its own exact truncations whatever
        ``truncation`` says); ``"poly"`` = the comparison/Newton versions of ``protocols.nonlinear``.
    comparison : str, default "digits"
        The decode-time selection's comparisons (``protocols.selection``: ``maximum``, the pairwise
        top-k, the by-position one-hots): ``"crypten"`` = CrypTen's comparison (8 rounds, 432 bytes)
        and A2B one-hots; ``"digits"`` = ``protocols.compare`` (exact, 2 rounds, 32 logged bytes per
        element, ≈ 1.4 k dealer elements each) with exact one-round look-ups of the ranks and slots.
        Both are exact; the choice changes only rounds, bytes and dealer material.
    trunc_matmul_limit : int, default 2^22
        Largest m ⊗ B correlation (elements, |z|·J) for which a truncation is fused with the
        fixed-mask product it feeds (``protocols.fixed_mask.trunc_matmul_step``: one round fewer per
        product); 0 never fuses. The fused SmolLM2 decode token is 899 rounds and 16.9 MB instead of
        1,018 and 18.5, but its ≈ 3.5 M m ⊗ B entries per layer are dealer (or TFP) work: on a 2-core
        CPU 26.4 s per token instead of 20.0 (``benchmarks/reports/secure_inference.md``).
    """

    precision_bits: int = 16
    count_communication: bool = True
    validation_mode: bool = False
    exp_clamp_min: float = -32.0
    exp_halvings: int = 5
    exp_taylor_degree: int = 8
    recip_nr_iters: int = 4
    sigmoid_clamp: float = 32.0
    sigmoid_nr_iters: int = 2
    inv_sqrt_range_log2: tuple[int, int] = (-12, 12)
    inv_sqrt_nr_iters: int = 3
    norm_fine_log2: int = 2
    norm_coarse_log2: int = 6
    norm_switch: float = 16.0
    norm_ms_gain_log2: int = 1
    norm_fine_octaves: tuple[int, int] = (-8, 11)
    norm_coarse_octaves: tuple[int, int] = (-7, 15)
    coef_frac_bits: int = 20
    mask_fill: float = 1024.0
    truncation: str = "exact"
    nonlinear: str = "lut"
    comparison: str = "digits"
    trunc_matmul_limit: int = 1 << 22

    def __post_init__(self) -> None:
        _check(8 <= self.precision_bits <= 30, "precision_bits must be in [8, 30]", self.precision_bits)
        for name in ("exp_halvings", "exp_taylor_degree", "recip_nr_iters", "sigmoid_nr_iters",
                     "inv_sqrt_nr_iters"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1", getattr(self, name))
        for name in ("norm_fine_log2", "norm_coarse_log2"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0", getattr(self, name))
        for name in ("inv_sqrt_range_log2", "norm_fine_octaves", "norm_coarse_octaves"):
            lo, hi = getattr(self, name)
            _check(lo < hi, f"{name} must be (lo, hi) with lo < hi", getattr(self, name))
        taylor_min = -(2.0**self.exp_halvings)
        _check(taylor_min <= self.exp_clamp_min < 0,
               f"exp_clamp_min must be in [-2^exp_halvings, 0) = [{taylor_min}, 0)", self.exp_clamp_min)
        _check(0 < self.sigmoid_clamp <= -taylor_min,
               f"sigmoid_clamp must be in (0, 2^exp_halvings] = (0, {-taylor_min}]", self.sigmoid_clamp)
        _check(0 <= self.norm_ms_gain_log2 <= self.precision_bits // 2,
               "norm_ms_gain_log2 must be in [0, precision_bits // 2] (4^g divides the scale)",
               self.norm_ms_gain_log2)
        _check(self.trunc_matmul_limit >= 0, "trunc_matmul_limit must be >= 0", self.trunc_matmul_limit)
        _check(self.norm_switch > 0, "norm_switch must be > 0", self.norm_switch)
        gain = 4.0**self.norm_ms_gain_log2
        for name, ms in (("norm_fine_octaves", gain * 4.0**self.norm_fine_log2 * self.norm_switch),
                         ("norm_coarse_octaves", gain * 4.0**-self.norm_coarse_log2 * self.norm_switch)):
            lo, hi = getattr(self, name)
            _check(lo <= math.log2(ms) < hi, f"{name} must contain the gained switch point 2^{math.log2(ms):g}",
                   getattr(self, name))
        _check(1 <= self.coef_frac_bits <= 62 - self.precision_bits,
               "coef_frac_bits must be in [1, 62 - precision_bits]", self.coef_frac_bits)
        _check(self.mask_fill > 0, "mask_fill must be > 0", self.mask_fill)
        _check(self.truncation in ("exact", "local"), 'truncation must be "exact" or "local"', self.truncation)
        _check(self.nonlinear in ("lut", "poly"), 'nonlinear must be "lut" or "poly"', self.nonlinear)
        _check(self.comparison in ("digits", "crypten"), 'comparison must be "digits" or "crypten"', self.comparison)
        _check(self.nonlinear == "poly" or self.precision_bits == 16,
               'nonlinear="lut" needs precision_bits=16 (its tables are built for that scale)', self.nonlinear)

    def crypten_overrides(self) -> dict[str, object]:
        """The dotted ``crypten.cfg`` keys this config sets."""
        return {
            "encoder.precision_bits": self.precision_bits,
            "communicator.verbose": self.count_communication,
            "debug.validation_mode": self.validation_mode,
        }


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")


_ACTIVE: contextvars.ContextVar[ProtocolConfig] = contextvars.ContextVar("protocol_config",
                                                                          default=ProtocolConfig())


def active_config() -> ProtocolConfig:
    """The config of the innermost enclosing ``protocol_context`` (this thread), else the defaults."""
    return _ACTIVE.get()


@contextlib.contextmanager
def protocol_context(cfg: ProtocolConfig, *, dealer: bool = False) -> Iterator[ProtocolConfig]:
    """Run the enclosed block with ``cfg`` applied to ``crypten.cfg`` and as ``active_config()``;
    restore both on exit.

    ``dealer=True`` also selects CrypTen's TTP provider (for the dealer process, which must call
    ``crypten.init()`` inside the block).
    """
    from protocols.compat import crypten  # here, not at the top: the CLI reads the dataclass at once
    overrides = cfg.crypten_overrides()
    if dealer:
        overrides["mpc.provider"] = "TTP"
    token = _ACTIVE.set(cfg)
    try:
        with crypten.cfg.temp_override(overrides):
            yield cfg
    finally:
        _ACTIVE.reset(token)
