"""Quality of every plaintext KV method next to the full cache, with intervals, paired differences and
effective budgets, on the offline eval harness (SmolLM2).

Cells are (length, method, budget). Each cell runs, on the same deterministic samples for every method:
``niah`` (RULER needle in the noise haystack; up to ``--samples``) and, on each prose corpus
(``--corpora``, default the Python docs and Vim's manual), ``fidelity`` (teacher-forced KL(full ‖ method),
top-1 agreement and perplexity over 64 tokens; sequential: stops once the KL's 95 % half-width is below
``--stop-kl``, after at least ``--min-samples``). Every record carries the method's measured ``kept`` and
``attended`` slots per decode step (plaintext_ref.eval.meter), so rows are compared at their effective
budget, not their label. Samples run batched on the GPU (``--batch-tokens`` bounds B·length², the eager
prefill's attention matrix). ``--ablation`` adds the MPCache diagnosis at 4K and 5 % (per-stage answer
survival and NIAH per variant, plaintext_ref.eval.mpcache_trace).

Cells run in priority order (full and the core methods at 4K, 2K, 8K, then the other methods at 4K) until
``--deadline-s``; the JSON is rewritten after every cell and ``--resume`` keeps the cells already in it, so a
run cut by the 10-minute limit continues. Writes benchmarks/reports/kv_quality.{json,md} and
kv_quality_<length>.png.

    python -m benchmarks.kv_quality --device cuda --ablation --deadline-s 540
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from plaintext_ref.eval.corpus import CorpusUnavailable, load_named
from plaintext_ref.eval.mpcache_trace import ExactBoundMPCache, TraceFactory
from plaintext_ref.eval.report import quality_markdown, quality_plots
from plaintext_ref.eval.runner import FULL, draw_samples, evaluate, policy_factory
from plaintext_ref.models import load_model
from plaintext_ref.mpcache_config import DEFAULT_MAPPING, MAPPINGS, MPCacheConfig, config_for_budget
from plaintext_ref.policies import POLICIES
from plaintext_ref.policies.mpcache import MPCache
from plaintext_ref.policies.quant import cache_bytes

log = logging.getLogger("kv_quality")
REPORTS = Path(__file__).resolve().parent / "reports"
CORE = ("mpcache", "snapkv", "h2o", "streaming_llm", "quest", "tokenselect", "pyramidkv", "tova")
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
NO_BUDGET = {"kivi", "vidkv"}  # fixed bit widths: one cell each, at their paper defaults


def policy_args(name: str, budget: float | None, length: int) -> dict:
    """POLICY_ARGS plus budget-matched windows: TokenSelect's sink/local windows (128 + 512 of its 2688-token
    default) are scaled to the same shares of the budget, so its rows attend their budget, not 640 tokens."""
    args = dict(POLICY_ARGS.get(name, {}))
    if name == "tokenselect" and budget is not None:
        tokens = budget * length
        args.update(n_init=max(1, round(tokens * 128 / 2688)), n_local=max(1, round(tokens * 512 / 2688)))
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="4096,2048,8192", help="context lengths, in priority order")
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="fractions of the context kept/attended")
    p.add_argument("--policies", default="all", help="comma-separated names, or all")
    p.add_argument("--other-lengths", default="core", choices=("core", "all"),
                   help="methods run at lengths after the first: the core set, or all")
    p.add_argument("--corpora", default="python-doc,vim-doc", help="named corpora or directories")
    p.add_argument("--samples", type=int, default=100, help="NIAH samples per cell")
    p.add_argument("--fidelity-samples", type=int, default=50, help="most fidelity samples per cell and corpus")
    p.add_argument("--min-samples", type=int, default=25, help="fidelity samples before the stopping rule")
    p.add_argument("--stop-kl", type=float, default=0.01, help="stop fidelity once the KL half-width is below")
    p.add_argument("--prose-niah", action="store_true", help="also NIAH in each corpus's prose (niah_prose)")
    p.add_argument("--batch-tokens", type=float, default=4.2e8, help="batch rows B so that B·length² <= this")
    p.add_argument("--max-batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="MPCache diagnosis at 4K, 5 %%")
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="stop starting cells after this")
    p.add_argument("--out", default=str(REPORTS / "kv_quality.json"))
    p.add_argument("--plots", default=str(REPORTS))
    p.add_argument("--resume", action="store_true", help="keep cells already in --out")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and plots from --out, run nothing")
    return p.parse_args(argv)


def cells(args) -> list[tuple[int, str, float | None]]:
    """(length, policy, budget) in priority order: full + the core methods at every length, then the other
    methods at the first length (and, with --other-lengths all, at the other lengths)."""
    names = sorted(n for n in POLICIES if n != FULL) if args.policies == "all" else args.policies.split(",")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(sorted(POLICIES))}")
    budgets = [float(b) for b in args.budgets.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    per = lambda ns: [(n, b) for n in ns for b in ([None] if n in NO_BUDGET else budgets)]
    core = [n for n in CORE if n in names]
    rest = [n for n in names if n not in core]
    out = [(length, n, b) for length in lengths for n, b in [(FULL, None)] + per(core)]
    out += [(lengths[0], n, b) for n, b in per(rest)]
    if args.other_lengths == "all":
        out += [(length, n, b) for length in lengths[1:] for n, b in per([n for n in names if n not in core])]
    return out


def batch_size(args, length: int) -> int:
    return max(1, min(args.max_batch, int(args.batch_tokens // length ** 2)))


def compact(res) -> dict:
    """A TaskResult as the JSON keeps it: per-sample scores and budgets (same sample order for every method)."""
    keys = [k for k in ("score", "top1", "ppl", "ppl_full", "kept", "attended") if k in res.samples[0]]
    out = {"metric": res.metric, "n": res.n, "seconds": res.seconds, **{k: [r[k] for r in res.samples] for k in keys}}
    if "depth" in res.samples[0]:
        out["depth"] = [r["depth"] for r in res.samples]
    return out


def run_cell(model, tok, length: int, name: str, budget, args, corpora: dict, reference: dict,
             make=None, label: str | None = None, niah_only: bool = False) -> dict:
    """All tasks of one cell; a method that raises is recorded, not fatal."""
    row: dict = {"length": length, "policy": label or name, "budget": budget, "results": {}, "seconds": 0.0}
    bs = batch_size(args, length)
    try:
        if make is None:
            row["args"] = policy_args(name, budget, length)
            make = policy_factory(name, budget, **row["args"])
            row["kv_bytes"] = cache_bytes(make(), model.config, length)
            if name == "mpcache":
                row["config"] = config_dict(make().config)
        jobs = [("niah", None, dict(n=args.samples))]
        if not niah_only:
            jobs += [("niah_prose", c, dict(n=args.samples)) for c in corpora if args.prose_niah]
            jobs += [("fidelity", c, dict(n=args.fidelity_samples, stop_half_width=args.stop_kl,
                                          min_n=args.min_samples)) for c in corpora]
        for task, corpus, kw in jobs:
            res = evaluate(model, tok, task, length, seed=args.seed, make_policy=make, is_full=name == FULL,
                           corpus_ids=corpora.get(corpus), batch_size=bs, grid=args.samples if task != "fidelity"
                           else None, reference=reference, reference_tag=corpus or "", **kw)
            row["results"][task if corpus is None else f"{task}@{corpus}"] = compact(res)
            row["seconds"] += res.seconds
    except Exception as err:  # noqa: BLE001 — one broken method must not hide the others' results
        log.exception("%s @ %s (%d) failed", name, budget, length)
        row["error"] = f"{type(err).__name__}: {err}"
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


ABLATION_BUDGET = 0.05


def config_dict(cfg: MPCacheConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def adopt_default_mapping(report: dict) -> None:
    """Name rows after the mapping that is the default now: an ``mpcache[m]`` row whose recorded config is
    exactly ``config_for_budget(budget)`` becomes ``mpcache`` (same knobs, so the same selection), and the
    ``mpcache`` row it replaces, run under the mapping that was the default then, becomes
    ``mpcache[authors]`` if its config is that mapping's (or, in a run before configs were recorded,
    if that run compared against the authors' mapping as the default)."""
    by_key = {(r["length"], r["policy"], r["budget"]): r for r in report["rows"]}
    for (length, name, budget), row in list(by_key.items()):
        if not name.startswith("mpcache[") or row.get("config") != config_dict(config_for_budget(budget)):
            continue
        old = by_key.get((length, "mpcache", budget))
        if old is not None:
            authors = config_dict(config_for_budget(budget, mapping="authors"))
            if old.get("config", authors if report.get("candidate_mapping") else None) != authors:
                continue
            old["policy"], old["config"] = "mpcache[authors]", authors
        row["policy"] = "mpcache"
        row["relabelled_from"] = name


