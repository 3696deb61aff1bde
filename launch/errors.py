"""Launch failures, each with the exit code a rank leaves with.

Codes (what ``mpirun`` and ``run_parties`` report): 0 ok · 1 the role's own code failed · 2 bad
launch (not under mpirun, wrong ``-n``, bad flags) · 3 a peer died or disconnected mid-run ·
4 a peer never arrived (rendezvous deadline) · 5 a live peer stayed silent past the op timeout.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    PEER_LOST = 3
    RENDEZVOUS_TIMEOUT = 4
    PEER_TIMEOUT = 5


class LaunchError(RuntimeError):
    """A launch problem whose message is complete on one line; ``code`` is the exit code."""

    code: ExitCode = ExitCode.USAGE


class NotUnderMPI(LaunchError):
    """The entry point was started without mpirun; the message shows the command line to use."""


class PeerLost(LaunchError):
    """A peer process died or closed its connections while this rank was talking to it."""

    code = ExitCode.PEER_LOST


class PeerTimeout(LaunchError):
    """A live peer sent nothing for longer than the op timeout."""

    code = ExitCode.PEER_TIMEOUT


class RendezvousError(LaunchError):
    """Not every rank reached the rendezvous within the deadline, or it could not be reached."""

    code = ExitCode.RENDEZVOUS_TIMEOUT


ROLE_NAMES = {0: "client", 1: "model owner"}


def describe_rank(rank: int, n_parties: int = 2) -> str:
    """``party 1 (model owner)`` for a computing party, ``dealer (rank 2)`` for the dealer."""
    if rank >= n_parties:
        return f"dealer (rank {rank})"
    return f"party {rank} ({ROLE_NAMES.get(rank, 'party')})"
