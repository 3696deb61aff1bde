"""Run an MPC function on real parties on this machine, without mpirun (tests, notebooks).

``run_parties(fn, *args, world_size=2, dealer=False)`` spawns one process per computing party (and
one dealer process when ``dealer=True``), each with its own CrypTen communicator talking gloo over a
TCP rendezvous on 127.0.0.1, runs ``fn(*args)`` on every party and returns the parties' results in
rank order. If any process fails, it raises ``PartyError`` carrying every party's traceback (never a
silent ``None``); if the parties do not finish within ``timeout`` seconds, all are killed and it
raises ``PartyError`` too.

``fn`` must be picklable (a module-level function). Inputs that the parties must agree on should be
drawn on rank 0 and broadcast, or derived from a seed passed in ``args``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


class PartyError(RuntimeError):
    """A party raised, died or timed out; the message holds what each party reported."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _party_main(rank: int, world_size: int, rendezvous: str, provider: str,
                fn: Callable, args: tuple, is_dealer: bool, queue: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND="gloo")
    try:
        from launch.session import init_party, shutdown
        if is_dealer:  # serves correlated randomness until the parties leave
            fn()
            queue.put((rank, "ok", None))
            return
        init_party(world_size=world_size, provider=provider)
        result = fn(*args)
        shutdown()
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_parties(fn: Callable, *args: Any, world_size: int = 2, dealer: bool = False,
                dealer_main: Callable | None = None, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` parties (+ a dealer); return results by rank.

    ``dealer_main`` is what the dealer process runs (default: CrypTen's TTP server, via
    ``launch.session.serve_dealer``); it must return when the parties shut down.
    """
    from launch.session import serve_dealer
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    provider = "TTP" if dealer else "TFP"
    n_procs = world_size + int(dealer)
    procs = [ctx.Process(target=_party_main, daemon=True,
                         args=(r, world_size, rendezvous, provider,
                               fn if r < world_size else (dealer_main or serve_dealer), args,
                               r >= world_size, queue))
             for r in range(n_procs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(n_procs):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception:  # queue.Empty: somebody hangs or died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                raise PartyError(f"parties did not finish within {timeout:.0f} s "
                                 f"(dead ranks: {dead or 'none'}; errors so far: {errors})") from None
            (results if status == "ok" else errors).__setitem__(rank, payload)
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise PartyError(f"{len(errors)} party(ies) failed:\n{detail}")
    return [results[r] for r in range(world_size)]
