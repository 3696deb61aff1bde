"""GPU speed of one decode step's sparse attention: Triton kernels vs torch fallback vs full SDPA.

Per context length T (random bf16 q/K/V, B=1, H=32, Hkv=8, D=128, pages of 16 tokens), the median
time of
- ``sdpa``: full decode attention, F.scaled_dot_product_attention with the G query heads of each KV
  head folded into the query length (exact GQA, flash backend);
- ``torch``: page scores (MPCache linear score by default) + top-k pages + gather + fp32 softmax
  attention, all torch (``backend="torch"``);
- ``triton``: the score kernel + torch top-k + the split-K sparse attention kernel.
Also the Triton parts alone (score, attention) and the Quest score. Page min/max summaries are
maintained incrementally in a decode loop, so they are built once, outside the timed step.
Budget: a fixed number of selected tokens per KV head (4096 by default, Quest's/TokenSelect's
convention), or a fraction of T when ``--budget`` < 1.

Times are medians of CUDA-event timings with L2 flushed before each run: eager launches
(``triton.testing.do_bench``, Python launch overhead included) and the step replayed as a CUDA graph
(launch overhead removed, as a serving decode loop does). ``Triton full`` is the same split-K kernel
over all pages (dense flash-decoding), the strong dense baseline next to SDPA.
Usage: python benchmarks/kv_kernels.py [--lengths 8K,16K,32K,64K,128K] [--out benchmarks/reports]
``--quant 2`` times the fused KIVI dequantize-attention kernel instead (``bench_quant_length``;
kv_quant_attention.json/.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not __package__:   # run as a file: crypten's wheel ships a `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plaintext_ref import kernels  # noqa: E402
from plaintext_ref.kernels.quant_attention import QuantKV, quant_decode_attention  # noqa: E402
from plaintext_ref.policies import KIVI  # noqa: E402

logger = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class KernelBenchConfig:
    """lengths: context lengths T; budget: selected tokens per KV head (< 1: fraction of T)."""

    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    budget: float = 4096
    mode: str = "linear"
    dtype: str = "bf16"
    cuda_graphs: bool = True
    out: str = "benchmarks/reports"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < self.page_size:
            raise ValueError(f"lengths must be non-empty and >= page_size, got {self.lengths}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.mode not in ("linear", "quest"):
            raise ValueError(f"mode must be 'linear' or 'quest', got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def n_pages(self, t: int) -> int:
        """Selected pages P per KV head at length T (public, fixed)."""
        tokens = self.budget * t if self.budget < 1 else self.budget
        return max(1, min(math.ceil(t / self.page_size), int(tokens) // self.page_size))


def _graph_median_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Median CUDA-event time of replaying ``fn`` as a CUDA graph, L2 flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")               # > L2 (50-60 MB)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in events]).median())


def _median_ms(fn: Callable[[], object], graph: bool) -> float:
    from triton.testing import do_bench

    if graph:
        return _graph_median_ms(fn)
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))                # flushes L2 too


def _step(q, k, v, lo, hi, n_pages: int, cfg: KernelBenchConfig, backend: str) -> torch.Tensor:
    """One decode step of query-aware page selection: score, top-k, sparse attention."""
    score = kernels.cluster_scores(q, lo, hi, cfg.mode, backend=backend)             # (B, Hkv, C)
    idx = score.topk(n_pages, dim=-1, sorted=False).indices.to(torch.int32)           # (B, Hkv, P)
    return kernels.sparse_decode_attention(q, k, v, idx, cfg.page_size, backend=backend)


def _random_qkv(t: int, cfg: KernelBenchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random CUDA decode inputs in cfg.dtype: q (B, H, D), k and v (B, Hkv, T, D)."""
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed + t)
    dt = DTYPES[cfg.dtype]
    b, h, hkv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    q = torch.randn(b, h, d, device="cuda", dtype=dt, generator=gen)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dt, generator=gen)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dt, generator=gen)
    return q, k, v


