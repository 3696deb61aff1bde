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


def die(code: int, message: str) -> None:
    """Write one line to stderr and leave at once (no finalizers: they can block on a dead peer)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, (message.rstrip() + "\n").encode())
    os._exit(int(code))


def _whoami() -> str:
    if "RANK" in os.environ:
        return describe_rank(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "2")))
    return f"rank {os.environ.get('OMPI_COMM_WORLD_RANK', os.environ.get('PMI_RANK', '?'))}"


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Exit with code 4 and a one-line message unless the block finishes within ``seconds``.

    Backstop: a Python timer cannot fire while a C call holds the GIL (``MPI_Init`` waiting for a
    rank that never starts does), so ``faulthandler`` (a C thread) also dumps the stacks and exits
    with code 1 ``_BACKSTOP_GRACE_S`` later.
    """
    def expire() -> None:
        die(ExitCode.RENDEZVOUS_TIMEOUT,
            f"mpcache: {_whoami()}: {what} not done after {seconds:g} s: a peer never arrived "
            "(did every rank start? is the rendezvous address/port reachable? firewall?)")
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + _BACKSTOP_GRACE_S, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
