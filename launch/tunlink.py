"""A userspace link emulator between network namespaces, for kernels without ``sch_netem``.

``python -m launch.tunlink NS0 NS1 ...`` opens a TUN device ``mpc0`` inside every namespace (it
enters each with ``setns`` and leaves again; nothing is created in the caller's namespace), then
forwards every IPv4 packet that a namespace sends to ``10.9.0.(j+1)`` into namespace j's device.
Each sender has one outgoing link with the model of ``tc netem delay D rate R`` on its egress::

    depart = max(now, link_free[src]) + 8·len / R     # serialisation, FIFO per sender
    deliver = depart + D                              # D = one-way delay = RTT / 2

so a message and its reply see RTT = 2·D, and the two directions of a pair are independent
(full duplex). No packet is ever dropped (a queue limit of ``MAX_QUEUED`` packets per sender is a
safety valve only). The devices use ``IFF_VNET_HDR`` with TSO/checksum offload, so TCP keeps its
real 1500-byte MSS (and congestion window dynamics) while the kernel hands over up to 64 KB GSO
packets: a few thousand packets per second at 1 Gbps, which Python forwards with ``select``
(microsecond timeouts; the process asks for 1 µs timer slack and runs at nice −10 so that a loaded
machine adds little wake-up latency).

Control on stdin, one command per line, each answered ``ok`` on stdout: ``set RTT_S RATE_BPS``
(``RATE_BPS`` 0 = unlimited) changes the model for packets that arrive from then on; ``stats``
answers one JSON line instead (packets forwarded and dropped, mean and max lateness of deliveries
since the previous ``stats``: the emulator's own error); ``quit`` or end of input ends the process (the devices vanish with it). The first line on stdout is ``ready``
once every device is open (the caller then gives them addresses and brings them up).
"""
from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import select
import struct
import sys
import time

DEVICE = "mpc0"
SUBNET = "10.9.0."  # namespace i has SUBNET + str(i + 1)
MAX_QUEUED = 100_000
_TUNSETIFF, _TUNSETOFFLOAD = 0x400454CA, 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_VNET_HDR = 10  # sizeof(struct virtio_net_hdr), the default TUNSETVNETHDRSZ
_CLONE_NEWNET = 0x40000000
_PR_SET_TIMERSLACK = 29
_READ_BATCH = 64  # packets read per device per wake-up before serving the others


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def open_tun(namespace: str, name: str = DEVICE) -> int:
    """A non-blocking fd of a new TUN device ``name`` inside ``namespace`` (``ip netns`` name)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR))
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
        return fd
    finally:
        _setns(home)
        os.close(target)
        os.close(home)


class Forwarder:
    """The event loop: read packets, schedule them on their sender's link, write them when due."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.one_way_s = 0.0
        self.rate_bps = 0.0
        self.link_free = [0.0] * len(fds)
        self.queued = [0] * len(fds)
        self.heap: list[tuple[float, int, int, int, bytes]] = []  # (deliver, seq, src, dst, packet)
        self.seq = 0
        self.dropped = 0
        self.forwarded = 0
        self.late_s = 0.0  # summed lateness of deliveries (when written − when due)
        self.late_max_s = 0.0

    def set(self, rtt_s: float, rate_bps: float) -> None:
        self.one_way_s, self.rate_bps = rtt_s / 2, rate_bps

    def _route(self, packet: bytes) -> int | None:
        ip = packet[_VNET_HDR:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[16:19] != bytes([10, 9, 0]):
            return None  # IPv6 chatter, foreign destinations
        dst = ip[19] - 1
        return dst if 0 <= dst < len(self.fds) else None

    def receive(self, src: int, now: float) -> None:
        for _ in range(_READ_BATCH):
            try:
                packet = os.read(self.fds[src], 65536 + _VNET_HDR)
            except BlockingIOError:
                return
            dst = self._route(packet)
            if dst is None or dst == src:
                continue
            if self.queued[src] >= MAX_QUEUED:
                self.dropped += 1
                continue
            depart = now
            if self.rate_bps:
                depart = max(now, self.link_free[src]) + 8 * (len(packet) - _VNET_HDR) / self.rate_bps
                self.link_free[src] = depart
            self.seq += 1
            self.queued[src] += 1
            heapq.heappush(self.heap, (depart + self.one_way_s, self.seq, src, dst, packet))

    def deliver(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            due, _, src, dst, packet = heapq.heappop(self.heap)
            self.queued[src] -= 1
            try:
                os.write(self.fds[dst], packet)
            except OSError:  # the device went down (teardown): drop, as a wire would
                self.dropped += 1
                continue
            self.forwarded += 1
            self.late_s += now - due
            self.late_max_s = max(self.late_max_s, now - due)

    def stats(self) -> dict:
        """Packets forwarded and dropped, and how late deliveries were (mean and max seconds),
        since the previous call (the counters restart)."""
        out = {"forwarded": self.forwarded, "dropped": self.dropped,
               "late_mean_s": self.late_s / max(self.forwarded, 1), "late_max_s": self.late_max_s}
        self.forwarded = self.dropped = 0
        self.late_s = self.late_max_s = 0.0
        return out

    def timeout(self, now: float) -> float | None:
        return max(self.heap[0][0] - now, 0.0) if self.heap else None


def _command(line: str, fwd: Forwarder) -> str | None:
    """Apply one control line; -> the answer, None on ``quit``."""
    parts = line.split()
    if not parts or parts[0] == "quit":
        return None
    if parts[0] == "stats":
        return json.dumps(fwd.stats())
    if parts[0] != "set" or len(parts) != 3:
        raise ValueError(f"bad control line {line!r}: want 'set RTT_S RATE_BPS', 'stats' or 'quit'")
    fwd.set(float(parts[1]), float(parts[2]))
    return "ok"


def serve(namespaces: list[str]) -> None:
    fwd = Forwarder([open_tun(ns) for ns in namespaces])
    print("ready", flush=True)
    ctrl, pending = sys.stdin.fileno(), b""
    while True:
        ready, _, _ = select.select([ctrl, *fwd.fds], [], [], fwd.timeout(time.monotonic()))
        now = time.monotonic()
        for fd in ready:
            if fd == ctrl:
                chunk = os.read(ctrl, 4096)
                pending += chunk if chunk else b"quit\n"
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    answer = _command(line.decode(), fwd)
                    if answer is None:
                        return
                    print(answer, flush=True)
            else:
                fwd.receive(fwd.fds.index(fd), now)
        fwd.deliver(time.monotonic())


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m launch.tunlink NAMESPACE [NAMESPACE ...]")
    ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # 1 µs: precise short sleeps
    try:
        os.nice(-10)  # a light process: wake it first so the link adds little latency under load
    except OSError:
        pass
    serve(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
