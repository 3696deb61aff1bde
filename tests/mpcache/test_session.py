"""``PrivateSession`` on real parties: the weights are shared once, then generations each own their
state. Two generations interleaved step by step through ONE session and ONE MPCache policy object
give exactly the logits and tokens of their solo runs (the policy keeps nothing about a sequence).

Exact, not approximate: before every step of sequence p the test reseeds CrypTen's generators from
(p, step), so a solo run and an interleaved run draw the same masks and triples.
"""
from __future__ import annotations

import pytest
import torch

from launch.local import run_parties
from tests.mpcache.helpers import to_lists, to_tensors
from tests.mpcache.test_policy_mpcache import SMALL

pytestmark = pytest.mark.mpc
FORCED = [42, 4242, 777]
N_NEW = 3


def _reseed(seed: int) -> None:
    """Every CrypTen generator from ``seed``, consistently across parties (party r's "next" seed is
    party r+1's "prev" seed). Test only: it makes two runs draw the same randomness."""
    from protocols.compat import comm, crypten
    r, n = comm.get().get_rank(), comm.get().get_world_size()
    for device in crypten.generators["prev"]:
        crypten.generators["next"][device].manual_seed(16 * seed + r)
        crypten.generators["prev"][device].manual_seed(16 * seed + (r - 1) % n)
        crypten.generators["local"][device].manual_seed(16 * seed + 8 + r)
        crypten.generators["global"][device].manual_seed(16 * seed + 15)


def _interleave_job(prompts: list[list[int]]) -> dict:
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, _, config = load_model("tiny-llama")
    args = ModelArgs.from_hf(config)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    policy = session.policy("mpcache", config=SMALL)  # shared by every sequence below

    def forced_logits(p: int):  # teacher-forced: the prefill, then one step per FORCED token
        ids, seq = prompts[p], session.sequence(policy)
        n = len(ids)
        _reseed(100 * p)
        yield session.model.forward(share_tokens(ids if rank == 0 else None, n, args.vocab_size),
                                    torch.arange(n), seq).get_plain_text()
        for j, t in enumerate(FORCED):
            _reseed(100 * p + j + 1)
            x = share_tokens([t] if rank == 0 else None, 1, args.vocab_size)
            yield session.model.forward(x, torch.tensor([n + j]), seq).get_plain_text()

    def tokens(p: int):  # greedy: one session.steps() token per next()
        ids = prompts[p]
        it = session.steps(ids if rank == 0 else None, len(ids), N_NEW, policy=policy)
        for j in range(N_NEW):
            _reseed(1000 + 100 * p + j)
            yield next(it).token

    out = {"solo": [list(forced_logits(p)) for p in range(2)],
           "solo_tokens": [list(tokens(p)) for p in range(2)]}
    out["interleaved"] = [list(run) for run in zip(*zip(forced_logits(0), forced_logits(1)))]  # A0 B0 A1 ...
    out["interleaved_tokens"] = [list(run) for run in zip(*zip(tokens(0), tokens(1)))]
    return to_lists(out)


def test_interleaved_generations_equal_their_solo_runs():
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (120, 100)]  # distinct tokens
    r = to_tensors(run_parties(_interleave_job, prompts, timeout=900)[0])
    for p in range(2):
        solo, inter = torch.stack(r["solo"][p]), torch.stack(r["interleaved"][p])
        assert torch.equal(solo, inter), f"prompt {p}: interleaved logits differ by {(solo - inter).abs().max():.3g}"
        assert r["interleaved_tokens"][p] == r["solo_tokens"][p], (p, r["interleaved_tokens"], r["solo_tokens"])
    apart = (torch.stack(r["solo"][0]) - torch.stack(r["solo"][1])).abs().max().item()
    assert apart > 0.1, f"the two prompts' logits are too close ({apart:.3g}) for the test to tell them apart"
