"""Bring one CrypTen party (or the dealer) up and down, from the environment the launcher set.

The launcher (``launch.mpi`` under mpirun, ``launch.local`` in tests) sets ``RANK``, ``WORLD_SIZE``
(computing parties only), ``RENDEZVOUS`` and ``DISTRIBUTED_BACKEND`` before calling these.

Timeouts. ``crypten.init()`` calls ``dist.init_process_group`` and ``dist.new_group`` itself, with no
timeout argument, so gloo would wait 30 min for a missing peer. Two bounds replace that:
1. a watchdog (``launch.watchdog.deadline``) around the whole bring-up: if it has not finished in
   ``timeout_s`` the process prints one line and hard-exits with code 4. A thread timer, because
   the blocking calls (MPI_Init and bcast, gloo connect) sit in C and no Python exception can
   interrupt them; they release the GIL, so the timer runs (``launch.mpi._init_mpi`` calls
   MPI_Init through ctypes for that: mpi4py holds the GIL in it);
2. torch's default process-group timeout (``distributed_c10d.default_pg_timeout``, which both
   ``init_process_group`` and ``new_group`` read when given none) is set to ``op_timeout_s`` during
   ``crypten.init()``, so every later gloo send/recv to a live but silent peer raises after that.
A peer that dies closes its sockets: gloo raises at once and ``peer_error`` names the peer.
"""
from __future__ import annotations

import os
import re
import traceback
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed.distributed_c10d as c10d

from launch.errors import LaunchError, PeerLost, PeerTimeout, RendezvousError, describe_rank
from launch.watchdog import deadline
from protocols.compat import comm, crypten

assert hasattr(c10d, "default_pg_timeout"), "torch moved default_pg_timeout: update _pg_timeout"

_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                 "connection refused", "econnreset", "epipe")
_TIMEOUT_MARKERS = ("timed out", "timeout")


@contextmanager
def _pg_timeout(seconds: float) -> Iterator[None]:
    """Temporarily make ``seconds`` the timeout of process groups created without one."""
    old = c10d.default_pg_timeout
    c10d.default_pg_timeout = timedelta(seconds=seconds)
    try:
        yield
    finally:
        c10d.default_pg_timeout = old


def peer_error(err: BaseException, rank: int, n_parties: int = 2,
               dealer: bool = False) -> LaunchError | None:
    """The ``PeerLost`` / ``PeerTimeout`` that a gloo error means, or None if it is something else."""
    if not isinstance(err, RuntimeError):  # torch's DistBackendError is one
        return None
    text = str(err).strip().lower()
    if rank >= n_parties:
        peers = " or ".join(describe_rank(r, n_parties) for r in range(n_parties))
    elif dealer and _in_dealer_request(err):  # a party talks to the dealer only there
        peers = describe_rank(n_parties, n_parties)
    else:
        peers = " or ".join(describe_rank(r, n_parties) for r in range(n_parties) if r != rank)
    if any(m in text for m in _LOST_MARKERS):
        return PeerLost(f"{peers} died or disconnected (gloo: {gloo_cause(err)})")
    if any(m in text for m in _TIMEOUT_MARKERS):
        return PeerTimeout(f"{peers} sent nothing within the op timeout (gloo: {gloo_cause(err)})")
    return None


def _in_dealer_request(err: BaseException) -> bool:
    """Whether ``err`` was raised talking to the dealer (``protocols.tape``, or CrypTen's ``ttp_request``)."""
    return any(frame.name == "ttp_request" or Path(frame.filename).match("protocols/tape.py")
               for frame in traceback.extract_tb(err.__traceback__))


def gloo_cause(err: BaseException) -> str:
    """The gist of a torch/gloo error: last line, no ``[file.cc:537]`` prefix, no advice trailer."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[-1].strip())
    return cause.split(". This is typically", 1)[0]


def _bring_up(what: str, timeout_s: float, op_timeout_s: float, init: Callable[[], None]) -> None:
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with deadline(timeout_s, what), _pg_timeout(op_timeout_s):
        try:
            init()
        except RuntimeError as err:  # torch's DistNetworkError / DistBackendError are RuntimeErrors
            raise RendezvousError(f"{what} failed: {gloo_cause(err)}") from err
    assert comm.get().get_rank() == rank, f"CrypTen rank {comm.get().get_rank()} != RANK {rank}"
    if comm.get().get_world_size() != n:
        raise LaunchError(f"expected a {n}-party world, got {comm.get().get_world_size()}")


def _require_env() -> None:
    missing = [v for v in ("RANK", "WORLD_SIZE", "RENDEZVOUS") if not os.environ.get(v)]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: refusing to start a silent 1-party world")


def init_party(world_size: int = 2, provider: str = "TFP", *, timeout_s: float = 60.0,
               op_timeout_s: float = 600.0, device: str | None = None) -> None:
    """``crypten.init()`` for a computing party; refuses anything but a real ``world_size``-party world.

    ``provider``: ``"TFP"`` (trusted dealer emulated inside party 0 — fast, NOT secure against
    party 0) or ``"TTP"`` (a separate dealer process, rank ``world_size``). ``device``: a CUDA device
    for CrypTen's GPU generators (None on CPU).
    """
    _require_env()
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise LaunchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but a {world_size}-party world was asked")
    if provider not in ("TFP", "TTP"):
        raise ValueError(f"provider must be 'TFP' or 'TTP', got {provider!r}")
    crypten.cfg.mpc.provider = provider
    if provider == "TTP":
        from protocols.tape import install
        install()  # the dealer's correlations come as one tape per step (protocols.tape)
    crypten.cfg.communicator.verbose = True  # byte/round counters only count when verbose
    _bring_up("rendezvous with the other party" + (" and the dealer" if provider == "TTP" else ""),
              timeout_s, op_timeout_s, lambda: crypten.init(device=device))


def init_dealer(*, timeout_s: float = 60.0, op_timeout_s: float = 600.0) -> None:
    """Join the parties' process group as the dealer (rank ``WORLD_SIZE``), provider TTP."""
    _require_env()
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    _bring_up("rendezvous with the parties", timeout_s, op_timeout_s, crypten.init)


def run_dealer(dealer_main: Callable[[], object]) -> None:
    """Run a dealer server (it calls ``crypten.init()`` again, a no-op once ``init_dealer`` ran)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CrypTen is already initialized", RuntimeWarning)
        dealer_main()


def serve_dealer() -> None:
    """Run the dealer (``protocols.tape``) until party 0 sends 'terminate'."""
    from protocols.dealer import serve
    if not comm.is_initialized():
        init_dealer()
    run_dealer(serve)


def shutdown() -> None:
    crypten.uninit()
