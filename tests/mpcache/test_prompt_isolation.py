"""The client's prompt reaches the client's process only: never another rank's command line,
environment or log lines. Real ``mpirun`` ranks, read from ``/proc`` while they run."""
from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.mpcache.test_cli import ENV, LAUNCH, MPIRUN, ROOT

pytestmark = pytest.mark.mpc

_TAG = re.compile(r"^\[\d+,(\d+)\]<(stdout|stderr)>: ?(.*)$")


def _ranks_of(run_id: str) -> dict[int, dict[str, bytes]]:
    """Command line and environment of every live rank of the job whose environment holds ``run_id``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone, or not ours
            continue
        env = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
        if env.get(b"MPCACHE_TEST_RUN") == run_id.encode() and b"mpcache.launch" in cmdline:
            rank = env.get(b"OMPI_COMM_WORLD_RANK")
            if rank is not None:
                found[int(rank)] = {"cmdline": cmdline, "environ": environ}
    return found


def _run_and_watch(flags: list[str], n: int, stdin: bytes | None
                   ) -> tuple[int | None, dict[int, list[str]], dict[int, dict[str, bytes]]]:
    """Run the CLI under ``mpirun --output tag``; -> (exit code, log lines by rank, /proc by rank)."""
    run_id = uuid.uuid4().hex
    cmd = [str(MPIRUN), "--oversubscribe", "--output", "tag", "-n", str(n), *LAUNCH, *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "MPCACHE_TEST_RUN": run_id},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()  # drain the pipe while we watch, or a verbose job blocks on a full pipe
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()  # Open MPI keeps rank 0's stdin open anyway; the client ends at a pause
    seen: dict[int, dict[str, bytes]] = {}
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_ranks_of(run_id))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    out = b"".join(chunks)
    lines: dict[int, list[str]] = {}
    for line in out.decode(errors="replace").splitlines():
        if m := _TAG.match(line):
            lines.setdefault(int(m.group(1)), []).append(m.group(3))
    return proc.returncode, lines, seen


def test_prompt_reaches_no_other_rank():
    secret = f"my account number is {uuid.uuid4().hex}"
    flags = ["--model", "tiny-llama", "--max-new-tokens", "2", "--log-level", "debug"]
    code, lines, ranks = _run_and_watch(flags, 3, (secret + "\n").encode())
    assert code == 0, "\n".join(f"[{r}] {ln}" for r, ls in lines.items() for ln in ls)
    assert sorted(ranks) == [0, 1, 2], f"saw ranks {sorted(ranks)} in /proc"
    assert any("token   2/2" in ln for ln in lines[0])  # the client did generate
    assert lines.get(1), "the model owner's debug log should not be empty"
    for rank in (1, 2):
        for what, raw in ranks[rank].items():
            assert secret.encode() not in raw, f"the prompt is in rank {rank}'s {what}"
        assert not any(secret in ln for ln in lines.get(rank, [])), f"the prompt is in rank {rank}'s log"


def test_prompt_flag_is_visible_to_the_owner_and_warns():
    """The check above can fail: a prompt given as --prompt is in the owner's command line."""
    secret = f"my account number is {uuid.uuid4().hex}"
    code, lines, ranks = _run_and_watch(["--model", "tiny-llama", "--prompt", secret, "--max-new-tokens", "1"],
                                        2, None)
    assert code == 0 and 1 in ranks, (code, sorted(ranks))
    assert secret.encode() in ranks[1]["cmdline"]
    assert any("warning: --prompt is on the command line of every rank" in ln for ln in lines[0])
