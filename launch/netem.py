"""Emulated networks: each party in its own Linux network namespace, the links shaped to a profile.

``emulated_network(n, profile)`` creates ``n`` namespaces ``mpcnet<pid>x<k>-<i>`` (the PID and a
counter in the name: parallel runs never collide), gives namespace i the address ``10.9.0.(i+1)``
on one interface (``Network.ifname``) and loopback, shapes every party's outgoing link to
``profile`` and yields a ``Network``; on leaving (also on errors, KeyboardInterrupt and SIGTERM) it
deletes everything it made. Nothing is created in the caller's namespace; traffic never leaves
this machine. Two backends, picked by ``available``:

1. ``netem`` (kernel ``sch_netem``): a switch namespace ``...-sw`` holds bridge ``br0``; party i
   has ``eth0``, a veth whose peer is a bridge port. Shaping is, on every party's ``eth0``,
   ``tc qdisc replace dev eth0 root netem delay RTT/2 rate R limit N`` (each direction sees RTT/2,
   so a reply comes back after RTT); the unshaped profile deletes the qdisc.
2. ``tun`` (userspace, for kernels built without ``sch_netem``, e.g. many VM guests): party i has
   TUN device ``mpc0``, and ``launch.tunlink`` forwards packets between the namespaces with the
   same per-sender ``delay RTT/2 + rate R`` model.

Profiles (``PROFILES``): ``loopback`` (no delay, no rate limit: the namespaces' link as is),
``LAN`` (1 Gbps, 0.5 ms one way = 1 ms RTT) and ``WAN`` (100 Mbps, 40 ms RTT). TCP inside the
namespaces gets large socket buffers (``TCP_SYSCTLS``). Needs root and iproute2 (``ip``, ``tc``);
``available()`` says why not when it cannot run. Knows nothing about
models or MPC (``launch.netrun`` runs parties in a ``Network``).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

from launch import tunlink

NETEM_LIMIT = 100_000  # packets netem may hold (its default 1000 drops bursts on a long fat link)
# TCP in every namespace, because the harness reshapes live connections:
# 1. 4 MB default socket buffers (8× WAN's bandwidth-delay product): with Linux's 128 KB default, a
#    connection that carried little data while the link was fast (gloo's, set up unshaped) keeps a
#    64 KB window, i.e. 13 Mbps at 40 ms RTT whatever the link rate;
# 2. reno congestion control: a model-based one (BBR, some hosts' default) keeps the previous
#    profile's minimum RTT for ~10 s, so after a switch to WAN its window is sized for the old path
#    (a 1 MiB all_reduce measured 0.5–1 s instead of 0.17–0.2 s); reno keeps no path state. (CUBIC's
#    HyStart also remembers the minimum RTT, and a namespace may not pick it where it is not in
#    net.ipv4.tcp_allowed_congestion_control.) Slow start after idle stays the kernel's default (on).
TCP_SYSCTLS = {"net.ipv4.tcp_rmem": "4096 4194304 16777216", "net.ipv4.tcp_wmem": "4096 4194304 16777216",
               "net.ipv4.tcp_congestion_control": "reno"}
_PREFIX = "mpcnet"
_CMD_TIMEOUT_S = 15.0
_counter = itertools.count()


class NetemError(RuntimeError):
    """An ``ip``/``tc`` command failed, or the emulation cannot run here (the message says why)."""


@dataclass(frozen=True)
class Profile:
    """A link: round-trip time and bandwidth per direction (``rate_bps`` None = not limited)."""

    name: str
    rtt_s: float
    rate_bps: float | None

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or (self.rate_bps is not None and self.rate_bps <= 0):
            raise ValueError(f"profile {self.name!r}: need rtt_s >= 0 and rate_bps > 0 or None, "
                             f"got {self.rtt_s}, {self.rate_bps}")

    @property
    def one_way_s(self) -> float:
        return self.rtt_s / 2

    @property
    def shaped(self) -> bool:
        return self.rtt_s > 0 or self.rate_bps is not None

    def describe(self) -> str:
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} Mbps"
        return f"{self.name}: {rate}, {self.rtt_s * 1e3:g} ms RTT"


LOOPBACK = Profile("loopback", 0.0, None)
LAN = Profile("LAN", 1e-3, 1e9)
WAN = Profile("WAN", 40e-3, 100e6)
PROFILES = {p.name: p for p in (LOOPBACK, LAN, WAN)}


def netem_args(profile: Profile, limit: int = NETEM_LIMIT) -> list[str]:
    """The qdisc part of ``tc qdisc replace dev DEV root ...`` for a shaped ``profile``."""
    assert profile.shaped, f"profile {profile.name!r} is unshaped: delete the qdisc instead"
    args = ["netem", "delay", f"{round(profile.one_way_s * 1e6)}us"]
    if profile.rate_bps is not None:
        args += ["rate", f"{round(profile.rate_bps)}bit"]
    return args + ["limit", str(limit)]


def shape_command(namespace: str, dev: str, profile: Profile) -> list[str]:
    """The ``tc`` command that puts ``profile`` on ``dev`` in ``namespace`` (unshaped: delete)."""
    if not profile.shaped:
        return ["tc", "-n", namespace, "qdisc", "del", "dev", dev, "root"]
    return ["tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root", *netem_args(profile)]


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise NetemError(f"`{' '.join(cmd)}` hung for {_CMD_TIMEOUT_S:g} s") from err
    if check and done.returncode != 0:
        raise NetemError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    return done


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[str | None, str]:
    """(backend or None, reason): root, iproute2, ``ip netns add``, then netem or /dev/net/tun."""
    if os.geteuid() != 0:
        return None, "needs root (network namespaces and qdiscs)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return None, f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2)"
    ns = f"{_PREFIX}{os.getpid()}probe"
    added = _run(["ip", "netns", "add", ns], check=False)
    if added.returncode:
        return None, f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    try:
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        forced = os.environ.get("MPC_NET_BACKEND")
        if forced in ("netem", "tun"):
            return forced, f"backend {forced} (forced by MPC_NET_BACKEND)"
        netem = _run(shape_command(ns, "eth0", LAN), check=False)
        if netem.returncode == 0:
            return "netem", "kernel netem qdisc"
        if os.path.exists("/dev/net/tun"):
            return "tun", (f"userspace TUN link emulator (launch.tunlink): the kernel has no netem qdisc "
                           f"({netem.stderr.strip()})")
        return None, f"no netem qdisc ({netem.stderr.strip()}) and no /dev/net/tun"
    finally:
        _run(["ip", "netns", "del", ns], check=False)


def available() -> tuple[bool, str]:
    """Whether ``emulated_network`` can run here, and why (or which backend it would use)."""
    backend, reason = _probe()
    return backend is not None, reason


def cleanup_stale() -> list[str]:
    """Delete namespaces that an ``emulated_network`` of a process no longer alive left behind."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    stale = []
    for name in re.findall(rf"^({_PREFIX}(\d+)\S*)", out, flags=re.M):
        if not os.path.exists(f"/proc/{name[1]}"):
            _run(["ip", "netns", "del", name[0]], check=False)
            stale.append(name[0])
    return stale


