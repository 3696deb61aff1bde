"""Summary table (stdout) and JSON results file of an evaluation run, and the kv_quality benchmark's
Markdown report (intervals, paired differences, effective budgets, the MPCache ablation) and plots."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from plaintext_ref.eval.metrics import mean_ci, paired_difference
from plaintext_ref.eval.runner import TaskResult

COLUMNS = ("task", "length", "n", "metric", "score", "s/sample", "extra")


def _row(r: TaskResult) -> tuple[str, ...]:
    extra = " ".join(f"{k}={v:.4g}" for k, v in r.extra.items())
    return (r.task, str(r.length), str(r.n), r.metric, f"{r.score:.4g}", f"{r.seconds / max(r.n, 1):.1f}", extra)


def format_table(results: Sequence[TaskResult], skipped: dict[str, str] | None = None) -> str:
    """Fixed-width table, one row per (task, length), then one line per skipped task."""
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"skipped {task}: {reason}" for task, reason in (skipped or {}).items()]
    return "\n".join(lines)


def write_json(path: str | Path, config: dict, environment: dict, results: Sequence[TaskResult],
               skipped: dict[str, str] | None = None) -> None:
    """``{"config", "environment", "results": [TaskResult + n], "skipped": {task: reason}}``."""
    payload = {"config": config, "environment": environment,
               "results": [{**asdict(r), "n": r.n} for r in results], "skipped": skipped or {}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- the kv_quality benchmark's report (benchmarks/kv_quality.py) --------------------------------------
def _ci(values: Sequence[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.3g} ± {half:.2g}" if math.isfinite(half) else f"{mean:.3g}"


def _pair(a: Sequence[float], b: Sequence[float]) -> str:
    """``Δ ± half`` of a − b over the common sample prefix, bold when the interval excludes 0."""
    n = min(len(a), len(b))
    if n < 2:
        return "–"
    d = paired_difference(a[:n], b[:n])
    if d["half"] == 0 and d["mean"] == 0:
        return "0"
    text = f"{d['mean']:+.3g} ± {d['half']:.2g}"
    return f"**{text}**" if d["significant"] else text


def _label(row: dict) -> str:
    return "full" if row["budget"] is None and row["policy"] == "full" else (
        "–" if row["budget"] is None else f"{row['budget']:.0%}")


def _task_keys(rows: list[dict], prefix: str) -> list[str]:
    return sorted({k for r in rows for k in r.get("results", {}) if k.split("@")[0] == prefix})


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def quality_markdown(report: dict) -> str:
    """The Markdown report: per-length tables, paired comparisons, the MPCache ablation, what did not run."""
    cfg, env = report["config"], report["environment"]
    rows = [r for r in report["rows"]]
    seconds = sum(run.get("seconds", 0.0) for run in report.get("runs", []))
    lines = [f"# KV-cache methods on {cfg['model']}: quality with 95 % intervals and effective budgets", "",
             f"{env['device_name']}, torch {env['torch']}, seed {cfg['seed']}; {len(report.get('runs', []))} "
             f"run(s), {seconds:.0f} s of wall time in all (model load and corpus tokenization included). "
             f"Regenerate: `python -m benchmarks.kv_quality --device cuda --ablation` (see its --help).", "",
             "**How to read.** Every method runs on the same deterministic samples. `niah`: RULER needle in the "
             f"noise haystack, depths spread over [0, 1], up to {cfg['samples']} samples. `KL@corpus`: teacher-"
             "forced KL(full ‖ method) over the last 64 tokens of a window of that corpus (lower is better), "
             f"sequential: at least {cfg['min_samples']}, at most {cfg['fidelity_samples']} samples, stopped once "
             f"the 95 % half-width is below {cfg['stop_kl']}; `top1` its top-1 agreement. Cells give mean ± the "
             "95 % t-interval half-width. `Δ vs full` and the comparison tables are **paired** per-sample "
             "differences (mean ± 95 % half-width, bold when the interval excludes 0). `attended` / `kept`: "
             "measured slots per decode step and layer (mean over heads, layers, steps and samples, at the NIAH "
             "answer steps), in tokens and as % of the prompt; ⚠ marks a row attending over 1.1× its label, "
             "so compare rows by `attended`, not by the label. Budget label = fraction of the context kept "
             "(attended for selection methods). `kv bytes`: the whole cache after the prefill, all layers, "
             "and in parentheses per context token; exact for the full fp16 cache and the quantized caches (their "
             "own accounting of codes, scales and full-precision parts), ≈ kept slots × the full cache's bytes "
             "per slot for eviction and selection methods. " + " ".join(f"{k}: budget = {v}." for k, v in
                                                           cfg.get("budget_meaning", {}).items()),
             ""]
    lines += ["Per-method settings: " + ", ".join(f"{k} {v}" for k, v in cfg.get("policy_args", {}).items())
              + "; TokenSelect's sink/local windows scaled to 128/2688 and 512/2688 of its budget (the "
              "defaults 128 + 512 alone exceed 5 % and 10 % of 4K).", ""]
    for length in sorted({r["length"] for r in rows}):
        lines += _length_table(length, [r for r in rows if r["length"] == length])
    lines += _comparisons(rows)
    if report.get("ablation"):
        lines += _ablation(report["ablation"])
    for check in report.get("cpu_checks", []):
        lines += _cpu_check(check, rows)
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Cells that failed", ""] + [f"- {r['policy']} @ {_label(r)} ({r['length']}): "
                                                  f"{r['error'][:160]}" for r in errors] + [""]
    for run in report.get("runs", []):
        if run.get("stopped_at"):
            lines.append(f"Run of {run['started']} stopped at its deadline before cell {run['stopped_at']}; "
                         "cells after it in priority order were not run.")
    return "\n".join(lines).rstrip() + "\n"


def _length_table(length: int, rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    full = next((r for r in ok if r["policy"] == "full"), None)
    kls = _task_keys(ok, "fidelity")
    pn = _task_keys(ok, "niah_prose")
    head = ["method", "budget", "attended", "kept", "kv bytes (per token)", "niah (n)", "Δ niah vs full"] + \
           [f"niah in {k.split('@')[1]}" for k in pn] + \
           [f"KL@{k.split('@')[1]} (n)" for k in kls] + [f"top1@{k.split('@')[1]}" for k in kls]
    out = [f"## {length} tokens", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prompt = length - 12
    slot = full["kv_bytes"] / length if full and full.get("kv_bytes") else None  # fp16 K+V, all layers
    for r in sorted(ok, key=lambda r: (r["policy"] != "full", r["policy"], r["budget"] or 0)):
        res = r["results"]
        niah = res.get("niah")
        cells = [r["policy"], _label(r)]
        if niah and "attended" in niah:
            att, kept = _mean(niah["attended"]), _mean(niah["kept"])
            warn = " ⚠" if r["budget"] is not None and att > 1.1 * r["budget"] * prompt else ""
            cells += [f"{att:.0f} ({att / prompt:.1%}){warn}", f"{kept:.0f} ({kept / prompt:.0%})"]
        else:
            cells += ["–", "–"]
        cells.append(_kv_bytes(r, slot, length, prompt))
        cells.append(f"{_ci(niah['score'])} ({niah['n']})" if niah else "–")
        cells.append(_pair(niah["score"], full["results"]["niah"]["score"]) if niah and full and
                     r is not full and "niah" in full["results"] else "–")
        cells += [_ci(res[k]["score"]) if k in res else "–" for k in pn]
        cells += [f"{_ci(res[k]['score'])} ({res[k]['n']})" if k in res else "–" for k in kls]
        cells += [f"{_mean(res[k]['top1']):.3f}" if k in res else "–" for k in kls]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _kv_bytes(row: dict, slot: float | None, length: int, prompt: int) -> str:
    """The cache's bytes (and per context token): exact where the method accounts for them (quantized
    caches and the full fp16 cache, at ``length`` tokens), else ≈ measured kept slots (of a ``prompt``)
    × the full cache's bytes per slot."""
    if row.get("kv_bytes") is not None:
        return f"{row['kv_bytes']:,.0f} ({row['kv_bytes'] / length:,.0f})"
    niah = row["results"].get("niah")
    if slot is None or not niah or "kept" not in niah:
        return "–"
    b = _mean(niah["kept"]) * slot
    return f"≈ {b:,.0f} ({b / prompt:,.0f})"