def ablation_variants(budget: float) -> dict[str, tuple[type, MPCacheConfig]]:
    """MPCache variants at one attended budget: each changes one knob of the budget mapping or the rule;
    ``mapping <name>`` rows are the candidate budget → knobs mappings of ``config_for_budget``."""
    base = config_for_budget(budget, mapping="authors")
    at = lambda keep, **kw: replace(config_for_budget(budget, replace(MPCacheConfig(), static_keep=keep),
                                                      mapping="authors"), **kw)
    variants = {
        "mapping authors (default)": (MPCache, base),
        "no layer sharing": (MPCache, replace(base, share_layers=False)),
        "alpha = 1 (r_max only)": (MPCache, replace(base, alpha=1.0)),
        "exact bound (Eq. 2), plaintext only": (ExactBoundMPCache, base),
        "level-1 keeps all (one level)": (MPCache, replace(base, level_ratios=(1.0, base.level_ratios[1]))),
        "static keep 100 % (dynamic only)": (MPCache, at(1.0)),
        "static keep 50 %": (MPCache, at(0.5)),
        "static keep = budget (static only)": (MPCache, replace(base, static_keep=budget, level_ratios=(1.0, 1.0))),
    }
    variants.update({f"mapping {m}": (MPCache, config_for_budget(budget, mapping=m)) for m in MAPPINGS[1:]})
    variants["mapping keep2b_window32, no sharing"] = (
        MPCache, replace(config_for_budget(budget, mapping="keep2b_window32"), share_layers=False))
    return variants