def our_namespaces() -> list[str]:
    """Namespaces that emulated networks of this process hold now."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return re.findall(rf"^({_PREFIX}{os.getpid()}x\S*)", out, flags=re.M)


class Network:
    """``n`` party namespaces on one emulated link; ``set_profile`` reshapes it at any time."""

    def __init__(self, n: int, backend: str) -> None:
        tag = f"{_PREFIX}{os.getpid()}x{next(_counter)}"
        self.backend = backend
        self.namespaces = [f"{tag}-{i}" for i in range(n)]
        self.switch = f"{tag}-sw" if backend == "netem" else None
        self.ifname = "eth0" if backend == "netem" else tunlink.DEVICE
        self.addrs = [f"{tunlink.SUBNET}{i + 1}" for i in range(n)]
        self.profile = LOOPBACK
        self._made: list[str] = []
        self._link: subprocess.Popen | None = None

    def exec_prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside party i's namespace."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def up(self) -> None:
        for ns in self.namespaces + ([self.switch] if self.switch else []):
            _run(["ip", "netns", "add", ns])
            self._made.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.backend == "netem":
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for i, ns in enumerate(self.namespaces):
                _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                      "netns", self.switch])
                _run(["ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up"])
        else:
            self._start_link()
        for ns, addr in zip(self.namespaces, self.addrs):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.ifname])
            _run(["ip", "-n", ns, "link", "set", self.ifname, "up"])
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in TCP_SYSCTLS.items())])

    def _start_link(self) -> None:
        self._link = subprocess.Popen([sys.executable, "-m", "launch.tunlink", *self.namespaces],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._ack("ready")

    def _ack(self, want: str | None) -> str:
        """The link emulator's next answer line (it must be ``want`` unless None)."""
        assert self._link is not None and self._link.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self._link.stdout.readline()), daemon=True)
        reader.start()
        reader.join(_CMD_TIMEOUT_S)
        if not line or not line[0].strip() or (want is not None and line[0].strip() != want):
            raise NetemError(f"launch.tunlink did not answer {want or 'a line'!r} (got {line[:1]}, exit "
                             f"code {self._link.poll()})")
        return line[0].strip()

    def stats(self) -> dict:
        """The link's own counters: the tun backend's packets forwarded/dropped and delivery
        lateness since the previous call (``launch.tunlink``); the netem backend's ``tc -s qdisc``
        text per party (cumulative)."""
        if self.backend == "netem":
            return {ns: _run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", self.ifname]).stdout
                    for ns in self.namespaces}
        assert self._link is not None and self._link.stdin is not None
        self._link.stdin.write("stats\n")
        self._link.stdin.flush()
        return json.loads(self._ack(None))

    def set_profile(self, profile: Profile) -> None:
        """Shape every party's outgoing link to ``profile`` (packets in flight keep their timing)."""
        if self.backend == "netem":
            for ns in self.namespaces:
                _run(shape_command(ns, self.ifname, profile), check=profile.shaped)
        else:
            assert self._link is not None and self._link.stdin is not None
            self._link.stdin.write(f"set {profile.rtt_s!r} {profile.rate_bps or 0!r}\n")
            self._link.stdin.flush()
            self._ack("ok")
        self.profile = profile

    def down(self) -> None:
        if self._link is not None:
            with contextlib.suppress(OSError):
                self._link.stdin.close()
            try:
                self._link.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._link.kill()
                self._link.wait()
            self._link = None
        for ns in reversed(self._made):
            _run(["ip", "netns", "del", ns], check=False)
        self._made.clear()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (so ``finally`` clauses run); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def emulated_network(n: int, profile: Profile = LOOPBACK) -> Iterator[Network]:
    """``n`` namespaces joined by a link shaped to ``profile``; always torn down on exit."""
    if n < 1:
        raise ValueError(f"need at least one namespace, got {n}")
    backend, reason = _probe()
    if backend is None:
        raise NetemError(f"cannot emulate a network here: {reason}")
    cleanup_stale()
    net = Network(n, backend)
    with _sigterm_raises():
        try:
            net.up()
            if profile.shaped:
                net.set_profile(profile)
            yield net
        finally:
            net.down()
