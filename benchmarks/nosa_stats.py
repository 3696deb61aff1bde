"""Locality and host-transfer statistics of the NOSA-style policy on SmolLM2, the quantities NOSA reports
(Huang et al., arXiv 2510.13602, Observation 1 and §4): the selection overlap between adjacent decode steps
γ(t) = |Γ(t) ∩ Γ(t−1)| / |Γ(t)| per layer, the cache hit rate of the device-resident blocks, and the
CPU→GPU blocks and bytes fetched per step (plaintext_ref.policies.nosa: ``NOSAState``, ``transfer_stats``).

Each variant runs teacher-forced on the same windows of the Python docs (``plaintext_ref.eval.corpus``):
a prefill of ``length − new_tokens`` tokens, then ``new_tokens`` decode steps, each selecting whole blocks.
* ``nosa``: window + sink + ``query_blocks`` query-aware blocks + query-agnostic (‖v‖) blocks for the rest;
* ``query-aware only``: the same budget with every non-forced block chosen by the query-aware score
  (InfLLM-v2's selection without NOSA's locality constraint; the paper's vanilla-offloading baseline).
Also per variant: KL(full ‖ variant) of the next-token distributions and top-1 agreement, so locality is
read next to what it costs. Block settings are kv_quality's for a short context (P = 16, 4-block window,
4 query-aware blocks, compressed windows 8/4). Budgets are int tokens, so the fetch bound (≤ query_blocks
blocks per KV head and step after the first) applies.

    python -m benchmarks.nosa_stats            # CPU, 1 thread, ~5 minutes; writes reports/nosa_stats.{json,md}
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.kv_quality import POLICY_ARGS
from benchmarks.kv_reuse import machine
from plaintext_ref.eval.corpus import load_named
from plaintext_ref.models import load_model
from plaintext_ref.policies import NOSA
from plaintext_ref.policies.nosa import transfer_stats
from plaintext_ref.runtime import RefCache, attached, step, teacher_forced_logits

log = logging.getLogger("nosa_stats")
REPORTS = Path(__file__).resolve().parent / "reports"


@dataclass
class NosaStatsConfig:
    """length: tokens per window; new_tokens: decode steps measured; budgets: tokens attended per step."""

    model: str = "smollm2"
    length: int = 2048
    new_tokens: int = 64
    budgets: tuple[int, ...] = (256, 512)
    windows: int = 2
    seed: int = 0
    threads: int = 1
    out: str = str(REPORTS)

    def __post_init__(self) -> None:
        if not 1 <= self.new_tokens < self.length or self.windows < 1 or not self.budgets:
            raise ValueError(f"need 1 <= new_tokens < length, windows >= 1 and budgets; got {self.new_tokens}, "
                             f"{self.length}, {self.windows}, {self.budgets}")


def variants(budget: int) -> dict[str, NOSA]:
    """The NOSA-style policy and its query-aware-only baseline at one budget."""
    args = POLICY_ARGS["nosa"]
    return {"nosa": NOSA(budget=budget, **args),
            "query-aware only": NOSA(budget=budget, **{**args, "query_blocks": budget // args["block_size"]})}


@torch.no_grad()
def measure(model, ids: torch.Tensor, prefix: int, policy: NOSA, full: torch.Tensor) -> dict:
    """Teacher-forced run of ids (1, S) under ``policy``: transfer_stats of the whole cache, γ per layer, and
    KL(full ‖ policy) / top-1 agreement against the full-cache log-probabilities ``full`` (1, S − prefix, V)."""
    cache = RefCache(model, policy)
    pos = torch.arange(ids.shape[1])[None]
    with attached(model):
        rows = [step(model, cache, ids[:, :prefix], pos[:, :prefix], logits_to_keep=1)]
        for j in range(prefix, ids.shape[1] - 1):
            rows.append(step(model, cache, ids[:, j:j + 1], pos[:, j:j + 1], logits_to_keep=1))
    logp = torch.cat(rows, dim=1).log_softmax(dim=-1)
    layers = [cache.kv(i) for i in range(cache.num_layers)]
    return {**transfer_stats(layers), "overlap_per_layer": [transfer_stats([kv])["overlap"] for kv in layers],
            "kl": float((full.exp() * (full - logp)).sum(-1).mean()),
            "top1": float((full.argmax(-1) == logp.argmax(-1)).float().mean())}


def mean_rows(rows: list[dict]) -> dict:
    """Mean of each statistic over windows (per-layer lists elementwise; the worst step as a max)."""
    out = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k not in ("overlap_per_layer",
                                                                                   "max_fetched_after_first")}
    out["max_fetched_after_first"] = max(r["max_fetched_after_first"] for r in rows)
    out["overlap_per_layer"] = [statistics.fmean(v) for v in zip(*(r["overlap_per_layer"] for r in rows))]
    out["hit_rate"] = 1.0 - out["fetched_fraction"]
    return out


def run(cfg: NosaStatsConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    model, tok, config = load_model(cfg.model)
    text = load_named("python-doc").text
    ids = torch.tensor(tok(text[:60 * cfg.length * cfg.windows], add_special_tokens=False)["input_ids"])
    starts = torch.linspace(0, len(ids) - cfg.length, cfg.windows).long().tolist()
    windows = [ids[s:s + cfg.length][None] for s in starts]
    prefix = cfg.length - cfg.new_tokens
    start = time.monotonic()
    fulls = [teacher_forced_logits(model, w, prefix).log_softmax(dim=-1) for w in windows]
    results: dict = {}
    for budget in cfg.budgets:
        for name, policy in variants(budget).items():
            rows = [measure(model, w, prefix, policy, f) for w, f in zip(windows, fulls)]
            results[f"{name} @ {budget}"] = {"budget": budget, "policy": asdict(policy) | {"budget": budget},
                                             **mean_rows(rows)}
            log.info("%s @ %d done, %.0fs", name, budget, time.monotonic() - start)
    return {"machine": f"CPU only: {machine()}", "model": cfg.model, "config": asdict(cfg),
            "windows_at_tokens": starts, "corpus": "python-doc", "seconds": round(time.monotonic() - start, 1),
            "kv_dtype": str(next(model.parameters()).dtype), "layers": config.num_hidden_layers,
            "kv_heads": config.num_key_value_heads, "results": results}


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# NOSA-style policy: selection locality and host transfers (SmolLM2, CPU)", "",
             f"{report['machine']}; {report['seconds']} s. {cfg['windows']} windows of {cfg['length']} tokens from "
             f"the Python docs, {cfg['new_tokens']} teacher-forced decode steps each; blocks of "
             f"{POLICY_ARGS['nosa']['block_size']} tokens, cache in {report['kv_dtype']} (bytes halve at fp16). "
             f"Per step and sequence, summed over {report['layers']} layers × {report['kv_heads']} KV heads; "
             "γ = |Γ(t) ∩ Γ(t−1)| / |Γ(t)| averaged over layers, heads and steps; hit rate = selected blocks "
             "already on the device / selected; worst = most blocks one KV head fetched in one step after the "
             "first (NOSA bounds it by query_blocks = "
             f"{POLICY_ARGS['nosa']['query_blocks']}).", "",
             "| variant @ budget (tokens) | γ | γ min layer | hit rate | selected blocks | fetched blocks | "
             "MB fetched / step | worst | KL(full ‖ ·) | top-1 |", "|" + "---|" * 10]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['overlap']:.3f} | {min(r['overlap_per_layer']):.3f} | {r['hit_rate']:.3f} | "
                     f"{r['selected_blocks']:.0f} | {r['fetched_blocks']:.1f} | {r['bytes_per_step'] / 2**20:.2f} | "
                     f"{r['max_fetched_after_first']} | {r['kl']:.4f} | {r['top1']:.3f} |")
    names = list(report["results"])
    lines += ["", "γ per layer:", "", "| layer | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i in range(len(report["results"][names[0]]["overlap_per_layer"])):
        lines.append(f"| {i} | " + " | ".join(f"{report['results'][n]['overlap_per_layer'][i]:.3f}" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=NosaStatsConfig.length)
    parser.add_argument("--new-tokens", type=int, default=NosaStatsConfig.new_tokens)
    parser.add_argument("--budgets", default="256,512", help="tokens attended per step, comma-separated")
    parser.add_argument("--windows", type=int, default=NosaStatsConfig.windows)
    parser.add_argument("--out", default=str(REPORTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = NosaStatsConfig(length=args.length, new_tokens=args.new_tokens, windows=args.windows, out=args.out,
                          budgets=tuple(int(b) for b in args.budgets.split(",")))
    report = run(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nosa_stats.json").write_text(json.dumps(report, indent=2))
    (out / "nosa_stats.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
