"""``python -m mpcache.server`` end to end: a real server process (tiny-llama, two real parties on
loopback) and a real HTTP client. One server serves every test here (start-up shares the weights
once); each test leaves it idle and ready."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.mpcache.server_helpers import (N_NEW, PROMPT, DemoServer, cancel, cli_result, get, post, shared_server,
                                          sse_events, stream)
from tests.mpcache.test_cli import _plain_greedy
mpc = pytest.mark.mpc  # every test but the first starts (or uses) real parties


@pytest.fixture(scope="module")
def server():
    s = shared_server()
    yield s
    assert s.proc.poll() is None, f"the server process died:\n{s.log()}"


def _agrees_with_plaintext(prompt: str, tokens: list[int]) -> None:
    """MPC tokens equal plaintext greedy decoding, except after a plaintext near-tie (as test_cli)."""
    from plaintext_ref.models import load_tokenizer
    want, margins = _plain_greedy(load_tokenizer()(prompt)["input_ids"], len(tokens))
    for i, (g, w) in enumerate(zip(tokens, want)):
        if g != w:
            assert margins[i] < 2e-2, (prompt, tokens, want, margins)
            return


def test_queue_limit_and_cancel_bookkeeping():
    """The supervisor's queue alone (no parties started): the limit, and cancels of waiting requests."""
    from mpcache.server.parties import PartyConfig
    from mpcache.server.supervisor import Job, QueueFull, Supervisor
    sup = Supervisor(PartyConfig(model="tiny-llama", vocab_digest="x"), decode=str, queue_limit=2)
    jobs = [Job(ids=[1, 2], kv={"kv_policy": "full"}, max_new_tokens=1, id=f"j{i}") for i in range(3)]
    assert [sup.submit(j) for j in jobs[:2]] == [1, 2]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        sup.submit(jobs[2])
    with pytest.raises(KeyError, match="already in use"):
        sup.submit(Job(ids=[1], kv={"kv_policy": "full"}, max_new_tokens=1, id="j0"))
    assert sup.cancel("j0") == {"state": "cancelled", "tokens_so_far": 0}
    assert jobs[0].result["finish_reason"] == "cancelled" and jobs[0].status == 200
    assert jobs[1].position == 1 and sup.queue() == {"running": None, "waiting": ["j1"]}
    with pytest.raises(ValueError, match="already ended"):
        sup.cancel("j0")
    with pytest.raises(KeyError, match="no request nope"):
        sup.cancel("nope")
    assert sup.submit(jobs[2]) == 2