def run_ablation(model, tok, args, reference: dict) -> list[dict]:
    """NIAH per variant at the first length (4K), 5 %, on seed + 1 (held out from the main table's samples);
    the default variant also traces where the answer tokens go."""
    length, rows, seed = int(args.lengths.split(",")[0]), [], args.seed + 1
    bs = batch_size(args, length)
    samples = draw_samples(tok, "niah", length, seed, range(args.samples), args.samples, None)
    spans = [tuple(s.meta["answer_span"]) for s in samples]
    held_out = argparse.Namespace(**{**vars(args), "seed": seed})
    for label, (cls, cfg) in ablation_variants(ABLATION_BUDGET).items():
        tracer = TraceFactory(cfg, spans, bs) if label.startswith("mapping authors") else None
        make = tracer or (lambda cls=cls, cfg=cfg: cls(config=cfg))
        row = run_cell(model, tok, length, "mpcache", ABLATION_BUDGET, held_out, {}, reference, make=make,
                       label=f"mpcache: {label}", niah_only=True)
        row["config"] = config_dict(cfg)
        row["seed"] = seed
        if tracer is not None:
            row["trace"] = tracer.per_sample()
        rows.append(row)
        log.info("ablation %s: niah %.3f", label, sum(row["results"]["niah"]["score"]) / args.samples
                 if "niah" in row["results"] else float("nan"))
    return rows


