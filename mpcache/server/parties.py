"""What the demo server's party processes run: one ``PrivateSession``, then generations on request.

The server (``mpcache.server.supervisor``) starts the client (rank 0), the model owner (rank 1) and,
with ``--dealer``, a dealer (rank 2) as processes on this machine, a CrypTen world over a gloo TCP
rendezvous on 127.0.0.1. The owner loads the weights and shares them once; then every generation
runs through the same session. Only the client talks to the server, over a pipe:

    server -> client   ("generate", job) | ("cancel", job_id) | ("stop",)
    client -> server   ("ready", info) | ("start", run) | ("token", token) | ("run_done", run)
                       | ("done", summary) | ("rejected", message) | ("failed", message)

and the client tells the owner what to do by a CrypTen broadcast of PUBLIC values only:

    ("idle",)                     a heartbeat while no request runs (keeps the owner's gloo wait
                                  under the op timeout, and finds a dead owner between requests)
    ("run", {kv, n_prompt, max_new_tokens})
    ("stop",)

The prompt ids go to the client process only; the owner sees their count. Per-token costs are
exact and aggregated over both parties (``CostMeter.aggregate`` after every step: bytes on the wire
= (P0 + P1) / 2, rounds and seconds the max over parties), the same numbers as the CLI's table.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

CLIENT, OWNER = 0, 1
_REC_FIELDS = 5  # CostMeter records: bytes, rounds, comm_s, wall_s, calls


@dataclass(frozen=True)
class PartyConfig:
    """What every party process is started with (public: no prompt, no weights).

    ``vocab_digest``: of the client's tokenizer (read by the server process), checked by the client
    against the model's. ``heartbeat_s``: the client's idle broadcast period (< ``op_timeout_s``).
    """

    model: str
    vocab_digest: str
    dealer: bool = False
    device: str = "cpu"
    timeout_s: float = 120.0
    op_timeout_s: float = 600.0
    heartbeat_s: float = 5.0

    @property
    def provider(self) -> str:
        return "TTP" if self.dealer else "TFP"


def party_process(rank: int, cfg: PartyConfig, rendezvous: str, conn: Connection | None) -> None:
    """Entry point of one party process (rank 2 = the dealer); ``conn`` is the client's pipe."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo")
    from launch.errors import ExitCode, LaunchError, describe_rank
    from launch.session import init_dealer, init_party, peer_error, run_dealer, shutdown
    from launch.watchdog import die
    from protocols.config import ProtocolConfig, protocol_context
    protocol = ProtocolConfig()
    try:
        if rank >= 2:  # as on mpirun rank 2: Beaver tuples and fixed masks until the parties leave
            from protocols.dealer import serve
            init_dealer(timeout_s=cfg.timeout_s, op_timeout_s=cfg.op_timeout_s)
            run_dealer(lambda: serve(protocol))
            return
        device = _place(rank, cfg.device)
        with protocol_context(protocol):
            init_party(2, cfg.provider, timeout_s=cfg.timeout_s, op_timeout_s=cfg.op_timeout_s,
                       device=device if device.startswith("cuda") else None)
            session, info = open_session(cfg, rank, device)
            if rank == CLIENT:
                client_loop(session, info, conn, cfg)
            else:
                owner_loop(session)
        shutdown()
    except BaseException as err:  # one line to the server (the client) and to stderr, then leave
        known = err if isinstance(err, LaunchError) else peer_error(err, rank, 2, cfg.dealer)
        text = " ".join(str(known or err).split()) or type(err).__name__
        if known is None:  # not a lost peer: a bug or a bad input; keep the traceback in the log
            text = f"{type(err).__name__}: {text}"
            traceback.print_exc()
        if conn is not None:
            try:
                conn.send(("failed", text))
            except OSError:
                pass
        code = known.code if known is not None else ExitCode.FAILED
        die(code, f"mpcache.server: {describe_rank(rank)}: {text}")  # gloo finalizers can block


def _place(rank: int, device: str) -> str:
    from launch.devices import party_device
    placed = str(party_device(rank, device))
    if placed.startswith("cuda"):
        import torch
        torch.cuda.set_device(torch.device(placed))
    return placed


def open_session(cfg: PartyConfig, rank: int, device: str):
    """The owner loads and shares the weights once; -> (session, public info for the server)."""
    import time

    from mpcache.launch import RunOptions, _agree, architecture, load_owner_side
    from mpcache.session import PrivateSession
    state, args, label, digest = load_owner_side(RunOptions(model=cfg.model), rank)
    error = None
    if rank == CLIENT and digest != cfg.vocab_digest:
        error = ("the client's tokenizer is not the model's (vocabulary digests differ): give the "
                 "server --tokenizer DIR, a local copy of the model's tokenizer files")
    _agree(None, error, CLIENT)
    t0 = time.perf_counter()
    session = PrivateSession(state, args, src=OWNER, device=device)
    del state
    setup = session.costs()  # collective
    session.meter.clear()
    total = setup.row("setup")
    info = {"model": label, "architecture": architecture(args), "args": asdict(args),
            "provider": setup.provider, "setup_s": time.perf_counter() - t0,
            "setup_wire_bytes": total.wire_bytes, "setup_rounds": total.rounds, "device": device}
    return session, info