@mpc
def test_health_config_and_page(server):
    h = server.health()
    assert h["status"] == "ready" and h["server_pid"] == server.proc.pid
    assert set(h["parties"]) == {"client", "model_owner"} and all(h["parties"].values())
    cfg = get(server, "/v1/config").json()
    assert cfg["model"] == "tiny-llama" and cfg["max_seq_len"] == 8192
    assert cfg["security"]["provider"] == "TFP" and not cfg["security"]["secure"]
    assert "NOT SECURE" in cfg["security"]["mode"]
    assert cfg["policies"] == ["full", "mpcache", "streaming_llm", "h2o", "snapkv", "quest"]
    assert cfg["setup"]["setup_wire_bytes"] > 0  # the weights were shared once, at start-up
    page = get(server, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="security"' in page.text and 'id="chart"' in page.text
    # nothing is fetched from elsewhere at run time: no external script, style, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text), "the page loads an external resource"
    assert "@import" not in page.text and "url(http" not in page.text


@mpc
def test_generate_equals_the_cli(server):
    """Non-streaming: the CLI's tokens and text for the same prompt and model, and its exact costs."""
    cli = cli_result()
    r = post(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": N_NEW})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == cli["tokens"] and out["text"] == cli["text"]
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == cli["n_prompt"] == 5
    assert out["security"]["provider"] == cli["provider"] == "TFP"
    per = out["per_token"]
    assert [p["index"] for p in per] == list(range(N_NEW)) and [p["id"] for p in per] == cli["tokens"]
    # per-token costs are both parties' exact counts: the CLI's prefill and (one) decode totals
    phases = cli["costs"]["phases"]
    for p, phase in ((per[0], "prefill"), (per[1], "decode")):
        want = phases[phase]["stages"]["total"]
        assert p["rounds"] == want["rounds"], (phase, p, want)
        assert abs(p["wire_bytes"] - want["wire_bytes"]) <= 1e-3 * want["wire_bytes"], (phase, p, want)
        assert p["seconds"] > 0
    assert out["costs"]["phases"]["prefill"]["stages"]["total"]["rounds"] == per[0]["rounds"]


@mpc
def test_streaming_yields_tokens_in_order(server):
    cli = cli_result()
    with stream(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": N_NEW}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [k for k, _ in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done", kinds
    assert kinds.index("start") < kinds.index("token")
    tokens = [d for k, d in events if k == "token"]
    assert [t["index"] for t in tokens] == list(range(N_NEW))
    assert [t["id"] for t in tokens] == cli["tokens"] == events[-1][1]["tokens"]
    assert "".join(t["piece"] for t in tokens) == events[-1][1]["text"] == cli["text"]
    assert all(t["wire_bytes"] > 0 and t["rounds"] > 0 for t in tokens)
    assert events[0][1]["id"] == events[-1][1]["id"]


_KNOWN_FIELD = {"prompt": PROMPT}
BAD = [
    (_KNOWN_FIELD | {"prompt": "   "}, 422, "prompt is empty"),
    ({"max_new_tokens": 2}, 422, "prompt is required"),
    ({"prompt": "word " * 9000}, 422, "exceeds the model context of 8192 tokens"),
    (_KNOWN_FIELD | {"max_new_tokens": 8190}, 422, "max_new_tokens must be in [1, 16]"),
    (_KNOWN_FIELD | {"max_new_tokens": 0}, 422, "max_new_tokens must be in [1, 16]"),
    (_KNOWN_FIELD | {"max_new_tokens": "3"}, 422, "max_new_tokens must be an integer"),
    (_KNOWN_FIELD | {"kv_policy": "magic"}, 422, "unknown kv_policy 'magic'"),
    (_KNOWN_FIELD | {"kv_policy": "mpcache", "budget": 3}, 422, "budget for mpcache is the fraction attended"),
    (_KNOWN_FIELD | {"kv_policy": "h2o", "budget": 1.5}, 422, "budget must be a fraction in (0, 1] or a whole"),
    (_KNOWN_FIELD | {"kv_policy": "quest", "budget": 0.5}, 422, "budget for quest is a whole token count"),
    (_KNOWN_FIELD | {"kv_policy": "h2o", "budget": -1}, 422, "budget must be a fraction in (0, 1]"),
    (_KNOWN_FIELD | {"budget": 0.5}, 422, "budget does not apply to kv_policy full"),
    (_KNOWN_FIELD | {"kv_policy": "streaming_llm", "n_recent": 0}, 422, "n_recent must be >= 1"),
    (_KNOWN_FIELD | {"temperature": 0.7}, 422, "unknown field(s) 'temperature'"),
    (_KNOWN_FIELD | {"id": "no spaces allowed"}, 422, "id must be 1 to 64 characters"),
    ([PROMPT], 422, "the body must be a JSON object, got list"),
    (b'{"prompt": "The capital', 400, "malformed JSON: Unterminated string"),
    (b'{"prompt": "caf\xe9 au lait"}', 400, "the body is not UTF-8: byte 0xe9 at offset 15"),
    (b"", 400, "the body is empty"),
    (b'{"prompt": "' + b"x" * (70 * 1024) + b'"}', 413, "over the limit of 65536 bytes"),
]


@mpc
@pytest.mark.parametrize("body, status, message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_input_is_refused_before_any_work(server, body, status, message):
    served = server.health()["served"]
    t0 = time.monotonic()
    r = post(server, body if isinstance(body, (dict, bytes)) else json.dumps(body).encode())
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()
    assert time.monotonic() - t0 < 10 and server.health()["served"] == served


@mpc
def test_other_client_errors(server):
    r = post(server, b'{"prompt": "hi"}', **{"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = post(server, b'{"prompt": "hi"}', **{"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and "UTF-8" in r.json()["error"]
    big = b"x" * (70 * 1024)  # refused on Content-Length, before the body is read
    r = post(server, big, **{"content-length": str(len(big))})
    assert r.status_code == 413
    r = cancel(server, "nosuchrequest")
    assert r.status_code == 404 and "no request nosuchrequest" in r.json()["error"]
    r = get(server, "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"].startswith("no such endpoint")
    r = get(server, "/v1/generate")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]


@mpc
def test_concurrent_clients_and_load(server):
    """4 concurrent clients x 2 requests each (streaming and not, different prompts): all 8 answered,
    each with its own prompt's tokens, none lost, duplicated or mixed up; served one at a time."""
    from plaintext_ref.models import load_tokenizer
    tok = load_tokenizer()
    prompts = [" ".join(["The cat", "sat on", "the mat", "and looked", "at the", "bright moon",
                         "over the", "quiet hill"][: i + 1]) for i in range(8)]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 8, lengths  # every answer names its prompt by its length
    served0 = server.health()["served"]
    positions: list[int] = []
    running = []

    def one(i: int) -> dict:
        body = {"prompt": prompts[i], "raw": True, "max_new_tokens": 1, "id": f"load-{i}"}
        if i % 2:
            r = post(server, body, timeout=600)
            assert r.status_code == 200, r.text
            return r.json()
        with stream(server, body, timeout=600) as r:
            events = list(sse_events(r))
        positions.extend(d["position"] for k, d in events if k in ("accepted", "queued"))
        assert events[-1][0] == "done", events[-1]
        return events[-1][1]

    def client(c: int) -> list[dict]:
        return [one(2 * c), one(2 * c + 1)]

    def watch(stop: threading.Event) -> None:  # never more than one request running
        while not stop.is_set():
            q = server.health()["queue"]
            running.append(q["running"])
            time.sleep(0.3)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
    watcher.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(client, range(4), timeout=900) for r in rs]
    stop.set()
    watcher.join(timeout=5)
    assert time.monotonic() - t0 < 900
    assert sorted(r["id"] for r in results) == sorted(f"load-{i}" for i in range(8))  # none lost or duplicated
    for r in results:
        i = int(r["id"].split("-")[1])
        assert r["prompt_tokens"] == lengths[i] and len(r["tokens"]) == 1, r
        _agrees_with_plaintext(prompts[i], r["tokens"])
    assert server.health()["served"] == served0 + 8
    assert max(positions) >= 2, positions  # some requests waited in line and were told their place
    assert len({x for x in running if x}) >= 2


@mpc
def test_cancel_stops_within_one_token_and_the_next_request_proceeds(server):
    served0 = server.health()["served"]
    pool = ThreadPoolExecutor(1)
    with stream(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 12, "id": "to-cancel"}) as r:
        events = sse_events(r)
        assert next(events)[0] == "accepted"
        after = pool.submit(post, server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 1, "id": "after-cancel"})
        end = time.monotonic() + 30
        while server.health()["queue"]["waiting"] < 1:
            assert time.monotonic() < end, "the second request was never queued"
            time.sleep(0.1)
        # a third request, cancelled while it waits in line, never runs
        with stream(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 1, "id": "cancelled-in-line"}) as q:
            waiting = sse_events(q)
            accepted = next(waiting)
            assert accepted[0] == "accepted" and accepted[1]["position"] == 2, accepted
            assert cancel(server, "cancelled-in-line").json()["state"] == "cancelled"
            rest = list(waiting)
            assert rest[-1][0] == "done", rest
            assert rest[-1][1]["finish_reason"] == "cancelled" and rest[-1][1]["tokens"] == []
        for kind, data in events:
            if kind == "token" and data["index"] == 0:
                c = cancel(server, "to-cancel")
                assert c.status_code == 200 and c.json()["state"] == "cancelling", c.text
                so_far = c.json()["tokens_so_far"]
            if kind in ("done", "error"):
                break
    assert kind == "done", data
    assert data["finish_reason"] == "cancelled" and data["state"] == "cancelled"
    assert 1 <= so_far and len(data["tokens"]) <= so_far + 1, (so_far, data["tokens"])  # within one token
    nxt = after.result(timeout=300)
    pool.shutdown()
    assert nxt.status_code == 200 and len(nxt.json()["tokens"]) == 1, nxt.text
    assert cancel(server, "to-cancel").status_code == 409  # already ended
    assert server.health()["served"] == served0 + 2


@mpc
def test_owner_death_gives_503_and_fresh_parties_serve_the_next_request(server):
    before = server.health()
    owner = before["parties"]["model_owner"]
    pool = ThreadPoolExecutor(1)
    doomed = pool.submit(post, server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 8, "id": "doomed"})
    end = time.monotonic() + 60
    while server.health()["queue"]["running"] != "doomed":
        assert time.monotonic() < end, "the request never started"
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(owner, signal.SIGKILL)
    r = doomed.result(timeout=120)
    pool.shutdown()
    assert r.status_code == 503, r.text
    assert "model owner" in r.json()["error"] and "restarting" in r.json()["error"], r.json()
    assert r.json()["partial"]["state"] == "failed" and r.json()["partial"]["finish_reason"] == "error"
    after = server.wait_ready(not_owner=owner)
    assert after["server_pid"] == before["server_pid"] == server.proc.pid  # the server did not restart
    assert after["restarts"] == before["restarts"] + 1
    ok = post(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": N_NEW})
    assert ok.status_code == 200 and ok.json()["tokens"] == cli_result()["tokens"], ok.text

    # killed while idle: the server notices, restarts the parties, and the next request is served
    owner = after["parties"]["model_owner"]
    os.kill(owner, signal.SIGKILL)
    again = server.wait_ready(not_owner=owner)
    assert again["restarts"] == after["restarts"] + 1 and again["server_pid"] == server.proc.pid
    ok = post(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 1})
    assert ok.status_code == 200 and ok.json()["tokens"] == cli_result()["tokens"][:1], ok.text


