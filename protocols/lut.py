"""One-round table look-ups on secret shares, from a dealer's one-hot vector (Curl / NssMPClib style).

A public table ``T`` of N = 2^k entries over a grid of step 2^s (ring units of the input) starting
at signed index ``low``; the input [x] is a ring integer (any scale: a product's untruncated
2^32-scaled value works as well as a 2^16 one).

Dealer (offline): uniform r ∈ Z_2^64, and a sharing of the one-hot vector o ∈ {0,1}^N at position
    p = ⌊(r mod 2^(s+k)) / 2^s⌋; with a multiplier, also uniform β and a sharing of o·β.
Online (1 round): x' = x − low·2^s; open c = (x' + r) mod 2^(s+k) (each party sends its share plus
    r's share, mod 2^(s+k): c is uniform, so it hides x) and, with a multiplier [w], ε = w − β.
    With c = c_hi·2^s + c_lo: c_hi − p ≡ ⌊x'/2^s⌋ + [c_lo < r_lo]  (mod N), i.e. the index
    i = (c_hi − p) mod N is x'/2^s rounded down or up, up with probability equal to the fractional
    part (unbiased stochastic rounding: |x'/2^s − i| < 1).
    [T[i]] = Σ_j [o_j]·T[(c_hi − j) mod N]  (local: public rotation of the table),
    [S[i]·w] = ε·[S[i]] + Σ_j [o_j·β]·S[(c_hi − j) mod N]  (local).
Domain: the look-up is correct when low·2^s ≤ x < (low + N − 1)·2^s; outside it the index wraps
    modulo N (a wrong entry, never an error): every caller states the range it guarantees.
Truncated multiplier (``Request.div``): the multiplier is ⌊z/d⌋ of a raw share z, truncated in the same
    round (``protocols.truncation``: open z + 2^62 + r_t instead of w − β); with [⌊z/d⌋] = p − [q] +
    Q·nw·[m] (p, nw public), [S[i]·⌊z/d⌋] = p·[S[i]] − Σ_j [o_j·q]·S[…] + Q·nw·Σ_j [o_j·m]·S[…]:
    dealer material o, o·q, o·m (3N per input element) and the truncated value's share comes out too.
Cost: 1 round (batched with any other openings of the round by ``lookup_many``), 16 logged bytes
    per party per input element (+ 16 per multiplier element; CrypTen logs sent + received); dealer
    material N elements per input element (2N with a multiplier), made by party 0 under TFP or sent
    in the step's tape.
Public: shapes, s, k, low, the tables; nothing about x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from protocols.compat import comm, crypten
from protocols.dealer import TrustedFirstPartyMasks, fixed_mask_provider
from protocols.rounds import Pending, add_public, together
from protocols.truncation import opening, plain, truncated, udiv

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import ArithmeticSharedTensor

_CHUNK = 1 << 22  # elements of (rows × N) handled at once in the local rotation


@dataclass(frozen=True)
class Table:
    """Public look-up tables on the grid ``(low + j)·2^shift``, j ∈ [0, N) (ring units of the input).

    ``values`` (K, N), K ≥ 0: plain outputs; ``slopes`` (K2, N) or None: outputs multiplied by the request's
    multiplier. Entries are ring integers (the caller picks their scale).
    """

    shift: int
    low: int
    values: torch.Tensor
    slopes: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.values.shape[-1])

    @property
    def bits(self) -> int:
        return int(math.log2(self.size))

    def to(self, device) -> "Table":
        slopes = None if self.slopes is None else self.slopes.to(device)
        return Table(self.shift, self.low, self.values.to(device), slopes)


def grid(shift: int, low: int, bits: int, in_frac: int) -> torch.Tensor:
    """The grid points (low + j)·2^shift / 2^in_frac as float64 values, j ∈ [0, 2^bits)."""
    return (torch.arange(1 << bits, dtype=torch.float64) + low) * 2.0 ** (shift - in_frac)


def encode(values: torch.Tensor, frac: int) -> torch.Tensor:
    """Float table entries as ring integers at scale 2^frac (rounded to nearest, clipped to ±2^62)."""
    return torch.round(values * 2.0**frac).clamp(-2.0**62, 2.0**62).long()


def table(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]], shift: int, low: int, bits: int,
          in_frac: int, out_frac: int,
          slopes: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (), slope_frac: int = 0) -> Table:
    """A ``Table`` of ``fn(grid)`` at scale 2^out_frac (and ``slope(grid)`` at 2^slope_frac)."""
    g = grid(shift, low, bits, in_frac)
    values = torch.stack([encode(f(g), out_frac) for f in fns])
    sl = torch.stack([encode(f(g), slope_frac) for f in slopes]) if slopes else None
    return Table(shift, low, values, sl)


class OneHots:
    """This party's shares of the one-hot rows o of a look-up and of the products o·β_k with its
    multiplier's masks (none; β; or q_r, m_r for a truncated multiplier), handed out in row chunks.

    Under TFP they are made on demand, chunk by chunk (party 0 keeps r and the β_k in plaintext: NOT
    secure against it), so a look-up over n inputs never holds more than a chunk of its n·N material;
    under the dealer they are the tape's (or the online answer's) tensors, sliced.
    """

    def __init__(self, bits: int, shift: int, n_prod: int, device=None, r: torch.Tensor | None = None,
                 betas: Sequence[torch.Tensor] = (), rows: tuple[torch.Tensor, ...] | None = None) -> None:
        self.n, self.shift, self.n_prod, self.device = 1 << bits, shift, n_prod, device
        self.r, self.betas, self.rows = r, list(betas), rows

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shares of o[start:stop] and of each o·β_k[start:stop] over the flattened inputs, (rows, N) each."""
        if self.rows is not None:
            o, *prods = (t.reshape(-1, self.n)[start:stop] for t in self.rows)
            return o, prods
        # TFP: party 1's shares are drawn from the seed it shares with party 0, party 0's are o − that.
        rank = comm.get().get_rank()
        gen = crypten.generators["next" if rank == 0 else "prev"][torch.device(self.device or "cpu")]
        masks = [plain(generate_random_ring_element((stop - start, self.n), generator=gen, device=self.device))
                 for _ in range(1 + self.n_prod)]
        if rank == 1:
            return masks[0], masks[1:]
        r = self.r.reshape(-1)[start:stop]
        onehot = torch.nn.functional.one_hot((r & ((self.n << self.shift) - 1)) >> self.shift, self.n).long()
        prods = [onehot * beta.reshape(-1)[start:stop].unsqueeze(-1) - mask
                 for beta, mask in zip(self.betas, masks[1:])]
        return onehot - masks[0], prods


