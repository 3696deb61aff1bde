"""KV budgets of the MPC policies (public): a fraction of the prompt in (0, 1], or a whole token count > 1.

K = int(b) for a count, else int(T0·b). The plaintext side's ``plaintext_ref.policies.base.Budget``
takes the same shorthand (``Budget.of``) and stores it in kvpress's terms (the fraction *removed*).
"""
from __future__ import annotations


def check_budget(budget: float, flag: str = "budget") -> None:
    """Raise ``ValueError`` unless ``budget`` is a fraction in (0, 1] or a whole count > 1."""
    if not (0 < budget <= 1 or (budget > 1 and budget == int(budget))):
        raise ValueError(f"{flag} must be a fraction in (0, 1] or a whole token count, got {budget:g}")


def kept_tokens(budget: float, prompt_len: int) -> int:
    """K: the tokens a budget keeps of a T0-token prompt (before any policy-specific floor or cap)."""
    return int(budget) if budget > 1 else int(prompt_len * budget)
