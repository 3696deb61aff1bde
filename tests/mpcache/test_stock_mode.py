"""Stock-CrypTen mode (``PrivateSession(fixed_masks=False)``) on real parties, tiny-llama.

Same greedy tokens as the fixed-mask model, and a per-token decode that opens more (the weights and
K/V on every product), while its set-up opens no weights.
"""
from __future__ import annotations

import pytest

from launch.local import run_parties

pytestmark = pytest.mark.mpc

PROMPT = [1, 17, 42, 99, 7, 3]
N_NEW = 3


def _job(fixed_masks: bool) -> dict:
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, _, config = load_model("tiny-llama")
    session = PrivateSession(hf.state_dict() if rank == 1 else None, ModelArgs.from_hf(config),
                             fixed_masks=fixed_masks)
    gen = session.generate(PROMPT if rank == 0 else None, len(PROMPT), N_NEW)
    report = session.costs()
    return {"tokens": gen.tokens, "setup": report.row("setup").wire_bytes,
            "decode": report.row("decode").per_token().wire_bytes}


def test_stock_matches_fixed_and_costs_more() -> None:
    fixed = run_parties(_job, True, timeout=120)[0]
    stock = run_parties(_job, False, timeout=120)[0]
    assert stock["tokens"] == fixed["tokens"] and len(fixed["tokens"]) == N_NEW
    assert stock["setup"] < 64 < fixed["setup"]  # stock opens no weights: only the public argmax scale (one int)
    assert stock["decode"] > 1.5 * fixed["decode"], (stock["decode"], fixed["decode"])
