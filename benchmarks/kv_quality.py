"""Quality of every plaintext KV method next to the full cache, on the offline eval harness.

For each method in ``plaintext_ref.policies.POLICIES`` and each budget (fraction of the context kept),
runs the eval tasks at one context length on SmolLM2 and writes
``benchmarks/reports/kv_quality.json`` + ``kv_quality.md``. The JSON is rewritten after every
(method, budget), and ``--resume`` skips the cells already in it, so a run cut by a time limit can be
continued (the GPU box allows 10 minutes per command).

    python -m benchmarks.kv_quality --device cuda --length 4096 --budgets 0.05,0.1,0.2 --samples 3
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from plaintext_ref.eval.corpus import CorpusUnavailable, load_corpus
from plaintext_ref.eval.runner import FULL, evaluate, policy_factory
from plaintext_ref.eval.tasks import PROSE_TASKS
from plaintext_ref.models import load_model
from plaintext_ref.policies import POLICIES
from plaintext_ref.policies.quant import cache_bytes

log = logging.getLogger("kv_quality")
REPORTS = Path(__file__).resolve().parent / "reports"
TASKS = "passkey,niah,niah_multikey,vt,cwe,ppl,fidelity"
# Per-method settings for a short (<= 8K) context, each with its reason.
POLICY_ARGS: dict[str, dict] = {
    "shadowkv": {"min_prompt": 0},  # the paper's default leaves prompts <= 4096 tokens dense
    "razor_attention": {"min_window": 0},  # the paper's 4000-token floor would leave 4K prompts whole
    # NOSA's 64-token blocks and 16-block window would fill a 5-20% budget of 4K with the window alone
    "nosa": {"block_size": 16, "local_blocks": 4, "query_blocks": 4, "compress_kernel": 8, "compress_stride": 4},
}
# Methods whose `budget` is not a token fraction (stated in the report).
BUDGET_MEANING: dict[str, str] = {
    "think": "fraction of key channels kept (all tokens kept)",
    "mikv": "fraction of the prompt kept at full precision (the rest quantized, none dropped)",
}
# Methods that take no budget (fixed bit widths): one cell each, at their paper defaults.
NO_BUDGET = {"kivi", "vidkv"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, default=4096, help="context length in tokens")
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="fractions of the context kept")
    p.add_argument("--policies", default="all", help="comma-separated names, or all")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="directory of *.txt prose (default: python3.11-doc)")
    p.add_argument("--out", default=str(REPORTS / "kv_quality.json"))
    p.add_argument("--resume", action="store_true", help="keep cells already in --out")
    return p.parse_args(argv)


def cells(args) -> list[tuple[str, float | None]]:
    names = sorted(n for n in POLICIES if n != FULL) if args.policies == "all" else args.policies.split(",")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(sorted(POLICIES))}")
    budgets = [float(b) for b in args.budgets.split(",")]
    return [(FULL, None)] + [(n, b) for n in names for b in ([None] if n in NO_BUDGET else budgets)]


def run_cell(model, tok, name: str, budget: float | None, args, corpus_ids) -> dict:
    """All tasks for one (method, budget); a method that raises is recorded, not fatal."""
    row: dict = {"policy": name, "budget": budget, "scores": {}, "seconds": 0.0}
    try:
        make = policy_factory(name, budget, **POLICY_ARGS.get(name, {}))
        row["kv_bytes"] = cache_bytes(make(), model.config, args.length)  # None for eviction/selection methods
        for task in args.tasks.split(","):
            if task in PROSE_TASKS and corpus_ids is None:
                continue
            res = evaluate(model, tok, task, args.length, args.samples, args.seed, make,
                           is_full=name == FULL, corpus_ids=corpus_ids)
            row["scores"][task] = res.score
            row["scores"].update({f"{task}.{k}": v for k, v in res.extra.items()})
            row["seconds"] += res.seconds
    except Exception as err:  # noqa: BLE001 — one broken method must not hide the others' results
        log.exception("%s @ %s failed", name, budget)
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def to_markdown(report: dict) -> str:
    rows = sorted(report["rows"], key=lambda r: (r["policy"] != FULL, r["policy"], r["budget"] or 0))
    tasks = [t for t in report["config"]["tasks"].split(",") if any(t in r["scores"] for r in rows)]
    extra = ["fidelity.top1"] if any("fidelity.top1" in r["scores"] for r in rows) else []
    cols = tasks + extra
    env = report["environment"]
    lines = [f"# KV-cache methods on {report['config']['model']} at {report['config']['length']} tokens",
             "",
             f"{env['device_name']}, torch {env['torch']}, {report['config']['samples']} samples per task, "
             f"seed {report['config']['seed']}. Budget = fraction of the context kept (attended for "
             "selection methods). passkey/niah/niah_multikey/vt/cwe: accuracy (string match); ppl: "
             "perplexity (lower is better); fidelity: teacher-forced KL(full ‖ method) (lower is better) "
             "and top-1 agreement with the full cache. kv bytes: the whole KV cache after a prefill of the "
             "context (fp16 for full-precision values, quantization codes at their bit width plus fp16 scales "
             "and zero points), for the full cache and the quantization methods. "
             + " ".join(f"{k}: budget = {v}." for k, v in BUDGET_MEANING.items())
             + " Per-method settings: " + ", ".join(f"{k} {v}" for k, v in POLICY_ARGS.items()) + ".",
             "",
             "| method | budget | " + " | ".join(cols) + " | kv bytes | seconds |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['budget']} | error: {r['error'][:80]} |" + " |" * (len(cols) + 1))
            continue
        vals = [f"{r['scores'][c]:.3g}" if c in r["scores"] else "–" for c in cols]
        budget = ("full" if r["policy"] == FULL else "–") if r["budget"] is None else f"{r['budget']:.0%}"
        kv_bytes = "–" if r.get("kv_bytes") is None else f"{r['kv_bytes']:,.0f}"
        lines.append(f"| {r['policy']} | {budget} | " + " | ".join(vals) + f" | {kv_bytes} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        todo = cells(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.resume and out.exists() else {"rows": []}
    done = {(r["policy"], r["budget"]) for r in report["rows"] if "error" not in r}
    report["rows"] = [r for r in report["rows"] if (r["policy"], r["budget"]) in done]
    model, tok, _ = load_model(args.model, device=args.device)
    try:
        corpus_ids = tok(load_corpus(args.corpus).text).input_ids
    except CorpusUnavailable as err:
        log.warning("prose tasks skipped: %s", err)
        corpus_ids = None
    report["config"] = vars(args)
    report["environment"] = {"torch": torch.__version__, "device": args.device,
                             "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, budget in todo:
        if (name, budget) in done:
            continue
        report["rows"].append(run_cell(model, tok, name, budget, args, corpus_ids))
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
