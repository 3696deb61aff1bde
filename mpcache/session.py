"""``PrivateSession``: the one way to run private inference.

The parties open a session once: the model owner secret-shares its weights (once, as fixed-mask
operands). Then the session serves any number of generations. Each generation has its own
``Sequence``: its KV cache and its policy's state. Generations can run one after another or
interleaved step by step (``steps``). Every method is collective. Every party calls it in the same
order with the same public arguments; only the client passes prompt ids (the others ``None``).

Costs accumulate on ``meter`` from the opening on: set-up, then each generation's prefill and decode
phases. ``costs()`` aggregates them over the parties, and ``meter.clear()`` starts a new account.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from mpcache.cache import Sequence
from mpcache.generate import Generation, Step, generate, steps
from mpcache.model import ModelArgs, Progress, SecureTransformer, share_model
from mpcache.policy.base import MPCPolicy, get_policy
from protocols.cost import CostMeter, CostReport

OWNER = 1


class PrivateSession:
    """The secret-shared model of one owner, shared once; generations run through ``generate``/``steps``.

    ``state_dict``: the HF state dict on the model owner (party ``src``), ``None`` elsewhere;
    ``args``: the public ``ModelArgs`` on every party. ``fixed_masks=False`` is the stock-CrypTen
    baseline (benchmarks). ``progress(done, total)`` follows the weight sharing.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor] | None, args: ModelArgs, *, src: int = OWNER,
                 device: str | torch.device = "cpu", fixed_masks: bool = True,
                 progress: Progress | None = None) -> None:
        self.meter = CostMeter()
        with self.meter.phase("setup"), self.meter.stage("share_weights"):
            self.model: SecureTransformer = share_model(state_dict, args, self.meter, src=src, device=device,
                                                        fixed_masks=fixed_masks, progress=progress)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def policy(self, name: str = "full", **options) -> MPCPolicy:
        """The registered KV policy ``name`` recording its costs on this session's meter."""
        return get_policy(name, self.meter, **options)

    def sequence(self, policy: MPCPolicy | None = None) -> Sequence:
        """An empty sequence (one generation's caches) under ``policy`` (default: the full cache)."""
        return self.model.new_sequence(policy or self.policy())

    def steps(self, prompt_ids: list[int] | None, n_prompt: int, max_new_tokens: int, *,
              policy: MPCPolicy | None = None, eos_ids: frozenset[int] = frozenset(),
              on_prefill: Progress | None = None,
              cancel: Callable[[], bool] | None = None) -> Iterator[Step]:
        """A new generation, one ``Step`` (token) per ``next()``; see ``mpcache.generate.steps``.

        ``cancel`` (client only): polled once per token; True ends the generation after that token."""
        return steps(self.model, self.sequence(policy), prompt_ids, n_prompt, max_new_tokens, eos_ids,
                     self.meter, on_prefill, cancel)

    def generate(self, prompt_ids: list[int] | None, n_prompt: int, max_new_tokens: int, *,
                 policy: MPCPolicy | None = None, eos_ids: frozenset[int] = frozenset(),
                 on_token: Callable[[Step], None] | None = None,
                 on_prefill: Progress | None = None) -> Generation:
        """A new generation run to the end (greedy, stops after an EOS token)."""
        return generate(self.model, self.sequence(policy), prompt_ids, n_prompt, max_new_tokens, eos_ids,
                        self.meter, on_token, on_prefill)

    def costs(self) -> CostReport:
        """Both parties' costs since the opening or the last ``meter.clear()`` (collective)."""
        return self.meter.aggregate()
