"""The offline phase with a separate dealer: per-request seeds, one tape of corrections per step.

CrypTen's TTP asks the dealer for every Beaver triple online (3 messages per request: a SmolLM2
token took 20,202 rounds with the dealer vs 5,052 without). Here the dealer is off the critical path:

Seeds. At start-up each party p and the dealer agree on a base seed s_p (drawn from CrypTen's
    TTP generator, which the dealer seeded). Request i of step t with public descriptor d (kind,
    shapes, operand key, divisor, ...) draws party p's shares from a generator seeded with
    H(s_p, t, i, d). Party 1 draws *all* of its shares (c_1 included) that way and never talks to
    the dealer; party 0 draws its a_0, b_0, r_0 the same way and needs one correction per request
    (c_0 = a·b − c_1, r²_0, (⌊r/d⌋_0, msb(r)_0), ...), which the dealer computes from both seeds.
Tape. The descriptors of one decode step are public and repeat from step to step, up to shapes that
    grow with the context. For step t the dealer predicts the list from the two previous steps
    (every integer extrapolated linearly, x_t = 2·x_{t−1} − x_{t−2}, when the two lists have the
    same structure; else a repeat of step t−1), computes every correction and sends party 0 one
    message: the predicted descriptors and one flat tensor. Party 0 checks each request's actual
    descriptor against the tape. A hit costs nothing online; from the first miss of a step on,
    every request of that step goes to the dealer online (1 round trip, counted as a dealer trip)
    and the dealer replays its state (fixed masks) to the actual sequence. Requests outside a step
    (weight sharing, prefill's first step have no history) are online.
Fixed masks (``protocols.fixed_mask``) live in the same schedule: the dealer keeps B per operand key,
    built from the parties' seeded shares, and answers pairs ``C = A @ B − c_1``.

Security: every correction is masked by a share party 0 never sees (c_1, ... from s_1), and the seeds
hash the descriptor, so a mispredicted entry (sent, then recomputed for the actual descriptor) uses
independent randomness. The dealer sees public descriptors only. A dealer colluding with party 0
learns everything (as in every dealer model). Cost accounting: the parties' rounds and bytes are
those of ``-n 2``; dealer traffic (tape and online answers, bytes received and sent by party 0) and
its round trips on the critical path are counted apart (``counters``).
"""
from __future__ import annotations

import contextlib
import hashlib
import pickle
from typing import Any, Iterator, Sequence

import numpy
import torch
import torch.distributed as dist

from protocols.compat import comm, crypten
from protocols.dealer import FixedMaskProvider, outer_mask, outer_size, product_size
from protocols.truncation import plain, udiv, wrap

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common import serial
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element
from crypten.cuda import CUDALongTensor
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
from crypten.mpc.provider.provider import TupleProvider
from crypten.mpc.provider.ttp_provider import TTPClient


Desc = tuple  # (kind, *public arguments) of plain builtins
OUTSIDE = -1  # the step index of requests made outside any step


# ---------------------------------------------------------------- what each kind draws and needs

def _meta(size: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(size), device="meta")


def _out_size(desc: Desc) -> tuple[int, ...]:
    """Shape of the product correlation of ``additive`` / ``binary`` / ``fm_pair`` descriptors."""
    kind = desc[0]
    if kind == "additive":
        _, s0, s1, op, args, kwargs, _ = desc
        if op == "mul":  # the hot path: a meta-tensor op costs ≈ 0.5 ms of Python, broadcasting µs
            return tuple(torch.broadcast_shapes(s0, s1))
        return tuple(getattr(torch, op)(_meta(s0), _meta(s1), *args, **dict(kwargs)).shape)
    if kind in ("binary", "trunc_mul"):
        return tuple(torch.broadcast_shapes(desc[1], desc[2]))
    if kind == "mul3":
        return tuple(torch.broadcast_shapes(desc[1], desc[2], desc[3]))
    if kind in ("fm_pair", "fm_trunc"):  # (kind, key, size_a, size_b, transpose, ...)
        return tuple(product_size(desc[2], desc[3], desc[4]))
    raise KeyError(kind)


