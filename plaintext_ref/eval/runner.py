"""Run tasks on a model under a KV policy: one :class:`TaskResult` per (task, length).

Samples run in batches of ``batch_size`` rows: every sample of a (task, length) has the same token count
(tasks.py), so a batch needs no padding and a policy sees exactly what it would see for one sample. A
policy is built fresh for every batch by a :data:`PolicyFactory` (per-sequence state lives in the cache,
per row), wrapped in :class:`~plaintext_ref.eval.meter.Metered` so each record carries the policy's
effective ``kept`` and ``attended`` slots per decode step. ``length`` is the whole sequence budget (prompt
+ generated tokens, or the prose window) and must not exceed the model's context (``max_context``).

Fidelity compares against full-cache logits of the same sample; pass a ``reference`` dict to compute
them once per sample and reuse them for every method (they are stored as fp32 log-probabilities on the
model's device, (continuation, V) per sample).
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
from plaintext_ref.eval.meter import Metered
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


def _stack(samples: list[Sample], device) -> torch.Tensor:
    lengths = {len(s.input_ids) for s in samples}
    assert len(lengths) == 1, f"a batch needs equally long samples, got lengths {sorted(lengths)}"
    return torch.tensor([s.input_ids for s in samples], device=device)          # (B, S)


def run_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: GenerationTask,
                   samples: list[Sample], policy: KVPolicy) -> list[dict]:
    """Greedy answers of a batch of equally long prompts; one record per sample."""
    ids = _stack(samples, model.device)                                          # (B, S)
    out = runtime.generate(model, ids, policy, max_new_tokens=task.max_new_tokens,
                           eos_token_id=tokenizer.eos_token_id)                  # (B, S + n)
    records = []
    for row, sample in zip(out[:, ids.shape[1]:].tolist(), samples):
        prediction = tokenizer.decode(row, skip_special_tokens=True)
        records.append({**sample.meta, "answers": list(sample.answers), "prediction": prediction,
                        "score": task.score(prediction, sample)})
    return records


def full_log_probs(model: PreTrainedModel, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Full-cache teacher-forced log-probabilities (B, S − prefix, V) fp32 (same path as a policy's)."""
    return torch.log_softmax(runtime.teacher_forced_logits(model, ids, prefix, None), dim=-1)


def run_prose(model: PreTrainedModel, task: ProseTask, samples: list[Sample], policy: KVPolicy, is_full: bool,
              reference: dict | None = None, keys: list | None = None) -> list[dict]:
    """Teacher-forced continuation of a batch: perplexity, or KL / top-1 against the full cache."""
    ids = _stack(samples, model.device)                                          # (B, S)
    prefix = int(samples[0].meta["prefix_len"])
    targets = ids[:, prefix:]                                                    # (B, C)
    log_q = torch.log_softmax(runtime.teacher_forced_logits(model, ids, prefix, policy), dim=-1)  # (B, C, V)
    nll_q = -log_q.gather(-1, targets[..., None])[..., 0].double().mean(-1)     # (B,)
    if task.name != "fidelity":
        return [{**s.meta, "score": p} for s, p in zip(samples, nll_q.exp().tolist())]
    if is_full:  # the full cache is its own reference: a second identical pass would measure nothing
        log_p = log_q
    elif reference is not None and keys is not None and all(k in reference for k in keys):
        log_p = torch.stack([reference[k] for k in keys])
    else:
        log_p = full_log_probs(model, ids, prefix)
    if reference is not None and keys is not None:
        for k, row in zip(keys, log_p):
            reference.setdefault(k, row)
    p = log_p.double().exp()
    kl = (p * (log_p.double() - log_q.double())).sum(-1).mean(-1)                # (B,)
    top1 = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean(-1)              # (B,)
    nll_p = -log_p.gather(-1, targets[..., None])[..., 0].double().mean(-1)
    return [{**s.meta, "score": a, "top1": b, "ppl": c, "ppl_full": d}
            for s, a, b, c, d in zip(samples, kl.tolist(), top1.tolist(), nll_q.exp().tolist(), nll_p.exp().tolist())]


def draw_samples(tokenizer: PreTrainedTokenizerBase, task_name: str, length: int, seed: int, indices: range,
                 n: int, corpus_ids: list[int] | None) -> list[Sample]:
    """Samples ``indices`` of a (task, length) grid of ``n`` (depth grids depend on ``n``)."""
    if task_name in GENERATION_TASKS:
        task = GENERATION_TASKS[task_name]()
        if task.needs_corpus and corpus_ids is None:
            raise ValueError(f"task {task_name!r} needs corpus_ids")
        return [task.sample(tokenizer, length, seed, i, n, corpus_ids=corpus_ids) for i in indices]
    assert corpus_ids is not None, f"task {task_name!r} needs corpus_ids"
    return [PROSE_TASKS[task_name]().sample(corpus_ids, length, seed, i) for i in indices]


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task_name: str, length: int,
             n: int, seed: int, make_policy: PolicyFactory, *, is_full: bool = False,
             corpus_ids: list[int] | None = None, batch_size: int = 1, grid: int | None = None,
             reference: dict | None = None, reference_tag: str = "", stop_half_width: float | None = None,
             min_n: int = 0) -> TaskResult:
    """Score up to ``n`` deterministic samples of ``task_name`` at ``length`` tokens, ``batch_size`` at a time.

    Prose tasks need ``corpus_ids``. ``is_full`` marks the full-cache policy (fidelity then skips the
    reference pass). ``grid`` (default ``n``) is the sample grid size that spreads NIAH depths, so a run
    stopped early keeps the same samples as a full one. ``reference`` caches full-cache log-probs keyed by
    ``(reference_tag, task, length, seed, index)``. Sequential stopping: after each batch, stop once at
    least ``min_n`` samples ran and the 95 % half-width of the mean score is ≤ ``stop_half_width``.
    """
    check_length(length, model.config)
    if batch_size < 1 or n < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    grid = grid or n
    records, start = [], time.perf_counter()
    metric = (GENERATION_TASKS[task_name] if task_name in GENERATION_TASKS else PROSE_TASKS[task_name]()).metric
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            indices = range(lo, min(n, lo + batch_size))
            samples = draw_samples(tokenizer, task_name, length, seed, indices, grid, corpus_ids)
            policy = Metered(make_policy())
            if task_name in GENERATION_TASKS:
                batch = run_generation(model, tokenizer, GENERATION_TASKS[task_name](), samples, policy)
            else:
                keys = [(reference_tag, task_name, length, seed, i) for i in indices]
                batch = run_prose(model, PROSE_TASKS[task_name](), samples, policy, is_full, reference, keys)
            for i, record, budget in zip(indices, batch, policy.summary() or [{}] * len(batch)):
                records.append({"index": i, **record, **budget})
            log.info("%s@%d samples %d-%d/%d: mean score %.4g", task_name, length, indices[0] + 1, indices[-1] + 1,
                     n, sum(r["score"] for r in records) / len(records))
            if stop_half_width is not None and len(records) >= max(min_n, 2):
                if metrics.mean_ci([r["score"] for r in records])[1] <= stop_half_width:
                    break
    seconds = time.perf_counter() - start
    keys = ("top1", "ppl", "ppl_full", "kept", "attended")
    extra = {key: sum(r[key] for r in records) / len(records) for key in keys if key in records[0]}
    score = sum(r["score"] for r in records) / len(records)
    return TaskResult(task_name, length, metric, score, seconds, records, extra)
