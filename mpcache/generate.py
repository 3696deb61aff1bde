"""Private greedy generation: prefill, decode loop, secure argmax, reveal of each token to the client.

Rank 0 (client) owns the prompt and learns the generated tokens, nothing else; rank 1 (model owner)
learns only public quantities: prompt length, number of generated tokens (it is told when to stop).
The argmax one-hot is fed back as the next step's secret input, so tokens are never re-shared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mpcache.model import Progress, SecureTransformer
from protocols.compat import comm, crypten
from protocols.cost import CostMeter
from protocols.selection import argmax_onehot, reveal_to
from protocols.types import Secret

CLIENT = 0


@dataclass
class Generation:
    """Result of ``generate``: ``tokens`` on the client, ``None`` elsewhere (counts are public)."""

    tokens: list[int] | None
    n_prompt: int
    n_generated: int
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decoded token after the first


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    """Client side: token ids of the prompt, through the chat template unless ``raw`` or absent."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def share_tokens(ids: list[int] | None, n: int, vocab_size: int, src: int = CLIENT,
                 device: str | torch.device = "cpu") -> Secret:
    """The client's token ids as a secret one-hot (1, S, V); other parties pass ``None``."""
    onehot = torch.zeros(1, n, vocab_size, device=device)
    if comm.get().get_rank() == src:
        assert ids is not None and len(ids) == n, f"client must pass {n} token ids"
        onehot[0, torch.arange(n), torch.tensor(ids)] = 1.0
    return crypten.cryptensor(onehot, src=src, device=device)


def next_token(logits: Secret, eos_ids: frozenset[int], meter: CostMeter) -> tuple[Secret, int | None, bool]:
    """Secure argmax of [logits] (1, 1, V) -> ([one-hot] (1, 1, V), id on the client, stop flag).

    Only the id is opened, to the client alone; the client then tells every party whether it was an
    end-of-sequence token (the number of generated tokens is public by design).
    """
    with meter.stage("argmax"):
        onehot = argmax_onehot(logits, dim=-1)  # (1, 1, V), exactly one 1
        ids = torch.arange(logits.shape[-1], device=logits.device)  # public integers: local product
        token_id = (onehot * ids).sum(dim=-1)  # (1, 1)
        opened = reveal_to(token_id, dst=CLIENT)
        token = int(opened.round().item()) if opened is not None else None
        stop = comm.get().broadcast_obj(token in eos_ids if token is not None else None, CLIENT)
    return onehot, token, bool(stop)


def generate(model: SecureTransformer, prompt_ids: list[int] | None, n_prompt: int,
             max_new_tokens: int, eos_ids: frozenset[int], meter: CostMeter,
             on_token: Callable[[int, int | None, float], None] | None = None,
             on_prefill: Progress | None = None) -> Generation:
    """Greedy decoding of up to ``max_new_tokens`` tokens, stopping after an EOS token.

    ``prompt_ids``: the client's ids (``None`` on other parties); ``n_prompt`` (public) their count.
    ``on_token(step, token_or_None, seconds)`` is called after each generated token,
    ``on_prefill(layers_done, n_layers)`` after each layer of the prefill.
    """
    assert max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"
    assert n_prompt + max_new_tokens <= model.args.max_seq_len, (
        f"{n_prompt} prompt + {max_new_tokens} new tokens exceed the context {model.args.max_seq_len}")
    tokens: list[int] = []
    t0 = time.perf_counter()
    with meter.phase("prefill", tokens=n_prompt):
        with meter.stage("embedding"):
            onehot = share_tokens(prompt_ids, n_prompt, model.args.vocab_size, device=model.device)
        logits = model.forward(onehot, torch.arange(n_prompt), progress=on_prefill)
        onehot, token, stop = next_token(logits, eos_ids, meter)
    result = Generation(None, n_prompt, 1, time.perf_counter() - t0)
    tokens.append(token)
    if on_token:
        on_token(0, token, result.prefill_s)
    for step in range(1, max_new_tokens):
        if stop:
            break
        t0 = time.perf_counter()
        with meter.phase("decode", tokens=1):
            logits = model.forward(onehot, torch.tensor([n_prompt + step - 1]))
            onehot, token, stop = next_token(logits, eos_ids, meter)
        result.decode_s.append(time.perf_counter() - t0)
        tokens.append(token)
        if on_token:
            on_token(step, token, result.decode_s[-1])
    result.n_generated = len(tokens)
    result.tokens = tokens if comm.get().get_rank() == CLIENT else None
    return result
