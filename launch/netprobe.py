"""Check an emulated link: TCP ping-pong round-trip time and one-way bulk throughput.

``link_check(net, src, dst)`` starts ``python -m launch.netprobe serve PORT`` in namespace ``dst``
and ``python -m launch.netprobe ping|bulk ADDR PORT ...`` in ``src`` (each prints one JSON line), and
returns ``{"rtt_s": median round trip of a 1-byte message and its 1-byte reply (TCP_NODELAY),
"rtts_s": every one, "throughput_bps": payload bits / seconds of one ``bulk_bytes`` transfer}``.
The bulk time runs from the first byte sent to the receiver's 1-byte acknowledgement, so it
includes one RTT and TCP slow start: a lower bound on the link rate.
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time

PORT = 29400
_CHUNK = 1 << 16


def _serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as srv:
        print("listening", flush=True)
        srv.settimeout(60)
        for _ in range(2):  # one ping-pong connection, then one bulk connection
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mode = conn.recv(1)
                if mode == b"p":
                    while (b := conn.recv(1)) and b != b"q":
                        conn.sendall(b)
                else:
                    want = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
                    while want > 0:
                        got = conn.recv(min(want, _CHUNK))
                        if not got:
                            break
                        want -= len(got)
                    conn.sendall(b"k")


def _connect(addr: str, port: int) -> socket.socket:
    sock = socket.create_connection((addr, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ping(addr: str, port: int, n: int) -> dict:
    with _connect(addr, port) as sock:
        sock.sendall(b"p")
        rtts = []
        for _ in range(n + 1):  # the first exchange warms the connection up; dropped
            t0 = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(1)
            rtts.append(time.perf_counter() - t0)
        sock.sendall(b"q")
    return {"rtts_s": rtts[1:]}


def _bulk(addr: str, port: int, nbytes: int) -> dict:
    payload = bytes(_CHUNK)
    with _connect(addr, port) as sock:
        sock.sendall(b"b" + nbytes.to_bytes(8, "big"))
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= sock.send(payload[:min(left, _CHUNK)])
        sock.recv(1)
        return {"bulk_s": time.perf_counter() - t0}


def link_check(net, src: int = 0, dst: int = 1, n_pings: int = 20, bulk_bytes: int = 4 << 20,
               timeout_s: float = 60.0) -> dict:
    """Measured RTT and throughput from namespace ``src`` to ``dst`` of ``net`` (a ``Network``)."""
    py = [sys.executable, "-m", "launch.netprobe"]
    server = subprocess.Popen(net.exec_prefix(dst) + py + ["serve", str(PORT)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        out = {}
        for mode, arg in (("ping", n_pings), ("bulk", bulk_bytes)):
            done = subprocess.run(net.exec_prefix(src) + py + [mode, net.addrs[dst], str(PORT), str(arg)],
                                  capture_output=True, text=True, timeout=timeout_s, check=True)
            out.update(json.loads(done.stdout))
        server.wait(timeout=timeout_s)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"rtt_s": statistics.median(out["rtts_s"]), "rtts_s": out["rtts_s"],
            "throughput_bps": 8 * bulk_bytes / out["bulk_s"]}


def main(argv: list[str]) -> None:
    mode, *rest = argv
    if mode == "serve":
        _serve(int(rest[0]))
    elif mode == "ping":
        print(json.dumps(_ping(rest[0], int(rest[1]), int(rest[2]))))
    elif mode == "bulk":
        print(json.dumps(_bulk(rest[0], int(rest[1]), int(rest[2]))))
    else:
        raise SystemExit(f"unknown mode {mode!r}: serve PORT | ping ADDR PORT N | bulk ADDR PORT BYTES")


if __name__ == "__main__":
    main(sys.argv[1:])
