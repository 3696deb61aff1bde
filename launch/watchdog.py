"""Leave fast and on one line: ``die`` and the ``deadline`` watchdog (no torch, no CrypTen)."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from launch.errors import ExitCode, describe_rank

_BACKSTOP_GRACE_S = 5.0
_NEVER_ARRIVED = ("a peer never arrived (did every rank start? is the rendezvous address/port "
                  "reachable? firewall?)")
_blocked_on: list[tuple[str, str]] = []  # innermost ``blocked_on`` last


def die(code: int, message: str) -> None:
    """Write one line to stderr and leave at once (no finalizers: they can block on a dead peer)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, (message.rstrip() + "\n").encode())
    os._exit(int(code))


def _whoami() -> str:
    if "RANK" in os.environ:
        return describe_rank(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "2")))
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):  # before CrypTen's env is set
        if os.environ.get(var, "").isdigit():
            return describe_rank(int(os.environ[var]))
    return "rank ?"


@contextmanager
def blocked_on(what: str, why: str) -> Iterator[None]:
    """Inside a ``deadline``: if it expires in this block, its line says ``what`` was not done and
    ``why`` (e.g. ``MPI_Init`` / ``a rank never started MPI``) instead of its own words."""
    _blocked_on.append((what, why))
    try:
        yield
    finally:
        _blocked_on.pop()


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Exit with code 4 and a one-line message unless the block finishes within ``seconds``.

    The message names ``what`` and says a peer never arrived, or what the innermost ``blocked_on``
    says. The timer is a Python thread: it fires only if the blocked call released the GIL. The
    calls of the bring-up do (MPI bcast/gather, gloo connect, and ``MPI_Init``, which
    ``launch.mpi._init_mpi`` makes through ctypes because mpi4py holds the GIL in it). Backstop for
    a C call that blocks holding the GIL anyway: ``faulthandler`` (a C thread) dumps the stacks and
    exits with code 1 ``_BACKSTOP_GRACE_S`` later.
    """
    def expire() -> None:
        late, why = _blocked_on[-1] if _blocked_on else (what, _NEVER_ARRIVED)
        die(ExitCode.RENDEZVOUS_TIMEOUT,
            f"mpcache: {_whoami()}: {late} not done after {seconds:g} s: {why}")
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + _BACKSTOP_GRACE_S, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
