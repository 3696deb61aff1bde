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
