"""Per-token latency measured over emulated LAN and WAN, next to the projection (``make report``).

The parties run in their own network namespaces (``launch.netem``: 2 namespaces, every party's
outgoing link shaped), started by ``launch.netrun``. Profiles: loopback (the namespaces' link
unshaped), LAN (1 Gbps, 1 ms RTT), WAN (100 Mbps, 40 ms RTT). Three jobs, each one harness run:

1. link calibration: TCP ping-pong RTT and bulk throughput (``launch.netprobe``), and the latency
   of single gloo collectives (all_reduce, an isend/irecv exchange, broadcast) per profile;
2. MPCache cost (``benchmarks.mpcache_cost``'s set-up: the first ``--layers`` SmolLM2 layers, a
   SIMULATED prefill from a plaintext KV cache — NOT private — with static eviction in MPC): per
   (context length, policy) the weights are shared and the prefill runs UNSHAPED (its one-off
   static eviction moves GBs: 4.8 GB at 1K, 76 GB at 4K), then ``--steps`` decode steps run under
   each profile in turn (the harness reshapes the link between phases, ``use_profile``);
3. secure inference (``benchmarks.secure_inference``'s model: all 30 SmolLM2 layers, fixed masks,
   a ``--si-prompt``-token prompt, full cache): set-up and prefill unshaped, then decode steps per
   profile.

Per (job, profile): measured seconds per token = median over steps (each the slower party, after
a barrier); bytes, rounds and compute (wall − time in collectives) from the loopback steps give the
projection ``T = compute + 8·bytes/bandwidth + rounds·RTT`` (``protocols.cost.project``) of LAN and
WAN. Records merge into ``--out`` by (policy, length, layers); the Markdown report and the plots are
written next to it (``benchmarks.network_report``).

    python -m benchmarks.network --lengths 512,1024 --policies full,mpcache --steps 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPORTS = Path(__file__).resolve().parent / "reports"
PROFILE_NAMES = ("loopback", "LAN", "WAN")


# --- party side (run inside the namespaces by launch.netrun; JSON in and out) ----------------------

def _decode_under_profiles(model, seq, x, pos: int, profiles: list[str], steps: int, meter,
                           tag: str) -> tuple[dict, object, int]:
    """One unmeasured warm-up step, then ``steps`` rounds of one decode step per profile
    (round-robin: a drift in the machine's load hits every profile alike);
    -> ({profile: [seconds]}, x, pos)."""
    import torch

    from launch.netrun import use_profile
    from mpcache.generate import next_token
    from protocols.compat import comm
    seconds: dict[str, list[float]] = {p: [] for p in profiles}
    with meter.phase(f"{tag}warmup", tokens=1):  # first-call costs stay out of every profile's steps
        x, _, _ = next_token(model.forward(x, torch.tensor([pos]), seq), frozenset(), meter)
    pos += 1
    for _ in range(steps):
        for prof in profiles:
            use_profile(prof)
            comm.get().barrier()
            t0 = time.perf_counter()
            with meter.phase(f"{tag}{prof}", tokens=1):
                logits = model.forward(x, torch.tensor([pos]), seq)
                x, _, _ = next_token(logits, frozenset(), meter)
            seconds[prof].append(time.perf_counter() - t0)
            pos += 1
    use_profile("loopback")  # the aggregation and the next set-up run unshaped
    return seconds, x, pos


def _per_token(report, phase: str) -> dict:
    r = report.row(phase).per_token()
    return {"wire_bytes": r.wire_bytes, "rounds": r.rounds, "comm_s": r.comm_s, "wall_s": r.wall_s,
            "compute_s": r.compute_s}


def mpcache_party(lengths: list[int], policies: list[str], layers: int, steps: int,
                  profiles: list[str]) -> list[dict]:
    """The truncated SmolLM2 shared once; per (length, policy): simulated prefill, decode per profile."""
    from benchmarks.mpcache_cost import MODEL, build_policy, plaintext_kv, prompt_ids
    from launch.netrun import use_profile
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.policy.simulate import prefill_from_plaintext_kv
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    use_profile("loopback")
    hf, tok, config = load_model(MODEL)
    hf.model.layers = hf.model.layers[:layers]
    hf.config.num_hidden_layers = layers
    args = dataclasses.replace(ModelArgs.from_hf(config), n_layers=layers,
                               max_seq_len=max(lengths) + steps * len(profiles) + 2)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    meter, model = session.meter, session.model
    out = []
    for t in lengths:
        ids = prompt_ids(tok, t + 1)
        for name in policies:
            meter.clear()
            pol = build_policy(name, meter, t)
            seq, w = session.sequence(pol), pol.window(t)
            rec = plaintext_kv(hf, ids[:t], w) if rank == 0 else None
            t0 = time.perf_counter()
            with meter.phase("simprefill"):
                prefill_from_plaintext_kv(model, seq, t, [(k, v) for k, v, _ in rec] if rec else None,
                                          [q for _, _, q in rec] if rec and w else None)
            sim_s = time.perf_counter() - t0
            x = share_tokens([ids[t]] if rank == 0 else None, 1, args.vocab_size)
            step_s, _, _ = _decode_under_profiles(model, seq, x, t, profiles, steps, meter, "decode-")
            report = meter.aggregate()
            out.append({"policy": name, "length": t, "layers": layers, "provider": report.provider,
                        "attended": pol.describe(t, 1)["attended_last_step"], "sim_prefill_s": sim_s,
                        "sim_prefill": _per_token(report, "simprefill"), "step_s": step_s,
                        "decode": {p: _per_token(report, f"decode-{p}") for p in profiles}})
            log.info("rank %d: %s T0=%d done", rank, name, t)
    return out


def secure_party(model_name: str, n_prompt: int, steps: int, profiles: list[str]) -> dict:
    """benchmarks.secure_inference's model and prompt: set-up and prefill unshaped, decode per profile."""
    import torch

    from benchmarks.secure_inference import build_model
    from launch.netrun import use_profile
    from mpcache.generate import next_token, share_tokens
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from protocols.compat import comm

    rank = comm.get().get_rank()
    use_profile("loopback")
    state, config = build_model(model_name, owner=rank == 1)
    args = ModelArgs.from_hf(config)
    session = PrivateSession(state, args)
    del state
    meter, model = session.meter, session.model
    ids = torch.randint(0, args.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = session.sequence()
    with meter.phase("prefill", tokens=n_prompt):
        x = share_tokens(ids if rank == 0 else None, n_prompt, args.vocab_size)
        x, _, _ = next_token(model.forward(x, torch.arange(n_prompt), seq), frozenset(), meter)
    step_s, _, _ = _decode_under_profiles(model, seq, x, n_prompt, profiles, steps, meter, "decode-")
    report = meter.aggregate()
    return {"model": model_name, "prompt_tokens": n_prompt, "provider": report.provider, "step_s": step_s,
            "setup": _per_token(report, "setup"), "prefill": _per_token(report, "prefill"),
            "decode": {p: _per_token(report, f"decode-{p}") for p in profiles}}


def primitives_party(profiles: list[str], repeats: int) -> dict:
    """Seconds of single gloo collectives under each profile (what one CrypTen 'round' costs)."""
    import torch
    import torch.distributed as dist

    from launch.netrun import use_profile
    from protocols.compat import comm
    c = comm.get()
    g, other = c.main_group, 1 - c.get_rank()
    small, big = torch.ones(4, dtype=torch.int64), torch.ones(1 << 17, dtype=torch.int64)  # 32 B, 1 MiB

    def exchange(t: torch.Tensor) -> None:
        into = torch.empty_like(t)
        for w in (dist.isend(t, other, group=g), dist.irecv(into, other, group=g)):
            w.wait()

    ops = {"all_reduce 32 B": lambda: dist.all_reduce(small, group=g),
           "all_reduce 1 MiB": lambda: dist.all_reduce(big, group=g),
           "exchange 32 B (isend+irecv)": lambda: exchange(small),
           "broadcast 32 B": lambda: dist.broadcast(small, 0, group=g)}
    out: dict[str, dict[str, float]] = {}
    for prof in profiles:
        use_profile(prof)
        out[prof] = {}
        for name, op in ops.items():
            op()  # warm the connection
            seconds = []
            for _ in range(repeats):
                dist.barrier(group=g)
                t0 = time.perf_counter()
                op()
                seconds.append(time.perf_counter() - t0)
            out[prof][name] = statistics.median(seconds)
    use_profile("loopback")
    return out


# --- driver side ---------------------------------------------------------------------------------

def _slower_party(results: list) -> None:
    """Per step, the slower of the two parties' seconds (in place, into party 0's records)."""
    r0, r1 = results
    pairs = zip(r0, r1) if isinstance(r0, list) else [(r0, r1)]
    for a, b in pairs:
        for prof, secs in a["step_s"].items():
            a["step_s"][prof] = [max(x, y) for x, y in zip(secs, b["step_s"][prof])]


def run_jobs(ns: argparse.Namespace) -> dict:
    """Every requested job, each in a fresh 2-namespace network; -> the new results."""
    from launch import netem
    from launch.netprobe import link_check
    from launch.netrun import run_in_network

    profiles = [p for p in PROFILE_NAMES if p in ns.profiles]
    new: dict = {"backend": netem.available()[1], "profiles": {p: dataclasses.asdict(netem.PROFILES[p])
                                                              for p in profiles}}
    with netem.emulated_network(2) as net:
        new["backend"] = f"{net.backend}: {new['backend']}"
        new["tcp_sysctls"] = netem.TCP_SYSCTLS
        checks = {}
        for p in profiles:
            net.set_profile(netem.PROFILES[p])
            checks[p] = link_check(net, bulk_bytes=8 << 20)
        new["link_checks"] = checks
        net.set_profile(netem.LOOPBACK)
        new["primitives"] = run_in_network(net, "benchmarks.network:primitives_party", [profiles, 9],
                                           timeout=600)[0]
        log.info("calibration: %s", json.dumps(new["primitives"]))
    links: dict[str, list] = {"mpcache": [], "secure_inference": []}
    if ns.lengths:
        t0 = time.perf_counter()
        with netem.emulated_network(2) as net:
            res = run_in_network(net, "benchmarks.network:mpcache_party",
                                 [ns.lengths, ns.policies, ns.layers, ns.steps, profiles], timeout=ns.timeout,
                                 link_log=links["mpcache"])
        _slower_party(res)
        new["mpcache"] = res[0]
        log.info("mpcache job: %.0f s", time.perf_counter() - t0)
    if ns.si_steps:
        t0 = time.perf_counter()
        with netem.emulated_network(2) as net:
            res = run_in_network(net, "benchmarks.network:secure_party",
                                 [ns.si_model, ns.si_prompt, ns.si_steps, profiles], timeout=ns.timeout,
                                 link_log=links["secure_inference"])
        _slower_party(res)
        new["secure_inference"] = res[0]
        log.info("secure-inference job: %.0f s", time.perf_counter() - t0)
    new["link_fidelity"] = {job: link_fidelity(log_) for job, log_ in links.items() if log_}
    return new


def link_fidelity(links: list[dict]) -> dict:
    """Per profile, the tun link's packets, drops and mean/max delivery lateness over its phases."""
    out: dict[str, dict] = {}
    for entry in links:
        st = entry["stats"]
        if not isinstance(st, dict) or "forwarded" not in st:  # netem backend: nothing of ours to add
            continue
        agg = out.setdefault(entry["profile"], {"forwarded": 0, "dropped": 0, "late_sum_s": 0.0, "late_max_s": 0.0})
        agg["forwarded"] += st["forwarded"]
        agg["dropped"] += st["dropped"]
        agg["late_sum_s"] += st["late_mean_s"] * st["forwarded"]
        agg["late_max_s"] = max(agg["late_max_s"], st["late_max_s"])
    for agg in out.values():
        agg["late_mean_s"] = agg.pop("late_sum_s") / max(agg["forwarded"], 1)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    from benchmarks import network_report
    from launch import netem
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=_ints, default=[512, 1024], help="context lengths (empty: skip MPCache)")
    p.add_argument("--policies", type=lambda s: s.split(","), default=["full", "mpcache"])
    p.add_argument("--layers", type=int, default=2, help="first L decoder layers of SmolLM2 (MPCache job)")
    p.add_argument("--steps", type=int, default=2, help="decode steps per profile (MPCache job)")
    p.add_argument("--profiles", type=lambda s: s.split(","), default=list(PROFILE_NAMES))
    p.add_argument("--si-model", default="smollm2", choices=("smollm2", "gpt2-small"))
    p.add_argument("--si-prompt", type=int, default=32, help="prompt tokens (secure-inference job)")
    p.add_argument("--si-steps", type=int, default=1, help="decode steps per profile; 0 skips the job")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per harness run")
    p.add_argument("--out", type=Path, default=REPORTS / "network.json")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md and plots from --out; run nothing")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "loopback" not in ns.profiles or any(q not in PROFILE_NAMES for q in ns.profiles):
        p.error(f"--profiles: a subset of {PROFILE_NAMES} that includes loopback (the projection's source)")
    if ns.steps < 1 or ns.layers < 1 or ns.si_steps < 0:
        p.error("--steps and --layers must be >= 1, --si-steps >= 0")
    if ns.render_only:  # re-summarised with the stored calibration
        return _write(network_report.merge(ns.out, {}), ns.out, time.perf_counter())
    ok, why = netem.available()
    if not ok:
        print(f"cannot measure over emulated networks here: {why}")
        return 2
    t0 = time.perf_counter()
    data = network_report.merge(ns.out, run_jobs(ns))
    data["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()}
    return _write(data, ns.out, t0)


def _write(data: dict, out: Path, t0: float) -> int:
    from benchmarks import network_report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(network_report.markdown(data, out.stem))
    made = network_report.plots(data, out)
    log.info("wrote %s, %s and %s in %.0f s", out, out.with_suffix(".md"), made, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
