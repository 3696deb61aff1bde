"""Per-token decode cost (wire bytes, rounds, seconds) of every MPC KV policy vs context length.

SIMULATION PREFILL (NOT PRIVATE, as the MPCache authors' artifact): the client computes the KV cache
of the first ``--layers`` SmolLM2 layers in plaintext and secret-shares it with the window queries;
static eviction (window attention, top-k, compaction) and every decode step then run in MPC
(``mpcache.policy.simulate``). A real MPC prefill is measured separately at ``--real-prefill``.

Per (policy, T0): ``--new-tokens`` decode steps (forward + secure argmax); per-token bytes and rounds
(exact, deterministic), median step seconds, and the projection ``compute + 8·bytes/bw + rounds·RTT``
on LAN and WAN. The constant head (embedding, final norm, LM head, argmax) is reported apart; the
"extrapolated" 30-layer cost is head + (decode − head)/L · 30 (every layer selecting); for ``mpcache``
the "with sharing" figure also subtracts the selection stage (``kv_select``/L) of each of the layers
that reuse their partner's indices under the default pattern (14 of 30; with L = 2 no layer shares,
so sharing itself is only extrapolated; the stage's wall seconds count as saved compute, a slight
overestimate next to bytes and rounds, which dominate the projections).

Budgets: every baseline attends as many tokens per decode step as MPCache (defaults) at that T0
(``MPCache.describe(T0)["attended_last_step"]``). Ablation names: mpcache-static (static eviction
only: no dynamic selection), mpcache-dyn1 (+ dynamic, one level of 16-token clusters, ratio 0.2),
mpcache-hier (+ hierarchy, defaults without sharing), mpcache (+ cross-layer sharing, the default).

    python -m benchmarks.mpcache_cost --lengths 512,1024 --policies full,mpcache --layers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from protocols.config import ProtocolConfig, active_config, protocol_context

log = logging.getLogger(__name__)

REPORTS = Path(__file__).resolve().parent / "reports"
MODEL = "smollm2"
FULL_LAYERS = 30
LAN = {"name": "LAN", "bandwidth_bps": 1e9, "rtt_s": 0.5e-3}
WAN = {"name": "WAN", "bandwidth_bps": 100e6, "rtt_s": 40e-3}
BASELINES = ("full", "mpcache", "streaming_llm", "h2o", "snapkv", "quest")
ABLATION = ("mpcache-static", "mpcache-dyn1", "mpcache-hier")
HEAD_STAGES = ("embedding", "lm_head", "argmax")
PAPER = ("MPCache paper (Llama-2/LongChat, 2PC, LAN/WAN): 1.8–2.01× decode latency and 3.39–8.37× "
         "communication reduction vs the full cache")


def build_policy(name: str, meter, prompt_len: int):
    """The policy ``name`` (an MPCache ablation or a baseline) with the budget rule of the module
    docstring (all budgets public)."""
    from plaintext_ref.mpcache_config import MPCacheConfig
    from mpcache.policy import MPCache, get_policy
    configs = {"mpcache": MPCacheConfig(),
               "mpcache-hier": MPCacheConfig(share_layers=False),
               "mpcache-dyn1": MPCacheConfig(cluster_sizes=(16,), level_ratios=(0.2,), share_layers=False),
               "mpcache-static": MPCacheConfig(share_layers=False, dynamic_min_tokens=1 << 30)}
    if name in configs:
        return MPCache(meter, config=configs[name])
    budget = MPCache(config=MPCacheConfig()).describe(prompt_len)["attended_last_step"]
    if name == "full":
        return get_policy("full", meter)
    if name == "streaming_llm":
        return get_policy(name, meter, n_sink=4, n_recent=budget - 4)
    if name in ("h2o", "snapkv", "quest"):
        return get_policy(name, meter, budget=budget)
    raise ValueError(f"unknown policy {name!r}; choose from {BASELINES + ABLATION}")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n real-text token ids (this repository's Markdown, repeated if short; costs do not depend on
    the values, only the decoded tokens do)."""
    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = list(tokenizer(text)["input_ids"])
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def plaintext_kv(hf, ids: list[int], w: int) -> list[tuple]:
    """Client side: post-RoPE (K, V) and the last-w unscaled queries per layer (plaintext prefill)."""
    from plaintext_ref.policies.base import KVPolicy
    from plaintext_ref.runtime import RefCache, attached, step
    rec: dict[int, tuple] = {}
    n = len(ids)

    class Recorder(KVPolicy):
        needs = frozenset({"q"})

        def on_prefill(self, ctx, kv):
            rec[ctx.layer_idx] = (kv.k.clone(), kv.v.clone(), ctx.q[:, :, n - w:].clone() if w else None)
            return kv

    cache = RefCache(hf, Recorder())
    with torch.no_grad(), attached(hf):
        step(hf, cache, torch.tensor([ids]), torch.arange(n)[None], logits_to_keep=1)
    return [rec[i] for i in range(len(rec))]


