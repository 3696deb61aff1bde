"""MPI ranks -> CrypTen parties. mpirun only starts the processes; the parties talk gloo over TCP.

``mpirun -n 2``: rank 0 client, rank 1 model owner, correlated randomness from a trusted dealer
emulated inside party 0 (CrypTen TFP). ``mpirun -n 3``: rank 2 is a separate dealer (CrypTen TTP);
CrypTen's ``WORLD_SIZE`` is 2 on every rank (the computing parties), the dealer has ``RANK=2``.
Rank 0 picks the rendezvous ``tcp://ADDR:PORT`` and broadcasts it over MPI (the only MPI message).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from launch.config import LaunchConfig
from launch.errors import LaunchError, NotUnderMPI, describe_rank
from launch.rendezvous import rendezvous_url

N_PARTIES = 2
# set by mpirun/mpiexec for every rank: Open MPI, then MPICH/Intel MPI (Hydra)
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def usage(prog: str = "python -m mpcache.launch") -> str:
    """How to start ``prog`` (shown when it was started without mpirun)."""
    return (f"{prog} must be started by mpirun, one process per role:\n"
            f"  mpirun -n 2 {prog} [flags]                  # client + model owner "
            "(dealer inside party 0: NOT secure, benchmarking only)\n"
            f"  mpirun --oversubscribe -n 3 {prog} [flags]  # + separate dealer rank 2\n"
            "As root, first: export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n"
            f"Several machines: mpirun --hostfile HOSTS -n 2 {prog} --master-addr 0.0.0.0 "
            "--advertise-addr HOST0 [--ifname IFACE]")


@dataclass(frozen=True)
class Topology:
    """This process's place in the launch (all public).

    rank: MPI rank = CrypTen rank. size: MPI processes (2, or 3 with the dealer).
    rendezvous: ``tcp://ADDR:PORT`` shared by all ranks. device: where this rank computes
    (``launch.devices.party_device``, placed by ``run_role``).
    """

    rank: int
    size: int
    rendezvous: str
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.size not in (N_PARTIES, N_PARTIES + 1):
            raise LaunchError(f"mpirun -n {self.size}: MPCache runs -n 2 (client + model owner) "
                              "or -n 3 (+ a separate dealer rank 2)")
        if not 0 <= self.rank < self.size:
            raise LaunchError(f"rank {self.rank} outside a world of {self.size}")

    @property
    def dealer(self) -> bool:
        return self.size == N_PARTIES + 1

    @property
    def is_dealer(self) -> bool:
        return self.rank >= N_PARTIES

    @property
    def provider(self) -> str:
        return "TTP" if self.dealer else "TFP"

    @property
    def name(self) -> str:
        return describe_rank(self.rank, N_PARTIES)

    def env(self) -> dict[str, str]:
        """CrypTen's communicator environment for this rank."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(N_PARTIES),
                "RENDEZVOUS": self.rendezvous, "DISTRIBUTED_BACKEND": "gloo"}


def under_mpi() -> bool:
    return any(v in os.environ for v in MPI_ENV_VARS)


def env_rank() -> int | None:
    """This process's MPI rank from the launcher's environment (None outside mpirun)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return None


def discover(cfg: LaunchConfig, prog: str = "python -m mpcache.launch") -> Topology:
    """This rank's ``Topology``: rank/size from MPI, the rendezvous broadcast by rank 0.

    Raises ``NotUnderMPI`` (message = ``usage(prog)``) outside mpirun, without initialising MPI, and
    ``LaunchError`` on every rank for a wrong ``-n`` or a ``--dealer`` flag that contradicts it.
    Call inside ``session.deadline``: the broadcast waits for rank 0 without a timeout.
    """
    if not under_mpi():
        raise NotUnderMPI(usage(prog))
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if cfg.dealer is not None and cfg.dealer != (size == N_PARTIES + 1):
        want = "-n 3 (a dealer rank)" if cfg.dealer else "-n 2 (no dealer rank)"
        raise LaunchError(f"{'--dealer' if cfg.dealer else '--no-dealer'} needs mpirun {want}, "
                          f"got -n {size}")
    url, error = None, None
    if rank == 0:
        try:
            url = rendezvous_url(cfg)
        except OSError as err:  # e.g. master_addr is not an address of this host
            error = f"rank 0 cannot listen on {cfg.master_addr}:{cfg.port}: {err}"
    url, error = world.bcast((url, error), root=0)
    if error:
        raise LaunchError(error)
    return Topology(rank, size, url)
