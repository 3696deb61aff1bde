"""Cost accounting: bytes, rounds and seconds per named stage and phase, from CrypTen's counters.

``CostMeter`` reads ``comm.get().get_communication_stats()`` (needs ``ProtocolConfig.
count_communication``, i.e. CrypTen's verbose communicator) around each block::

    meter = CostMeter()
    with meter.phase("prefill", tokens=S):
        with meter.stage("qkv"): ...
    for _ in range(n_new):                 # or one phase("decode") + meter.count_tokens(1) per step
        with meter.phase("decode", tokens=1):
            with meter.stage("attention"):
                with meter.stage("softmax"): ...   # recorded as "attention/softmax"
    report = meter.aggregate()   # collective: every party gets both parties' numbers

Per party CrypTen logs bytes sent *and* received (8 per element), so bytes on the wire =
(party 0 + party 1) / 2, as CrypTen's docstring says. With the separate dealer its traffic is not
in those counters: ``dealer_bytes`` (sent and received by party 0, ``protocols.tape``) and
``dealer_trips`` (round trips to the dealer on party 0's critical path: one per step for its tape,
plus one per request answered online) are counted apart. Rounds and seconds are the maximum over parties. ``comm_s`` is time inside
collectives (network plus waiting for the peer); ``compute_s = wall_s − comm_s``.
Projection to a network: ``T = compute_s + 8·wire_bytes / bandwidth_bps + rounds·rtt_s`` (all wire
bytes serialised over one link: conservative for a full-duplex link).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Collection, Iterator, Union

from protocols.compat import comm, crypten

logger = logging.getLogger(__name__)

TOTAL = "total"   # stage name of a whole phase block
OTHER = "other"   # phase total minus its top-level stages (report only)
_FIELDS = ("bytes", "rounds", "comm_s", "wall_s", "calls", "dealer_bytes", "dealer_trips")


class NullMeter:
    """A meter that records nothing (models and policies used outside a ``CostMeter``)."""

    def stage(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _counters() -> tuple[float, int, float, float, float]:
    from protocols.tape import counters
    s = comm.get().get_communication_stats()
    return (float(s["bytes"]), int(s["rounds"]), float(s["time"]), *counters())


class CostMeter:
    """Per-party recorder of (phase, stage) → bytes, rounds, comm seconds, wall seconds, calls.

    Stages nest (``"attention/softmax"``; a parent includes its children). Stages outside any
    ``phase`` block go to phase ``"run"``. ``tokens`` given to ``phase`` accumulate per phase and
    give per-token averages in the report.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(_FIELDS))
        self._tokens: dict[str, int] = defaultdict(int)
        self._phase: str | None = None
        self._stack: list[str] = []

    @contextlib.contextmanager
    def _measure(self, phase: str, stage: str) -> Iterator[None]:
        rec = self._records[(phase, stage)]  # created on entry: records keep pipeline order
        b0, r0, c0, d0, t0_ = _counters()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            b1, r1, c1, d1, t1_ = _counters()
            for i, v in enumerate((b1 - b0, r1 - r0, c1 - c0, time.perf_counter() - t0, 1, d1 - d0, t1_ - t0_)):
                rec[i] += v

    @contextlib.contextmanager
    def phase(self, name: str, tokens: int = 0) -> Iterator[None]:
        """Attribute the block to phase ``name`` (e.g. "prefill", "decode") and count ``tokens``.

        A phase opened inside another one suspends the outer one until it closes.
        """
        if "/" in name or "|" in name:
            raise ValueError(f"bad phase name {name!r}")
        prev, self._phase = self._phase, name
        self.count_tokens(tokens)
        try:
            with self._measure(name, TOTAL):
                yield
        finally:
            self._phase = prev

    def count_tokens(self, n: int = 1, phase: str | None = None) -> None:
        """Add ``n`` tokens to ``phase`` (default: the open one), e.g. once per decode step."""
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        self._tokens[phase or self._phase or "run"] += n

    @contextlib.contextmanager
    def stage(self, name: str, phase: str | None = None) -> Iterator[None]:
        """Attribute the block to stage ``name`` (nested under any open stage) of the current phase."""
        if not name or "/" in name or "|" in name or name in (TOTAL, OTHER):
            raise ValueError(f"bad stage name {name!r}")
        self._stack.append(name)
        try:
            with self._measure(phase or self._phase or "run", "/".join(self._stack)):
                yield
        finally:
            self._stack.pop()

    def clear(self) -> None:
        """Forget every record and token count (start a new account; no phase may be open)."""
        assert self._phase is None and not self._stack, "clear() inside an open phase or stage"
        self._records.clear()
        self._tokens.clear()

    def local(self) -> dict:
        """This party's numbers as plain builtins (picklable through CrypTen's restricted unpickler)."""
        return {"records": {f"{p}|{s}": list(v) for (p, s), v in self._records.items()},
                "tokens": dict(self._tokens)}

    def aggregate(self) -> CostReport:
        """Exchange every party's numbers (collective; its own traffic is not counted)."""
        c = comm.get()
        saved = (c.comm_bytes, c.comm_rounds, c.comm_time)
        mine = self.local()
        parties = [c.broadcast_obj(mine if c.get_rank() == r else None, r)
                   for r in range(c.get_world_size())]
        c.comm_bytes, c.comm_rounds, c.comm_time = saved
        return CostReport(parties, provider=type(crypten.mpc.get_default_provider()).NAME)


