"""Run an MPC function on real parties on this machine, without mpirun (tests, notebooks).

``run_parties(fn, *args, world_size=2, dealer=False)`` spawns one process per computing party (and
one dealer process when ``dealer=True``), each with its own CrypTen communicator talking gloo over a
TCP rendezvous on 127.0.0.1, runs ``fn(*args)`` on every party and returns the parties' results in
rank order. If any process raises or dies (exits without reporting), it raises ``PartyError``
carrying every party's traceback and naming the dead ranks (never a silent ``None``); a party that
loses its peer reports which one (``launch.session.peer_error``). If the parties do not finish
within ``timeout`` seconds, all are killed and it raises ``PartyError`` too; ``timeout`` also bounds
the rendezvous and every single gloo wait inside the parties.

Processes are forked from a multiprocessing forkserver that has imported torch and CrypTen once
(``launch.session`` preloaded), so a call costs no interpreter start-up or imports after the first;
nothing touches CUDA, gloo or threads before the fork. Each party gets the caller's environment at
the time of the call, plus RANK/WORLD_SIZE/RENDEZVOUS/DISTRIBUTED_BACKEND (variables read only at
``import torch`` keep the server's values).

``fn`` must be picklable (a module-level function). Inputs that the parties must agree on should be
drawn on rank 0 and broadcast, or derived from a seed passed in ``args``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import time
import traceback
from typing import Any, Callable

from launch.rendezvous import free_port

__all__ = ["PartyError", "run_parties", "free_port"]

_POLL_S = 0.2
_DEAD_GRACE_S = 1.0  # an exited process's last message may still be in the queue's pipe


class PartyError(RuntimeError):
    """A party raised, died or timed out; the message holds what each party reported."""


def _party_main(rank: int, world_size: int, rendezvous: str, provider: str, fn: Callable,
                args: tuple, is_dealer: bool, timeout: float, env: dict[str, str],
                queue: mp.Queue) -> None:
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world_size), RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND="gloo")
    try:
        from launch.session import init_dealer, init_party, run_dealer, shutdown
        if is_dealer:  # serves correlated randomness until the parties leave
            init_dealer(timeout_s=timeout, op_timeout_s=timeout)
            run_dealer(fn)
            queue.put((rank, "ok", None))
            return
        init_party(world_size=world_size, provider=provider, timeout_s=timeout,
                   op_timeout_s=timeout)
        result = fn(*args)
        shutdown()
        queue.put((rank, "ok", result))
    except BaseException as err:  # report everything, including SystemExit, to the parent
        from launch.session import peer_error
        known = peer_error(err, rank, world_size, provider == "TTP")
        queue.put((rank, "error", (f"{known}\n" if known else "") + traceback.format_exc()))


def _collect(procs: list, queue: mp.Queue, timeout: float) -> tuple[dict, dict, dict]:
    """Read reports until all arrived, one failed, a process died silently, or time ran out."""
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    dead: dict[int, int] = {}
    exited_at: dict[int, float] = {}
    end = time.monotonic() + timeout
    while len(results) < len(procs) and not errors and not dead:
        try:
            rank, status, payload = queue.get(timeout=_POLL_S)
            (results if status == "ok" else errors)[rank] = payload
            continue
        except queue_lib.Empty:
            pass
        now = time.monotonic()
        for r, p in enumerate(procs):
            if r not in results and p.exitcode is not None:
                exited_at.setdefault(r, now)
                if now - exited_at[r] > _DEAD_GRACE_S:
                    dead[r] = p.exitcode
        if now > end:
            raise PartyError(f"parties did not finish within {timeout:.0f} s (dead ranks: "
                             f"{dead or 'none'}; errors so far: {errors})")
    return results, errors, dead


def run_parties(fn: Callable, *args: Any, world_size: int = 2, dealer: bool = False,
                dealer_main: Callable | None = None, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` parties (+ a dealer); return results by rank.

    ``dealer_main`` is what the dealer process runs after joining the parties (default: CrypTen's
    TTP server, via ``launch.session.serve_dealer``); it must return when the parties shut down.
    """
    from launch.session import serve_dealer
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["launch.session"])  # no effect once the server runs
    queue = ctx.Queue()
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    provider = "TTP" if dealer else "TFP"
    n_procs = world_size + int(dealer)
    procs = [ctx.Process(target=_party_main, daemon=True,
                         args=(r, world_size, rendezvous, provider,
                               fn if r < world_size else (dealer_main or serve_dealer), args,
                               r >= world_size, timeout, dict(os.environ), queue))
             for r in range(n_procs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    dead: dict[int, int] = {}
    try:
        results, errors, dead = _collect(procs, queue, timeout)
    finally:
        for r, p in enumerate(procs):
            p.join(timeout=5 if not (errors or dead) else 0.5)
            if p.exitcode not in (None, 0) and r not in results and r not in errors:
                dead[r] = p.exitcode  # died on its own, before we kill the rest
            if p.is_alive():
                p.kill()
    if errors or dead:
        detail = "\n".join([f"--- rank {r} exited with code {c} without reporting ---"
                            for r, c in sorted(dead.items())]
                           + [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())])
        raise PartyError(f"{len(errors) + len(dead)} party(ies) failed:\n{detail}")
    return [results[r] for r in range(world_size)]