def payload_sizes(desc: Desc) -> list[tuple[int, ...]]:
    """Shapes of party 0's corrections for ``desc`` (the dealer's answer), in order."""
    kind = desc[0]
    if kind in ("additive", "binary", "fm_pair"):
        return [_out_size(desc)]
    if kind in ("square", "B2A"):
        return [tuple(desc[1])]
    if kind in ("trunc", "trunc_sq"):
        return [tuple(desc[1])] * (2 if kind == "trunc" else 4)
    if kind == "mul3":  # a·b, a·c, b·c, a·b·c
        _, sa, sb, sc, _ = desc
        return [tuple(torch.broadcast_shapes(sa, sb)), tuple(torch.broadcast_shapes(sa, sc)),
                tuple(torch.broadcast_shapes(sb, sc)), _out_size(desc)]
    if kind == "trunc_mul":  # q, m of z; q·b, m·b of the product
        return [tuple(desc[1])] * 2 + [_out_size(desc)] * 2
    if kind == "fm_trunc":  # q, m of z; q @ B; m ⊗ B
        return [tuple(desc[2])] * 2 + [_out_size(desc), tuple(outer_size(desc[2], desc[3], desc[4]))]
    if kind == "lut":
        return [(*desc[1], 1 << desc[3])] * (2 if desc[4] else 1)
    if kind == "lut_tr":  # q, m of the multiplier; o, o·q, o·m
        return [tuple(desc[1])] * 2 + [(*desc[1], 1 << desc[3])] * 3
    if kind == "cmp":  # the digit one-hots, ρ_top
        return [(*desc[1], sum(1 << k for k in desc[2])), tuple(desc[1])]
    return []  # fm_mask, fm_select: state only


def draw(desc: Desc, gen: torch.Generator, party1: bool, device) -> list[torch.Tensor]:
    """This party's seeded shares for ``desc`` (plain torch tensors); ``party1`` also draws the
    shares party 0 gets as corrections. Party and dealer call this with the same generator seed:
    the same draws."""
    kind = desc[0]

    def ring(s):
        return plain(generate_random_ring_element(tuple(s), generator=gen, device=device))

    def kbit(s, bits=None):
        return plain(generate_kbit_random_tensor(tuple(s), bitlength=bits, generator=gen, device=device))

    if kind == "additive":
        own = [ring(desc[1]), ring(desc[2])]
        return own + ([ring(_out_size(desc))] if party1 else [])
    if kind == "binary":
        own = [kbit(desc[1]), kbit(desc[2])]
        return own + ([kbit(_out_size(desc))] if party1 else [])
    if kind == "square":
        return [ring(desc[1])] + ([ring(desc[1])] if party1 else [])
    if kind == "B2A":
        return [kbit(desc[1], 1)] + ([ring(desc[1])] if party1 else [])
    if kind in ("trunc", "trunc_sq"):  # r own; party 1 also (q, m) or (q, m, q², q·m)
        return [ring(desc[1])] + ([ring(desc[1]) for _ in range(2 if kind == "trunc" else 4)] if party1 else [])
    if kind == "mul3":  # (a, b, c) own; party 1 also (a·b, a·c, b·c, a·b·c)
        return [ring(t) for t in desc[1:4]] + ([ring(t) for t in payload_sizes(desc)] if party1 else [])
    if kind == "trunc_mul":  # (r, b) own; party 1 also (q, m, q·b, m·b)
        out = _out_size(desc)
        return [ring(desc[1]), ring(desc[2])] + ([ring(desc[1]), ring(desc[1]), ring(out), ring(out)] if party1 else [])
    if kind == "lut_tr":  # (r, r_t) own; party 1 also (q, m, o, o·q, o·m)
        _, size, _, bits, _, _ = desc
        rows = (*size, 1 << bits)
        return [ring(size), ring(size)] + ([ring(size), ring(size)] + [ring(rows) for _ in range(3)] if party1 else [])
    if kind == "lut":  # (r, β) own; party 1 also (o, o·β)
        _, size, _, bits, mult, _ = desc
        n = 2 if mult else 1
        return [ring(size) for _ in range(n)] + ([ring((*size, 1 << bits)) for _ in range(n)] if party1 else [])
    if kind == "cmp":  # r own; party 1 also (digit one-hots, ρ_top)
        return [ring(desc[1])] + ([ring(t) for t in payload_sizes(desc)] if party1 else [])
    if kind == "fm_mask":
        return [ring(desc[2])]
    if kind == "fm_pair":
        return [ring(desc[2])] + ([ring(_out_size(desc))] if party1 else [])
    if kind == "fm_trunc":  # r own; party 1 also (q, m, q @ B, m ⊗ B)
        return [ring(desc[2])] + ([ring(s) for s in payload_sizes(desc)] if party1 else [])
    if kind == "fm_select":
        return []
    raise ValueError(f"unknown correlation kind {kind!r}")