def _phase_rows(report, phase: str, layers: int) -> dict:
    """Per-token numbers of one phase: total, head (constant), per layer, stage split."""
    rows = [r.per_token() for r in report.rows if r.phase == phase]
    by = {r.stage: r for r in rows}
    total = by["total"]
    norm = by.get("norm")
    n_norms = 2 * layers + 1

    def pack(b: float, rounds: float, comp: float) -> dict:
        return {"wire_bytes": b, "rounds": rounds, "compute_s": comp}

    hb = sum(by[s].wire_bytes for s in HEAD_STAGES if s in by) + (norm.wire_bytes / n_norms if norm else 0)
    hr = sum(by[s].rounds for s in HEAD_STAGES if s in by) + (norm.rounds / n_norms if norm else 0)
    hc = sum(by[s].compute_s for s in HEAD_STAGES if s in by) + (norm.compute_s / n_norms if norm else 0)
    per_layer = pack((total.wire_bytes - hb) / layers, (total.rounds - hr) / layers,
                     (total.compute_s - hc) / layers)
    return {"total": pack(total.wire_bytes, total.rounds, total.compute_s), "head": pack(hb, hr, hc),
            "per_layer": per_layer,
            "stages": {s: {"wire_bytes": r.wire_bytes, "rounds": r.rounds, "wall_s": r.wall_s}
                       for s, r in by.items() if s != "total"}}


def _delta(before, after, phase: str) -> dict:
    """Totals of ``phase`` recorded between two reports of one meter (per token for decode)."""
    def tot(report) -> tuple[float, float, float, int]:
        for r in report.rows:
            if r.phase == phase and r.stage == "total":
                return r.wire_bytes, r.rounds, r.compute_s, r.tokens
        return 0.0, 0.0, 0.0, 0
    (b0, r0, c0, n0), (b1, r1, c1, n1) = tot(before), tot(after)
    n = max(n1 - n0, 1) if phase == "decode" else 1
    return {"wire_bytes": (b1 - b0) / n, "rounds": (r1 - r0) / n, "compute_s": (c1 - c0) / n}


def _project(c: dict, net: dict) -> float:
    from protocols.cost import project
    return project(c["compute_s"], c["wire_bytes"], c["rounds"], net["bandwidth_bps"], net["rtt_s"])


def party_job(lengths: list[int], policies: list[str], layers: int, n_new: int, device: str,
              real_prefill: list[int], real_policies: list[str], comparison: str) -> list[dict]:
    """One party, under ``ProtocolConfig.comparison = comparison``: share the truncated model once,
    then one simulated run per (policy, T0)."""
    with protocol_context(dataclasses.replace(active_config(), comparison=comparison)):
        return [dict(r, comparison=comparison) for r in
                _party_runs(lengths, policies, layers, n_new, device, real_prefill, real_policies)]


