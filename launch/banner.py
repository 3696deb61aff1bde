"""The security banner every run prints first: model, security mode, and what is public by design.

Public by design (DESIGN.md §1): architecture and shapes, prompt length, number of generated tokens,
every budget, fixed-point precision. Never public: token ids (except the outputs, to the client),
activations, KV cache, attention scores, which tokens/clusters were kept or selected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

TFP_MODE = "TRUSTED DEALER INSIDE PARTY 0 (TFP) — NOT SECURE against party 0; for benchmarking"
TTP_MODE = ("separate dealer rank 2 (TTP-style) — secure against one semi-honest party if the "
            "dealer colludes with neither")
SECRET = ("token ids (except the generated tokens, to the client), activations, KV cache, "
          "attention scores, which tokens/clusters were kept or selected")


def security_mode(dealer: bool) -> str:
    """The one-line security mode for banners, log lines and report rows."""
    return TTP_MODE if dealer else TFP_MODE


@dataclass(frozen=True)
class PublicInfo:
    """What every party learns by design (the caller fills it; launch knows no models).

    architecture: family and shapes, e.g. ``llama L=30 E=576 H=9 Hkv=3 D=64 F=1536 V=49152``.
    prompt_tokens / new_tokens: prompt length and number of generated tokens.
    budgets: every budget by name (static keep count, clusters selected per level, layer sharing).
    precision_bits: fractional bits of the fixed-point encoding.
    """

    architecture: str
    prompt_tokens: int
    new_tokens: int
    precision_bits: int
    budgets: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.architecture:
            raise ValueError("architecture must describe the model's shapes, got ''")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.new_tokens < 0:
            raise ValueError(f"new_tokens must be >= 0, got {self.new_tokens}")
        if not 0 < self.precision_bits < 64:
            raise ValueError(f"precision_bits must be in (0, 64), got {self.precision_bits}")


def banner(model: str, dealer: bool, public: PublicInfo) -> str:
    """The multi-line banner (no trailing newline)."""
    parties = "rank 0 client (prompt, tokens) · rank 1 model owner (weights)"
    budgets = ", ".join(f"{k}={v}" for k, v in public.budgets.items()) or "none (full cache)"
    rows = [("model", model),
            ("parties", parties + (" · rank 2 dealer" if dealer else "")),
            ("security", security_mode(dealer)),
            ("public", f"architecture {public.architecture}"),
            ("", f"prompt length {public.prompt_tokens} tokens · {public.new_tokens} generated tokens"),
            ("", f"budgets: {budgets}"),
            ("", f"fixed point: {public.precision_bits} fractional bits"),
            ("secret", SECRET)]
    rule = "=" * 78
    body = [f"{name:<9}: {text}" if name else f"{'':<11}{text}" for name, text in rows]
    return "\n".join([rule, " MPCache private inference", rule, *body, rule])
