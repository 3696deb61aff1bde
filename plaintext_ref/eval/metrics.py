"""Scores for the offline tasks: string matching (RULER), perplexity and label-free fidelity.

Text metrics compare a decoded prediction with reference strings. Logit metrics take teacher-forced
logits of shape (T, V) — T continuation tokens, V vocabulary — and are computed in float64.
"""
from __future__ import annotations

import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_all``: fraction of references found in the prediction (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction's first word, stripped of punctuation, equals the reference.

    The passkey convention (Quest, landmark attention): the prompt ends with "The pass key is", so
    a correct continuation starts with the key, e.g. " 68231. Remember it".
    """
    words = prediction.split()
    first = words[0].strip(string.punctuation) if words else ""
    return float(first == reference.strip())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean_t −log p(targets[t] | logits[t])); logits (T, V), targets (T,)."""
    assert logits.shape[:-1] == targets.shape, f"{tuple(logits.shape)} vs {tuple(targets.shape)}"
    nll = F.cross_entropy(logits.double(), targets.long(), reduction="mean")
    return float(nll.exp())


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over tokens of KL(p_ref ‖ p_cand) = Σ_v p_ref (log p_ref − log p_cand); both (T, V)."""
    assert reference.shape == candidate.shape, f"{tuple(reference.shape)} vs {tuple(candidate.shape)}"
    log_p = F.log_softmax(reference.double(), dim=-1)  # (T, V)
    log_q = F.log_softmax(candidate.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def top1_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of positions where argmax_v of both logits agree; both (T, V)."""
    assert reference.shape == candidate.shape, f"{tuple(reference.shape)} vs {tuple(candidate.shape)}"
    return float((reference.argmax(-1) == candidate.argmax(-1)).double().mean())


# ---- intervals ------------------------------------------------------------------------------------
# Two-sided 95 % Student t quantiles t_{0.975, df} for df = 1..30; above 30 the normal 1.96 is within 2 %.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95 % t quantile with ``df`` degrees of freedom (1.96 beyond 30)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t interval of the mean); half-width is inf for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, float("inf")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t975(n - 1) * (var / n) ** 0.5


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-sample differences a_i − b_i on the same samples: mean, 95 % half-width, wins/losses/ties of a.

    ``significant`` is 1.0 when the interval excludes 0 (the difference the intervals support).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean, half = mean_ci(d)
    return {"n": len(d), "mean": mean, "half": half, "wins": sum(x > 0 for x in d),
            "losses": sum(x < 0 for x in d), "significant": float(abs(mean) > half)}