def _party_runs(lengths: list[int], policies: list[str], layers: int, n_new: int, device: str,
                real_prefill: list[int], real_policies: list[str]) -> list[dict]:
    from mpcache.generate import next_token, share_tokens
    from mpcache.model import ModelArgs
    from mpcache.policy.simulate import prefill_from_plaintext_kv
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, tok, config = load_model(MODEL)
    hf.model.layers = hf.model.layers[:layers]
    hf.config.num_hidden_layers = layers
    args = dataclasses.replace(ModelArgs.from_hf(config), n_layers=layers,
                               max_seq_len=max(lengths + real_prefill) + n_new + 1)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args, device=device)
    meter, model = session.meter, session.model
    out = []
    for t in lengths:
        ids = prompt_ids(tok, t + 1)
        for name in policies:
            pol = build_policy(name, meter, t)
            seq = session.sequence(pol)
            w = pol.window(t)
            rec = plaintext_kv(hf, ids[:t], w) if rank == 0 else None
            tag = f"{len(out)}"
            t0 = time.perf_counter()
            with meter.phase(f"simprefill{tag}"):
                prefill_from_plaintext_kv(model, seq, t, [(k, v) for k, v, _ in rec] if rec else None,
                                          [q for _, _, q in rec] if rec and w else None)
            sim_s = time.perf_counter() - t0
            x = share_tokens([ids[t]] if rank == 0 else None, 1, args.vocab_size, device=device)
            steps = []
            for j in range(n_new):
                comm.get().barrier()
                t0 = time.perf_counter()
                with meter.phase(f"decode{tag}", tokens=1):
                    logits = model.forward(x, torch.tensor([t + j]), seq)
                    x, _, _ = next_token(logits, frozenset(), meter)
                steps.append(time.perf_counter() - t0)
            report = meter.aggregate()
            out.append({"policy": name, "length": t, "mode": "simulation", "step_s": steps, "sim_prefill_s": sim_s,
                        "decode": _phase_rows(report, f"decode{tag}", layers),
                        "sim_prefill": _phase_rows(report, f"simprefill{tag}", layers)["total"],
                        "describe": pol.describe(t, n_new), "provider": report.provider})
    for t in real_prefill:
        ids = prompt_ids(tok, t)
        for name in real_policies:
            pol = build_policy(name, meter, t)
            before = meter.aggregate()
            gen = session.generate(ids if rank == 0 else None, t, n_new + 1, policy=pol)
            after = meter.aggregate()
            pre, dec = _delta(before, after, "prefill"), _delta(before, after, "decode")
            out.append({"policy": name, "length": t, "mode": "real_prefill", "prefill": pre, "decode": dec,
                        "prefill_s": gen.prefill_s, "step_s": gen.decode_s, "describe": pol.describe(t, n_new),
                        "provider": after.provider})
    return out


def summarise(raw: dict, layers: int, device: str) -> dict:
    """Add medians, LAN/WAN projections and the 30-layer extrapolation to one party-0 record."""
    rec = dict(raw, device=device, layers=layers, model=MODEL)
    rec["median_step_s"] = statistics.median(raw["step_s"]) if raw["step_s"] else None
    dec = raw["decode"]
    if raw["mode"] == "simulation":
        head, layer = dec["head"], dec["per_layer"]
        ext = {k: head[k] + layer[k] * FULL_LAYERS for k in head}
        rec["extrapolated_30_layers"] = dict(ext, **{f"{n['name']}_s": _project(ext, n) for n in (LAN, WAN)})
        if raw["policy"] == "mpcache":
            from plaintext_ref.mpcache_config import MPCacheConfig
            shared = sum(MPCacheConfig().shares_with(l) is not None for l in range(FULL_LAYERS))
            sel = dec["stages"].get("kv_select", {"wire_bytes": 0.0, "rounds": 0.0, "wall_s": 0.0})
            saved = {"wire_bytes": sel["wire_bytes"], "rounds": sel["rounds"], "compute_s": sel["wall_s"]}
            shr = {k: ext[k] - shared * saved[k] / layers for k in ext}
            rec["extrapolated_30_layers_shared"] = dict(shr, shared_layers=shared,
                                                        **{f"{n['name']}_s": _project(shr, n) for n in (LAN, WAN)})
        rec["decode"] = dict(dec, **{f"{n['name']}_s": _project(dec["total"], n) for n in (LAN, WAN)})
    else:
        rec["decode"] = dict(dec, **{f"{n['name']}_s": _project(dec, n) for n in (LAN, WAN)})
        rec["prefill"] = dict(raw["prefill"], **{f"{n['name']}_s": _project(raw["prefill"], n) for n in (LAN, WAN)})
    return rec


def _key(r: dict) -> tuple:
    return r["policy"], r["length"], r["device"], r["layers"], r["mode"], _comparison(r)


def _comparison(r: dict) -> str:
    """The selection's comparisons of a record (records before the option used CrypTen's)."""
    return r.get("comparison", "crypten")


CMP_LABEL = {"crypten": "CrypTen cmp", "digits": "digit cmp"}
DEFAULT_CMP = ProtocolConfig().comparison


def _label(r: dict) -> str:
    """The policy, with the comparisons named when they are not the default's."""
    cmp = _comparison(r)
    return r["policy"] if cmp == DEFAULT_CMP else f"{r['policy']} ({CMP_LABEL[cmp]})"