def best_mapping(ablation: list[dict]) -> str:
    """The candidate mapping with the highest held-out NIAH (ties: the earlier one in MAPPINGS)."""
    scores = {}
    for r in ablation:
        name = r["policy"].removeprefix("mpcache: mapping ").removesuffix(" (default)")
        if name in MAPPINGS and "niah" in r.get("results", {}):
            scores[name] = sum(r["results"]["niah"]["score"]) / len(r["results"]["niah"]["score"])
    return max(MAPPINGS, key=lambda m: (scores.get(m, -1.0), -MAPPINGS.index(m)))


def setup(args):
    model, tok, _ = load_model(args.model, device=args.device)
    corpora = {}
    for name in args.corpora.split(","):
        try:
            corpus = load_named(name)
            corpora[corpus.name] = tok(corpus.text).input_ids
            log.info("corpus %s: %d tokens", corpus.name, len(corpora[corpus.name]))
        except CorpusUnavailable as err:
            log.warning("corpus %s skipped: %s", name, err)
    return model, tok, corpora


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        todo = cells(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = Path(args.out)
    report = json.loads(out.read_text()) if (args.resume or args.report_only) and out.exists() else {"rows": []}
    done = {(r["length"], r["policy"], r["budget"]) for r in report["rows"] if "error" not in r}
    report["rows"] = [r for r in report["rows"] if (r["length"], r["policy"], r["budget"]) in done]
    adopt_default_mapping(report)
    if args.report_only:
        out.with_suffix(".md").write_text(quality_markdown(report))
        quality_plots(report, Path(args.plots))
        out.write_text(json.dumps(report, indent=0))
        return 0
    model, tok, corpora = setup(args)
    report["config"] = {**vars(args), "deadline_s": str(args.deadline_s), "corpora_used": sorted(corpora),
                        "policy_args": POLICY_ARGS, "budget_meaning": BUDGET_MEANING}
    report["environment"] = {"torch": torch.__version__, "device": args.device,
                             "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    report.setdefault("runs", []).append({"started": report["environment"]["date"], "seconds": 0.0})
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["runs"][-1]["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(report, indent=0))
        out.with_suffix(".md").write_text(quality_markdown(report))

    reference: dict = {}
    if args.ablation and not (args.resume and report.get("ablation")):
        report["ablation"] = run_ablation(model, tok, args, reference)
        save()
    if report.get("ablation") and (pick := best_mapping(report["ablation"])) != DEFAULT_MAPPING:
        report["candidate_mapping"] = pick  # run as an extra row next to every mpcache cell
        todo = [c for cell in todo for c in ([cell, (cell[0], f"mpcache[{pick}]", cell[2])]
                                             if cell[1] == "mpcache" else [cell])]
    last: dict[int, float] = {}
    for length, name, budget in todo:
        if (length, name, budget) in done:
            continue
        elapsed = time.perf_counter() - t0
        if elapsed + 1.2 * last.get(length, 0.0) > args.deadline_s:
            log.warning("deadline: skipping %s @ %s (%d) and later cells", name, budget, length)
            report["runs"][-1]["stopped_at"] = [length, name, budget]
            break
        if name.startswith("mpcache["):
            mapping = name[len("mpcache["):-1]
            make = lambda b=budget, m=mapping: MPCache(config=config_for_budget(b, mapping=m))
            row = run_cell(model, tok, length, "mpcache", budget, args, corpora, reference, make=make, label=name)
            row["config"] = config_dict(make().config)
        else:
            row = run_cell(model, tok, length, name, budget, args, corpora, reference)
        last[length] = row["seconds"]
        report["rows"].append(row)
        save()
    save()
    quality_plots(report, Path(args.plots))
    print(quality_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
