"""Bring one CrypTen party (or the dealer) up and down, from the environment the launcher set.

The launcher (``launch.mpi`` under mpirun, ``launch.local`` in tests) sets ``RANK``, ``WORLD_SIZE``
(computing parties only), ``RENDEZVOUS`` and ``DISTRIBUTED_BACKEND`` before calling these.
"""
from __future__ import annotations

import os

from protocols.compat import comm, crypten


def init_party(world_size: int = 2, provider: str = "TFP") -> None:
    """``crypten.init()`` for a computing party; refuses anything but a real ``world_size``-party world.

    ``provider``: ``"TFP"`` (trusted dealer emulated inside party 0 — fast, NOT secure against
    party 0) or ``"TTP"`` (a separate dealer process, rank ``world_size``).
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "RENDEZVOUS") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: refusing to start a silent 1-party world")
    crypten.cfg.mpc.provider = provider
    crypten.cfg.communicator.verbose = True  # byte/round counters only count when verbose
    crypten.init()
    got = comm.get().get_world_size()
    if got != world_size:
        raise RuntimeError(f"expected a {world_size}-party world, got {got}")


def serve_dealer() -> None:
    """Run CrypTen's trusted-third-party server until party 0 sends 'terminate'."""
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    crypten.mpc.provider.TTPServer()


def shutdown() -> None:
    crypten.uninit()