def merge(path: Path, new: list[dict]) -> list[dict]:
    """Records of ``path`` with ``new`` replacing any of the same (policy, length, device, layers, mode,
    comparison)."""
    old = json.loads(path.read_text())["records"] if path.exists() else []
    keys = {_key(r) for r in new}
    recs = [r for r in old if _key(r) not in keys] + new
    order = {p: i for i, p in enumerate(BASELINES + ABLATION)}
    return sorted(recs, key=lambda r: (r["mode"], r["device"], r["layers"], r["length"], order.get(r["policy"], 99),
                                       _comparison(r) != DEFAULT_CMP))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def markdown(recs: list[dict], machines: dict[str, str]) -> str:
    """The report: one table per (device, layers) of simulated decode, the real prefill table, context."""
    lines = ["# MPCache per-token decode cost vs context length", "",
             f"Model: SmolLM2-135M-Instruct (real weights), first L decoder layers + real LM head and secure "
             f"argmax. Machines: {'; '.join(f'{d}: {m}' for d, m in sorted(machines.items()))}. LAN = 1 Gbps, 0.5 ms RTT; WAN = 100 Mbps, 40 ms RTT; projection "
             "T = compute + 8·bytes/bandwidth + rounds·RTT (protocols.cost.project).", "",
             "**SIMULATION (NOT PRIVATE), as the MPCache authors' artifact:** the client computes the prompt "
             "KV cache in plaintext and secret-shares it (plus the window queries); static eviction and every "
             "decode step run in MPC. Real MPC prefill is reported separately below.", "",
             "Budgets: every baseline attends the same number of tokens per decode step as MPCache (defaults: "
             "static_keep 0.3, clusters 32/16, ratios 0.5/0.2) at that length (column 'attended'). "
             "'×full' = full cache / policy (higher is better). '30L extrap.' = head + per-layer × 30 "
             "(extrapolated; ignores cross-layer sharing, so an upper bound for mpcache: the sharing table below "
             "subtracts the selection of the 14 sharing layers).", "",
             f"Paper, for context: {PAPER}.", ""]
    sim = [r for r in recs if r["mode"] == "simulation"]
    for dev, lay in sorted({(r["device"], r["layers"]) for r in sim}):
        group = [r for r in sim if (r["device"], r["layers"]) == (dev, lay)]
        full = {r["length"]: r for r in sorted(group, key=lambda r: _comparison(r) == DEFAULT_CMP)
                if r["policy"] == "full"}  # the full cache selects nothing: either run (the default's last)
        lines += [f"## Decode per token, {dev}, L = {lay} layers (simulation prefill)", "",
                  "| T0 | policy | attended | MB/token | ×full | rounds | median s | LAN s | WAN s | WAN ×full "
                  "| 30L MB (extrap.) | 30L ×full | 30L WAN s (extrap.) | static-evict MB (once) |",
                  "|" + "---|" * 14]
        shared_rows = []
        for r in group:
            d, f = r["decode"], full.get(r["length"])
            e = r["extrapolated_30_layers"]
            fb = f["decode"]["total"]["wire_bytes"] if f else 0
            fw = f["decode"]["WAN_s"] if f else 0
            fe = f["extrapolated_30_layers"] if f else {"wire_bytes": 0}
            lines.append(
                f"| {r['length']} | {_label(r)} | {r['describe']['attended_last_step']} | "
                f"{d['total']['wire_bytes'] / 1e6:.2f} | {_ratio(fb, d['total']['wire_bytes'])} | "
                f"{d['total']['rounds']:.0f} | {r['median_step_s']:.2f} | {d['LAN_s']:.2f} | {d['WAN_s']:.2f} | "
                f"{_ratio(fw, d['WAN_s'])} | {e['wire_bytes'] / 1e6:.1f} | {_ratio(fe['wire_bytes'], e['wire_bytes'])} | "
                f"{e['WAN_s']:.1f} | {r['sim_prefill']['wire_bytes'] / 1e6:.1f} |")
            s = r.get("extrapolated_30_layers_shared")
            if s and f:
                fe_full = f["extrapolated_30_layers"]
                shared_rows.append(f"| {r['length']} | {_label(r)} | {s['shared_layers']} | {s['wire_bytes'] / 1e6:.1f} | "
                                   f"{_ratio(fe_full['wire_bytes'], s['wire_bytes'])} | {s['rounds']:.0f} | "
                                   f"{s['WAN_s']:.1f} | {_ratio(fe_full['WAN_s'], s['WAN_s'])} |")
        if shared_rows:
            lines += ["", "MPCache with cross-layer sharing, 30 layers (extrapolated: the shared layers skip "
                          "the measured per-layer selection cost):", "",
                      "| T0 | policy | sharing layers | 30L MB | ×full | 30L rounds | 30L WAN s | WAN ×full |",
                      "|---|---|---|---|---|---|---|---|", *shared_rows]
        head = group[0]["decode"]["head"]
        lines += ["", f"Constant head per token (embedding + final norm + LM head + argmax, same for every "
                      f"policy): {head['wire_bytes'] / 1e6:.2f} MB, {head['rounds']:.0f} rounds.", ""]
    real = [r for r in recs if r["mode"] == "real_prefill"]
    if real:
        lines += ["## Real MPC prefill (no simulation)", "",
                  "| device | L | T0 | policy | prefill MB | prefill rounds | prefill s | LAN s | WAN s "
                  "| decode MB/token | decode rounds |", "|" + "---|" * 11]
        for r in real:
            p, d = r["prefill"], r["decode"]
            lines.append(f"| {r['device']} | {r['layers']} | {r['length']} | {_label(r)} | "
                         f"{p['wire_bytes'] / 1e6:.1f} | {p['rounds']:.0f} | {r['prefill_s']:.1f} | "
                         f"{p['LAN_s']:.1f} | {p['WAN_s']:.1f} | {d['wire_bytes'] / 1e6:.2f} | {d['rounds']:.0f} |")
    return "\n".join(lines) + "\n"


