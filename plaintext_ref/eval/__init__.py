"""Offline evaluation of KV policies (kv_methods.md §16.2): nothing is downloaded at run time.

Modules: ``tasks`` (deterministic passkey / NIAH / RULER-style samples and prose windows),
``corpus`` (local prose), ``metrics`` (string match, perplexity, KL, top-1 agreement),
``runner`` (scores a task at a length under a policy), ``report`` (table + JSON) and
``__main__`` (the CLI, ``python -m plaintext_ref.eval --help``). The full-cache baseline of
SmolLM2 is in docs/eval_baseline.md.
"""
from plaintext_ref.eval.runner import TaskResult, evaluate, parse_budget, policy_factory
from plaintext_ref.eval.tasks import TASKS, Sample, resolve_tasks

__all__ = ["TASKS", "Sample", "TaskResult", "evaluate", "parse_budget", "policy_factory", "resolve_tasks"]
