"""Run tasks on a model under a KV policy: one :class:`TaskResult` per (task, length).

A policy is built fresh for every sample by a :data:`PolicyFactory`, so per-sequence state never
leaks between samples. ``length`` is the whole sequence budget (prompt + generated tokens, or the
prose window) and must not exceed the model's context (``max_context``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plaintext_ref import runtime
from plaintext_ref.eval import metrics
from plaintext_ref.eval.tasks import GENERATION_TASKS, PROSE_TASKS, GenerationTask, ProseTask, Sample
from plaintext_ref.models import max_context
from plaintext_ref.policies import POLICIES, get_policy
from plaintext_ref.policies.base import KVPolicy

log = logging.getLogger(__name__)

PolicyFactory = Callable[[], KVPolicy]
FULL = "full"


def parse_budget(text: str | None) -> float | int | None:
    """``"0.1"`` -> 0.1 (fraction of the cache kept, in (0, 1]); ``"256"`` -> 256 (tokens kept)."""
    if text is None:
        return None
    try:
        value: float | int = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(f"budget {text!r}: give a fraction kept in (0, 1] or a token count") from None
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"budget {text!r}: a fraction must lie in (0, 1], a token count must be >= 1")
    return value


def policy_factory(name: str, budget: float | int | None = None, **kwargs) -> PolicyFactory:
    """Validated factory for ``get_policy(name, budget=budget, **kwargs)`` (budget left out if None)."""
    if name not in POLICIES:  # get_policy says the same; checked here to keep one message format
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}")
    if budget is not None:
        kwargs["budget"] = budget
    try:
        get_policy(name, **kwargs)  # fail now on bad kwargs, not after loading the model
    except TypeError as err:
        raise ValueError(f"policy {name!r} rejects {sorted(kwargs)}: {err}") from None
    return lambda: get_policy(name, **kwargs)


@dataclass
class TaskResult:
    task: str
    length: int
    metric: str
    score: float  # mean over samples of the task's metric
    seconds: float  # wall time of all samples
    samples: list[dict] = field(default_factory=list)  # per-sample records (meta, prediction, score)
    extra: dict[str, float] = field(default_factory=dict)  # secondary means (e.g. top1, ppl_full)

    @property
    def n(self) -> int:
        return len(self.samples)


def check_length(length: int, config) -> None:
    if length > (limit := max_context(config)):
        raise ValueError(f"length {length} exceeds the model's context of {limit} tokens")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")


def run_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: GenerationTask,
                   sample: Sample, policy: KVPolicy) -> dict:
    ids = torch.tensor([sample.input_ids], device=model.device)  # (1, S)
    out = runtime.generate(model, ids, policy, max_new_tokens=task.max_new_tokens,
                           eos_token_id=tokenizer.eos_token_id)  # (1, S + n)
    prediction = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {**sample.meta, "answers": list(sample.answers), "prediction": prediction,
            "score": task.score(prediction, sample)}


def run_prose(model: PreTrainedModel, task: ProseTask, sample: Sample, policy: KVPolicy, is_full: bool) -> dict:
    """Teacher-forced continuation: perplexity, or KL / top-1 against the full cache."""
    ids = torch.tensor([sample.input_ids], device=model.device)  # (1, S)
    prefix = int(sample.meta["prefix_len"])
    targets = ids[0, prefix:]  # (S - prefix,)
    logits = runtime.teacher_forced_logits(model, ids, prefix, policy)[0]  # (S - prefix, V)
    ppl = metrics.perplexity(logits, targets)
    if task.name != "fidelity":
        return {**sample.meta, "score": ppl}
    # The full cache is its own reference: a second identical pass would measure nothing.
    ref = logits if is_full else runtime.teacher_forced_logits(model, ids, prefix, None)[0]
    return {**sample.meta, "score": metrics.kl_divergence(ref, logits), "top1": metrics.top1_agreement(ref, logits),
            "ppl": ppl, "ppl_full": metrics.perplexity(ref, targets)}


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task_name: str, length: int,
             n: int, seed: int, make_policy: PolicyFactory, *, is_full: bool = False,
             corpus_ids: list[int] | None = None) -> TaskResult:
    """Score ``n`` deterministic samples of ``task_name`` at ``length`` tokens (prose tasks need
    ``corpus_ids``). ``is_full`` marks the full-cache policy (fidelity then skips the reference pass)."""
    check_length(length, model.config)
    records, start = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            if task_name in GENERATION_TASKS:
                task = GENERATION_TASKS[task_name]()
                record = run_generation(model, tokenizer, task, task.sample(tokenizer, length, seed, i, n),
                                        make_policy())
            else:
                assert corpus_ids is not None, f"task {task_name!r} needs corpus_ids"
                task = PROSE_TASKS[task_name]()
                record = run_prose(model, task, task.sample(corpus_ids, length, seed, i), make_policy(), is_full)
            log.info("%s@%d sample %d/%d: score %.4g", task_name, length, i + 1, n, record["score"])
            records.append(record)
    seconds = time.perf_counter() - start
    extra = {key: sum(r[key] for r in records) / n for key in ("top1", "ppl", "ppl_full") if key in records[0]}
    score = sum(r["score"] for r in records) / n
    return TaskResult(task_name, length, task.metric, score, seconds, records, extra)
