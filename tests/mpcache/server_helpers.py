"""A real ``python -m mpcache.server`` process for the server tests, shared by the test modules of one
pytest run (it starts once: tiny-llama, a random free port on 127.0.0.1), and the CLI's tokens for
the same prompt and model (one ``mpirun -n 2`` run, cached)."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from launch.rendezvous import free_port
from tests.mpcache.test_cli import ENV, ROOT, _cli

PROMPT = "The capital of France is"
N_NEW = 2          # tokens per checked generation (a tiny-llama token costs seconds on 2 cores)
START_S = 300      # start-up bound: forkserver imports + weight sharing, on a loaded machine


class DemoServer:
    """``python -m mpcache.server --model tiny-llama`` in its own process group, logging to a file."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="mpcache-server-")) / "server.log"
        self._log = self.log_path.open("wb")
        self._final_log: str | None = None
        cmd = [sys.executable, "-m", "mpcache.server", "--model", "tiny-llama", "--port", str(self.port),
               "--log-level", "warning", "--max-new-tokens-limit", "16", *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/v1/health", timeout=10, trust_env=False).json()

    def wait_ready(self, timeout: float = START_S, not_owner: int | None = None) -> dict:
        """Health once it says ready (with an owner PID other than ``not_owner``, after a restart)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                h = self.health()
                if h["status"] == "ready" and h["parties"].get("model_owner") not in (None, not_owner):
                    return h
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready within {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
                self.proc.wait(timeout=10)
        self._log.close()
        self._final_log = self.log()
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def shared_server() -> DemoServer:
    """The one server of this pytest run (stopped at exit)."""
    server = DemoServer()
    atexit.register(server.stop)
    server.wait_ready()
    return server


@functools.lru_cache(maxsize=None)
def cli_result() -> dict:
    """``echo PROMPT | mpirun -n 2 python -m mpcache.launch --model tiny-llama --raw --max-new-tokens N_NEW``."""
    with tempfile.TemporaryDirectory(prefix="mpcache-cli-") as folder:
        out = Path(folder) / "run.json"
        run = _cli("--model", "tiny-llama", "--raw", "--max-new-tokens", str(N_NEW), "--json-out", str(out),
                   n=2, stdin=PROMPT + "\n")
        assert run.returncode == 0, run.stdout + run.stderr
        return json.loads(out.read_text())


def get(server: DemoServer, path: str, **kw) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=30, trust_env=False, **kw)


def cancel(server: DemoServer, job_id: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate/{job_id}/cancel", timeout=30, trust_env=False)


def post(server: DemoServer, body: dict | bytes, *, timeout: float = 300, **headers) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{server.url}/v1/generate", json=body, timeout=timeout, trust_env=False)
    return httpx.post(f"{server.url}/v1/generate", content=body, timeout=timeout, trust_env=False,
                      headers={"content-type": "application/json", **headers})


def sse_events(response: httpx.Response):
    """(event, data) pairs of a streaming response, as they arrive."""
    kind, data = "message", ""
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


def stream(server: DemoServer, body: dict, timeout: float = 300):
    """A context manager: the open streaming response of ``POST /v1/generate`` with ``stream: true``."""
    return httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True},
                        timeout=httpx.Timeout(timeout, connect=10), trust_env=False)
