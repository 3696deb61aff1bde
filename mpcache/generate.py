"""Private greedy generation: prefill, decode loop, secure argmax, reveal of each token to the client.

Rank 0 (client) owns the prompt and learns the generated tokens, nothing else; rank 1 (model owner)
learns only public quantities: prompt length, number of generated tokens (it is told when to stop).
With ``nonlinear="lut"`` the argmax is ``protocols.lut_argmax`` (⌈log2 V⌉ + 1 rounds, the id opened
to the client alone) and the client shares the id's one-hot as the next step's input (no message:
CrypTen's zero-sharing plus the client's value); with ``"poly"`` the secure argmax one-hot
(``protocols.selection.argmax_onehot``) is fed back, and only its id is opened to the client.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from mpcache.cache import Sequence
from mpcache.model import Progress, SecureTransformer
from protocols import lut_argmax, tape
from protocols.compat import comm, crypten
from protocols.config import active_config
from protocols.cost import CostMeter, Meter
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
    """The client's token ids as a secret one-hot (1, S, V) of exact 0/1 ring integers (scale 1, so
    the embedding product needs no truncation); other parties pass ``None``. No message (CrypTen's
    zero-sharing plus the client's value)."""
    onehot = torch.zeros(1, n, vocab_size, device=device)
    if comm.get().get_rank() == src:
        assert ids is not None and len(ids) == n, f"client must pass {n} token ids"
        onehot[0, torch.arange(n), torch.tensor(ids)] = 1.0
    return crypten.cryptensor(onehot, src=src, device=device, precision=0)


def next_token(logits: Secret, eos_ids: frozenset[int], meter: Meter,
               cancel: Callable[[], bool] | None = None, logit_shift: int = 0) -> tuple[Secret, int | None, bool]:
    """Secure argmax of [logits] (1, 1, V) -> ([one-hot] (1, 1, V) of it, id on the client, stop flag);
    ``logit_shift``: the model's public argmax scale (``SecureTransformer.logit_shift``).

    Only the id is opened, to the client alone; the client then tells every party whether to stop:
    an end-of-sequence token, or ``cancel()`` (client only) returning True (the number of generated
    tokens is public by design).
    """
    vocab = logits.shape[-1]
    with meter.stage("argmax"):
        if active_config().nonlinear == "lut":
            opened = lut_argmax.argmax_to(logits, dst=CLIENT, shift=logit_shift)  # (1, 1) on the client
            onehot = None
        else:
            onehot = argmax_onehot(logits, dim=-1)  # (1, 1, V), exactly one 1
            ids = torch.arange(vocab, device=logits.device)  # public integers: local product
            opened = reveal_to((onehot * ids).sum(dim=-1), dst=CLIENT)
        token = int(opened.reshape(-1)[0].round().item()) if opened is not None else None
        stop = comm.get().broadcast_obj((token in eos_ids or bool(cancel and cancel()))
                                        if token is not None else None, CLIENT)
    if onehot is None:
        with meter.stage("embedding"):
            onehot = share_tokens([token] if token is not None else None, 1, vocab, device=logits.device)
    return onehot.reshape(1, 1, vocab), token, bool(stop)


@dataclass(frozen=True)
class Step:
    """One generated token: ``index`` (0 = the prefill's), ``token`` (client only, else None), seconds."""

    index: int
    token: int | None
    seconds: float


def steps(model: SecureTransformer, seq: Sequence, prompt_ids: list[int] | None, n_prompt: int,
          max_new_tokens: int, eos_ids: frozenset[int], meter: CostMeter,
          on_prefill: Progress | None = None, cancel: Callable[[], bool] | None = None) -> Iterator[Step]:
    """Greedy decoding of ``seq`` one token per ``next()``: the prefill, then up to
    ``max_new_tokens − 1`` decode steps, stopping after an EOS token or once the client's
    ``cancel()`` returns True (checked once per token, after its argmax).

    Collective: every party iterates in step. ``prompt_ids``: the client's ids (``None`` on other
    parties); ``n_prompt`` (public) their count. Iterators of different sequences may be interleaved.
    ``on_prefill(layers_done, n_layers)`` is called after each layer of the prefill.
    """
    assert max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"
    assert n_prompt + max_new_tokens <= model.args.max_seq_len, (
        f"{n_prompt} prompt + {max_new_tokens} new tokens exceed the context {model.args.max_seq_len}")
    assert seq.length == 0, f"a new generation needs an empty sequence, got {seq.length} cached tokens"
    t0 = time.perf_counter()
    with meter.phase("prefill", tokens=n_prompt), tape.step("prefill", meter):
        with meter.stage("embedding"):
            onehot = share_tokens(prompt_ids, n_prompt, model.args.vocab_size, device=model.device)
        logits = model.forward(onehot, torch.arange(n_prompt), seq, progress=on_prefill)
        onehot, token, stop = next_token(logits, eos_ids, meter, cancel, model.logit_shift)
    yield Step(0, token, time.perf_counter() - t0)
    for index in range(1, max_new_tokens):
        if stop:
            return
        t0 = time.perf_counter()
        with meter.phase("decode", tokens=1), tape.step("decode", meter):
            logits = model.forward(onehot, torch.tensor([n_prompt + index - 1]), seq)
            onehot, token, stop = next_token(logits, eos_ids, meter, cancel, model.logit_shift)
        yield Step(index, token, time.perf_counter() - t0)


def generate(model: SecureTransformer, seq: Sequence, prompt_ids: list[int] | None, n_prompt: int,
             max_new_tokens: int, eos_ids: frozenset[int], meter: CostMeter,
             on_token: Callable[[Step], None] | None = None,
             on_prefill: Progress | None = None) -> Generation:
    """``steps`` run to the end: the tokens (client only) and the seconds of prefill and each decode
    step. ``on_token(step)`` is called after each generated token."""
    tokens, result = [], Generation(None, n_prompt, 0, 0.0)
    for step in steps(model, seq, prompt_ids, n_prompt, max_new_tokens, eos_ids, meter, on_prefill):
        tokens.append(step.token)
        if step.index == 0:
            result.prefill_s = step.seconds
        else:
            result.decode_s.append(step.seconds)
        if on_token:
            on_token(step)
    result.n_generated = len(tokens)
    result.tokens = tokens if comm.get().get_rank() == CLIENT else None
    return result
