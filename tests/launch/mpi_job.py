"""A tiny job for ``mpirun`` tests of ``launch.role.run_role`` (not a test module itself).

``mpirun -n 2|3 python tests/launch/mpi_job.py MODE [launch flags]``; MODE:
matmul (2-party secret matmul, prints ``RESULT rank=R world=W provider=P err=E``),
die (rank 1 exits with 3 right after init), dealer-dies (``-n 3``: the dealer serves for a second,
then exits with 3 while the parties keep asking it for tuples), absent (rank 1 gets the rendezvous over MPI but never
joins it; needs ``--timeout-s``), absent-mpi (rank 1 never even starts MPI), silent (rank 1 stays
alive but sends nothing; needs ``--op-timeout-s``).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from launch.config import add_arguments, from_args  # noqa: E402
from launch.mpi import Topology  # noqa: E402
from launch.role import run_role  # noqa: E402


def _matmul(topo: Topology) -> None:
    import torch

    from protocols.compat import comm, crypten
    torch.manual_seed(7)
    x, w = torch.randn(3, 8), torch.randn(8, 5)
    out = crypten.cryptensor(x, src=0).matmul(crypten.cryptensor(w, src=1)).get_plain_text()
    err = (out - x @ w).abs().max().item()
    print(f"RESULT rank={comm.get().get_rank()} world={comm.get().get_world_size()} "
          f"provider={type(crypten.mpc.get_default_provider()).__name__} err={err:.2e}", flush=True)


def _die(topo: Topology) -> None:
    if topo.rank == 1:
        os._exit(3)
    _matmul(topo)


def _serve_then_die() -> None:
    from protocols.dealer import serve
    threading.Timer(1.0, os._exit, (3,)).start()
    serve()


def _keep_multiplying(topo: Topology) -> None:
    for _ in range(300):
        _matmul(topo)


def _silent(topo: Topology) -> None:
    if topo.rank == 1:
        time.sleep(120)
    _matmul(topo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["matmul", "die", "dealer-dies", "absent", "absent-mpi", "silent"])
    add_arguments(parser)
    args = parser.parse_args()
    if args.mode.startswith("absent") and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        if args.mode == "absent":
            from mpi4py import MPI
            MPI.COMM_WORLD.bcast(None, root=0)  # receives the rendezvous, then never joins it
        time.sleep(120)
    job = {"matmul": _matmul, "die": _die, "silent": _silent, "dealer-dies": _keep_multiplying}.get(args.mode, _matmul)
    dealer_main = _serve_then_die if args.mode == "dealer-dies" else None
    return run_role(job, from_args(args), prog="python tests/launch/mpi_job.py MODE", dealer_main=dealer_main)


if __name__ == "__main__":
    sys.exit(main())
