"""MPI ranks -> CrypTen parties. mpirun only starts the processes; the parties talk gloo over TCP.

``mpirun -n 2``: rank 0 client, rank 1 model owner, correlated randomness from a trusted dealer
emulated inside party 0 (CrypTen TFP). ``mpirun -n 3``: rank 2 is a separate dealer (CrypTen TTP);
CrypTen's ``WORLD_SIZE`` is 2 on every rank (the computing parties), the dealer has ``RANK=2``.
Rank 0 picks the rendezvous ``tcp://ADDR:PORT`` and broadcasts it over MPI (the only MPI message).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import ModuleType

from launch.config import LaunchConfig
from launch.errors import LaunchError, NotUnderMPI, describe_rank
from launch.rendezvous import rendezvous_url
from launch.watchdog import blocked_on

N_PARTIES = 2
# set by mpirun/mpiexec for every rank: Open MPI, then MPICH/Intel MPI (Hydra)
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def usage(prog: str = "python -m mpcache.launch") -> str:
    """How to start ``prog`` (shown when it was started without mpirun)."""
    return (f"{prog} must be started by mpirun, one process per role (the prompt on standard "
            "input reaches rank 0, the client, only):\n"
            f"  echo PROMPT | mpirun --oversubscribe -n 3 {prog} [flags]  # client + model owner + "
            "dealer rank 2 (secure)\n"
            f"  echo PROMPT | mpirun -n 2 {prog} [flags]                  # dealer inside party 0: NOT "
            "secure, benchmarking only\n"
            "As root, first: export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n"
            f"Two hosts: mpirun -n 1 -H CLIENT {prog} --prompt-file Q.txt --master-addr 0.0.0.0 "
            f"--advertise-addr CLIENT : -n 1 -H OWNER {prog} --model DIR")


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


def _init_mpi() -> ModuleType:
    """Initialise MPI without holding the GIL; return mpi4py's ``MPI`` module, ready to use.

    ``MPI_Init`` returns only once every mpirun rank has called it. mpi4py calls it holding the GIL,
    at import and in ``MPI.Init_thread()`` alike (measured with mpi4py 4.1.2), so a rank that never
    starts would freeze every Python thread of the others, the ``deadline`` timer included. Here
    mpi4py is imported with ``rc.initialize = False`` and ``MPI_Init_thread(THREAD_MULTIPLE)`` (what
    mpi4py would request) of the libmpi its extension links is called through ctypes, which releases
    the GIL during a foreign call. What mpi4py's own start-up would add is kept: ``rc.finalize =
    True`` (it finalises at exit only an MPI it started unless told; Open MPI reports a rank that
    exits without ``MPI_Finalize`` as failed) and ``MPI.ERRORS_RETURN`` on COMM_WORLD/COMM_SELF (MPI
    errors raise ``MPI.Exception``). An mpi4py imported earlier keeps its rc (by default it started
    MPI then, GIL held). Where libmpi's symbol cannot be found, ``MPI.Init_thread()`` starts MPI,
    bounded only by the watchdog's faulthandler backstop.
    """
    import ctypes

    import mpi4py
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = True
    from mpi4py import MPI
    if MPI.Is_initialized():
        return MPI
    with blocked_on("MPI_Init", "a rank never started MPI (did every mpirun rank start? "
                                "is one stuck before MPI_Init?)"):
        try:  # dlsym on the extension's handle searches the libraries it links
            init_thread = ctypes.CDLL(MPI.__file__).MPI_Init_thread
        except (OSError, AttributeError):
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
            return MPI
        init_thread.restype = ctypes.c_int
        init_thread.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_int)]
        provided = ctypes.c_int(0)
        ierr = init_thread(None, None, MPI.THREAD_MULTIPLE, ctypes.byref(provided))
    if ierr != MPI.SUCCESS:
        raise LaunchError(f"MPI_Init_thread failed (MPI error code {ierr})")
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        comm.Set_errhandler(MPI.ERRORS_RETURN)
    return MPI


def discover(cfg: LaunchConfig, prog: str = "python -m mpcache.launch") -> Topology:
    """This rank's ``Topology``: rank/size from MPI, the rendezvous broadcast by rank 0.

    Raises ``NotUnderMPI`` (message = ``usage(prog)``) outside mpirun, without initialising MPI, and
    ``LaunchError`` on every rank for a wrong ``-n`` or a ``--dealer`` flag that contradicts it.
    Call inside ``watchdog.deadline``: MPI start-up and the broadcast wait for the other ranks
    without a timeout (``_init_mpi`` keeps the GIL free so that the deadline can fire).
    """
    if not under_mpi():
        raise NotUnderMPI(usage(prog))
    world = _init_mpi().COMM_WORLD
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
