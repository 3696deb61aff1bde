"""``ProtocolConfig``: every MPC protocol knob, and the one place that touches CrypTen's global cfg.

CrypTen reads ``crypten.cfg`` deep inside its functions (exp, reciprocal, inv_sqrt, max, the
fixed-point encoder, the communicator's byte counter). ``protocol_context(cfg)`` scopes those reads
with ``crypten.cfg.temp_override``; no other function in this repository reads or writes
``crypten.cfg``. Every party (and the dealer) must enter the same config: the fixed-point scale and
iteration counts are part of the protocol.

Knobs that CrypTen does not have (``softmax``) are read from the dataclass by our own protocols.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

SOFTMAX_VARIANTS = ("crypten", "2quad", "2relu")
RECIPROCAL_METHODS = ("NR", "log")
MAX_METHODS = ("log_reduction", "double_log_reduction", "pairwise")
SIGMOID_TANH_METHODS = ("reciprocal", "chebyshev")


@dataclass(frozen=True)
class ProtocolConfig:
    """Fixed-point and approximation settings shared by all parties.

    Parameters
    ----------
    precision_bits : int, default 16
        Fraction bits of the Z_2^64 fixed-point encoding (CrypTen ``encoder.precision_bits``).
    exp_iterations : int, default 8
        exp(x) ≈ (1 + x/2^n)^(2^n), n squarings (``functions.exp_iterations``).
    reciprocal_method : {"NR", "log"}, default "NR"
    reciprocal_nr_iters : int, default 10
        Newton–Raphson iterations for 1/x (``functions.reciprocal_nr_iters``).
    sqrt_nr_iters : int, default 3
        Newton–Raphson iterations for 1/√x (``functions.sqrt_nr_iters``).
    max_method : {"log_reduction", "double_log_reduction", "pairwise"}, default "log_reduction"
        Secure max/argmax tree (``functions.max_method``).
    sigmoid_tanh_method : {"reciprocal", "chebyshev"}, default "reciprocal"
    sigmoid_tanh_terms : int, default 32
    softmax : {"crypten", "2quad", "2relu"}, default "crypten"
        Softmax variant (ours): "crypten" = max-shift, exp, reciprocal (CrypTen's); "2quad" =
        (x + c)² / Σ; "2relu" = ReLU(x) / Σ (MPCFormer's substitutes).
    count_communication : bool, default True
        Count bytes/rounds in the communicator (``communicator.verbose``); ``CostMeter`` needs it.
    validation_mode : bool, default False
        CrypTen re-checks every truncation against plaintext (debug only, reveals values).
    """

    precision_bits: int = 16
    exp_iterations: int = 8
    reciprocal_method: str = "NR"
    reciprocal_nr_iters: int = 10
    sqrt_nr_iters: int = 3
    max_method: str = "log_reduction"
    sigmoid_tanh_method: str = "reciprocal"
    sigmoid_tanh_terms: int = 32
    softmax: str = "crypten"
    count_communication: bool = True
    validation_mode: bool = False

    def __post_init__(self) -> None:
        if not 8 <= self.precision_bits <= 30:
            raise ValueError(f"precision_bits must be in [8, 30], got {self.precision_bits}")
        for name in ("exp_iterations", "reciprocal_nr_iters", "sqrt_nr_iters", "sigmoid_tanh_terms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("reciprocal_method", RECIPROCAL_METHODS), ("max_method", MAX_METHODS),
                              ("sigmoid_tanh_method", SIGMOID_TANH_METHODS),
                              ("softmax", SOFTMAX_VARIANTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def crypten_overrides(self) -> dict[str, object]:
        """The dotted ``crypten.cfg`` keys this config sets."""
        return {
            "encoder.precision_bits": self.precision_bits,
            "functions.exp_iterations": self.exp_iterations,
            "functions.reciprocal_method": self.reciprocal_method,
            "functions.reciprocal_nr_iters": self.reciprocal_nr_iters,
            "functions.sqrt_nr_iters": self.sqrt_nr_iters,
            "functions.max_method": self.max_method,
            "functions.sigmoid_tanh_method": self.sigmoid_tanh_method,
            "functions.sigmoid_tanh_terms": self.sigmoid_tanh_terms,
            "communicator.verbose": self.count_communication,
            "debug.validation_mode": self.validation_mode,
        }

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@contextlib.contextmanager
def protocol_context(cfg: ProtocolConfig, *, dealer: bool = False) -> Iterator[ProtocolConfig]:
    """Run the enclosed block with ``cfg`` applied to ``crypten.cfg``; restore it on exit.

    ``dealer=True`` also selects CrypTen's TTP provider (for the dealer process, which must call
    ``crypten.init()`` inside the block).
    """
    from protocols.compat import crypten  # here, not at the top: the CLI reads the dataclass at once
    overrides = cfg.crypten_overrides()
    if dealer:
        overrides["mpc.provider"] = "TTP"
    with crypten.cfg.temp_override(overrides):
        yield cfg
