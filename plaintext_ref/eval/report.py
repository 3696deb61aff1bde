"""Summary table (stdout) and JSON results file of an evaluation run."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

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
