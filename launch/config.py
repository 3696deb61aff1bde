"""LaunchConfig: how the ranks find each other, how long they wait, where the parties compute.

Every field is a flag of ``python -m mpcache.launch`` (``add_arguments`` / ``from_args``), one to one.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

WILDCARD_ADDRS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class LaunchConfig:
    """Process topology knobs (all public, none affects the protocol).

    master_addr: address rank 0's rendezvous store listens on; ``0.0.0.0`` = every interface (several
        machines; then the others dial ``advertise_addr``).
    advertise_addr: address the other ranks dial; None = ``master_addr``, or this host's name when
        ``master_addr`` is a wildcard.
    port: rendezvous TCP port; 0 = rank 0 picks a free one and broadcasts it over MPI.
    timeout_s: bring-up deadline: every rank must have joined the rendezvous within this time, else
        all exit with code 4 (gloo's own default would wait 30 min).
    op_timeout_s: one send/recv waits at most this long for a live but silent peer (gloo timeout).
    dealer: None = decided by ``mpirun -n`` (3 = separate dealer rank 2); True/False is checked
        against it.
    device: ``cpu`` or ``cuda`` (parties on ``cuda:{rank % device_count}``, see ``launch.devices``).
    ifname: network interface gloo uses (``GLOO_SOCKET_IFNAME``) on several machines; None = gloo's
        choice (the interface of this host's name).
    """

    master_addr: str = "127.0.0.1"
    advertise_addr: str | None = None
    port: int = 0
    timeout_s: float = 60.0
    op_timeout_s: float = 600.0
    dealer: bool | None = None
    device: str = "cpu"
    ifname: str | None = None

    def __post_init__(self) -> None:
        if not self.master_addr:
            raise ValueError("master_addr must be a host name or address, got ''")
        if self.advertise_addr is not None and (not self.advertise_addr
                                                or self.advertise_addr in WILDCARD_ADDRS):
            raise ValueError(f"advertise_addr must be a dialable address, got {self.advertise_addr!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 = pick a free one), got {self.port}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.op_timeout_s > 0:
            raise ValueError(f"op_timeout_s must be > 0, got {self.op_timeout_s}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.ifname is not None and not self.ifname:
            raise ValueError("ifname must be an interface name or None, got ''")


_HELP = {
    "master_addr": "address rank 0's rendezvous listens on (0.0.0.0 for several machines)",
    "advertise_addr": "address the other ranks dial (default: master_addr, or this host's name)",
    "port": "rendezvous TCP port (0: rank 0 picks a free one)",
    "timeout_s": "seconds for every rank to join; a peer that never arrives fails the launch",
    "op_timeout_s": "seconds one send/recv waits for a live but silent peer",
    "dealer": "require (--dealer) or forbid (--no-dealer) a separate dealer rank (default: -n 3)",
    "device": "cpu, or cuda: party r computes on cuda:{r %% device_count}",
    "ifname": "network interface for gloo on several machines (GLOO_SOCKET_IFNAME)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per ``LaunchConfig`` field (``timeout_s`` -> ``--timeout-s``)."""
    group = parser.add_argument_group("launch")
    default = LaunchConfig()
    for f in fields(LaunchConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(default, f.name)
        if f.name == "dealer":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=_HELP[f.name])
            continue
        kind = {"port": int, "timeout_s": float, "op_timeout_s": float}.get(f.name, str)
        choices = ("cpu", "cuda") if f.name == "device" else None
        group.add_argument(flag, type=kind, default=value, choices=choices,
                           help=f"{_HELP[f.name]} [default: {value}]")


def from_args(ns: argparse.Namespace) -> LaunchConfig:
    """The ``LaunchConfig`` of parsed flags added by ``add_arguments``."""
    return LaunchConfig(**{f.name: getattr(ns, f.name) for f in fields(LaunchConfig)})
