"""Cost of one private token: fixed-mask weights (ours) vs stock CrypTen, on real 2-party MPC.

For each model (SmolLM2-135M, a GPT-2-small-shaped model with seeded random weights) and mode
(``fixed``: ``share_model(fixed_masks=True)``; ``stock``: ``fixed_masks=False``, CrypTen's Beaver
matmul on every secret weight and on K/V), runs a P-token prompt then N decode steps through
``mpcache.generate.generate`` on ``launch.local.run_parties`` and records, from the aggregated
``CostMeter``: set-up (weight sharing, once per model), prefill (P tokens → first token) and decode
per token (bytes on the wire, rounds, seconds) with the decode stage breakdown, plus a projection
``T = compute + 8·bytes / bandwidth + rounds·RTT`` to LAN and WAN. Prompt ids are seeded random
(costs do not depend on their values). Rows merge into ``--out`` by (model, mode, device); the
Markdown report is written next to it.

    python -m benchmarks.secure_inference --models smollm2 gpt2-small --modes fixed stock
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from launch.local import run_parties
from protocols.dealer import serve

logger = logging.getLogger(__name__)

MODELS = ("smollm2", "gpt2-small")
MODES = ("fixed", "stock")
NETWORKS = {"LAN": (5e9, 1e-3), "WAN": (400e6, 40e-3)}  # bits/s, RTT s (LAN = PUMA's setting)
PUBLISHED = [  # /work/shared/research/mpc_anchors.md §7-8 (GPT2-base, 32-token prompt -> 1 token)
    ("PUMA", "3PC RSS, CPU, 5 Gbps / 1 ms", "GPT2-base 32 → 1 tok", 15.51, 3.77e9),
    ("MPCFormer on CrypTen (re-run by PUMA)", "2PC + dealer, 5 Gbps / 1 ms", "GPT2-base 32 → 1 tok",
     34.89, 5.00e9),
]
WEIGHT_SEED = 0


def build_model(name: str, owner: bool):
    """-> (state_dict or None, HF config). ``gpt2-small``: GPT2Config(768, 12 layers, 12 heads,
    V=50257, 1024 positions) with HF's initialisation under ``torch.manual_seed(0)`` (random, no download)."""
    if name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        if not owner:
            return None, config
        torch.manual_seed(WEIGHT_SEED)
        return GPT2LMHeadModel(config).eval().state_dict(), config
    from plaintext_ref.models import load_model
    model, _, config = load_model(name)
    return (model.state_dict() if owner else None), config


def party(name: str, mode: str, n_prompt: int, n_new: int, device: str) -> dict:
    """One party's run; returns the aggregated costs (every party gets the same report)."""
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from protocols.compat import comm

    rank = comm.get().get_rank()
    state, config = build_model(name, owner=rank == 1)
    args = ModelArgs.from_hf(config)
    session = PrivateSession(state, args, device=device, fixed_masks=mode == "fixed")
    del state
    ids = torch.randint(0, args.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    gen = session.generate(ids if rank == 0 else None, n_prompt, n_new + 1)
    return {"report": session.costs(), "tokens": gen.tokens, "threads": torch.get_num_threads(),
            "params": matrix_params(args)}


def matrix_params(args) -> int:
    """|W| summed over the weight operands (the stock per-token estimate is 16·|W| bytes per party)."""
    from mpcache.model import shared_shapes
    return sum(math.prod(s) for k, s in shared_shapes(args).items() if len(s) == 2 and k != "pos")


def row_of(name: str, mode: str, device: str, n_prompt: int, n_new: int, result: dict,
           elapsed_s: float) -> dict:
    report = result["report"]

    def cost(phase: str, per_token: bool = False) -> dict:
        r = report.row(phase)
        r = r.per_token() if per_token else r
        out = {"wire_bytes": r.wire_bytes, "party_bytes": r.party_bytes, "rounds": r.rounds,
               "wall_s": r.wall_s, "comm_s": r.comm_s, "compute_s": r.compute_s}
        out.update({f"{net}_s": r.project(*NETWORKS[net]) for net in NETWORKS})
        return out

    stages = {r.stage: {"wire_bytes": r.per_token().wire_bytes, "rounds": r.per_token().rounds,
                        "wall_s": r.per_token().wall_s}
              for r in report.rows if r.phase == "decode" and r.stage != "total"}
    return {"model": name, "mode": mode, "device": device, "prompt_tokens": n_prompt,
            "new_tokens": n_new, "provider": report.provider, "secure": report.secure,
            "threads_per_party": result["threads"], "matrix_params": result["params"],
            "setup": cost("setup"), "prefill": cost("prefill"),
            "decode_per_token": cost("decode", per_token=True) if n_new else None,
            "decode_stages": stages, "tokens": result["tokens"], "elapsed_s": elapsed_s}


def machine(device: str) -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"cpu": cpu, "gpu": gpu, "torch": torch.__version__}