def correlation(size: torch.Size, shift: int, bits: int, mult: bool, device=None,
                div: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], OneHots]:
    """This party's shares of r, of the multiplier's masks (β; with ``div``: r_t, ⌊r_t/div⌋, msb(r_t)
    of a truncated multiplier) and its ``OneHots``."""
    provider = fixed_mask_provider()
    n_prod = 0 if not mult else (2 if div else 1)
    if isinstance(provider, TrustedFirstPartyMasks):  # party 0 draws everything: NOT secure against it
        n_parts = 1 + (0 if not mult else (3 if div else 1))
        if comm.get().get_rank() == 0:
            r = plain(generate_random_ring_element(tuple(size), device=device))
            parts = [r]
            if mult:
                rm = plain(generate_random_ring_element(tuple(size), device=device))
                parts += [rm, udiv(rm, div), (rm < 0).long()] if div else [rm]
            betas = parts[2:] if div else parts[1:]
            onehots = OneHots(bits, shift, n_prod, device, r, betas)
        else:
            parts = [torch.zeros(tuple(size), dtype=torch.long, device=device)] * n_parts
            onehots = OneHots(bits, shift, n_prod, device)
        shares = [plain(ArithmeticSharedTensor(p, precision=0, src=0).share) for p in parts]
        return shares[0], shares[1:], onehots
    from protocols.tape import TapeProvider
    if isinstance(provider, TapeProvider):
        if div:
            r, rt, q, m, *rows = provider.lut_tr(size, shift, bits, div, device)
            return r, [rt, q, m], OneHots(bits, shift, n_prod, device, rows=tuple(rows))
        r, o, *rest = provider.lut(size, shift, bits, mult, device)
        beta, ob = rest if mult else (None, None)
        return r, ([beta] if mult else []), OneHots(bits, shift, n_prod, device, rows=(o, ob) if mult else (o,))
    raise NotImplementedError(f"no look-up correlation for {type(provider).__name__}")


@dataclass
class Request:
    """One look-up: the input share ``x`` (plain int64), its ``table``, an optional multiplier share.

    ``div``: the multiplier is ⌊mult/div⌋ of the raw share ``mult`` (e.g. a product's 2^32 value and
    div = 2^16), truncated exactly in the look-up's own round (``protocols.truncation``); the result
    then also carries that truncated multiplier's share.
    """

    x: torch.Tensor
    table: Table
    mult: torch.Tensor | None = None
    div: int | None = None


