"""Real ``mpirun`` launches of ``tests/launch/mpi_job.py`` through ``launch.role.run_role``."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from launch.errors import ExitCode
from launch.mpi import MPI_ENV_VARS

pytestmark = pytest.mark.mpc

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
MPIRUN = ROOT / ".venv" / "bin" / "mpirun"
JOB = ROOT / "tests" / "launch" / "mpi_job.py"

if not MPIRUN.exists():
    pytest.skip(f"no mpirun at {MPIRUN}", allow_module_level=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "PRTE_")) or k.startswith("OMPI_ALLOW")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _run(cmd: list[str], limit: float = 90) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=limit, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _mpirun(n: int, *args: str, limit: float = 90) -> tuple[int, str, float]:
    return _run([str(MPIRUN), "--oversubscribe", "-n", str(n), str(PYTHON), str(JOB), *args], limit)


def _results(out: str) -> dict[int, dict[str, str]]:
    rows = [dict(kv.split("=") for kv in line.split()[1:])
            for line in out.splitlines() if line.startswith("RESULT ")]
    return {int(r["rank"]): r for r in rows}


@pytest.mark.parametrize("n, provider", [(2, "TrustedFirstParty"), (3, "TapeProvider")])
def test_matmul_on_real_parties(n, provider):
    rc, out, _ = _mpirun(n, "matmul", "--timeout-s", "60")
    assert rc == 0, out
    results = _results(out)
    assert sorted(results) == [0, 1], out  # the dealer computes nothing
    for r in results.values():
        assert r["world"] == "2" and r["provider"] == provider, out
        assert float(r["err"]) < 1e-2, out


def test_dead_party_fails_the_job_fast():
    rc, out, took = _mpirun(2, "die", "--timeout-s", "60")
    assert rc != 0, out
    assert took < 60, f"took {took:.0f} s"
    # party 0 either reports the dead peer itself, or mpirun kills it first and names rank 1
    ours = "mpcache: party 0 (client): party 1 (model owner) died or disconnected" in out
    mpiruns = re.search(r"Process name:\s*\[\S*,1\]\s*Exit code:\s*3", out) is not None
    assert ours or mpiruns, out


def test_dead_dealer_is_named():
    rc, out, took = _mpirun(3, "dealer-dies", "--timeout-s", "60")
    assert rc != 0, out
    assert took < 60, f"took {took:.0f} s"
    ours = [ln for ln in out.splitlines() if ln.startswith("mpcache: ")]
    mpiruns = re.search(r"Process name:\s*\[\S*,2\]\s*Exit code:\s*3", out) is not None
    assert ours or mpiruns, out
    if ours:  # the first party to notice names the dealer, not "a party or the dealer"
        assert re.match(r"mpcache: party [01] \([a-z ]+\): dealer \(rank 2\) died or disconnected", ours[0]), out


def test_absent_peer_hits_the_rendezvous_deadline():
    rc, out, took = _mpirun(2, "absent", "--timeout-s", "8")
    assert rc == ExitCode.RENDEZVOUS_TIMEOUT, out
    assert "party 0 (client): rendezvous with the other party not done after 8 s" in out, out
    assert took < 60, f"took {took:.0f} s"


def test_rank_that_never_starts_mpi_fails_in_one_line():
    # rank 1 never calls MPI_Init: rank 0 waits in it, with the GIL released, so the deadline fires
    rc, out, took = _mpirun(2, "absent-mpi", "--timeout-s", "8")
    assert rc == ExitCode.RENDEZVOUS_TIMEOUT, out
    assert re.search(r"^mpcache: party 0 \(client\): MPI_Init not done after 8 s: "
                     r"a rank never started MPI\b.*$", out, re.M), out
    assert out.count("mpcache:") == 1, out
    assert not any(s in out for s in ("Traceback", "Fatal Python error", "Thread 0x")), out
    assert took < 30, f"took {took:.0f} s"


def test_wrong_world_size_is_refused():
    rc, out, _ = _mpirun(1, "matmul")
    assert rc == ExitCode.USAGE, out
    assert "mpirun -n 1: MPCache runs -n 2" in out, out


def test_without_mpirun_prints_how_to_launch():
    rc, out, _ = _run([str(PYTHON), str(JOB), "matmul"])
    assert rc == ExitCode.USAGE, out
    assert "must be started by mpirun" in out and "mpirun -n 2 python tests/launch/mpi_job.py" in out
    assert not any(v in _env() for v in MPI_ENV_VARS)
