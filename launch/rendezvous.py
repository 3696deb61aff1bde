"""The TCP rendezvous: rank 0 picks the port, every rank dials the advertised address.

The store behind ``tcp://ADDR:PORT`` is torch's ``TCPStore``, served by rank 0 on every interface;
``ADDR`` only tells the other ranks where to dial. Picking the port by binding port 0 and closing
the socket leaves a short window in which another program could take it; ``port`` pins it instead.
"""
from __future__ import annotations

import socket

from launch.config import WILDCARD_ADDRS, LaunchConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def advertised_addr(cfg: LaunchConfig) -> str:
    """Where the other ranks dial rank 0: ``advertise_addr``, else ``master_addr`` unless wildcard."""
    if cfg.advertise_addr:
        return cfg.advertise_addr
    return socket.gethostname() if cfg.master_addr in WILDCARD_ADDRS else cfg.master_addr


def rendezvous_url(cfg: LaunchConfig) -> str:
    """``tcp://ADDR:PORT`` for this launch (called on rank 0, then broadcast)."""
    port = cfg.port or free_port(cfg.master_addr)
    addr = advertised_addr(cfg)
    return f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"