def _rotated_dot(o: torch.Tensor, c_hi: torch.Tensor, tables: torch.Tensor, first: int | None) -> torch.Tensor:
    """``Σ_j o[r, j]·T[k, (c_hi[r] − j) mod N]`` for rows r of o (rows, N) and every table row k: (K, rows).

    ``first`` = f when T is a single 0/1 step row [k ≥ f] (a comparison, ``_step_start``): then the sum
    is a cyclic interval sum of o, read off its prefix sums: j ∈ [c + 1, c + 1 + N − f) mod N.
    """
    n = o.shape[-1]
    if first is not None:
        cum = o.cumsum(1)  # cum[:, m] = Σ_{j ≤ m} o[:, j]; ring arithmetic, wrapping

        def upto(m: torch.Tensor) -> torch.Tensor:  # Σ_{j < m} o[:, j]
            return cum.gather(1, (m - 1).clamp(min=0).unsqueeze(1)).squeeze(1) * (m > 0)

        a = (c_hi + 1) % n
        end = a + (n - first)
        return (upto(end.clamp(max=n)) - upto(a) + upto((end - n).clamp(min=0))).unsqueeze(0)
    rolled = o.gather(1, (c_hi.unsqueeze(1) - torch.arange(n, device=o.device)) % n)  # rolled[:, k] = o[(c − k) mod N]
    return (rolled.unsqueeze(0) * tables.unsqueeze(1)).sum(-1)


def _step_start(tables: torch.Tensor) -> int | None:
    """f if ``tables`` is one row [k ≥ f] (0 < f < N), else None."""
    if tables.shape[0] != 1:
        return None
    row = tables[0]
    first = int(row.argmax())
    if first == 0 or not bool((row[first:] == 1).all()) or bool(row[:first].any()):
        return None
    return first


def _evaluate(onehots: OneHots, c_hi: torch.Tensor, t: Table, eps: torch.Tensor | None,
              coefs: Sequence = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The look-up's value shares (K, *shape) and, with a multiplier, product shares (K2, *shape),
    one chunk of rows at a time: [S[i]·w] = ε·[S[i]] + Σ_k coef_k·Σ_j [o_j·β_k]·S[(c_hi − j) mod N]
    (plain multiplier: w = ε + β; truncated: w = p − q_r + Q·nw·m_r, ε = p, coefs (−1, Q·nw))."""
    flat_c = c_hi.reshape(-1)
    flat_e = None if eps is None else eps.reshape(-1)
    flat_k = [k.reshape(-1) if isinstance(k, torch.Tensor) else k for k in coefs]
    k = t.values.shape[0] + (0 if eps is None else t.slopes.shape[0])
    rows = max(1, _CHUNK // (onehots.n * k))
    step_v = _step_start(t.values)
    step_s = _step_start(t.slopes) if eps is not None else None
    vals, prods = [], []
    for start in range(0, flat_c.numel(), rows):
        stop = min(start + rows, flat_c.numel())
        o, obs = onehots.chunk(start, stop)
        c = flat_c[start:stop]
        if t.values.shape[0]:
            vals.append(_rotated_dot(o, c, t.values, step_v))
        if eps is not None:
            acc = _rotated_dot(o, c, t.slopes, step_s) * flat_e[start:stop]
            for ob, coef in zip(obs, flat_k):
                part = _rotated_dot(ob, c, t.slopes, step_s)
                acc = acc + (part * coef[start:stop] if isinstance(coef, torch.Tensor) else part * coef)
            prods.append(acc)
    shape = tuple(c_hi.shape)
    values = torch.cat(vals, dim=1).reshape(-1, *shape) if vals else torch.zeros((0, *shape), dtype=torch.long,
                                                                                 device=c_hi.device)
    return values, (torch.cat(prods, dim=1).reshape(-1, *shape) if eps is not None else None)


def lookup_many(requests: Sequence[Request]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of ``(values[:, i], slopes[:, i]·w)`` per request (see module docstring), in 1 round."""
    return together(lookup_step(requests))[0]


def lookup_step(requests: Sequence[Request]) -> Pending:
    """``lookup_many`` as a ``protocols.rounds.Pending`` step (to share a round with others)."""
    prepared, to_open = [], []
    for req in requests:
        t = req.table.to(req.x.device)
        modulus = 1 << (t.shift + t.bits)
        x = add_public(req.x, -t.low * (1 << t.shift))
        r, masks, onehots = correlation(x.size(), t.shift, t.bits, req.mult is not None, device=x.device,
                                        div=req.div)
        to_open.append((x + r) & (modulus - 1))
        if req.mult is not None:
            to_open.append(opening(req.mult, masks[0]) if req.div else req.mult - masks[0])
        prepared.append((req, t, modulus, onehots, masks))

    def finish(opened_list: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        opened, out = iter(opened_list), []
        for req, t, modulus, onehots, masks in prepared:
            c_hi = (next(opened) & (modulus - 1)) >> t.shift
            if req.mult is None:
                out.append(_evaluate(onehots, c_hi, t, None))
            elif not req.div:
                out.append(_evaluate(onehots, c_hi, t, next(opened), (1,)))
            else:
                w, p, nw, big = truncated(next(opened), req.div, masks[1], masks[2])
                values, prods = _evaluate(onehots, c_hi, t, p, (-1, big * nw))
                out.append((values, prods, w + p if comm.get().get_rank() == 0 else w))
        return out

    return Pending(to_open, finish)