def bench_length(t: int, cfg: KernelBenchConfig) -> dict:
    """Median times (ms) and errors at one context length."""
    q, k, v = _random_qkv(t, cfg)
    b, h, hkv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    lo, hi = kernels.page_minmax(k, cfg.page_size)
    p = cfg.n_pages(t)
    score = kernels.cluster_scores(q, lo, hi, cfg.mode)                               # (B, Hkv, C)
    idx = score.topk(p, dim=-1).indices.to(torch.int32)
    qf = q.view(b, hkv, h // hkv, d)                                                  # (B, Hkv, G, D)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qf, k, v)

    cases = {
        "sdpa": sdpa,
        "torch": lambda: _step(q, k, v, lo, hi, p, cfg, "torch"),
        "triton": lambda: _step(q, k, v, lo, hi, p, cfg, "triton"),
        "torch_attn": lambda: kernels.sparse_decode_attention(q, k, v, idx, cfg.page_size, backend="torch"),
        "triton_attn": lambda: kernels.sparse_decode_attention(q, k, v, idx, cfg.page_size, backend="triton"),
        "triton_full": lambda: kernels.sparse_decode_attention(q, k, v, None, cfg.page_size, backend="triton"),
        "triton_score": lambda: kernels.cluster_scores(q, lo, hi, cfg.mode, backend="triton"),
        "topk": lambda: score.topk(p, dim=-1, sorted=False),
        "triton_score_quest": lambda: kernels.cluster_scores(q, lo, hi, "quest", backend="triton"),
        "triton_head_logits": lambda: kernels.head_logits(q, k, backend="triton"),
        "page_minmax": lambda: kernels.page_minmax(k, cfg.page_size, backend="triton"),
    }
    row: dict = {"T": t, "pages": p, "tokens": min(t, p * cfg.page_size)}
    for graph in (False, True) if cfg.cuda_graphs else (False,):
        tag = "graph" if graph else "eager"
        row[tag] = {name: _median_ms(fn, graph) for name, fn in cases.items()}
    ref = kernels.sparse_decode_attention(q, k, v, idx, cfg.page_size, backend="torch").float()
    out = kernels.sparse_decode_attention(q, k, v, idx, cfg.page_size, backend="triton").float()
    full = kernels.sparse_decode_attention(q, k, v, None, cfg.page_size, backend="triton").float()
    row["max_abs_err_triton_vs_torch"] = (out - ref).abs().max().item()
    row["max_abs_err_full_triton_vs_sdpa"] = (full - sdpa().float().view(b, h, d)).abs().max().item()
    return row


def _speedups(times: dict) -> dict:
    return {"torch": times["sdpa"] / times["torch"], "triton": times["sdpa"] / times["triton"],
            "triton_attn": times["sdpa"] / times["triton_attn"],
            "triton_vs_full": times["triton_full"] / times["triton"],
            "triton_attn_vs_full": times["triton_full"] / times["triton_attn"]}


def markdown(report: dict) -> str:
    """The report as a Markdown page (one table per timing mode)."""
    cfg = report["config"]
    lines = [f"# Sparse decode attention kernels — {report['gpu']}", "",
             f"torch {report['torch']}, triton {report['triton']}, {cfg['dtype']}, B={cfg['batch']}, "
             f"H={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, page {cfg['page_size']}, "
             f"score `{cfg['mode']}`, budget {report['budget_rule']}. Median ms per decode step "
             "(one layer), L2 flushed before each run. ×: SDPA full-attention time / time; ×full: time of the "
             "Triton split-K kernel over *all* pages (dense flash-decoding) / time.", ""]
    for tag in [m for m in ("eager", "graph") if m in report["rows"][0]]:
        lines += [f"## {tag} ({'CUDA graph replay' if tag == 'graph' else 'eager launches'})", "",
                  "| T | tokens | SDPA | Triton full | torch step | Triton step | Triton attn | score | top-k | "
                  "Quest score | TokenSelect logits | ×torch | ×Triton | ×Triton attn | ×full Triton | "
                  "×full Triton attn |",
                  "|" + "---|" * 16]
        for r in report["rows"]:
            m, s = r[tag], r["speedup_" + tag]
            lines.append(f"| {r['T']} | {r['tokens']} | {m['sdpa']:.4f} | {m['triton_full']:.4f} | {m['torch']:.4f} | "
                         f"{m['triton']:.4f} | {m['triton_attn']:.4f} | {m['triton_score']:.4f} | {m['topk']:.4f} | "
                         f"{m['triton_score_quest']:.4f} | {m['triton_head_logits']:.4f} | "
                         f"{s['torch']:.2f} | {s['triton']:.2f} | {s['triton_attn']:.2f} | "
                         f"{s['triton_vs_full']:.2f} | {s['triton_attn_vs_full']:.2f} |")
        lines.append("")
    errs = ", ".join(f"T={r['T']}: {r['max_abs_err_triton_vs_torch']:.1e} / {r['max_abs_err_full_triton_vs_sdpa']:.1e}"
                     for r in report["rows"])
    lines += [f"Max abs error, Triton sparse vs torch fallback / Triton over all pages vs SDPA: {errs}.", ""]
    return "\n".join(lines)


def run(cfg: KernelBenchConfig) -> dict:
    """Benchmark every length, write kv_kernels.json and kv_kernels.md under cfg.out, return the report."""
    if not torch.cuda.is_available() or not kernels.HAS_TRITON:
        raise SystemExit("kv_kernels needs a CUDA GPU and triton")
    import triton

    rows = []
    for t in cfg.lengths:
        row = bench_length(t, cfg)
        for tag in ("eager", "graph"):
            if tag in row:
                row["speedup_" + tag] = _speedups(row[tag])
        logger.info("T=%d done", t)
        rows.append(row)
        torch.cuda.empty_cache()
    rule = f"{cfg.budget:g}·T tokens" if cfg.budget < 1 else f"{int(cfg.budget)} tokens"
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "budget_rule": rule, "config": asdict(cfg), "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_kernels.json").write_text(json.dumps(report, indent=2))
    (out / "kv_kernels.md").write_text(markdown(report))
    return report