def _broadcast(obj):
    from protocols.compat import comm
    return comm.get().broadcast_obj(obj, CLIENT)


def owner_loop(session) -> None:
    """The model owner follows the client's public commands until told to stop."""
    while True:
        cmd = _broadcast(None)
        if cmd[0] == "stop":
            return
        if cmd[0] == "run":
            run_generation(session, None, cmd[1])
        elif cmd[0] != "idle":
            raise RuntimeError(f"out of step with the client: unexpected command {cmd!r:.60}")


def client_loop(session, info: dict, conn: Connection, cfg: PartyConfig) -> None:
    """Serve the server's requests one at a time; heartbeat the owner while idle."""
    conn.send(("ready", info))
    while True:
        if not conn.poll(cfg.heartbeat_s):
            _broadcast(("idle",))
            continue
        msg = conn.recv()
        if msg[0] == "stop":
            _broadcast(("stop",))
            return
        if msg[0] == "generate":
            if serve_job(session, conn, msg[1]):
                _broadcast(("stop",))
                return
        # ("cancel", id) of a request that already ended: nothing to do


def policy_options(public_kv: dict):
    """``PolicyOptions`` back from its ``public()`` dict (lists -> tuples)."""
    from mpcache.options import PolicyOptions
    return PolicyOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in public_kv.items()})


def serve_job(session, conn: Connection, job: dict) -> bool:
    """One request: the chosen policy, then (``compare_full``) the full cache on the same prompt.

    -> whether the server asked to stop meanwhile. Checks the policy against the prompt before
    telling the owner anything (a bad combination is ``rejected``, the owner never hears of it).
    """
    ids, n, n_new = job["ids"], len(job["ids"]), job["max_new_tokens"]
    runs = [("policy", policy_options(job["kv"]))]
    if job.get("compare_full") and runs[0][1].kv_policy != "full":
        runs.append(("full", policy_options({"kv_policy": "full"})))
    try:
        budgets = [{k: v for k, v in kv.build().describe(n, n_new).items() if k != "policy"} for _, kv in runs]
    except (ValueError, AssertionError) as err:
        conn.send(("rejected", " ".join(str(err).split())))
        return False
    flags = {"cancelled": False, "stop": False}

    def cancel() -> bool:  # polled by next_token once per token, on the client only
        while conn.poll(0):
            msg = conn.recv()
            if msg[0] == "cancel" and msg[1] == job["id"]:
                flags["cancelled"] = True
            elif msg[0] == "stop":
                flags["cancelled"] = flags["stop"] = True
        return flags["cancelled"]

    eos = frozenset(job.get("eos", ()))
    for (name, kv), budget in zip(runs, budgets):
        if cancel():
            break
        public = {"kv": kv.public(), "n_prompt": n, "max_new_tokens": n_new}
        _broadcast(("run", public))
        conn.send(("start", {"run": name, "kv_policy": kv.kv_policy, "budgets": budget}))
        costs = run_generation(session, ids, public, eos, cancel,
                               on_token=lambda token: conn.send(("token", {"run": name, **token})))
        conn.send(("run_done", {"run": name, "costs": costs}))
    conn.send(("done", {"cancelled": flags["cancelled"]}))
    return flags["stop"]


def run_generation(session, ids: list[int] | None, public: dict, eos: frozenset[int] = frozenset(),
                   cancel=None, on_token=None) -> dict:
    """Collective: one generation; -> its ``CostReport.to_dict()`` (both parties, this generation
    only: the meter is cleared first). ``on_token({index, token, seconds, wire_bytes, rounds, comm_s,
    wall_s})`` after each token (token None on the owner)."""
    kv = policy_options(public["kv"])
    session.meter.clear()
    steps = session.steps(ids, public["n_prompt"], public["max_new_tokens"],
                          policy=kv.build(session.meter), eos_ids=eos, cancel=cancel)
    decoded_so_far = None  # each party's cumulative decode record before this step
    for step in steps:
        parties = session.meter.aggregate().parties  # collective; its own traffic is not counted
        phase = "prefill" if step.index == 0 else "decode"
        now = [p["records"].get(f"{phase}|total", [0.0] * _REC_FIELDS) for p in parties]
        before = decoded_so_far if phase == "decode" and decoded_so_far else [[0.0] * _REC_FIELDS] * len(now)
        delta = [[a - b for a, b in zip(x, y)] for x, y in zip(now, before)]
        if phase == "decode":
            decoded_so_far = now
        if on_token is not None:
            on_token({"index": step.index, "token": step.token, "seconds": step.seconds,
                      "wire_bytes": sum(d[0] for d in delta) / 2, "rounds": int(max(d[1] for d in delta)),
                      "comm_s": max(d[2] for d in delta), "wall_s": max(d[3] for d in delta)})
    return session.meter.aggregate().to_dict()


if __name__ == "__main__":  # not an entry point
    sys.exit("mpcache.server.parties is started by `python -m mpcache.server`")
