"""The server's side of the parties: start them, feed them one request at a time, restart them.

``Supervisor`` owns the party processes (``Parties``: client, model owner, optional dealer, forked
from a multiprocessing forkserver that imported torch and CrypTen once) and a FIFO of ``Job``\\ s.
One worker thread serves the jobs in order, because the two parties are one shared resource: it
sends a job to the client party, turns the client's messages into the job's events (decoding the
token text with the client's tokenizer), and forwards a cancel. If a party dies or the session
fails mid-request, that request ends with 503 and the worker tears the parties down and starts
fresh ones (the owner shares its weights again) before the next request; the server process
itself never restarts. CrypTen and gloo are never initialised in the server process.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from launch.rendezvous import free_port
from mpcache.server.parties import PartyConfig, party_process

log = logging.getLogger("mpcache.server")
ROLE = {0: "client", 1: "model_owner", 2: "dealer"}
_PRELOAD = ["launch.session", "mpcache.session", "plaintext_ref.models"]
_DEATH_GRACE_S = 3.0  # a dead peer's survivor reports the gloo error (with the reason) within this
_FINISHED_KEPT = 512


class PartyFailure(RuntimeError):
    """The parties could not start, or the session broke (the message is one line)."""


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    """One accepted request. ``ids``: the prompt's token ids (client trust domain only).

    Events go to an ``asyncio.Queue`` on the event loop that created the job (thread-safe emit).
    ``status``/``result`` are set once it ends: 200 + the result, or an error status + message.
    """

    ids: list[int]
    kv: dict                     # PolicyOptions.public()
    max_new_tokens: int
    compare_full: bool = False
    raw: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "queued"        # queued | running | done | cancelled | failed
    cancel_requested: bool = False
    status: int | None = None
    result: dict | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    position: int = 0            # place in the waiting line when last told (1 = next)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    runs: dict = field(default_factory=dict)

    def attach(self) -> None:
        """Called on the event loop: events go to a queue of this loop."""
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()

    def emit(self, kind: str, data: dict) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the loop is closed (server shutting down)
            pass

    @property
    def ended(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


class Parties:
    """The party processes of one session and the client's pipe."""

    def __init__(self, ctx, cfg: PartyConfig) -> None:
        self.cfg = cfg
        self.conn, child = ctx.Pipe()
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        ranks = [0, 1, 2] if cfg.dealer else [0, 1]
        self.procs = {r: ctx.Process(target=party_process, name=f"mpcache-{ROLE[r]}", daemon=True,
                                     args=(r, cfg, rendezvous, child if r == 0 else None))
                      for r in ranks}
        for p in self.procs.values():
            p.start()
        child.close()  # sent to the client already; now EOF here means the client is gone

    def pids(self) -> dict[str, int | None]:
        return {ROLE[r]: p.pid for r, p in self.procs.items()}

    def dead(self) -> dict[int, int]:
        """rank -> exit code of every party process that has exited."""
        return {r: p.exitcode for r, p in self.procs.items() if p.exitcode is not None}

    def describe_dead(self) -> str:
        from launch.errors import describe_rank
        return ", ".join(f"{describe_rank(r)} exited with code {c}" for r, c in sorted(self.dead().items()))

    def wait_ready(self, timeout: float) -> dict:
        """The client's ``ready`` info, or ``PartyFailure`` (a party failed, died, or time ran out)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.conn.poll(0.2):
                try:
                    kind, data = self.conn.recv()
                except (EOFError, OSError):
                    kind, data = "failed", None
                if kind == "ready":
                    return data
                if kind == "failed":
                    self._grace()
                    raise PartyFailure(data or f"the client party died ({self.describe_dead()})")
            elif self.dead():
                self._grace()
                raise PartyFailure(self._last_words() or self.describe_dead())
        raise PartyFailure(f"the parties were not ready within {timeout:.0f} s")

    def _grace(self) -> None:
        end = time.monotonic() + _DEATH_GRACE_S
        while time.monotonic() < end and len(self.dead()) < len(self.procs):
            time.sleep(0.1)

    def _last_words(self) -> str | None:
        """The client's ``failed`` message if it sent one (it names the peer it lost)."""
        try:
            while self.conn.poll(0):
                kind, data = self.conn.recv()
                if kind == "failed":
                    return data
        except (EOFError, OSError):
            pass
        return None

    def stop(self, grace: float = 5.0) -> None:
        """Ask the client to end the session, then kill whatever is left after ``grace`` seconds."""
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        end = time.monotonic() + grace
        for p in self.procs.values():
            p.join(timeout=max(0.0, end - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(timeout=5)
        self.conn.close()


class Supervisor:
    """A FIFO of jobs served one at a time on one long-lived set of parties (see module doc).

    ``decode(ids) -> str``: the client's tokenizer (thread-safe); ``eos_ids``: its end-of-sequence
    ids (the client party checks them; the owner never learns a token). ``on_fatal(message)``: called once
    if the parties cannot come up the first time (the server then exits).
    """

    def __init__(self, cfg: PartyConfig, decode, *, eos_ids: frozenset[int] = frozenset(),
                 queue_limit: int = 32, start_timeout_s: float = 600.0, on_fatal=None) -> None:
        self.cfg = cfg
        self.decode = decode
        self.eos_ids = frozenset(eos_ids)
        self.queue_limit = queue_limit
        self.start_timeout_s = start_timeout_s
        self.on_fatal = on_fatal
        self.state, self.detail = "starting", "the model owner is sharing its weights"
        self.info: dict | None = None
        self.parties: Parties | None = None
        self.restarts = 0
        self.served = 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._closing = False
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._thread = threading.Thread(target=self._main, name="mpcache-supervisor", daemon=True)

    # ---- called from the web side -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; -> its place in the waiting line (1 = next). Raises QueueFull / KeyError."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if job.id in self._jobs or job.id in self._finished:
                raise KeyError(f"request id {job.id!r} is already in use")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (limit "
                                f"{self.queue_limit}); retry later")
            self._jobs[job.id] = job
            self._waiting.append(job)
            job.position = len(self._waiting)
            self._cond.notify_all()
            return job.position

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job; -> ``{state, tokens_so_far}``. KeyError if unknown,
        ValueError if it already ended. A running job stops after the token being computed now."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                if job_id in self._finished:
                    raise ValueError(f"request {job_id} already ended ({self._finished[job_id]})")
                raise KeyError(f"no request {job_id}")
            if job.state == "queued":
                self._waiting.remove(job)
                self._end(job, "cancelled", 200, self._result(job, cancelled=True))
                self._tell_positions()
                return {"state": "cancelled", "tokens_so_far": 0}
            job.cancel_requested = True
            self._cond.notify_all()
            return {"state": "cancelling", "tokens_so_far": len(job.runs.get("policy", {}).get("tokens", []))}

    def queue(self) -> dict:
        with self._cond:
            return {"running": self._running.id if self._running else None,
                    "waiting": [j.id for j in self._waiting]}

    def health(self) -> dict:
        with self._cond:
            parties = self.parties.pids() if self.parties else {}
            return {"status": self.state, "detail": self.detail, "server_pid": os.getpid(),
                    "parties": parties, "restarts": self.restarts, "served": self.served,
                    "queue": {"running": self._running.id if self._running else None,
                              "waiting": len(self._waiting)}}

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving: fail what waits, end the session, stop the parties."""
        with self._cond:
            self._closing = True
            for job in list(self._waiting):
                self._end(job, "failed", 503, {"error": "the server is shutting down"})
            self._waiting.clear()
            if self._running:
                self._running.cancel_requested = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)
        parties = self.parties
        if parties is not None:
            parties.stop(grace=3.0)

    # ---- the worker thread ----------------------------------------------------------------------
    def _main(self) -> None:
        backoff = 1.0
        while not self._closing:
            if self.parties is None or self.parties.dead():
                if self.parties is not None:  # died between requests
                    log.warning("parties lost between requests (%s); restarting", self.parties.describe_dead())
                    self._teardown()
                try:
                    self._bring_up()
                    backoff = 1.0
                except PartyFailure as err:
                    if self.info is None:
                        self._set_state("failed", str(err))
                        self._fail_waiting(503, f"the parties could not start: {err}")
                        if self.on_fatal:
                            self.on_fatal(str(err))
                        return
                    self._set_state("restarting", f"{err}; retrying in {backoff:.0f} s")
                    self._fail_waiting(503, f"the model owner's side could not be restarted: {err}")
                    with self._cond:
                        self._cond.wait(timeout=backoff)
                    backoff = min(2 * backoff, 30.0)
                continue
            job = self._next_job()
            if job is not None and self.parties.dead():  # died while idle: fresh parties serve it
                with self._cond:
                    job.state, self._running = "queued", None
                    self._waiting.appendleft(job)
                    self._tell_positions()
                continue
            if job is not None:
                try:
                    self._serve(job)
                except Exception as err:  # a bug here must not stop the server: fail this one, start afresh
                    log.exception("serving request %s failed", job.id)
                    with self._cond:
                        if not job.ended:
                            self._end(job, "failed", 500, {"error": f"internal error: {type(err).__name__}: {err}"})
                    self._teardown()

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._cond:
            self.state, self.detail = state, detail
        log.info("parties %s%s", state, f": {detail}" if detail else "")

    def _bring_up(self) -> None:
        first = self.info is None
        self._set_state("starting" if first else "restarting",
                        "the model owner is sharing its weights" + ("" if first else " again"))
        try:
            parties = Parties(self._ctx, self.cfg)
        except Exception as err:  # e.g. the forkserver could not start a process
            raise PartyFailure(f"cannot start the party processes: {type(err).__name__}: {err}") from err
        with self._cond:
            self.parties = parties
        try:
            info = parties.wait_ready(self.start_timeout_s)
        except PartyFailure:
            parties.kill()
            with self._cond:
                self.parties = None
            raise
        with self._cond:
            self.info = info
        self._set_state("ready", f"{info['model']} shared once in {info['setup_s']:.1f} s; serving")

    def _teardown(self) -> None:
        parties = self.parties
        with self._cond:
            self.parties = None
            self.restarts += 1
            self.state, self.detail = "restarting", "the parties are being replaced"
        if parties is not None:
            parties.kill()

    def _fail_waiting(self, status: int, message: str) -> None:
        with self._cond:
            for job in list(self._waiting):
                self._end(job, "failed", status, {"error": message})
            self._waiting.clear()

    def _next_job(self) -> Job | None:
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout=0.5)
            if not self._waiting or self._closing:
                return None
            job = self._waiting.popleft()
            job.state, job.started, self._running = "running", time.monotonic(), job
            self._tell_positions()
            return job

    def _tell_positions(self) -> None:
        """Every waiting job whose place changed hears its new place (call holding the lock)."""
        for i, job in enumerate(self._waiting, 1):
            if job.position != i:
                job.position = i
                job.emit("queued", {"id": job.id, "position": i})

    def _end(self, job: Job, state: str, status: int, result: dict) -> None:
        """(holding the lock) The job's final state; its last event is ``done`` or ``error``."""
        job.state, job.status, job.result = state, status, result
        self._jobs.pop(job.id, None)
        self._finished[job.id] = state
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)
        if self._running is job:
            self._running = None
        job.emit("done" if status == 200 else "error", result if status == 200 else {"status": status, **result})

    def _serve(self, job: Job) -> None:
        parties = self.parties
        payload = {"id": job.id, "ids": job.ids, "kv": job.kv, "max_new_tokens": job.max_new_tokens,
                   "compare_full": job.compare_full, "eos": sorted(self.eos_ids)}
        eos = set(self.eos_ids)
        cancel_sent, eof = False, False
        died_at = None  # when a party was first seen dead
        try:
            parties.conn.send(("generate", payload))
        except OSError:
            died_at = time.monotonic()
        while True:
            if job.cancel_requested and not cancel_sent and died_at is None:
                try:
                    parties.conn.send(("cancel", job.id))
                except OSError:
                    pass
                cancel_sent = True
            message = None
            if not eof:
                try:
                    if parties.conn.poll(0.1):
                        message = parties.conn.recv()
                except (EOFError, OSError):
                    eof, died_at = True, died_at or time.monotonic()
            else:  # the client is gone: wait out the grace period for the others
                time.sleep(0.1)
            if message is not None:
                kind, data = message
                if kind == "done":
                    with self._cond:
                        self.served += 1
                        result = self._result(job, cancelled=data["cancelled"], eos=eos)
                        self._end(job, result["state"], 200, result)
                    return
                if kind == "rejected":
                    with self._cond:
                        self._end(job, "failed", 422, {"error": data})
                    return
                if kind == "failed":
                    self._broken(job, data)
                    return
                self._on_event(job, kind, data)
                continue
            if died_at is None and parties.dead():
                died_at = time.monotonic()
            if died_at is not None and time.monotonic() - died_at > _DEATH_GRACE_S:
                self._broken(job, parties.describe_dead() or "the client party's pipe closed")
                return

    def _broken(self, job: Job, reason: str) -> None:
        """The session broke during ``job``: 503 for it, then fresh parties for the next one."""
        log.warning("session broke during request %s: %s", job.id, reason)
        with self._cond:  # health says so before the request hears it
            self.state, self.detail = "restarting", f"the session broke: {reason}"
            self._end(job, "failed", 503, {
                "error": f"the private-inference session broke during this request: {reason}; the "
                         "server is restarting the parties (the model owner shares its weights again): "
                         "retry", "partial": self._result(job, cancelled=False, failed=True)})
        self._teardown()

    def _on_event(self, job: Job, kind: str, data: dict) -> None:
        run = job.runs.setdefault(data["run"], {"tokens": [], "text": "", "per_token": []})
        if kind == "start":
            run.update(kv_policy=data["kv_policy"], budgets=data["budgets"])
            job.emit("start", {"id": job.id, "run": data["run"], "kv_policy": data["kv_policy"],
                               "budgets": data["budgets"], "prompt_tokens": len(job.ids),
                               "max_new_tokens": job.max_new_tokens})
        elif kind == "token":
            run["tokens"].append(data["token"])
            text = self.decode(run["tokens"])
            piece = text[len(run["text"]):] if text.startswith(run["text"]) else text
            run["text"] = text
            cost = {k: data[k] for k in ("index", "seconds", "wire_bytes", "rounds", "comm_s")}
            entry = {"id": data["token"], "piece": piece, **cost}
            run["per_token"].append(entry)
            job.emit("token", {"run": data["run"], "text": text, **entry})
        elif kind == "run_done":
            run["costs"] = data["costs"]
            job.emit("run_done", {"run": data["run"], **_run_summary(run)})

    def _result(self, job: Job, cancelled: bool, eos: set[int] = frozenset(), failed: bool = False) -> dict:
        """The response body of an ended job (what streaming sends as ``done``; ``failed``: the
        tokens a broken session had produced)."""
        main = job.runs.get("policy", {"tokens": [], "text": "", "per_token": []})
        tokens = main["tokens"]
        if failed:
            reason = "error"
        elif tokens and tokens[-1] in eos:
            reason = "eos"
        elif len(tokens) >= job.max_new_tokens:
            reason = "length"
        else:
            reason = "cancelled" if cancelled else "length"
        security = self.security()
        out = {"id": job.id, "state": {"cancelled": "cancelled", "error": "failed"}.get(reason, "done"),
               "finish_reason": reason, "prompt_tokens": len(job.ids), "max_new_tokens": job.max_new_tokens,
               "kv": job.kv, "raw": job.raw, "budgets": main.get("budgets"), **_run_summary(main),
               "costs": main.get("costs"), "full_cache": None, "security": security,
               "queued_s": round((job.started or time.monotonic()) - job.submitted, 3)}
        if "full" in job.runs:
            full = job.runs["full"]
            out["full_cache"] = {"budgets": full.get("budgets"), **_run_summary(full), "costs": full.get("costs")}
        return out

    def security(self) -> dict:
        from launch.banner import security_mode
        return {"dealer": self.cfg.dealer, "provider": self.cfg.provider, "secure": self.cfg.dealer,
                "mode": security_mode(self.cfg.dealer)}


def _run_summary(run: dict) -> dict:
    per = run["per_token"]
    return {"tokens": list(run["tokens"]), "text": run["text"], "per_token": list(per),
            "totals": {"seconds": sum(p["seconds"] for p in per), "wire_bytes": sum(p["wire_bytes"] for p in per),
                       "rounds": sum(p["rounds"] for p in per)}}