def plots(recs: list[dict], out: Path) -> list[str]:
    """bytes/token and projected WAN s/token vs T0, one line per policy, per (device, layers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    sim = [r for r in recs if r["mode"] == "simulation"]
    for dev, lay in sorted({(r["device"], r["layers"]) for r in sim}):
        group = [r for r in sim if (r["device"], r["layers"]) == (dev, lay)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for pol in dict.fromkeys(_label(r) for r in group):
            rs = sorted((r for r in group if _label(r) == pol), key=lambda r: r["length"])
            xs = [r["length"] for r in rs]
            axes[0].plot(xs, [r["decode"]["total"]["wire_bytes"] / 1e6 for r in rs], marker="o", label=pol)
            axes[1].plot(xs, [r["decode"]["WAN_s"] for r in rs], marker="o", label=pol)
        for ax, ylabel in zip(axes, ("wire MB / token", "projected WAN s / token")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # Quest grows far above the rest; a log axis keeps the others apart
            ax.set_xlabel("prompt length T0")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"SmolLM2, {lay} layers, {dev} (simulation prefill, NOT private)")
        fig.tight_layout()
        name = f"{out.stem}_{dev}_L{lay}.png"
        fig.savefig(out.parent / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=_ints, default=[512, 1024, 2048, 4096])
    p.add_argument("--policies", default=",".join(BASELINES),
                   help=f"comma list of {BASELINES + ABLATION}")
    p.add_argument("--layers", type=int, default=2, help="first L decoder layers of SmolLM2")
    p.add_argument("--new-tokens", type=int, default=2, help="decode steps per run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--real-prefill", type=_ints, default=[], help="lengths with a real MPC prefill")
    p.add_argument("--real-policies", default="full,mpcache")
    p.add_argument("--comparison", choices=("digits", "crypten"), default=DEFAULT_CMP,
                   help="the selection's comparisons (ProtocolConfig.comparison)")
    p.add_argument("--out", type=Path, default=REPORTS / "mpcache_cost.json")
    p.add_argument("--timeout", type=float, default=7200)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    policies, real_policies = ns.policies.split(","), ns.real_policies.split(",")
    for name in policies + real_policies:
        if name not in BASELINES + ABLATION:
            p.error(f"unknown policy {name!r}")
    if ns.layers < 1 or ns.new_tokens < 1:
        p.error("--layers and --new-tokens must be >= 1")
    from launch.local import run_parties
    t0 = time.perf_counter()
    raw = run_parties(party_job, ns.lengths, policies, ns.layers, ns.new_tokens, ns.device, ns.real_prefill,
                      real_policies, ns.comparison, world_size=2, timeout=ns.timeout)
    for r0, r1 in zip(*raw):  # seconds: the slower party per step
        r0["step_s"] = [max(a, b) for a, b in zip(r0["step_s"], r1["step_s"])]
    new = [summarise(r, ns.layers, ns.device) for r in raw[0]]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    recs = merge(ns.out, new)
    machines = json.loads(ns.out.read_text()).get("machines", {}) if ns.out.exists() else {}
    machines[ns.device] = (f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores" if ns.device == "cuda" else
                           f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    ns.out.write_text(json.dumps({"note": "decode records use a SIMULATION prefill (plaintext KV shared by the "
                                          "client): NOT private; see the .md", "paper": PAPER,
                                  "networks": [LAN, WAN], "machines": machines, "records": recs}, indent=1))
    ns.out.with_suffix(".md").write_text(markdown(recs, machines))
    made = plots(recs, ns.out)
    log.info("wrote %s, %s and %s in %.0f s", ns.out, ns.out.with_suffix(".md"), made, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