def merge(path: Path, rows: list[dict], device: str, info: dict) -> dict:
    """Rows of ``path`` (if any) with ``rows`` replacing those of the same (model, mode, device, provider)."""
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "machines": {}}

    def key(r: dict) -> tuple:
        return r["model"], r["mode"], r["device"], r["provider"]

    keep = {key(r) for r in rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in keep] + rows
    data["machines"][device] = info
    data["networks"] = {k: {"bandwidth_bps": b, "rtt_s": t} for k, (b, t) in NETWORKS.items()}
    return data


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def markdown(data: dict) -> str:
    """The report: machine, side-by-side table, fixed/stock ratios, decode stages, published anchors."""
    lines = ["# Secure inference: one private token, fixed masks vs stock CrypTen", ""]
    for dev, m in data["machines"].items():
        lines.append(f"- {dev}: CPU {m['cpu']}" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
                     + f", torch {m['torch']}" + (f" — {m['note']}" if m.get("note") else ""))
    nets = ", ".join(f"{k} {v['bandwidth_bps'] / 1e9:g} Gbps / {v['rtt_s'] * 1e3:g} ms RTT"
                     for k, v in data["networks"].items())
    lines += [f"- 2 parties on one host (gloo over loopback); projection T = compute + 8·bytes/BW + "
              f"rounds·RTT with {nets}.",
              "- MB = wire bytes (mean of the two parties' logged sent+received bytes, CrypTen's "
              "convention) / 1e6. Provider TFP = correlations generated locally (NOT secure; the "
              "dealer's traffic is not counted); TTP = a separate dealer process (``-n 3``, secure against "
              "either party; its traffic is logged by party 0 and included, see protocols.cost).", "",
              "| model | mode | dev | provider | P | setup MB | setup s | prefill MB | prefill rounds | prefill s "
              "| prefill LAN s | decode MB/tok | decode rounds/tok | decode s/tok | decode LAN s/tok "
              "| decode WAN s/tok |", "|" + "---|" * 16]
    rows = sorted(data["rows"], key=lambda r: (r["model"], r["device"], r["provider"], r["mode"]))
    for r in rows:
        s, p, d = r["setup"], r["prefill"], r["decode_per_token"] or {}
        lines.append(f"| {r['model']} | {r['mode']} | {r['device']} | {r['provider']} | {r['prompt_tokens']} | "
                     f"{_mb(s['wire_bytes'])} | {s['wall_s']:.1f} | {_mb(p['wire_bytes'])} | "
                     f"{p['rounds']:g} | {p['wall_s']:.1f} | {p['LAN_s']:.1f} | "
                     f"{_mb(d.get('wire_bytes', 0))} | {d.get('rounds', 0):g} | {d.get('wall_s', 0):.2f} | "
                     f"{d.get('LAN_s', 0):.2f} | {d.get('WAN_s', 0):.2f} |")
    lines += ["", "## Stock / fixed ratio (same model, device, context)", "",
              "| model | dev | provider | P | prefill bytes | decode bytes/tok | decode s/tok (here) "
              "| decode LAN s/tok |", "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["device"], r["provider"], r["mode"]): r for r in rows}
    for (model, dev, provider, mode), fixed in by_key.items():
        stock = by_key.get((model, dev, provider, "stock"))
        if mode != "fixed" or stock is None or stock["prompt_tokens"] != fixed["prompt_tokens"]:
            continue
        fd, sd = fixed["decode_per_token"], stock["decode_per_token"]
        ratio = (lambda a, b: f"{a / b:.1f}×" if b else "—")
        lines.append(f"| {model} | {dev} | {provider} | {fixed['prompt_tokens']} | "
                     f"{ratio(stock['prefill']['wire_bytes'], fixed['prefill']['wire_bytes'])} | "
                     f"{ratio(sd['wire_bytes'], fd['wire_bytes'])} | {ratio(sd['wall_s'], fd['wall_s'])} | "
                     f"{ratio(sd['LAN_s'], fd['LAN_s'])} |")
    lines += ["", "## Decode stages per token (MB / rounds / s)", ""]
    for r in rows:
        parts = [f"{k} {_mb(v['wire_bytes'])} / {v['rounds']:g} / {v['wall_s']:.2f}"
                 for k, v in r["decode_stages"].items()]
        lines.append(f"- {r['model']} {r['mode']} {r['device']} {r['provider']}: " + "; ".join(parts))
    lines += ["", "## Published anchors (published, different systems/settings: for context only)", "",
              "| system | setting | workload | latency s | comm GB |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {t:.2f} | {g / 1e9:.2f} |" for a, b, c, t, g in PUBLISHED]
    lines += ["", "Their 32 → 1 figure is one prefill of 32 tokens; compare with the prefill columns "
              "(setup listed apart: a one-time cost per model, not per request).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=1, help="decode steps after the prefill's token")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dealer", action="store_true", help="separate TTP dealer process (secure)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per (model, mode) run")
    p.add_argument("--out", default="benchmarks/reports/secure_inference.json")
    ns = p.parse_args(argv)
    if ns.prompt_tokens < 1 or ns.new_tokens < 0:
        p.error("need --prompt-tokens >= 1 and --new-tokens >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine(ns.device)
    for name in ns.models:
        for mode in ns.modes:
            t0 = time.perf_counter()
            result = run_parties(party, name, mode, ns.prompt_tokens, ns.new_tokens, ns.device,
                                 dealer=ns.dealer, dealer_main=serve if ns.dealer else None,
                                 timeout=ns.timeout)[0]
            row = row_of(name, mode, ns.device, ns.prompt_tokens, ns.new_tokens, result,
                         time.perf_counter() - t0)
            data = merge(out, [row], ns.device, info)
            out.write_text(json.dumps(data, indent=2))
            out.with_suffix(".md").write_text(markdown(data))
            logger.info("%s %s %s: prefill %.1f MB %.1f s, decode %.1f MB/tok %.2f s/tok", name, mode,
                        ns.device, row["prefill"]["wire_bytes"] / 1e6, row["prefill"]["wall_s"],
                        (row["decode_per_token"] or {}).get("wire_bytes", 0) / 1e6,
                        (row["decode_per_token"] or {}).get("wall_s", 0))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