def _memory_holds(pid: int, needle: bytes, chunk: int = 1 << 24) -> bool:
    """Whether any writable mapping of process ``pid`` contains ``needle`` (root reads /proc/PID/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            for start in range(lo, hi, chunk):  # overlapping chunks: a match across a border counts
                try:
                    mem.seek(start)
                    if needle in mem.read(min(chunk + len(needle), hi - start)):
                        return True
                except (OSError, ValueError, OverflowError):
                    break
    return False


@mpc
def test_the_prompt_never_reaches_the_party_processes(server):
    """The server (client side) tokenizes; the parties get ids (client) or a count (owner) only."""
    marker = "zebra quokka marmalade 7731"
    r = post(server, {"prompt": f"{marker} is", "raw": True, "max_new_tokens": 1})
    assert r.status_code == 200, r.text
    pids = server.health()["parties"]
    if not os.access(f"/proc/{pids['model_owner']}/mem", os.R_OK):
        pytest.skip("cannot read another process's memory here (needs root / ptrace)")
    assert _memory_holds(server.proc.pid, marker.encode()), "control: the server process holds the prompt"
    for role in ("model_owner", "client"):
        pid = pids[role]
        for name in ("cmdline", "environ"):
            assert marker.encode() not in open(f"/proc/{pid}/{name}", "rb").read()
        assert not _memory_holds(pid, marker.encode()), f"the {role} party's memory holds the prompt text"


@mpc
def test_separate_dealer_mode():
    """``--dealer``: a third process deals the correlations (``protocols.tape``) and the tokens and online
    rounds are the same; a dealer
    that dies mid-request gives 503 and is replaced like an owner; SIGTERM stops everything cleanly."""
    server = DemoServer("--dealer")
    try:
        h = server.wait_ready()
        assert set(h["parties"]) == {"client", "model_owner", "dealer"}
        sec = get(server, "/v1/config").json()["security"]
        assert sec["provider"] == "TTP" and sec["secure"] and "separate dealer" in sec["mode"]
        tfp_rounds = cli_result()["costs"]["phases"]["prefill"]["stages"]["total"]["rounds"]
        with stream(server, {"prompt": PROMPT, "raw": True, "max_new_tokens": 6}) as r:
            for kind, data in sse_events(r):
                if kind == "token" and data["index"] == 0:  # a TTP token, then the dealer dies
                    os.kill(h["parties"]["dealer"], signal.SIGKILL)
                    first = data
                if kind in ("done", "error"):
                    break
        assert kind == "error" and data["status"] == 503 and "dealer (rank 2)" in data["error"], (kind, data)
        _agrees_with_plaintext(PROMPT, [first["id"]])
        assert first["rounds"] == tfp_rounds  # the dealer's tape: the online rounds of -n 2
        pids = server.wait_ready(not_owner=h["parties"]["model_owner"])["parties"].values()
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()  # SIGTERM: a clean stop, the parties' too
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], server.log()
    assert "Traceback" not in server.log(), server.log()
