"""What one protocol round costs next to the bare collective it is built on (2 parties, one host).

Per size n (int64 elements), device and correlation source, the median over ``--reps`` of:

- ``bare``: ``torch.distributed.all_reduce`` of n elements on the parties' gloo group (the wire);
- ``bare 2n``: the same with 2n elements (what a product's round opens: x − a and y − b);
- ``comm``: CrypTen's communicator ``all_reduce`` (the same collective + its accounting);
- ``product``: one Beaver product of two (1, n) fixed-point secrets with CrypTen's local truncation
  (1 round: the opening of x − a and y − b);
- ``truncation``: one exact truncation of a (1, n) secret (``protocols.truncation``, 1 round);
- ``product+trunc``: the default product (2 rounds), reported per round;
- ``raw product``: the decoder's hot path, one batched Beaver product on plain ring shares
  (``protocols.rounds.mul_many``, no truncation, 1 round);
- ``look-up``: one table look-up of N = 512 entries per element (``protocols.lut``, 1 round).

``overhead`` = per-round time / the bare all-reduce of the elements that round opens (``bare 2n``
for the products, ``bare`` otherwise). Correlations (``--dealer``):

- ``tfp``: made inline by party 0 inside the timed call (CrypTen's TFP, NOT secure against party 0);
- ``tape``: the secure ``-n 3`` mode: a separate dealer ships each repetition's corrections in one
  message before it starts (``protocols.tape``; each repetition is one tape step, predicted from the
  previous two), so the timer sees only the online round (own seeded draws, the opening, local work).

The machine is named in the report. Rows merge into ``--out`` by device and correlation source.

    python -m benchmarks.transport --sizes 1 576 100000 --device cpu --dealer tape
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
from protocols.dealer import serve

REPORTS = Path(__file__).resolve().parent / "reports"
OPS = ("bare", "bare 2n", "comm", "product", "truncation", "product+trunc", "raw product", "look-up")
ROUNDS = {"product+trunc": 2}  # every other op is one round
BASE = {"product": "bare 2n", "product+trunc": "bare 2n", "raw product": "bare 2n"}  # what the round opens
DEALERS = ("tfp", "tape")


def _party(sizes: list[int], reps: int, device: str) -> dict:
    import torch.distributed as dist

    from protocols.compat import comm, crypten
    from protocols.config import ProtocolConfig, protocol_context
    from protocols.lut import Request, lookup_many, table
    from protocols.rounds import mul_many, share_of
    from protocols.tape import step

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        t = torch.ones(n, dtype=torch.long, device=dev)
        t2 = torch.ones(2 * n, dtype=torch.long, device=dev)
        x = crypten.cryptensor(torch.rand(1, n), src=0, device=dev)
        y = crypten.cryptensor(torch.rand(1, n), src=1, device=dev)
        xs, ys = share_of(x), share_of(y)
        relu = table([lambda c: c.clamp(min=0)], shift=12, low=-256, bits=9, in_frac=16, out_frac=16)
        cases = {
            "bare": (None, lambda: dist.all_reduce(t, group=comm.get().main_group)),
            "bare 2n": (None, lambda: dist.all_reduce(t2, group=comm.get().main_group)),
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
                    with step(f"transport {name} {n}"):  # tape: this repetition's corrections arrive here
                        dist.barrier(group=comm.get().main_group)
                        sync()
                        t0 = time.perf_counter()
                        fn()
                        sync()
                        if i >= 3:  # warm-up (and the tape's two steps of history)
                            times.append(time.perf_counter() - t0)
            row[name] = statistics.median(times) / ROUNDS.get(name, 1) * 1e3
        out[str(n)] = row
    return out


def machine(device: str) -> str:
    cpu = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    return f"{cpu}{gpu}, torch {torch.__version__}"


def _overhead(r: dict, op: str) -> str:
    base = BASE.get(op, "bare")
    return f"{r[op] / r[base]:.1f}×" if op in r and base in r else "—"


def to_markdown(rows: dict) -> str:
    lines = ["# Transport: one protocol round vs the bare collective", "",
             "Two parties on one host (gloo over loopback), median ms per round; overhead = per-round "
             "ms / the bare all_reduce of the elements the round opens (`bare 2n` for the products, "
             "`bare` otherwise). `product`: a Beaver product with CrypTen's local truncation (1 round); "
             "`truncation`: the exact truncation (1 round); `product+trunc`: the default product "
             "(2 rounds, per round); `raw product`: a batched Beaver product on ring shares "
             "(``protocols.rounds``, the decoder's hot path); `look-up`: a 512-entry table look-up "
             "(``protocols.lut``: its local work is the n × 512 rotation of the one-hot shares). "
             "Correlations: `tfp` = made by party 0 inside the timed call (insecure benchmark mode); "
             "`tape` = the secure `-n 3` mode, the dealer's corrections for each repetition sent in one "
             "message before it (offline), so the time is the online round. Regenerate: "
             "`python -m benchmarks.transport --device cpu --dealer tape` (see --help).", ""]
    for key, entry in rows.items():
        lines += [f"## {key}: {entry['machine']}", "",
                  "| n | " + " | ".join(f"{op} ms" for op in OPS) + " | " +
                  " | ".join(f"{op} overhead" for op in OPS[1:]) + " |",
                  "|---|" + "---|" * (2 * len(OPS) - 1)]
        for n, r in entry["sizes"].items():  # an op measured before it was added shows as —
            lines.append(f"| {int(n):,} | " + " | ".join(f"{r[op]:.3f}" if op in r else "—" for op in OPS) + " | " +
                         " | ".join(_overhead(r, op) for op in OPS[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 576, 100_000])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dealer", choices=DEALERS, default="tfp",
                   help="where correlations come from: party 0 inline (tfp) or the -n 3 dealer's tape")
    p.add_argument("--out", type=Path, default=REPORTS / "transport.json")
    args = p.parse_args()
    tape = args.dealer == "tape"
    sizes = run_parties(_party, args.sizes, args.reps, args.device, dealer=tape, dealer_main=serve if tape else None,
                        timeout=1800)[0]
    rows = json.loads(args.out.read_text()) if args.out.exists() else {}
    key = f"{args.device}, {args.dealer}"
    rows[key] = {"machine": machine(args.device), "sizes": sizes}
    args.out.write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