def seed_of(base: int, step: int, index: int, desc: Desc) -> int:
    """H(s_p, t, i, d): 63 bits of blake2b over the canonical text of the request."""
    text = f"{base}|{step}|{index}|{desc!r}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generator(device_type: str, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device_type)
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------- wire format (party 0 <-> dealer)

def _send_obj(obj: Any, dst: int, group) -> int:
    """CrypTen's ``send_obj`` wire format (int32 size, int8 bytes), not logged; returns bytes sent."""
    buf = pickle.dumps(obj)
    dist.send(torch.tensor(len(buf), dtype=torch.int32), dst=dst, group=group)
    dist.send(torch.from_numpy(numpy.frombuffer(buf, dtype=numpy.int8).copy()), dst=dst, group=group)
    return len(buf) + 4


def _recv_obj(src: int, group) -> tuple[Any, int]:
    """Counterpart of ``_send_obj`` through CrypTen's restricted unpickler; returns (obj, bytes)."""
    size = torch.tensor(1, dtype=torch.int32)
    dist.recv(size, src=src, group=group)
    data = torch.empty(int(size), dtype=torch.int8)
    dist.recv(data, src=src, group=group)
    return serial.restricted_loads(data.numpy().tobytes()), int(size) + 4


def _send_flat(parts: list[torch.Tensor], dst: int, group) -> int:
    flat = torch.cat([p.reshape(-1).cpu() for p in parts]) if parts else torch.empty(0, dtype=torch.long)
    if flat.numel():
        dist.send(flat, dst=dst, group=group)
    return 8 * flat.numel()


def _recv_flat(numel: int, src: int, group) -> torch.Tensor:
    flat = torch.empty(numel, dtype=torch.long)
    if numel:
        dist.recv(flat, src=src, group=group)
    return flat


def _split(flat: torch.Tensor, sizes: list[tuple[int, ...]], device) -> list[torch.Tensor]:
    out, at = [], 0
    for s in sizes:
        n = int(numpy.prod(s, dtype=numpy.int64)) if s else 1
        out.append(flat[at:at + n].reshape(s).to(device))
        at += n
    return out