def bench_quant_length(t: int, cfg: KernelBenchConfig, bits: int = 2, group: int = 32, residual: int = 128) -> dict:
    """One decode step's attention over a KIVI cache of T slots (plaintext_ref.kernels.quant_attention): median ms
    of SDPA over the fp K/V, torch dequantize-then-attend, the torch fallback on the codes and the fused Triton
    kernel (eager launches), the cache bytes, and the kernels' max abs errors vs dequantize-then-attend."""
    q, k, v = _random_qkv(t, cfg)
    dt = DTYPES[cfg.dtype]
    b, h, hkv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    cache = QuantKV.from_dense(k, v, KIVI(bits=bits, group_size=group, residual_length=residual))
    qf = q.view(b, hkv, h // hkv, d)                                                  # (B, Hkv, G, D)

    def dequantize_then_attend() -> torch.Tensor:
        k_hat, v_hat = cache.dequantize()
        return F.scaled_dot_product_attention(qf, k_hat.to(dt), v_hat.to(dt)).view(b, h, d)

    cases = {"sdpa_fp": lambda: F.scaled_dot_product_attention(qf, k, v),
             "dequant_sdpa": dequantize_then_attend,
             "torch_codes": lambda: quant_decode_attention(q, cache, backend="torch"),
             "triton_fused": lambda: quant_decode_attention(q, cache, backend="triton")}
    ref = dequantize_then_attend().float()
    errs = {name: (cases[name]().float() - ref).abs().max().item() for name in ("torch_codes", "triton_fused")}
    packed = sum(x.numel() * x.element_size() for x in vars(cache).values() if isinstance(x, torch.Tensor))
    return {"T": t, "bits": bits, "group": group, "residual": residual,
            "ms": {name: _median_ms(fn, False) for name, fn in cases.items()},
            "cache_bytes": packed, "fp_bytes": 2 * k.numel() * k.element_size(), "max_abs_err": errs}


def run_quant(cfg: KernelBenchConfig, bits: int = 2) -> dict:
    """bench_quant_length at every length; writes kv_quant_attention.json/.md under cfg.out."""
    if not torch.cuda.is_available() or not kernels.HAS_TRITON:
        raise SystemExit("kv_kernels --quant needs a CUDA GPU and triton")
    rows = [bench_quant_length(t, cfg, bits) for t in cfg.lengths]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": asdict(cfg), "rows": rows}
    first = rows[0]
    lines = [f"# Fused dequantize-attention (KIVI {bits}-bit, G={first['group']}, R={first['residual']}) — "
             f"{report['gpu']}", "",
             f"{cfg.dtype}, B={cfg.batch}, H={cfg.heads}, Hkv={cfg.kv_heads}, D={cfg.head_dim}. Median ms of one "
             "decode step's attention (one layer, eager launches, L2 flushed); bytes of one layer's K/V.", "",
             "| T | SDPA fp | dequant + SDPA | torch on codes | Triton fused | ×fused vs dequant | KIVI bytes | "
             "fp bytes | err torch | err Triton |", "|" + "---|" * 10]
    for r in rows:
        m = r["ms"]
        lines.append(f"| {r['T']} | {m['sdpa_fp']:.4f} | {m['dequant_sdpa']:.4f} | {m['torch_codes']:.4f} | "
                     f"{m['triton_fused']:.4f} | {m['dequant_sdpa'] / m['triton_fused']:.2f} | {r['cache_bytes']} | "
                     f"{r['fp_bytes']} | {r['max_abs_err']['torch_codes']:.1e} | "
                     f"{r['max_abs_err']['triton_fused']:.1e} |")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant_attention.json").write_text(json.dumps(report, indent=2))
    (out / "kv_quant_attention.md").write_text("\n".join(lines) + "\n")
    return report


def _length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8K,16K,32K,64K,128K", help="comma-separated T, e.g. 8K,32K,131072")
    parser.add_argument("--budget", type=float, default=4096, help="selected tokens per KV head; < 1: fraction of T")
    parser.add_argument("--mode", default="linear", choices=["linear", "quest"], help="page score of the step")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--out", default="benchmarks/reports", help="folder for kv_kernels.json/.md")
    parser.add_argument("--quant", type=int, metavar="BITS", help="instead: the fused KIVI dequantize-attention "
                        "kernel at BITS bits (writes kv_quant_attention.json/.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = KernelBenchConfig(lengths=tuple(_length(x) for x in args.lengths.split(",")), budget=args.budget,
                            mode=args.mode, dtype=args.dtype, cuda_graphs=not args.no_graphs, out=args.out)
    if args.quant:
        run_quant(cfg, args.quant)
        print((Path(cfg.out) / "kv_quant_attention.md").read_text())
        return
    print(markdown(run(cfg)))


if __name__ == "__main__":
    main()
