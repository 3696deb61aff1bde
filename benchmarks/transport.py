"""What one protocol round costs next to the bare collective it is built on (2 parties, one host).

Per size n (int64 elements) and device, the median over ``--reps`` of:

- ``bare``: ``torch.distributed.all_reduce`` of n elements on the parties' gloo group (the wire);
- ``comm``: CrypTen's communicator ``all_reduce`` (the same collective + its accounting);
- ``product``: one Beaver product of two (1, n) fixed-point secrets with CrypTen's local truncation
  (1 round: the opening of x − a and y − b);
- ``truncation``: one exact truncation of a (1, n) secret (``protocols.truncation``, 1 round);
- ``product+trunc``: the default product (2 rounds), reported per round;
- ``raw product``: the decoder's hot path, one batched Beaver product on plain ring shares
  (``protocols.rounds.mul_many``, no truncation, 1 round);
- ``look-up``: one table look-up of N = 512 entries per element (``protocols.lut``, 1 round).

``overhead`` = per-round time / ``bare`` of the same n. Under TFP (correlations made locally by
party 0); the machine is named in the report. Rows merge into ``--out`` by device.

    python -m benchmarks.transport --sizes 1 576 100000 --device cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from launch.local import run_parties

REPORTS = Path(__file__).resolve().parent / "reports"
OPS = ("bare", "comm", "product", "truncation", "product+trunc", "raw product", "look-up")
ROUNDS = {"bare": 1, "comm": 1, "product": 1, "truncation": 1, "product+trunc": 2, "raw product": 1, "look-up": 1}


def _party(sizes: list[int], reps: int, device: str) -> dict:
    import torch.distributed as dist

    from protocols.compat import comm, crypten
    from protocols.config import ProtocolConfig, protocol_context
    from protocols.lut import Request, lookup_many, table
    from protocols.rounds import mul_many, share_of

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        t = torch.ones(n, dtype=torch.long, device=dev)
        x = crypten.cryptensor(torch.rand(1, n), src=0, device=dev)
        y = crypten.cryptensor(torch.rand(1, n), src=1, device=dev)
        xs, ys = share_of(x), share_of(y)
        relu = table([lambda c: c.clamp(min=0)], shift=12, low=-256, bits=9, in_frac=16, out_frac=16)
        cases = {
            "bare": (None, lambda: dist.all_reduce(t, group=comm.get().main_group)),
            "comm": (None, lambda: comm.get().all_reduce(t)),
            "product": ("local", lambda: x * y),
            "truncation": ("exact", lambda: x.div(2**16)),
            "product+trunc": ("exact", lambda: x * y),
            "raw product": ("exact", lambda: mul_many([(xs, ys)])),
            "look-up": ("exact", lambda: lookup_many([Request(xs, relu)])),
        }
        row = {}
        for name, (trunc, fn) in cases.items():
            with protocol_context(ProtocolConfig(truncation=trunc or "exact")):
                times = []
                for i in range(reps + 3):
                    dist.barrier(group=comm.get().main_group)
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if i >= 3:  # warm-up
                        times.append(time.perf_counter() - t0)
            row[name] = statistics.median(times) / ROUNDS[name] * 1e3
        out[str(n)] = row
    return out


def machine(device: str) -> str:
    cpu = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    return f"{cpu}{gpu}, torch {torch.__version__}"


def to_markdown(rows: dict) -> str:
    lines = ["# Transport: one protocol round vs the bare collective", "",
             "Two parties on one host (gloo over loopback), TFP, median ms per round; "
             "overhead = per-round ms / bare all_reduce of the same size. `product`: a Beaver "
             "product with CrypTen's local truncation (1 round); `truncation`: the exact truncation "
             "(1 round); `product+trunc`: the default product (2 rounds, per round); `raw product`: "
             "a batched Beaver product on ring shares (``protocols.rounds``, the decoder's hot path); "
             "`look-up`: a 512-entry table look-up (``protocols.lut``).", ""]
    for device, entry in rows.items():
        lines += [f"## {device}: {entry['machine']}", "",
                  "| n | " + " | ".join(f"{op} ms" for op in OPS) + " | " +
                  " | ".join(f"{op} overhead" for op in OPS[1:]) + " |",
                  "|---|" + "---|" * (2 * len(OPS) - 1)]
        for n, r in entry["sizes"].items():  # an op measured before it was added shows as —
            lines.append(f"| {int(n):,} | " + " | ".join(f"{r[op]:.3f}" if op in r else "—" for op in OPS) + " | " +
                         " | ".join(f"{r[op] / r['bare']:.1f}×" if op in r else "—" for op in OPS[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 576, 100_000])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=REPORTS / "transport.json")
    args = p.parse_args()
    sizes = run_parties(_party, args.sizes, args.reps, args.device, timeout=1800)[0]
    rows = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows[args.device] = {"machine": machine(args.device), "sizes": sizes}
    args.out.write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
