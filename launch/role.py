"""``run_role``: what every mpirun rank of ``python -m mpcache.launch`` runs.

1. ``discover`` the topology (fails with the mpirun command line when started without mpirun),
   then check that every rank was given the same public options (``launch.agreement``);
2. set CrypTen's environment, place the rank on its device, set up rank-tagged logging;
3. bring CrypTen up within ``timeout_s`` (parties) or join as the dealer and serve;
4. run ``main(topology)`` on the two parties, then shut CrypTen down.
Any failure becomes one line on stderr, ``mpcache: party 0 (client): ...``, and the exit code of
``launch.errors.ExitCode``. After bring-up a failing rank leaves with ``os._exit`` (gloo and MPI
finalizers can block on a dead peer). Open MPI 5's mpirun then SIGKILLs the other ranks at once and
reports the first non-zero exit (rank and code); a survivor whose gloo socket closed first has
already printed which peer it lost (measured: either may win the race).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import Callable, Mapping

from launch.agreement import InputRejected, agree
from launch.config import LaunchConfig
from launch.errors import ExitCode, LaunchError, NotUnderMPI, PeerLost
from launch.mpi import N_PARTIES, Topology, discover, env_rank
from launch.watchdog import deadline, die

logger = logging.getLogger(__name__)


def configure_logging(topo: Topology, verbose: bool = False) -> None:
    """Rank-tagged log lines; info from rank 0 only (debug everywhere when ``verbose``).

    CrypTen logs on the root logger; those records are dropped unless ``verbose``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{topo.name}] %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(lambda record: record.name != "root")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO if topo.rank == 0 else logging.WARNING)


def _stop_on_sigterm(topo: Topology) -> None:
    """On SIGTERM (slurm, ``kill``, a launcher stopping the job) leave with one line, not silently.

    A party raises ``PeerLost`` from the handler, so a gloo error naming the dead peer, when it comes
    first, is the message; the dealer exits at once (``TTPServer`` swallows ``RuntimeError``).
    """
    def handler(signum: int, frame: object) -> None:
        text = "stopped by SIGTERM (the launcher stops the job, e.g. another rank exited)"
        if topo.is_dealer:
            die(ExitCode.PEER_LOST, f"mpcache: {topo.name}: {text}")
        raise PeerLost(text)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, LaunchError) else f"{type(err).__name__}: {text}"


def run_role(main: Callable[[Topology], object], cfg: LaunchConfig, *,
             prog: str = "python -m mpcache.launch",
             dealer_main: Callable[[], object] | None = None, verbose: bool = False,
             public: Mapping[str, object] | None = None, rejected: bool = False) -> int:
    """Run this rank's role; return its exit code (0 ok) for the caller to ``sys.exit`` with.

    ``main(topology)`` runs on both computing parties after ``crypten.init()``; ``dealer_main``
    (default: ``protocols.dealer.serve``, the tape dealer) runs on rank 2 of ``mpirun -n 3`` until party 0 shuts down.
    ``public``: this rank's public options; every rank must have been given the same (else all
    stop with one line naming the differences, exit code 2). ``rejected``: this rank's own input
    failed its checks (it printed why); it still joins the rendezvous so that all ranks stop together.
    """
    try:
        with deadline(cfg.timeout_s, "MPI rendezvous broadcast"):
            topo = discover(cfg, prog)
            if public is not None:
                agree(public, N_PARTIES, rejected=rejected)
    except NotUnderMPI as err:
        print(str(err), file=sys.stderr)
        return int(ExitCode.USAGE)
    except InputRejected as err:  # the rejecting rank said why; rank 0 says who, unless it was it
        if env_rank() in (0, None) and not rejected:
            print(f"mpcache: {_one_line(err)}", file=sys.stderr)
        return int(err.code)
    except LaunchError as err:  # every rank hit the same check: rank 0 says so
        if env_rank() in (0, None):
            print(f"mpcache: {_one_line(err)}", file=sys.stderr)
        return int(err.code)
    # torch and CrypTen only now: the usage and wrong -n answers stay instant
    from launch.devices import party_device
    from launch.session import init_dealer, init_party, peer_error, run_dealer, shutdown
    from protocols.compat import crypten
    try:
        topo = replace(topo, device=str(party_device(topo.rank, cfg.device, n_parties=N_PARTIES)))
    except ValueError as err:  # --device cuda without a GPU
        print(f"mpcache: {topo.name}: {err}", file=sys.stderr)
        return int(ExitCode.USAGE)
    os.environ.update(topo.env())
    if cfg.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = cfg.ifname
    configure_logging(topo, verbose)
    _stop_on_sigterm(topo)
    try:
        if topo.device.startswith("cuda"):
            import torch
            torch.cuda.set_device(torch.device(topo.device))
        if topo.is_dealer:
            init_dealer(timeout_s=cfg.timeout_s, op_timeout_s=cfg.op_timeout_s)
            from protocols.dealer import serve
            run_dealer(dealer_main or serve)
            return int(ExitCode.OK)
        init_party(N_PARTIES, topo.provider, timeout_s=cfg.timeout_s,
                   op_timeout_s=cfg.op_timeout_s,
                   device=topo.device if topo.device.startswith("cuda") else None)
        logger.info("%d parties%s up over %s", N_PARTIES, " + dealer" if topo.dealer else "",
                    topo.rendezvous)
        main(topo)
        shutdown()
    except (Exception, KeyboardInterrupt) as err:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # we are leaving anyway
        known = err if isinstance(err, LaunchError) else peer_error(err, topo.rank, N_PARTIES,
                                                                    topo.dealer)
        if known is None:
            logger.debug("traceback of the failure", exc_info=err)
        code = known.code if known is not None else ExitCode.FAILED
        die(code, f"mpcache: {topo.name}: {_one_line(known or err)}")
    return int(ExitCode.OK)
