"""Run CrypTen parties (and the dealer) as separate processes inside an emulated ``Network``.

``run_in_network(net, "pkg.module:function", args)`` starts, for every rank r,
``ip netns exec <namespace r> python -m launch.netrun --target ... --args FILE --out FILE`` with
``RANK``/``WORLD_SIZE``/``RENDEZVOUS``/``DISTRIBUTED_BACKEND`` set (the rendezvous is rank 0's
address inside its namespace, where torch's TCPStore listens on every interface) and
``GLOO_SOCKET_IFNAME`` = the namespace's interface, so every gloo connection crosses the emulated
link. Each party calls ``function(*args)`` (arguments and result: JSON) between
``launch.session.init_party`` and ``shutdown`` and writes ``{"status", "result" | "error"}`` to its
file; the dealer rank (``dealer=True``, rank ``world_size``) serves CrypTen's TTP until the parties
leave. ``run_in_network`` returns the parties' results in rank order, or raises
``launch.local.PartyError`` with every party's traceback and log tail; after ``timeout`` seconds,
or once a party failed (plus a short grace), it kills the rest (by their process ids).

Reshaping mid-run: a party function calls ``use_profile("WAN")`` (collective: every party, same
order). Rank 0 asks the harness through a control directory, the harness reshapes the link
(``Network.set_profile``) and answers, then the parties pass a barrier. Heavy set-up (weight
sharing, a simulated prefill) can run unshaped and only the measured phase shaped.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from launch.local import PartyError
from launch.netem import PROFILES, Network, Profile

REPO = Path(__file__).resolve().parents[1]
PORT = 29500  # a fresh namespace has every port free
_POLL_S = 0.05
_GRACE_S = 10.0  # after one party fails, how long the others get to report their own error
_CONTROL_ENV = "MPC_NET_CONTROL"


def use_profile(name: str, timeout_s: float = 60.0) -> None:
    """Collective: have the harness reshape the link to profile ``name`` (a key of the
    ``profiles`` given to ``run_in_network``); a no-op outside ``run_in_network``."""
    from protocols.compat import comm
    control = os.environ.get(_CONTROL_ENV)
    if not control:
        return
    c = comm.get()
    c.barrier()
    if c.get_rank() == 0:
        n = len(list(Path(control).glob("request-*")))
        tmp = Path(control) / f".request-{n}"
        tmp.write_text(name)
        tmp.rename(Path(control) / f"request-{n}")
        done, end = Path(control) / f"done-{n}", time.monotonic() + timeout_s
        while not done.exists():
            if time.monotonic() > end:
                raise TimeoutError(f"the harness did not switch to profile {name!r} within {timeout_s} s")
            time.sleep(_POLL_S)
    c.barrier()


def _serve_requests(net: Network, control: Path, served: list[str], profiles: dict[str, Profile],
                    link_log: list | None) -> None:
    for req in sorted(control.glob("request-*"), key=lambda p: int(p.name.split("-")[1])):
        n = int(req.name.split("-")[1])
        if n < len(served):
            continue
        name = req.read_text().strip()
        if name not in profiles:
            raise ValueError(f"a party asked for unknown profile {name!r}; known: {sorted(profiles)}")
        if link_log is not None:  # the link's counters over the phase that ends here
            link_log.append({"profile": net.profile.name, "stats": net.stats()})
        net.set_profile(profiles[name])
        served.append(name)
        (control / f"done-{n}").write_text("ok")


def _command(net: Network, rank: int, target: str, files: dict, world_size: int, dealer: bool,
             timeout: float) -> list[str]:
    cmd = [sys.executable, "-m", "launch.netrun", "--target", target, "--args", str(files["args"]),
           "--out", str(files["out"][rank]), "--timeout", str(timeout)]
    if rank >= world_size:
        cmd.append("--dealer")
    return net.exec_prefix(rank) + cmd


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_in_network(net: Network, target: str, args: list | tuple = (), *, world_size: int = 2,
                   dealer: bool = False, provider: str | None = None, timeout: float = 600.0,
                   env: dict[str, str] | None = None, profiles: dict[str, Profile] | None = None,
                   link_log: list | None = None) -> list[Any]:
    """Run ``target(*args)`` on ``world_size`` parties (+ dealer) in ``net``; results by rank.

    ``profiles``: what ``use_profile(name)`` may ask for (default ``launch.netem.PROFILES``).
    ``link_log``: if given, gets ``{"profile", "stats": Network.stats()}`` at every reshaping: the
    link's counters over the phase of the named profile that just ended.
    """
    n_procs = world_size + int(dealer)
    if len(net.namespaces) < n_procs:
        raise ValueError(f"{n_procs} processes need {n_procs} namespaces, the network has {len(net.namespaces)}")
    with tempfile.TemporaryDirectory(prefix="mpcnet-run-") as tmp:
        tmp_path = Path(tmp)
        control = tmp_path / "control"
        control.mkdir()
        files = {"args": tmp_path / "args.json", "out": [tmp_path / f"rank{r}.json" for r in range(n_procs)],
                 "log": [tmp_path / f"rank{r}.log" for r in range(n_procs)]}
        files["args"].write_text(json.dumps(list(args)))
        base = dict(os.environ, **(env or {}), WORLD_SIZE=str(world_size), DISTRIBUTED_BACKEND="gloo",
                    RENDEZVOUS=f"tcp://{net.addrs[0]}:{PORT}", GLOO_SOCKET_IFNAME=net.ifname,
                    MPC_NET_PROVIDER=provider or ("TTP" if dealer else "TFP"))
        base[_CONTROL_ENV] = str(control)
        procs = []
        try:
            for r in range(n_procs):
                with open(files["log"][r], "w") as log:
                    procs.append(subprocess.Popen(_command(net, r, target, files, world_size, dealer, timeout),
                                                  env=dict(base, RANK=str(r)), cwd=REPO, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            _wait(net, procs, control, timeout, profiles or PROFILES, link_log)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        return _results(procs, files, world_size, timeout)


def _wait(net: Network, procs: list[subprocess.Popen], control: Path, timeout: float,
          profiles: dict[str, Profile], link_log: list | None) -> None:
    """Serve reshaping requests until every process exited, one failed (+ grace) or time ran out."""
    end, served, failed_at = time.monotonic() + timeout, [], None
    while any(p.poll() is None for p in procs):
        _serve_requests(net, control, served, profiles, link_log)
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > end or (failed_at is not None and now - failed_at > _GRACE_S):
            return
        time.sleep(_POLL_S)


def _results(procs: list[subprocess.Popen], files: dict, world_size: int, timeout: float) -> list[Any]:
    results, problems = {}, []
    for r, p in enumerate(procs):
        out = files["out"][r]
        report = json.loads(out.read_text()) if out.exists() else None
        if report and report["status"] == "ok":
            results[r] = report.get("result")
            continue
        why = (report["error"] if report else
               f"exited with code {p.returncode} without reporting" if p.returncode not in (None, -9)
               else f"killed (still running after the timeout of {timeout:.0f} s or a peer's failure)")
        problems.append(f"--- rank {r}: {why}\n--- rank {r} log tail ---\n{_tail(files['log'][r])}")
    if problems:
        raise PartyError(f"{len(problems)} process(es) failed:\n" + "\n".join(problems))
    return [results[r] for r in range(world_size)]


def _party(target: str, args: list, is_dealer: bool, timeout: float) -> Any:
    from launch.session import init_dealer, init_party, peer_error, serve_dealer, shutdown
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    provider = os.environ.get("MPC_NET_PROVIDER", "TFP")
    try:
        if is_dealer:
            init_dealer(timeout_s=timeout, op_timeout_s=timeout)
            serve_dealer()
            return None
        init_party(world_size=world_size, provider=provider, timeout_s=timeout, op_timeout_s=timeout)
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(*args)
        shutdown()
        return result
    except BaseException as err:
        known = peer_error(err, rank, world_size, provider == "TTP")
        if known:
            raise RuntimeError(str(known)) from err
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one party of launch.netrun.run_in_network (not for direct use)")
    p.add_argument("--target", required=True, help="module:function")
    p.add_argument("--args", type=Path, required=True, help="JSON list of arguments")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--dealer", action="store_true")
    ns = p.parse_args(argv)
    try:
        result = _party(ns.target, json.loads(ns.args.read_text()), ns.dealer, ns.timeout)
        report = {"status": "ok", "result": result}
    except BaseException:  # everything, SystemExit included, goes to the harness
        report = {"status": "error", "error": traceback.format_exc()}
    tmp = ns.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.rename(ns.out)
    sys.stdout.flush()
    os._exit(0 if report["status"] == "ok" else 1)  # no finalizers: they can block on a dead peer


if __name__ == "__main__":
    main()