Meter = Union[CostMeter, NullMeter]  # what models and policies record their stages on


@dataclass
class CostRow:
    """Aggregated cost of one (phase, stage); ``party_bytes`` as logged by each party."""

    phase: str
    stage: str
    party_bytes: list[float]
    rounds: float
    comm_s: float
    wall_s: float
    calls: int
    tokens: int = 0
    dealer_bytes: float = 0.0
    dealer_trips: float = 0.0

    @property
    def wire_bytes(self) -> float:
        return sum(self.party_bytes) / 2

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.comm_s, 0.0)

    def project(self, bandwidth_bps: float, rtt_s: float) -> float:
        """Seconds on a link: ``compute_s + 8·wire_bytes / bandwidth_bps + rounds·rtt_s``."""
        return project(self.compute_s, self.wire_bytes, self.rounds, bandwidth_bps, rtt_s)

    def per_token(self) -> CostRow:
        n = max(self.tokens, 1)
        return CostRow(self.phase, self.stage, [b / n for b in self.party_bytes], self.rounds / n,
                       self.comm_s / n, self.wall_s / n, self.calls, self.tokens,
                       self.dealer_bytes / n, self.dealer_trips / n)


def project(compute_s: float, wire_bytes: float, rounds: float, bandwidth_bps: float,
            rtt_s: float) -> float:
    """``T = compute + 8·bytes / bandwidth + rounds·RTT`` (bandwidth in bits per second)."""
    if bandwidth_bps <= 0 or rtt_s < 0:
        raise ValueError(f"need bandwidth_bps > 0 and rtt_s >= 0, got {bandwidth_bps}, {rtt_s}")
    return compute_s + 8.0 * wire_bytes / bandwidth_bps + rounds * rtt_s


