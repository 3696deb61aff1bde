"""CLI: ``python -m plaintext_ref.eval --policy NAME --budget B --task T --lengths L1,L2 ...``.

Prints a table (task × length: mean score, seconds per sample) and writes every sample's record
to ``--out`` as JSON. ``--budget`` is a fraction of the cache kept ("0.1") or a token count
("256"); it reaches the policy as ``get_policy(name, budget=0.1)`` / ``budget=256``. ``--lengths``
values are whole-sequence budgets (prompt + answer tokens), at most the model's context.

Example (the full-cache baseline of docs/eval_baseline.md):
    python -m plaintext_ref.eval --device cuda --task all --lengths 1024,2048,4096,8192 \\
        --samples 5 --out results.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable

import torch
import transformers

from plaintext_ref.eval.corpus import CorpusUnavailable, load_corpus
from plaintext_ref.eval.report import format_table, write_json
from plaintext_ref.eval.runner import FULL, TaskResult, check_length, evaluate, parse_budget, policy_factory
from plaintext_ref.eval.tasks import GENERATION_TASKS, PROSE_TASKS, TASKS, resolve_tasks
from plaintext_ref.models import DEFAULT_MODEL, load_model

log = logging.getLogger("plaintext_ref.eval")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plaintext_ref.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2, tiny-llama, tiny-gpt2 or a HF directory")
    p.add_argument("--policy", default=FULL, help="a name in plaintext_ref.policies.POLICIES")
    p.add_argument("--budget", default=None, help='fraction kept ("0.1") or tokens kept ("256")')
    p.add_argument("--policy-args", default="{}", help="extra policy kwargs as a JSON object")
    p.add_argument("--task", default="all", help=f"comma-separated from {', '.join(TASKS)}, or all")
    p.add_argument("--lengths", default="1024,2048,4096", help="comma-separated sequence lengths in tokens")
    p.add_argument("--samples", type=int, default=3, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--corpus", default=None, help="directory of *.txt prose for ppl/fidelity")
    p.add_argument("--out", default="eval_results.json", help="JSON results path")
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    """Validate every argument (before the model loads where possible); return what run() needs."""
    tasks = resolve_tasks(args.task)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        policy_args = json.loads(args.policy_args)
    except ValueError as err:
        raise ValueError(f"bad --lengths {args.lengths!r} or --policy-args {args.policy_args!r}: {err}") from None
    if not lengths or not isinstance(policy_args, dict):
        raise ValueError("--lengths needs at least one integer and --policy-args a JSON object")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    make_policy = policy_factory(args.policy, parse_budget(args.budget), **policy_args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, config = load_model(args.model, device=device, dtype=DTYPES[args.dtype])
    for length in lengths:  # every (task, length) must fit before anything runs
        check_length(length, config)
        for task in tasks:
            if task in GENERATION_TASKS:
                if not GENERATION_TASKS[task].needs_corpus:  # corpus tasks are checked when they run
                    GENERATION_TASKS[task]().sample(tokenizer, length, args.seed, 0, args.samples)
            elif length <= (cont := PROSE_TASKS[task]().continuation):
                raise ValueError(f"task {task!r} at length {length}: must exceed the continuation ({cont})")
    return model, tokenizer, tasks, lengths, make_policy, device


def run(args, model, tokenizer, tasks, lengths, make_policy,
        save: Callable[[list[TaskResult], dict[str, str], str | None], None]) -> None:
    """Every (task, length) in order; prose tasks are skipped with the reason when no corpus exists.
    ``save(results, skipped {task: reason}, corpus name or None)`` runs after each (task, length), so
    a long run that is stopped keeps what it finished."""
    results, skipped, corpus_ids, corpus_name = [], {}, None, None
    if prose := [t for t in tasks if t in PROSE_TASKS or t == "niah_prose"]:
        try:
            corpus = load_corpus(args.corpus)
            corpus_ids = tokenizer(corpus.text).input_ids
            corpus_name = corpus.name
            log.info("corpus %s: %d tokens", corpus_name, len(corpus_ids))
        except CorpusUnavailable as err:
            log.warning("skipping %s: %s", ", ".join(prose), err)
            skipped = {t: str(err) for t in prose}
    save(results, skipped, corpus_name)
    for task in tasks:
        if task in skipped:
            continue
        for length in lengths:
            results.append(evaluate(model, tokenizer, task, length, args.samples, args.seed, make_policy,
                                    is_full=args.policy == FULL, corpus_ids=corpus_ids))
            save(results, skipped, corpus_name)


def environment(device: str) -> dict:
    cuda = device.startswith("cuda")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node(), "device": device,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        model, tokenizer, tasks, lengths, make_policy, device = setup(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = " ".join(["python -m plaintext_ref.eval", *(sys.argv[1:] if argv is None else argv)])
    final: list = []

    def save(results: list[TaskResult], skipped: dict[str, str], corpus_name: str | None) -> None:
        config = {**vars(args), "corpus_used": corpus_name, "command": command}
        write_json(args.out, config, environment(device), results, skipped)
        final[:] = [results, skipped]

    run(args, model, tokenizer, tasks, lengths, make_policy, save)
    print(format_table(*final))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
