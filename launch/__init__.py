"""Process topology: MPI ranks -> CrypTen parties, dealer rank, rendezvous, fail-fast shutdown.

Knows nothing about transformers. ``run_role`` is what ``python -m mpcache.launch`` runs on every
rank; ``run_parties`` runs a function on real local parties without mpirun (tests, notebooks).
Modules: config (LaunchConfig + flags), mpi (ranks, roles, rendezvous broadcast), rendezvous,
session (CrypTen up/down, bounded timeouts, peer errors), watchdog, role (run_role), local
(run_parties), devices (party placement), banner (security banner), errors (exit codes), netem
(emulated LAN/WAN links between network namespaces; tunlink: its userspace link emulator),
netrun (parties in those namespaces), netprobe (link RTT/throughput check).
"""
from launch.config import LaunchConfig
from launch.errors import ExitCode, LaunchError, NotUnderMPI, PeerLost, PeerTimeout, RendezvousError

__all__ = ["LaunchConfig", "ExitCode", "LaunchError", "NotUnderMPI", "PeerLost", "PeerTimeout",
           "RendezvousError"]