@dataclass
class CostReport:
    """Both parties' numbers, merged into rows; ``provider`` is CrypTen's ("TFP" is NOT secure)."""

    parties: list[dict]
    provider: str = "TFP"
    rows: list[CostRow] = field(init=False)

    def __post_init__(self) -> None:
        seen = dict.fromkeys(k for p in self.parties for k in p["records"])  # party 0's order first
        keys = sorted(seen, key=self._order)  # stable: stages stay in the order they first ran
        self.rows = [self._merge(k) for k in keys]
        self._add_other()

    @staticmethod
    def _order(key: str) -> tuple:
        phase, stage = key.split("|", 1)
        return ({"setup": 0, "prefill": 1, "decode": 2}.get(phase, 3), phase, stage == TOTAL)

    def _merge(self, key: str) -> CostRow:
        phase, stage = key.split("|", 1)
        recs = [list(p["records"].get(key, ())) for p in self.parties]
        recs = [r + [0.0] * (len(_FIELDS) - len(r)) for r in recs]  # records without dealer fields
        tokens = self.parties[0]["tokens"].get(phase, 0)
        return CostRow(phase, stage, [r[0] for r in recs], int(max(r[1] for r in recs)),
                       max(r[2] for r in recs), max(r[3] for r in recs), int(max(r[4] for r in recs)),
                       tokens, max(r[5] for r in recs), max(r[6] for r in recs))

    def _add_other(self) -> None:
        for total in [r for r in self.rows if r.stage == TOTAL]:
            top = [r for r in self.rows if r.phase == total.phase and r.stage != TOTAL
                   and "/" not in r.stage]
            if not top:
                continue
            other = CostRow(total.phase, OTHER,
                            [b - sum(r.party_bytes[i] for r in top) for i, b in enumerate(total.party_bytes)],
                            total.rounds - sum(r.rounds for r in top),
                            max(total.comm_s - sum(r.comm_s for r in top), 0.0),
                            max(total.wall_s - sum(r.wall_s for r in top), 0.0), total.calls, total.tokens,
                            total.dealer_bytes - sum(r.dealer_bytes for r in top),
                            total.dealer_trips - sum(r.dealer_trips for r in top))
            self.rows.insert(self.rows.index(total), other)

    @property
    def secure(self) -> bool:
        return self.provider != "TFP"

    def row(self, phase: str, stage: str = TOTAL) -> CostRow:
        for r in self.rows:
            if (r.phase, r.stage) == (phase, stage):
                return r
        raise KeyError(f"no cost recorded for phase {phase!r}, stage {stage!r}")

    def project(self, bandwidth_bps: float, rtt_s: float, phase: str | None = None,
                per_token: bool = False) -> float:
        """Projected seconds of one phase's total (``phase=None``: every phase's total)."""
        totals = [r for r in self.rows if r.stage == TOTAL and phase in (None, r.phase)]
        if not totals:
            raise KeyError(f"no phase total recorded for phase={phase!r}")
        return sum((r.per_token() if per_token else r).project(bandwidth_bps, rtt_s) for r in totals)

    def to_dict(self) -> dict:
        """Machine-readable: ``{"provider", "secure", "phases": {phase: {"tokens", "stages": {...}}}}``."""
        phases: dict[str, dict] = {}
        for r in self.rows:
            ph = phases.setdefault(r.phase, {"tokens": r.tokens, "stages": {}})
            ph["stages"][r.stage] = {"party_bytes": r.party_bytes, "wire_bytes": r.wire_bytes,
                                     "rounds": r.rounds, "comm_s": r.comm_s, "wall_s": r.wall_s,
                                     "compute_s": r.compute_s, "calls": r.calls,
                                     "dealer_bytes": r.dealer_bytes, "dealer_trips": r.dealer_trips}
        return {"provider": self.provider, "secure": self.secure, "phases": phases}

    def _table(self, per_token: Collection[str]) -> tuple[list[str], list[list[str]]]:
        head = ["phase", "stage", "calls", "wire MB", "P0 MB", "P1 MB", "rounds", "comm s", "wall s"]
        if self.secure:
            head += ["dealer MB", "dealer trips"]
        body = []
        for r in self.rows:
            mean = r.phase in per_token
            v = r.per_token() if mean else r
            body.append([f"{r.phase} / token" if mean else r.phase, r.stage, str(r.calls),
                         f"{v.wire_bytes / 1e6:.3f}", *(f"{b / 1e6:.3f}" for b in v.party_bytes[:2]),
                         f"{v.rounds:g}", f"{v.comm_s:.3f}", f"{v.wall_s:.3f}"]
                        + ([f"{v.dealer_bytes / 1e6:.3f}", f"{v.dealer_trips:g}"] if self.secure else []))
        return head, body

    def title(self, per_token: Collection[str] = ()) -> str:
        mode = "secure dealer" if self.secure else "NOT secure: dealer emulated in party 0"
        means = [f"{p}: mean per token over {self.row(p).tokens}" for p in per_token
                 if any(r.phase == p for r in self.rows)]
        return f"MPC cost (provider {self.provider}, {mode}){'; ' if means else ''}{'; '.join(means)}"

    def to_markdown(self, per_token: Collection[str] = ()) -> str:
        """Markdown table; phases named in ``per_token`` show means per token, the others totals."""
        head, body = self._table(per_token)
        lines = [f"**{self.title(per_token)}**", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)

    def to_rich(self, per_token: Collection[str] = ()):
        """A ``rich.table.Table`` of the same rows (see ``to_markdown``)."""
        from rich.table import Table
        head, body = self._table(per_token)
        table = Table(*head, title=self.title(per_token))
        for row in body:
            table.add_row(*row)
        return table