def _comparisons(rows: list[dict]) -> list[str]:
    """MPCache against each other method at the same length and budget label, paired."""
    ok = {(r["length"], r["policy"], r["budget"]): r for r in rows if "error" not in r}
    out = ["## MPCache against the other methods (paired, same samples, same budget label)", "",
           "Δ = MPCache − other: positive Δ niah favours MPCache, negative Δ KL favours MPCache.", ""]
    body = []
    for (length, name, budget), r in sorted(ok.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0, kv[0][1])):
        mp = ok.get((length, "mpcache", budget))
        if name in ("mpcache", "full") or mp is None:
            continue
        keys = ["niah"] + _task_keys([r, mp], "fidelity")
        cells = [_pair(mp["results"][k]["score"], r["results"][k]["score"])
                 if k in r["results"] and k in mp["results"] else "–" for k in keys]
        body.append((length, budget, name, keys, cells))
    if not body:
        return []
    keys = body[0][3]
    out += ["| length | budget | other | " + " | ".join(f"Δ {k}" for k in keys) + " |",
            "|" + "---|" * (3 + len(keys))]
    out += [f"| {length} | {budget:.0%} | {name} | " + " | ".join(cells) + " |"
            for length, budget, name, _, cells in body]
    return out + [""]


STAGES = (("static", "kept by static eviction"), ("level1", "in a level-1 pick"), ("attended", "attended"),
          ("level1_exact", "level-1, exact bound"), ("attended_exact", "attended, exact bound"))