def _ring_matmul(a: torch.Tensor, b: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Z_2^64 matmul (CUDA has no int64 matmul: CrypTen's block-split ``CUDALongTensor`` one)."""
    b = b.transpose(-1, -2) if transpose else b
    if a.is_cuda:
        return plain(torch.matmul(CUDALongTensor(a), CUDALongTensor(b)))
    return torch.matmul(a, b)


def _numel(sizes: list[tuple[int, ...]]) -> int:
    return sum(int(numpy.prod(s, dtype=numpy.int64)) if s else 1 for s in sizes)


# ---------------------------------------------------------------- prediction

def _leaves(x: Any) -> tuple[list[int], Any]:
    """Integer leaves of a descriptor and its structure with the integers blanked out."""
    if isinstance(x, bool) or not isinstance(x, (int, tuple, list)):
        return [], x
    if isinstance(x, int):
        return [x], int
    ints, shape = [], []
    for item in x:
        i, s = _leaves(item)
        ints += i
        shape.append(s)
    return ints, tuple(shape)


def _fill(structure: Any, ints: Iterator[int]) -> Any:
    if structure is int:
        return next(ints)
    if isinstance(structure, tuple):
        return tuple(_fill(s, ints) for s in structure)
    return structure


def predict(prev: list[Desc] | None, prev2: list[Desc] | None) -> list[Desc]:
    """Step t's descriptors from steps t−1 and t−2: integers extrapolated linearly where both steps
    have the same structure entry by entry, else step t−1 repeated (empty without history)."""
    if prev is None:
        return []
    if prev2 is None or len(prev2) != len(prev):
        return list(prev)
    out = []
    for a, b in zip(prev, prev2):
        (ia, sa), (ib, sb) = _leaves(a), _leaves(b)
        out.append(_fill(sa, iter([2 * x - y for x, y in zip(ia, ib)])) if sa == sb else a)
    return out


# ---------------------------------------------------------------- party side

class TapeProvider(TupleProvider, FixedMaskProvider):
    """CrypTen tuple provider + fixed masks + truncation pairs for parties with a separate dealer.

    Installed in place of CrypTen's ``TrustedThirdParty`` (``install``); same protocol for every
    correlation, with the dealer's messages moved into one tape per step (module docstring).
    """

    NAME = "TTP"

    def __init__(self) -> None:
        TupleProvider.__init__(self)  # CrypTen's tracing state (unused: the tape replaces its cache)
        self._ready = False

    # -- life cycle
    def _setup(self) -> None:
        """Draw the base seed from CrypTen's TTP generator (first use after ``crypten.init``)."""
        client = TTPClient.get()
        self.party = comm.get().get_rank()
        self.dealer = comm.get().get_ttp_rank()
        self.group = client.ttp_group
        self.base = int(torch.randint(0, 2**62, (), generator=client.generator))
        self.step, self.index, self.outside, self.steps = OUTSIDE, 0, 0, 0
        self.tape: list[Desc] = []
        self.tape_parts: list[list[torch.Tensor]] = []
        self.missed: int | None = None
        self.released: list[int] = []
        self.keys = 0
        self.stats = {"dealer_bytes": 0, "dealer_trips": 0, "hits": 0, "misses": 0}
        self._ready = True

    def _check(self) -> None:
        if not self._ready:
            self._setup()

    @contextlib.contextmanager
    def run_step(self, label: str, meter) -> Iterator[None]:
        """One step of the schedule (a forward pass); steps with the same ``label`` (e.g. "decode")
        predict each other. Party 0 receives its tape first (stage "dealer_tape" of ``meter``) and
        reports after."""
        self._check()
        assert self.step == OUTSIDE, "steps do not nest"
        self.step, self.index, self.missed = self.steps, 0, None
        self.steps += 1
        with meter.stage("dealer_tape"):
            if self.party == 0:
                self._receive_tape(label)
        try:
            yield
        finally:
            if self.party == 0:
                n = self.index
                self.stats["dealer_bytes"] += _send_obj(("end", self.step, n, self.missed), self.dealer,
                                                        self.group)
            self.step, self.tape, self.tape_parts = OUTSIDE, [], []

    def _receive_tape(self, label: str) -> None:
        """Party 0: ask for step ``self.step``'s tape and unpack it (one dealer trip)."""
        self.stats["dealer_bytes"] += _send_obj(("begin", self.step, label, self._take_released()),
                                                self.dealer, self.group)
        (descs, numel), nbytes = _recv_obj(self.dealer, self.group)
        flat = _recv_flat(numel, self.dealer, self.group)
        self.tape = descs
        sizes = [payload_sizes(d) if d is not None else [] for d in descs]
        parts = _split(flat, [s for group in sizes for s in group], "cpu")
        self.tape_parts, at = [], 0
        for group in sizes:
            self.tape_parts.append(parts[at:at + len(group)])
            at += len(group)
        self.stats["dealer_bytes"] += nbytes + 8 * numel
        self.stats["dealer_trips"] += 1

    def _take_released(self) -> list[int]:
        released, self.released = self.released, []
        return released

    # -- the one request path
    def _correlate(self, desc: Desc, device) -> list[torch.Tensor]:
        """This party's shares for ``desc``: own seeded draws, then (party 0) the dealer's corrections."""
        self._check()
        if self.step == OUTSIDE:
            step, index = OUTSIDE, self.outside
            self.outside += 1
        else:
            step, index = self.step, self.index
            self.index += 1
        dtype = torch.device(device).type if device is not None else "cpu"
        gen = _generator(dtype, seed_of(self.base, step, index, desc))
        own = draw(desc, gen, self.party == 1, device)
        if self.party != 0:
            return own
        return own + self._corrections(step, index, desc, device)

    def _corrections(self, step: int, index: int, desc: Desc, device) -> list[torch.Tensor]:
        if step != OUTSIDE and self.missed is None and index < len(self.tape) and self.tape[index] == desc:
            self.stats["hits"] += 1
            return [p.to(device) for p in self.tape_parts[index]]
        if step != OUTSIDE and self.missed is None:
            self.missed = index
        self.stats["misses"] += 1
        sizes = payload_sizes(desc)
        self.stats["dealer_bytes"] += _send_obj(("req", step, index, desc, self._take_released()),
                                                self.dealer, self.group)
        if not sizes:  # state only: the dealer applies it in order, nothing to wait for
            return []
        flat = _recv_flat(_numel(sizes), self.dealer, self.group)
        self.stats["dealer_bytes"] += 8 * flat.numel()
        self.stats["dealer_trips"] += 1
        return _split(flat, sizes, device)

    # -- CrypTen's TupleProvider interface
    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        desc = ("additive", tuple(size0), tuple(size1), op, tuple(args), tuple(sorted(kwargs.items())),
                _dtype(device))
        a, b, c = self._correlate(desc, device)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    def square(self, size, device=None):
        r, r2 = self._correlate(("square", tuple(size), _dtype(device)), device)
        return (ArithmeticSharedTensor.from_shares(r, precision=0),
                ArithmeticSharedTensor.from_shares(r2, precision=0))

    def generate_binary_triple(self, size0, size1, device=None):
        a, b, c = self._correlate(("binary", tuple(size0), tuple(size1), _dtype(device)), device)
        return tuple(BinarySharedTensor.from_shares(t) for t in (a, b, c))

    def B2A_rng(self, size, device=None):
        rb, ra = self._correlate(("B2A", tuple(size), _dtype(device)), device)
        return ArithmeticSharedTensor.from_shares(ra, precision=0), BinarySharedTensor.from_shares(rb)

    def wrap_rng(self, size, device=None):
        raise NotImplementedError("wrap_rng serves > 2 parties; MPCache runs 2 parties + a dealer")

    # -- fixed masks (protocols.fixed_mask's provider interface)
    def new_key(self) -> int:
        """A fresh operand key; every party calls this at the same program point."""
        self._check()
        self.keys += 1
        return self.keys - 1

    def mask(self, key, size, dim=None, device=None):
        (b,) = self._correlate(("fm_mask", key, tuple(size), dim, _dtype(device)), device)
        return ArithmeticSharedTensor.from_shares(b, precision=0)

    def pair(self, key, size_a, size_b, transpose, device=None):
        a, c = self._correlate(("fm_pair", key, tuple(size_a), tuple(size_b), bool(transpose),
                                _dtype(device)), device)
        return (ArithmeticSharedTensor.from_shares(a, precision=0),
                ArithmeticSharedTensor.from_shares(c, precision=0))

    def trunc_pair(self, key, size_z, size_b, d, transpose, device=None):
        return tuple(self._correlate(("fm_trunc", key, tuple(size_z), tuple(size_b), bool(transpose), int(d),
                                      _dtype(device)), device))

    def select(self, key, new_key, dim, index):
        self._correlate(("fm_select", key, new_key, dim, tuple(int(i) for i in index.tolist())), None)

    def release(self, key):
        if self._ready and self.party == 0:
            self.released.append(key)

    # -- truncation pairs (protocols.truncation)
    def trunc(self, size, d, device=None, square: bool = False) -> tuple[torch.Tensor, ...]:
        """(r, ⌊r_u/d⌋, msb(r)) shares, and (q², q·m) with ``square`` (``protocols.truncation``)."""
        dd = d if isinstance(d, int) else (tuple(d.shape), tuple(d.reshape(-1).tolist()))
        return tuple(self._correlate(("trunc_sq" if square else "trunc", tuple(size), dd, _dtype(device)), device))

    def mul3(self, sa, sb, sc, device=None) -> tuple[torch.Tensor, ...]:
        """(a, b, c, a·b, a·c, b·c, a·b·c) shares for a three-factor product (``protocols.rounds.mul3_step``)."""
        return tuple(self._correlate(("mul3", tuple(sa), tuple(sb), tuple(sc), _dtype(device)), device))

    def trunc_mul(self, size_z, size_y, d: int, device=None) -> tuple[torch.Tensor, ...]:
        """(r, b, ⌊r_u/d⌋, msb(r), q·b, m·b) shares for a truncation fused with a product
        (``protocols.truncation.trunc_mul_step``)."""
        return tuple(self._correlate(("trunc_mul", tuple(size_z), tuple(size_y), int(d), _dtype(device)), device))

    # -- look-up one-hots (protocols.lut)
    def lut(self, size, shift, bits, mult, device=None) -> tuple[torch.Tensor, ...]:
        """(r, o) or (r, o, β, o·β) shares for a look-up of ``size`` inputs (``protocols.lut``)."""
        parts = self._correlate(("lut", tuple(size), int(shift), int(bits), bool(mult), _dtype(device)), device)
        if not mult:
            return tuple(parts)
        r, beta, o, ob = parts
        return r, o, beta, ob

    def lut_tr(self, size, shift, bits, d: int, device=None) -> tuple[torch.Tensor, ...]:
        """(r, r_t, q, m, o, o·q, o·m) shares for a look-up whose multiplier is ⌊z/d⌋ of a raw z
        (``protocols.lut``, truncated multipliers)."""
        return tuple(self._correlate(("lut_tr", tuple(size), int(shift), int(bits), int(d), _dtype(device)), device))

    # -- comparison digits (protocols.compare)
    def cmp(self, size, widths, device=None) -> tuple[torch.Tensor, ...]:
        """(r, digit one-hots of r mod 2^B, bit B of r) shares for an exact comparison (``protocols.compare``)."""
        return tuple(self._correlate(("cmp", tuple(size), tuple(int(k) for k in widths), _dtype(device)), device))

    @staticmethod
    def _init():
        TTPClient._init()

    @staticmethod
    def uninit():
        TTPClient.uninit()


def _dtype(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


_PROVIDER = TapeProvider()


def install() -> TapeProvider:
    """Make the tape CrypTen's TTP provider (call before ``crypten.init`` with provider TTP)."""
    crypten.mpc.__dict__["__SUPPORTED_PROVIDERS"]["TTP"] = _PROVIDER
    _PROVIDER._ready = False
    return _PROVIDER


def active() -> TapeProvider | None:
    """The tape, if the parties run with the separate dealer (else None)."""
    provider = crypten.mpc.get_default_provider()
    return provider if isinstance(provider, TapeProvider) else None


@contextlib.contextmanager
def step(label: str, meter=None) -> Iterator[None]:
    """Mark one step of the schedule, e.g. one decode forward (no-op without the separate dealer).
    Collective; steps with the same ``label`` predict each other's correlations; the tape's
    transfer is recorded as stage "dealer_tape" on ``meter``."""
    from protocols.cost import NullMeter
    tape = active()
    if tape is None:
        yield
    else:
        with tape.run_step(label, meter or NullMeter()):
            yield


def counters() -> tuple[float, float]:
    """(dealer bytes, dealer round trips on the critical path) so far on this party (0 without a tape)."""
    tape = active()
    if tape is None or not tape._ready:
        return 0.0, 0.0
    return float(tape.stats["dealer_bytes"]), float(tape.stats["dealer_trips"])


# ---------------------------------------------------------------- dealer side

class TapeDealer:
    """The dealer (rank ``world_size``): seeds, tapes and online answers until party 0 terminates."""

    def __init__(self) -> None:
        crypten.init()
        self.group = comm.get().ttp_group
        self.bases = self._setup_seeds()
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.masks: dict[int, torch.Tensor] = {}
        self.history: dict[str, list[list[Desc]]] = {}  # per label: the last two steps' actual lists
        self.label = ""
        self.predicted: list[Desc] = []
        self.start_masks: dict[int, torch.Tensor] = {}
        self.online: list[Desc] = []
        self.replayed = False
        self.step = OUTSIDE
        self.ahead = None  # ((step, label, True), _tape(...)) computed during the previous step
        self.exact = False  # the last step ran exactly as predicted
        self.trusted: dict[str, bool] = {}  # per label: its last step ran as predicted

    def _setup_seeds(self) -> list[int]:
        """CrypTen's TTP seed exchange, then each party's base seed (its first draw)."""
        ws = comm.get().get_world_size()
        seeds = [torch.randint(-(2**63), 2**63 - 1, size=()) for _ in range(ws)]
        reqs = [dist.isend(tensor=seeds[i], dst=i, group=self.group) for i in range(ws)]
        bases = []
        for i in range(ws):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seeds[i].item())
            bases.append(int(torch.randint(0, 2**62, (), generator=gen)))
            reqs[i].wait()
        dist.barrier(group=self.group)
        return bases

    def serve(self) -> None:
        while True:
            msg, _ = _recv_obj(0, self.group)
            if msg == "terminate":
                return
            kind = msg[0]
            if kind == "begin":
                _, step, label, released = msg
                self._forget(released)
                if self.ahead is not None:
                    for key in released:
                        self.ahead[1][3].pop(key, None)
                self._begin(step, label)
            elif kind == "end":
                self._end(msg[2], msg[3])
            elif kind == "req":
                _, step, index, desc, released = msg
                self._forget(released)
                self._online(step, index, desc)
            else:
                raise ValueError(f"dealer: unknown message {kind!r}")

    def _forget(self, keys: Sequence[int]) -> None:
        for key in keys:
            self.masks.pop(key, None)

    # -- one request, computed against a mask state
    def _answer(self, masks: dict[int, torch.Tensor], step: int, index: int,
                desc: Desc) -> list[torch.Tensor] | None:
        """Party 0's corrections for ``desc`` (updating ``masks`` for state kinds); None if the
        state it needs is missing (a mispredicted key)."""
        dev = self.device_type if desc[-1] == "cuda" else "cpu"
        g0, g1 = (_generator(dev, seed_of(b, step, index, desc)) for b in self.bases[:2])
        p0, p1 = draw(desc, g0, False, dev), draw(desc, g1, True, dev)
        kind = desc[0]
        if kind == "additive":
            _, _, _, op, args, kwargs, _ = desc
            a, b = p0[0] + p1[0], p0[1] + p1[1]
            c = _ring_matmul(a, b) if op == "matmul" and not args and not kwargs else \
                plain(getattr(torch, op)(wrap(a), wrap(b), *args, **dict(kwargs)))
            return [c - p1[2]]
        if kind == "binary":
            return [((p0[0] ^ p1[0]) & (p0[1] ^ p1[1])) ^ p1[2]]
        if kind == "square":
            r = p0[0] + p1[0]
            return [r * r - p1[1]]
        if kind == "B2A":
            return [(p0[0] ^ p1[0]) - p1[1]]
        if kind in ("trunc", "trunc_sq"):
            r, d = p0[0] + p1[0], desc[2]
            dd = d if isinstance(d, int) else torch.tensor(d[1], device=dev).reshape(d[0])
            q, m = udiv(r, dd), (r < 0).long()
            parts = [q, m] + ([q * q, q * m] if kind == "trunc_sq" else [])
            return [t - s for t, s in zip(parts, p1[1:])]
        if kind == "mul3":
            a, b, c = (x + y for x, y in zip(p0[:3], p1[:3]))
            return [t - s for t, s in zip([a * b, a * c, b * c, a * b * c], p1[3:])]
        if kind == "trunc_mul":
            r, b = p0[0] + p1[0], p0[1] + p1[1]
            q, m = udiv(r, desc[3]), (r < 0).long()
            return [t - s for t, s in zip([q, m, q * b, m * b], p1[2:])]
        if kind == "lut_tr":
            _, _, shift, bits, d, _ = desc
            r, rt = p0[0] + p1[0], p0[1] + p1[1]
            onehot = torch.nn.functional.one_hot((r & ((1 << (shift + bits)) - 1)) >> shift, 1 << bits).long()
            q, m = udiv(rt, d), (rt < 0).long()
            parts = [q, m, onehot, onehot * q.unsqueeze(-1), onehot * m.unsqueeze(-1)]
            return [t - s for t, s in zip(parts, p1[2:])]
        if kind == "lut":
            _, _, shift, bits, mult, _ = desc
            r = p0[0] + p1[0]
            onehot = torch.nn.functional.one_hot((r & ((1 << (shift + bits)) - 1)) >> shift, 1 << bits).long()
            if not mult:
                return [onehot - p1[1]]
            beta = p0[1] + p1[1]
            return [onehot - p1[2], onehot * beta.unsqueeze(-1) - p1[3]]
        if kind == "cmp":
            from protocols.compare import digit_onehots
            return [t - u for t, u in zip(digit_onehots(p0[0] + p1[0], desc[2]), p1[1:])]
        if kind == "fm_mask":
            _, key, _, dim, _ = desc
            b = p0[0] + p1[0]
            if dim is None:
                masks[key] = b
            elif key in masks:
                masks[key] = torch.cat([masks[key], b], dim=dim)
            else:
                return None
            return []
        if kind == "fm_pair":
            key, transpose = desc[1], desc[4]
            if key not in masks or tuple(masks[key].shape) != tuple(desc[3]):
                return None
            return [_ring_matmul(p0[0] + p1[0], masks[key].to(dev), transpose) - p1[1]]
        if kind == "fm_trunc":
            _, key, _, size_b, transpose, d, _ = desc
            if key not in masks or tuple(masks[key].shape) != tuple(size_b):
                return None
            r, b = p0[0] + p1[0], masks[key].to(dev)
            q, m = udiv(r, d), (r < 0).long()
            parts = [q, m, _ring_matmul(q, b, transpose), outer_mask(m, b, transpose)]
            return [t - s for t, s in zip(parts, p1[1:])]
        if kind == "fm_select":
            _, key, new_key, dim, index_list = desc
            if key not in masks:
                return None
            masks[new_key] = masks[key].index_select(dim, torch.tensor(index_list, dtype=torch.long,
                                                                       device=masks[key].device))
            return []
        raise ValueError(f"dealer: unknown correlation kind {kind!r}")

    # -- steps
    def _tape(self, step: int, history: list[list[Desc]],
              masks: dict[int, torch.Tensor]) -> tuple[list[Desc], list, list, dict]:
        """(predicted descriptors, descriptors sent, corrections, mask state after the step) of
        ``step`` predicted from ``history``, starting from mask state ``masks``."""
        prev = history[-1] if history else None
        prev2 = history[-2] if len(history) > 1 else None
        predicted = predict(prev, prev2)
        shadow = dict(masks)
        descs, parts = [], []
        for index, desc in enumerate(predicted):
            answer = self._answer(shadow, step, index, desc)
            descs.append(desc if answer is not None else None)
            parts += answer or []
        return predicted, descs, parts, shadow

    def _begin(self, step: int, label: str) -> None:
        """Send step ``step``'s tape: the one computed ahead during the previous step if its
        assumption held (that step ran exactly as predicted), else computed now. Then, if this step's
        predecessor ran as predicted, compute the next step's tape ahead (while the parties work)."""
        self.step, self.label, self.online, self.replayed = step, label, [], False
        self.start_masks = dict(self.masks)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == (step, label, self.exact):
            self.predicted, descs, parts, self.shadow = ahead[1]
        else:
            self.predicted, descs, parts, self.shadow = self._tape(step, self.history.get(label, []),
                                                                   self.masks)
        _send_obj((descs, sum(p.numel() for p in parts)), 0, self.group)
        _send_flat(parts, 0, self.group)
        if self.predicted and self.trusted.get(label):
            history = (self.history.get(label, []) + [self.predicted])[-2:]
            self.ahead = ((step + 1, label, True), self._tape(step + 1, history, self.shadow))

    def _replay(self, upto: int) -> None:
        """The true mask state at the first miss: the step's start state + its predicted head."""
        masks = dict(self.start_masks)
        for index, desc in enumerate(self.predicted[:upto]):
            if desc[0] in ("fm_mask", "fm_select"):
                self._answer(masks, self.step, index, desc)
        self.masks, self.replayed = masks, True

    def _online(self, step: int, index: int, desc: Desc) -> None:
        self.ahead = None  # a request outside the prediction: the next tape is computed afresh
        if step != OUTSIDE:
            if not self.replayed:
                self._replay(index)
            self.online.append(desc)
        answer = self._answer(self.masks, step, index, desc)
        if answer is None:
            raise RuntimeError(f"dealer: no fixed mask for request {desc[:2]} (step {step}, #{index})")
        if payload_sizes(desc):
            _send_flat(answer, 0, self.group)

    def _end(self, n: int, missed: int | None) -> None:
        self.exact = missed is None and n == len(self.predicted)  # the step ran as predicted
        if self.exact:
            actual, self.masks = self.predicted, self.shadow
        elif missed is None:
            actual = self.predicted[:n]
            self._replay(n)
        else:
            actual = self.predicted[:missed] + self.online
        self.trusted[self.label] = self.exact
        self.history[self.label] = (self.history.get(self.label, []) + [actual])[-2:]
        self.step = OUTSIDE

