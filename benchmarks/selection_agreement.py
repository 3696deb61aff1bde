"""Selection agreement: MPCache's secret choices vs the plaintext twin on the same inputs (an AUDIT).

AUDIT, NOT A PRIVATE RUN: this harness opens every selection, query, key and score that the protocol
keeps secret (``get_plain_text`` on both parties) and starts from the labelled simulation prefill (the
client's plaintext KV cache, ``mpcache.policy.simulate``). It exists to count and report where the MPC
selection may differ from ``plaintext_ref.policies.mpcache`` because of fixed-point error.

Per layer that selects (not sharing): the static set after the prefill, then in each of ``--steps``
decode steps (teacher-forced on the prompt text's next tokens) the clusters picked at every level, per
KV head. Each MPC choice is compared with the twin's on the MPC's own inputs at that point (the revealed
window queries and keys; the revealed query Σ_g q and keys of the step), so upstream fixed-point drift
does not count against the selection. A difference is a *fixed-point tie* when the twin's scores at the
top-K boundary are closer than twice the largest |MPC score − twin score| of that selection (the MPC
ranks its own scores exactly, and they lie within that error of the twin's); any other difference is a
*mismatch* (a bug; the run fails). A choice whose scores are off by more than any fixed-point
approximation allows (``STATIC_FAULT``, ``SCORE_FAULT``) is a *fault*, whatever it selected: CrypTen's
2-party truncation is local and fails with probability ≈ |value|/2^32 per truncated product, and then
errs by 2^32 (``tests/protocols/test_truncation.py`` measures it); a run with faults fails too. Per
level, a head that differed is not compared deeper (its candidates differ). With all layers,
next-token agreement (MPC argmax vs twin argmax, teacher-forced; a miss is a near-tie when the twin's
top-2 margin < 0.02) is reported too.

    python -m benchmarks.selection_agreement --lengths 1024,2048 --steps 8 --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from benchmarks.mpcache_cost import MODEL, REPORTS, plaintext_kv, prompt_ids
from plaintext_ref.mpcache_config import MPCacheConfig
from plaintext_ref.policies import mpcache as twin
from protocols.config import ProtocolConfig

log = logging.getLogger(__name__)

MARGIN = 0.02  # a token miss is a near-tie when the twin's top-2 logit margin is below this
# Fault thresholds, far above the fixed-point error measured on SmolLM2 at 1K-4K (static scores <= 2.2e-2,
# cluster scores <= 1.6e-3) and below the smallest wrap: a wrapped logit moves one window row's whole
# probability mass (up to 1) to one token; a wrapped product elsewhere errs by 2^32 / (row length) or more.
STATIC_FAULT = 0.5
SCORE_FAULT = 1.0


@dataclasses.dataclass
class Verdict:
    """One compared choice: ``status`` in {same, tie, mismatch, fault}; gap = the twin's boundary gap,
    eps = max |MPC − twin| score of the compared candidates (both in the MPC's score units)."""

    status: str
    gap: float = math.inf
    eps: float = 0.0
    worst: dict = dataclasses.field(default_factory=dict)  # where eps was attained

    @staticmethod
    def of(differs: bool, gap: float, eps: float, bound: float) -> "Verdict":
        status = "fault" if eps > bound else "same" if not differs else "tie" if gap < 2 * eps else "mismatch"
        return Verdict(status, gap, eps)


def boundary_gap(score: torch.Tensor, n: int) -> float:
    """score[n-1] − score[n] of the descending scores (1-D): how far the top-n set is from flipping."""
    ranked = score.sort(descending=True).values
    return float(ranked[n - 1] - ranked[n]) if 0 < n < len(ranked) else math.inf


def twin_levels(q_kv: torch.Tensor, k: torch.Tensor, cfg: MPCacheConfig) -> list[tuple]:
    """The twin's ``select_clusters`` loop keeping every level: per level (picked, score, candidate, n),
    bool/float (B, Hkv, C_l) and the public top-k count. q_kv (B, Hkv, D); k (B, Hkv, T', D)."""
    t = k.shape[-2]
    parent, levels = None, []
    for level, s in enumerate(cfg.cluster_sizes):
        c = cfg.n_clusters(t, level)
        rmin, rmax = twin.cluster_minmax(k, s)
        score = twin.cluster_scores(q_kv, twin.representative_keys(rmin, rmax, cfg.alpha))
        if parent is None:
            cand = torch.ones_like(score, dtype=torch.bool)
        else:
            cand = parent.repeat_interleave(cfg.cluster_sizes[level - 1] // s, dim=-1)[..., :c]
        forced = twin.forced_clusters(c, cfg)
        cand[..., forced] = False
        n = cfg.n_topk(t, level)
        picked = torch.zeros_like(cand)
        if n:
            picked.scatter_(-1, score.masked_fill(~cand, -math.inf).topk(n, dim=-1).indices, True)
        picked[..., forced] = True
        levels.append((picked, score, cand, n))
        parent = picked
    return levels


def mpc_picked(pick: torch.Tensor | None, rng: tuple[int, int], shape: tuple[int, int, int], last: bool,
               forced: list[int]) -> torch.Tensor:
    """Decoded MPC picks of one level as a bool (B, Hkv, C): [m] (coarse) or the one-hot rows [O]
    (finest, summed over rows), placed at the middle range, plus the public forced clusters."""
    lo, hi = rng
    picked = torch.zeros(shape, dtype=torch.bool)
    if pick is not None:
        mid = pick.round().sum(dim=-2) if last else pick.round()
        if not set(mid.unique().tolist()) <= {0.0, 1.0}:
            raise AssertionError("a cluster was picked twice")
        picked[..., lo:hi] = mid.bool()
    picked[..., forced] = True
    return picked


def compare_dynamic(q_kv: torch.Tensor, k: torch.Tensor, picks: list, ranges: list, scores: torch.Tensor,
                    cfg: MPCacheConfig) -> list[list[Verdict]]:
    """Verdicts per level, per (b, head) still comparable, of one step's MPC selection (decoded picks,
    concatenated middle scores) vs the twin on the same (q_kv, k). Returns [level][i] Verdicts."""
    levels = twin_levels(q_kv, k, cfg)
    b, h = q_kv.shape[:2]
    diverged = torch.zeros(b, h, dtype=torch.bool)
    start, out = 0, []
    for level, (want, score, cand, n) in enumerate(levels):
        c = want.shape[-1]
        lo, hi = ranges[level]
        mine = scores[..., start:start + hi - lo]
        start += hi - lo
        got = mpc_picked(picks[level], ranges[level], (b, h, c), level == len(levels) - 1,
                         twin.forced_clusters(c, cfg))
        row = []
        for bb in range(b):
            for kv in range(h):
                if diverged[bb, kv]:
                    continue
                live = cand[bb, kv, lo:hi]
                eps = float((mine[bb, kv] - score[bb, kv, lo:hi])[live].abs().max()) if live.any() else 0.0
                differs = not torch.equal(got[bb, kv], want[bb, kv])
                gap = boundary_gap(score[bb, kv][cand[bb, kv]], n) if differs else math.inf
                row.append(Verdict.of(differs, gap, eps, SCORE_FAULT))
                diverged[bb, kv] = differs
        out.append(row)
    return out


def compare_static(s_mpc: torch.Tensor, kept: torch.Tensor | None, q_win: torch.Tensor, k: torch.Tensor,
                   n_keep: int) -> list[Verdict]:
    """Per batch row: MPC static set vs the twin's on the same window queries and keys. s_mpc (B, T0) are
    the MPC's Σ-over-heads scores (the twin's mean × H); kept (B, K) the decoded set or None (keep all)."""
    s_twin = twin.static_scores(twin.window_attention(q_win, k, q_win.shape[-1] ** -0.5)) * q_win.shape[1]
    want = twin.static_keep(s_twin, n_keep) if n_keep < k.shape[-2] else None
    out = []
    for b in range(s_mpc.shape[0]):
        err = (s_mpc[b] - s_twin[b]).abs()
        j = int(err.argmax())
        differs = (kept is None) != (want is None) or (kept is not None and not torch.equal(kept[b], want[b]))
        v = Verdict.of(differs, boundary_gap(s_twin[b], n_keep) if differs else math.inf, float(err[j]),
                       STATIC_FAULT)
        v.worst = {"position": j, "mpc": float(s_mpc[b, j]), "twin": float(s_twin[b, j]),
                   "off_1e-2": int((err > 1e-2).sum())}
        out.append(v)
    return out


def party_job(model_name: str, lengths: list[int], layers: int, steps: int, device: str, cfg: MPCacheConfig
              ) -> list[dict] | None:
    """One party: per T0, simulated prefill + teacher-forced decode with every selection opened (AUDIT).
    Rank 0 (the client, which holds the plaintext cache in the simulation) compares and returns counts."""
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.policy import MPCache
    from mpcache.policy.base import window_scores
    from mpcache.policy.simulate import prefill_from_plaintext_kv
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from plaintext_ref.runtime import teacher_forced_logits
    from protocols.compat import comm

    class Audited(MPCache):
        """MPCache that opens its inputs and choices on the layers that select (AUDIT ONLY); one
        object per audited run, which keeps the openings."""

        def __init__(self, config: MPCacheConfig) -> None:
            super().__init__(None, config)
            self.static_log: dict[int, tuple] = {}
            self.step_log: list[tuple] = []

        def after_prefill(self, layer, cache, p_win, partner) -> None:
            s = window_scores(p_win).get_plain_text().cpu() if p_win is not None else None
            super().after_prefill(layer, cache, p_win, partner)
            if s is not None:
                e = cache.aux["static"]
                self.static_log[layer] = (s, None if e is None else e.get_plain_text().argmax(-1).cpu())

        def decode(self, layer, q, cache, partner):
            out = super().decode(layer, q, cache, partner)
            if partner is None and cache.length > self.config.dynamic_min_tokens:
                sel = cache.aux["selection"]
                self.step_log.append((layer, q.sum(dim=2).get_plain_text().cpu(),
                                      cache.keys.secret.get_plain_text().cpu(),
                                      [None if p is None else p.get_plain_text().cpu() for p in sel.picks],
                                      sel.ranges, sel.scores.get_plain_text().cpu()))
            return out

    rank = comm.get().get_rank()
    hf, tok, config = load_model(model_name)
    full = layers >= config.num_hidden_layers
    hf.model.layers = hf.model.layers[:layers]
    hf.config.num_hidden_layers = layers
    args = dataclasses.replace(ModelArgs.from_hf(config), n_layers=layers, max_seq_len=max(lengths) + steps + 1)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args, device=device)
    out = []
    for t in lengths:
        ids = prompt_ids(tok, t + steps)
        pol = Audited(cfg)
        seq = session.sequence(pol)
        w = pol.window(t)
        rec = plaintext_kv(hf, ids[:t], w) if rank == 0 else None
        t0 = time.perf_counter()
        prefill_from_plaintext_kv(session.model, seq, t, [(k, v) for k, v, _ in rec] if rec else None,
                                  [q for _, _, q in rec] if rec else None)
        argmax = []
        for j in range(steps):
            x = share_tokens([ids[t + j]] if rank == 0 else None, 1, args.vocab_size, device=device)
            logits = session.model.forward(x, torch.tensor([t + j]), seq)
            argmax.append(int(logits[0, 0].get_plain_text().argmax()))
        seconds = time.perf_counter() - t0
        if rank != 0:
            continue
        static = {layer: compare_static(s, kept, rec[layer][2].cpu().float(), rec[layer][0].cpu().float(),
                                        cfg.n_keep(t))
                  for layer, (s, kept) in pol.static_log.items()}
        dynamic = [(layer, compare_dynamic(q_kv, k, picks, ranges, scores, cfg))
                   for layer, q_kv, k, picks, ranges, scores in pol.step_log]
        res = {"length": t, "steps": steps, "seconds": seconds, "static": static, "dynamic": dynamic}
        if full:  # next-token agreement with the twin, teacher-forced on the same text (row 0: prefill)
            logits = teacher_forced_logits(hf, torch.tensor([ids[: t + steps] + [0]]), t,
                                           twin.MPCache(config=cfg))[0, 1:].float().cpu()
            top2 = logits.topk(2, dim=-1).values
            res["tokens"] = {"mpc": argmax, "twin": logits.argmax(-1).tolist(),
                             "margin": (top2[:, 0] - top2[:, 1]).tolist()}
        out.append(res)
    return out if rank == 0 else None


def summarise(res: dict, model: str, layers: int, device: str, cfg: MPCacheConfig) -> dict:
    """Counts per kind of choice: compared, same, fixed-point ties, mismatches, faults; worst eps, tie gaps."""
    def count(verdicts: list[Verdict]) -> dict:
        ties = [v for v in verdicts if v.status == "tie"]
        return {"compared": len(verdicts), "same": sum(v.status == "same" for v in verdicts),
                "ties": len(ties), "mismatches": sum(v.status == "mismatch" for v in verdicts),
                "faults": sum(v.status == "fault" for v in verdicts),
                "max_eps": max((v.eps for v in verdicts), default=0.0),
                "tie_gaps": sorted(v.gap for v in ties)}
    static = [v for vs in res["static"].values() for v in vs]
    n_levels = len(cfg.cluster_sizes)
    levels = [[v for _, lv in res["dynamic"] for v in lv[level]] for level in range(n_levels)]
    row = {"model": model, "device": device, "layers": layers, "length": res["length"], "steps": res["steps"],
           "truncation": ProtocolConfig().truncation,
           "seconds": res["seconds"], "static_layers": sorted(res["static"]),
           "selecting_layers": sorted({layer for layer, _ in res["dynamic"]}),
           "static": count(static), "levels": [count(v) for v in levels], "config": dataclasses.asdict(cfg),
           "static_per_layer": {str(layer): [dataclasses.asdict(v) for v in vs] for layer, vs in res["static"].items()}}
    if "tokens" in res:
        tk = res["tokens"]
        miss = [i for i, (a, b) in enumerate(zip(tk["mpc"], tk["twin"])) if a != b]
        row["tokens"] = dict(tk, agree=len(tk["mpc"]) - len(miss),
                             near_tie_misses=sum(tk["margin"][i] < MARGIN for i in miss))
    return row


def markdown(rows: list[dict], machines: dict) -> str:
    lines = ["# MPCache selection agreement with the plaintext twin (audit)", "",
             "**AUDIT, NOT PRIVATE:** every selection, query, key and score is opened to compare it with "
             "`plaintext_ref.policies.mpcache`; the prefill is the labelled simulation (client's plaintext KV "
             "cache, static eviction in MPC). Machines: "
             + "; ".join(f"{d}: {m}" for d, m in sorted(machines.items())) + ".", "",
             "Each layer that selects (the others reuse their partner's indices) is compared on the MPC's own "
             "inputs: the static set once per batch row, and every level's picked clusters per KV head and "
             "decode step. *tie* = differs where the twin's top-K boundary gap < 2·eps, eps = max |MPC − twin| "
             "score of that choice (fixed-point error); *mismatch* = any other difference (none allowed); "
             "*fault* = scores off by more than any approximation allows (static: 0.5, clusters: 1.0): "
             "a 2-party truncation wrap (with CrypTen's local truncation, column *trunc.* = local, a product of "
             "value v wraps with probability ≈ |v|/2^32 and then errs by 2^32; a wrapped logit sends a window "
             "row's whole probability mass to one token; the exact truncation of `protocols.truncation` "
             "cannot wrap). A head that differed at a level is not compared "
             "deeper. Tokens: MPC argmax vs twin argmax, teacher-forced on the prompt text (all layers only).", "",
             "| model | device | trunc. | T0 | layers | steps | static sets: same / ties / mism. / faults | " +
             "level picks (per level): same / ties / mism. / faults | max eps (static; levels) | tie gaps | "
             "tokens agree | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["device"], r["length"])):
        st, lv = r["static"], r["levels"]
        lvs = "; ".join(f"{x['same']}/{x['ties']}/{x['mismatches']}/{x['faults']} of {x['compared']}" for x in lv)
        eps = f"{st['max_eps']:.1e}; " + ", ".join(f"{x['max_eps']:.1e}" for x in lv)
        gaps = [g for x in [st, *lv] for g in x["tie_gaps"]]
        tk = r.get("tokens")
        tks = f"{tk['agree']}/{len(tk['mpc'])} ({tk['near_tie_misses']} near-tie misses)" if tk else "—"
        lines.append(f"| {r['model']} | {r['device']} | {r.get('truncation', 'local')} | {r['length']} | "
                     f"{r['layers']} | {r['steps']} | "
                     f"{st['same']}/{st['ties']}/{st['mismatches']}/{st['faults']} of {st['compared']} | "
                     f"{lvs} | {eps} | "
                     f"{', '.join(f'{g:.1e}' for g in gaps) or '—'} | {tks} | {r['seconds']:.0f} |")
    cfg = rows[0]["config"] if rows else {}
    lines += ["", f"Config: static_keep {cfg.get('static_keep')}, clusters {cfg.get('cluster_sizes')}, "
              f"ratios {cfg.get('level_ratios')}, alpha {cfg.get('alpha')}, sharing {cfg.get('share_layers')}."]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny-llama"), default=MODEL)
    p.add_argument("--lengths", type=_ints, default=[512])
    p.add_argument("--layers", type=int, default=30, help="first L decoder layers (default: all of SmolLM2)")
    p.add_argument("--steps", type=int, default=4, help="teacher-forced decode steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=REPORTS / "selection_agreement.json")
    p.add_argument("--timeout", type=float, default=7200)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if ns.layers < 1 or ns.steps < 1 or not ns.lengths or min(ns.lengths) < 2:
        p.error("--layers and --steps must be >= 1 and --lengths a comma list of T0 >= 2")
    from launch.local import run_parties
    cfg = MPCacheConfig()
    raw = run_parties(party_job, ns.model, ns.lengths, ns.layers, ns.steps, ns.device, cfg, timeout=ns.timeout)[0]
    new = [summarise(r, ns.model, ns.layers, ns.device, cfg) for r in raw]
    old = json.loads(ns.out.read_text()) if ns.out.exists() else {"rows": [], "machines": {}}
    key = ("model", "device", "length", "layers")
    keep = [r for r in old["rows"] if tuple(r[k] for k in key) not in {tuple(n[k] for k in key) for n in new}]
    machines = dict(old["machines"])
    machines[ns.device] = (f"{torch.cuda.get_device_name()}" if ns.device == "cuda" else
                           f"CPU, {torch.get_num_threads()} threads")
    rows = keep + new
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"note": "AUDIT (every selection opened) on a SIMULATION prefill: NOT private",
                                  "machines": machines, "rows": rows}, indent=1))
    ns.out.with_suffix(".md").write_text(markdown(rows, machines))
    bad = sum(x[k] for r in new for x in [r["static"], *r["levels"]] for k in ("mismatches", "faults"))
    log.info("wrote %s and %s; %d mismatches or faults", ns.out, ns.out.with_suffix(".md"), bad)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