def _ablation(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r and "niah" in r["results"]]
    if not ok:
        return ["## MPCache ablation: every variant failed", ""]
    base = ok[0]["results"]["niah"]["score"]
    out = [f"## MPCache at 5 % of {ok[0]['length']} tokens: where the needle goes", "",
           "NIAH per variant on the same 100 samples, drawn with seed + 1 so that they are held out from the main table (paired Δ against the authors' mapping). `static keep`, "
           "`ratios`, `α`, `window` are the MPCacheConfig knobs the variant runs with.", "",
           "| variant | static keep | ratios | α | window | share | attended | niah | Δ vs default |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        c, niah = r["config"], r["results"]["niah"]
        att = _mean(niah["attended"]) if "attended" in niah else float("nan")
        out.append(f"| {r['policy'].removeprefix('mpcache: ')} | {c['static_keep']:.3g} | "
                   f"{', '.join(f'{x:.3g}' for x in c['level_ratios'])} | {c['alpha']} | {c['window_ratio']:.3g} | "
                   f"{'yes' if c['share_layers'] else 'no'} | {att:.0f} | {_ci(niah['score'])} | "
                   f"{'–' if r is ok[0] else _pair(niah['score'], base)} |")
    trace = next((r for r in ok if r.get("trace")), None)
    if trace:
        score = trace["results"]["niah"]["score"]
        groups = {"all": range(len(trace["trace"])),
                  "retrieved": [i for i, s in enumerate(score) if s > 0.5],
                  "lost": [i for i, s in enumerate(score) if s <= 0.5]}
        out += ["", "Answer-token survival at the first answer step (default variant): fraction of the "
                "answer's tokens per stage, mean over layers and KV heads (and, after /, mean over layers of "
                "the best KV head); level stages over the layers that select (not the sharing ones).", "",
                "| samples | n | " + " | ".join(name for _, name in STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
        for group, idx in groups.items():
            idx = list(idx)
            if not idx:
                continue
            cells = []
            for stage, _ in STAGES:
                vals = [trace["trace"][i][stage] for i in idx if stage in trace["trace"][i]]
                best = [trace["trace"][i][f"{stage}_best"] for i in idx if stage in trace["trace"][i]]
                cells.append(f"{_mean(vals):.2f} / {_mean(best):.2f}" if vals else "–")
            out.append(f"| {group} | {len(idx)} | " + " | ".join(cells) + " |")
    return out + [""]


def _cpu_check(check: dict, rows: list[dict]) -> list[str]:
    """A smaller run of one method on another machine, paired with the main rows on the same sample indices."""
    idx, score = check["indices"], check["niah"]
    out = [f"## {check['title']}", "", check["machine"], "",
           f"{check['policy']} at {check['budget']:.0%} of {check['length']}: NIAH {_ci(score)} on {len(idx)} "
           f"samples (grid indices {idx[0]}, {idx[1]}, …, {idx[-1]}), attended "
           f"{_mean(check['attended']):.0f} slots per step.", "",
           "| against (main run, same samples) | its NIAH there | Δ (other − this) |", "|---|---|---|"]
    for r in rows:
        if r["length"] == check["length"] and r["budget"] in (check["budget"], None) and "niah" in r.get("results", {}):
            theirs = [r["results"]["niah"]["score"][i] for i in idx if i < len(r["results"]["niah"]["score"])]
            if len(theirs) == len(idx):
                out.append(f"| {r['policy']} @ {_label(r)} | {_ci(theirs)} | {_pair(theirs, score)} |")
    return out + [""]


def quality_plots(report: dict, folder: Path) -> list[Path]:
    """kv_quality_<length>.png: NIAH and KL per corpus against the measured attended fraction, per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in report["rows"] if "error" not in r]
    for length in sorted({r["length"] for r in rows}):
        at = [r for r in rows if r["length"] == length]
        kls = _task_keys(at, "fidelity")
        panels = ["niah"] + kls
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        for ax, key in zip(axes[0], panels):
            for name in sorted({r["policy"] for r in at}):
                pts = sorted((_mean(r["results"]["niah"]["attended"]) / (length - 12), *mean_ci(r["results"][key]["score"]))
                             for r in at if r["policy"] == name and key in r["results"] and "niah" in r["results"]
                             and "attended" in r["results"]["niah"])
                if not pts:
                    continue
                x, y, h = zip(*pts)
                h = [0 if not math.isfinite(v) else v for v in h]
                style = dict(marker="o", lw=2.5, color="k") if name in ("mpcache", "full") else dict(marker=".", lw=1)
                ax.errorbar(x, y, yerr=h, label=name, capsize=2, **style)
            ax.set_xscale("log")
            ax.set_xlabel("attended per decode step (fraction of the prompt, measured)")
            ax.set_ylabel("NIAH accuracy" if key == "niah" else "KL(full ‖ method)")
            if key != "niah":
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title(f"{key} at {length} tokens")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, ncol=2, loc="best")
        fig.tight_layout()
        path = Path(folder) / f"kv_quality_{length}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
