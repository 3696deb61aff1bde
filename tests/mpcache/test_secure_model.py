"""The secret-shared decoder against HF on real parties (tiny-llama, tiny-gpt2; SmolLM2 when slow).

One ``run_parties`` job per model does every check, to pay the process start-up once:
greedy tokens == plaintext greedy, per-layer hidden states within the fixed-point tolerance, decode
with the cache == recomputing without it, and secrecy (only the output tokens are opened, to rank 0).
Tolerance: hidden states |Δ| <= HIDDEN_ATOL + HIDDEN_RTOL·max|h| per layer (16 fraction bits:
one ulp is 1.5e-5; the errors come from the norms' inverse square root and the softmax).
"""
from __future__ import annotations

import pytest
import torch

from launch.local import run_parties
from tests.mpcache.helpers import spy_openings

pytestmark = pytest.mark.mpc

HIDDEN_ATOL, HIDDEN_RTOL = 2e-3, 1e-2
LOGIT_ATOL = 1e-2
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


def _plain_greedy(model, ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """HF greedy continuation (no EOS stop) and the top-1 minus top-2 logit margin per step."""
    ids, out, margins = list(ids), [], []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out, margins


def _secure_job(spec: str, prompts: list[list[int]], n_new: int, probe: list[int]) -> dict:
    """Runs on each party. Revealing hidden states/logits with get_plain_text is test-only."""
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm
    from protocols.selection import reset_reveals, reveal_log

    rank = comm.get().get_rank()
    hf, _, config = load_model(spec)
    args = ModelArgs.from_hf(config)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    model = session.model
    out: dict = {"tokens": [], "opened": [], "audited": []}
    for ids in prompts:
        reset_reveals()
        with spy_openings([]) as opened:
            gen = session.generate(ids if rank == 0 else None, len(ids), n_new)
        out["tokens"].append(gen.tokens)
        out["opened"].append(opened)
        out["audited"].append(reveal_log())

    # per-layer hidden states on the first prompt
    hidden: list = []
    ids0 = prompts[0]
    model.forward(share_tokens(ids0 if rank == 0 else None, len(ids0), args.vocab_size),
                  torch.arange(len(ids0)), session.sequence(), hidden)
    out["hidden"] = [h.get_plain_text().tolist() for h in hidden]

    # decode with the cache vs one-shot recomputation: prompt + probe tokens
    n, seq = len(ids0), session.sequence()
    model.forward(share_tokens(ids0 if rank == 0 else None, n, args.vocab_size), torch.arange(n), seq)
    for i, t in enumerate(probe):
        cached = model.forward(share_tokens([t] if rank == 0 else None, 1, args.vocab_size),
                               torch.tensor([n + i]), seq)
    full = ids0 + probe
    recomputed = model.forward(share_tokens(full if rank == 0 else None, len(full), args.vocab_size),
                               torch.arange(len(full)), session.sequence())
    out["cached"], out["recomputed"] = cached.get_plain_text().tolist(), recomputed.get_plain_text().tolist()
    out["costs"] = session.costs().to_dict()
    return out


def _check_tokens(got: list[int], want: list[int], margins: list[float]) -> None:
    """Equal tokens; a first divergence is tolerated only where plaintext's top-2 margin is tiny."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert margins[i] < 2 * LOGIT_ATOL, (
                f"step {i}: MPC {g} != plaintext {w} with margin {margins[i]:.4f}; {got} vs {want}")
            return


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_secure_model_matches_plaintext(spec):
    from plaintext_ref.models import load_model
    hf, tok, _ = load_model(spec)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    n_new, probe = 3, [42, 4242]
    res = run_parties(_secure_job, spec, prompts, n_new, probe, timeout=240)
    r0, r1 = res

    for ids, got in zip(prompts, r0["tokens"]):
        want, margins = _plain_greedy(hf, ids, n_new)
        _check_tokens(got, want, margins)
    assert all(t is None for t in r1["tokens"]), "the model owner must not learn the tokens"

    # secrecy: the only plaintext openings are the n_new token ids, (1, 1) each, to rank 0
    for r in res:
        for opened, audited in zip(r["opened"], r["audited"]):
            assert opened == [(0, (1, 1))] * n_new, opened
            assert audited == [(0, (1, 1))] * n_new, audited

    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
    final_norm = hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f
    got = [torch.tensor(h) for h in r0["hidden"]]
    assert len(got) == len(ref)
    with torch.no_grad():  # HF's last hidden state is after the final norm; ours before it
        got[-1] = final_norm(got[-1])
    for layer, (g, w) in enumerate(zip(got, ref)):
        err = (g - w).abs().max().item()
        assert err <= HIDDEN_ATOL + HIDDEN_RTOL * w.abs().max().item(), f"layer {layer}: max |Δ| {err}"

    cached, recomputed = torch.tensor(r0["cached"]), torch.tensor(r0["recomputed"])
    assert (cached - recomputed).abs().max().item() < LOGIT_ATOL
    with torch.no_grad():
        plain = hf(torch.tensor([prompts[0] + probe])).logits[0, -1]
    assert (cached[0, 0] - plain).abs().max().item() < LOGIT_ATOL

    # fixed-mask LM head: per token it opens only the (1, 1, E) activation, not the (V, E) weight,
    # then the (1, 1, V) logits' exact truncation
    from mpcache.model import ModelArgs
    decode = r0["costs"]["phases"]["decode"]
    assert decode["tokens"] == len(PROMPTS) * (n_new - 1)
    lm_head_bytes = decode["stages"]["lm_head"]["party_bytes"][1]
    args = ModelArgs.from_hf(hf.config)
    assert lm_head_bytes == 16 * (args.dim + args.vocab_size) * decode["tokens"]


def _smollm2_job(ids: list[int], n_new: int) -> list[int] | None:
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm
    rank = comm.get().get_rank()
    hf, _, config = load_model("smollm2")
    session = PrivateSession(hf.state_dict() if rank == 1 else None, ModelArgs.from_hf(config))
    del hf
    return session.generate(ids if rank == 0 else None, len(ids), n_new).tokens


@pytest.mark.slow
def test_smollm2_tokens_match_plaintext():
    from plaintext_ref.models import load_model
    hf, tok, _ = load_model("smollm2")
    ids = tok("The capital of France is")["input_ids"]
    want, margins = _plain_greedy(hf, ids, 4)
    got = run_parties(_smollm2_job, ids, 4, timeout=1200)[0]
    _check_tokens(got, want, margins)
