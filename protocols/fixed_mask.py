"""Fixed-mask matmul: open ``W − B`` once for an operand that does not change, not on every call.

Stock CrypTen multiplies two secrets with a fresh Beaver triple and opens ``x − a`` *and* ``W − b``
on every call, so a secret weight (or a cached K/V row) costs ``16·|W|`` logged bytes per party per
token. Here ``[W]`` gets one persistent mask ``[B]``:

Set-up (once per operand, and once per appended block of rows):
    1. Obtain a random sharing ``[B]`` from the provider (the dealer keeps ``B``).
    2. Open ``δ = [W] − [B]`` (1 round, ``|W|`` elements). Keep ``δ`` (public) and ``[B]``.
    Appended rows' openings wait for the next product with the operand and share its round
    (``append_all``: a decode step's K/V rows go out with its q·Kᵀ opening).
Per call ``[x] @ [W]`` (or ``[x] @ [W]ᵀ``):
    1. Obtain fresh ``[A]`` (shape of ``x``) and ``[C] = [A @ B]`` from the provider.
    2. Open ``ε = [x] − [A]`` (1 round, ``|x|`` elements).
    3. ``[x @ W] = ε @ δ + ε @ [B] + [A] @ δ + [C]`` (local; ``ε @ δ`` added by party 0). Each party
       keeps its share of ``[W] = δ + [B]`` (party 0 folds ``δ`` into its share), so this is
       ``ε @ [W] + [A] @ δ + [C]``: two local matmuls per party.
    4. Fixed-point truncation by the scale (``protocols.truncation``: exact, 1 round, ``|x @ W|``
       elements; ``ProtocolConfig(truncation="local")``: CrypTen's local share division).

Public: shapes; ``δ = W − B`` and ``ε = x − A`` are uniformly masked. ``A`` is fresh per call, ``B``
is reused, which is safe because ``B`` is only ever opened once, inside ``δ``.
Cost (logged, per party): set-up ``16·|W|`` bytes, 1 round (+ the dealer request below); per call
``16·|x|`` bytes, 1 round, independent of ``|W|``, + the exact truncation ``16·|x @ W|`` bytes, 1 round. With the separate dealer, party 0 also logs the
dealer's answer ``8·|x @ W|`` bytes plus a small pickled request/size (3 extra rounds), as CrypTen's
TTP does; with TFP the correlations cost nothing (and party 0 knows ``B``: NOT secure).
Error: ≤ 2 ulps (exact truncation; local truncation: ±1 ulp and a 2^32-ulp error w.p. ≈ |v|/2^32).

Baseline: ``StockOperand`` has the same interface but keeps ``[W]`` as a plain share, and
``fixed_matmul`` then runs CrypTen's own Beaver matmul (opens ``x − A`` and ``W − B`` every call:
``16·(|x| + |W|)`` logged bytes, 1 round). It exists only to measure what fixed masks save.
"""
from __future__ import annotations

import logging
import weakref

import torch

from protocols.compat import MPCTensor, comm, crypten
from protocols.config import active_config
from protocols.dealer import fixed_mask_provider, outer_size, product_size
from protocols.truncation import Untruncated, _check_divisor, opening, plain, truncated, wrap
from protocols.types import Public, Secret

# CrypTen internals; protocols.compat (imported above) has already made CrypTen importable.
from crypten.mpc.primitives import ArithmeticSharedTensor

logger = logging.getLogger(__name__)


def _arith(x: Secret) -> ArithmeticSharedTensor:
    tensor = getattr(x, "_tensor", None)
    if not isinstance(tensor, ArithmeticSharedTensor):
        raise TypeError(f"expected an arithmetic MPCTensor, got {type(x).__name__} / {type(tensor).__name__}")
    return tensor


def _grow_dim(grow_dim: int | None, ndim: int) -> int | None:
    """``grow_dim`` normalised to a non-negative index (None: the operand never grows)."""
    if grow_dim is not None and not -ndim <= grow_dim < ndim:
        raise ValueError(f"grow_dim {grow_dim} out of range for a {ndim}-D operand")
    return None if grow_dim is None else grow_dim % ndim


def _open(share: torch.Tensor) -> torch.Tensor:
    """Sum the parties' ring shares (1 round, ``2·n·8`` logged bytes per party)."""
    return comm.get().all_reduce(share)


class FixedMaskOperand:
    """A secret operand ``[W]`` with a persistent mask ``[B]`` and the opened ``δ = W − B``.

    ``grow_dim``: the dimension along which ``append`` adds rows (e.g. the T axis of a KV cache),
    or ``None`` for a weight that never changes. Only the new rows' ``δ`` are opened on append.
    Each party holds ``δ`` (public) and its share of ``[W] = δ + [B]`` (party 0: ``δ + b0``).
    """

    def __init__(self, value: Secret, *, grow_dim: int | None = None) -> None:
        w = _arith(value)
        self.grow_dim = _grow_dim(grow_dim, w.dim())
        self.encoder = w.encoder
        self._provider = fixed_mask_provider()
        self.key = self._provider.new_key()
        b = self._provider.mask(self.key, w.size(), device=w.device)
        self._delta = _open(w.share - b.share)  # W − B, public ring elements
        self._share = self._mask_to_w(b.share, self._delta)
        self._appends: _Appends | None = None
        weakref.finalize(self, self._provider.release, self.key)
        logger.debug("fixed mask %d (%s): opened %d elements", self.key, self._provider.NAME,
                     self._delta.numel())

    @classmethod
    def _from_parts(cls, delta: torch.Tensor, share: torch.Tensor, encoder, grow_dim: int | None,
                    key: int, provider) -> FixedMaskOperand:
        self = cls.__new__(cls)
        self._delta, self._share, self.encoder, self.grow_dim = delta, share, encoder, grow_dim
        self.key, self._provider, self._appends = key, provider, None
        weakref.finalize(self, provider.release, key)
        return self

    @staticmethod
    def _mask_to_w(b_share: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """This party's share of ``[W] = δ + [B]``."""
        return b_share + delta if comm.get().get_rank() == 0 else b_share

    @property
    def shape(self) -> torch.Size:
        """The shape with any appended rows (also those whose opening is still pending)."""
        size = list(self._delta.size())
        if self._appends is not None:
            size[self.grow_dim] += self._appends.rows(self)
        return torch.Size(size)

    @property
    def device(self) -> torch.device:
        return self._delta.device

    @property
    def secret(self) -> Secret:
        """``[W]`` as an MPCTensor: party 0 holds ``δ + b0``, the others ``b_i`` (no communication)."""
        self._settle()
        return MPCTensor.from_shares(self._share.clone(), precision=self.encoder._precision_bits)

    def _settle(self) -> None:
        """Open pending appended rows now (1 round), if any."""
        if self._appends is not None:
            from protocols.rounds import together
            together(self._appends.step())

    def append(self, rows: Secret) -> None:
        """Concatenate ``[rows]`` along ``grow_dim``; opens only ``rows − B_new`` (``|rows|`` elements)."""
        append_all([(self, rows)])

    def _masked_rows(self, rows: Secret) -> tuple[ArithmeticSharedTensor, torch.Tensor]:
        """Check ``rows``, draw their new mask rows [B_new]: (B_new, this party's share of rows − B_new)."""
        self._settle()
        if self.grow_dim is None:
            raise ValueError("append needs an operand built with grow_dim")
        r = _arith(rows)
        expect = list(self.shape)
        expect[self.grow_dim] = r.size(self.grow_dim)
        if list(r.size()) != expect:
            raise ValueError(f"rows of shape {tuple(r.size())} do not fit operand {tuple(self.shape)} "
                             f"along dim {self.grow_dim}")
        if r.encoder.scale != self.encoder.scale:
            raise ValueError(f"rows scale {r.encoder.scale} != operand scale {self.encoder.scale}")
        b = self._provider.mask(self.key, r.size(), dim=self.grow_dim, device=r.device)
        return b, r.share - b.share

    def _extend(self, b: ArithmeticSharedTensor, delta: torch.Tensor) -> None:
        self._share = torch.cat([self._share, self._mask_to_w(b.share, delta)], dim=self.grow_dim)
        self._delta = torch.cat([self._delta, delta], dim=self.grow_dim)

    def select(self, dim: int, index: Public) -> FixedMaskOperand:
        """A new operand of ``W.index_select(dim, index)`` for a public ``index``.

        Reuses the opened ``δ`` and ``[B]`` rows: no opening; one dealer message under TTP, none
        under TFP. (Use it for public evictions, e.g. a sliding window; secret selections need a
        one-hot product instead.)
        """
        self._settle()
        dim = dim % len(self.shape)
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        key = self._provider.new_key()
        self._provider.select(self.key, key, dim, index)
        return FixedMaskOperand._from_parts(self._delta.index_select(dim, index),
                                            self._share.index_select(dim, index), self.encoder,
                                            self.grow_dim, key, self._provider)

    def __repr__(self) -> str:
        return f"FixedMaskOperand(shape={tuple(self.shape)}, grow_dim={self.grow_dim}, key={self.key})"


def append_all(pairs: list[tuple["FixedMaskOperand", Secret]]) -> None:
    """``operand.append(rows)`` for every pair, all openings in one round (e.g. a layer's K and V),
    deferred: the masks are drawn now and the opening joins the round of the next product with any of
    the operands (``matmul_step``), or runs on its own when an operand is read otherwise. Public:
    which round carries it."""
    _Appends([(op, *op._masked_rows(rows)) for op, rows in pairs])


class _Appends:
    """Rows drawn for several operands whose ``rows − B_new`` openings are still to come (one round)."""

    def __init__(self, prepared: list[tuple[FixedMaskOperand, ArithmeticSharedTensor, torch.Tensor]]) -> None:
        self.prepared = prepared
        for op, _, _ in prepared:
            op._appends = self

    def rows(self, op: FixedMaskOperand) -> int:
        return sum(int(b.size(op.grow_dim)) for o, b, _ in self.prepared if o is op)

    def step(self):
        """The openings as a ``protocols.rounds.Pending``; its finish extends every operand."""
        from protocols.rounds import Pending
        for op, _, _ in self.prepared:
            op._appends = None

        def finish(opened: list[torch.Tensor]) -> None:
            for (op, b, _), delta in zip(self.prepared, opened):
                op._extend(b, wrap(delta))

        return Pending([plain(masked) for _, _, masked in self.prepared], finish)


class StockOperand:
    """Stock-CrypTen baseline of ``FixedMaskOperand``: ``[W]`` as a plain share, no persistent mask.

    Same interface (``shape``, ``device``, ``encoder``, ``grow_dim``, ``secret``, ``append``,
    ``select``); set-up and ``append`` open nothing, but every ``fixed_matmul`` opens ``W − B``.
    """

    def __init__(self, value: Secret, *, grow_dim: int | None = None) -> None:
        w = _arith(value)
        self.grow_dim = _grow_dim(grow_dim, w.dim())
        self.encoder = w.encoder
        self._value = value

    @property
    def shape(self) -> torch.Size:
        return self._value.size()

    @property
    def device(self) -> torch.device:
        return self._value.device

    @property
    def secret(self) -> Secret:
        """``[W]`` (a copy of the share; no communication)."""
        return self._value.clone()

    def append(self, rows: Secret) -> None:
        """Concatenate ``[rows]`` along ``grow_dim`` (local)."""
        if self.grow_dim is None:
            raise ValueError("append needs an operand built with grow_dim")
        if _arith(rows).encoder.scale != self.encoder.scale:
            raise ValueError(f"rows scale {_arith(rows).encoder.scale} != operand scale {self.encoder.scale}")
        self._value = crypten.cat([self._value, rows], dim=self.grow_dim)

    def select(self, dim: int, index: Public) -> StockOperand:
        """A new operand of ``W.index_select(dim, index)`` for a public ``index`` (local)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return StockOperand(self._value.index_select(dim % len(self.shape), index), grow_dim=self.grow_dim)

    def __repr__(self) -> str:
        return f"StockOperand(shape={tuple(self.shape)}, grow_dim={self.grow_dim})"


Operand = FixedMaskOperand | StockOperand


def _t(m: torch.Tensor, transpose: bool) -> torch.Tensor:
    return m.transpose(-1, -2) if transpose else m


def fixed_matmul(x: Secret, w: Operand, *, transpose_w: bool = False) -> Secret:
    """``[x] @ [W]`` (or ``[x] @ [W]ᵀ``) with ``W``'s mask opened once (see module docstring).

    Shapes follow torch.matmul broadcasting, e.g. ``(B, H, S, D) x (D, F)``,
    ``(B, Hkv, G·S, D) x (B, Hkv, T, D)ᵀ -> (B, Hkv, G·S, T)``, one-hot ``(B, Hkv, K, T) x (B, Hkv, T, D)``.
    Public: shapes. Cost: 1 round and ``16·|x|`` logged bytes per party (+ the dealer's answer on
    party 0 under TTP), independent of ``|W|``, + the output's truncation (1 round, ``16·|x @ W|``). A ``StockOperand`` gets CrypTen's Beaver matmul
    instead (``16·(|x| + |W|)`` bytes).
    """
    if isinstance(w, StockOperand):
        out = x.matmul(w._value.transpose(-1, -2) if transpose_w else w._value)
        if _arith(x).encoder.scale == 1:  # CrypTen keeps x's encoder: the product is at W's scale
            _arith(out).encoder = _arith(w._value).encoder
        return out
    xa = _arith(x)
    result = ArithmeticSharedTensor.from_shares(wrap(fixed_matmul_raw(x, w, transpose_w=transpose_w)), precision=0)
    sx, sw = xa.encoder.scale, w.encoder.scale
    result.encoder = xa.encoder if sx > 1 else w.encoder
    if sx > 1 and sw > 1:
        result.div_(sx)  # truncation back to one scale (local division with 2 parties)
    out = MPCTensor([])
    out._tensor = result
    return out


def fixed_matmul_raw(x: Secret, w: FixedMaskOperand, *, transpose_w: bool = False) -> torch.Tensor:
    """This party's share of ``x @ W`` (plain int64) at the product of the two scales (no truncation:
    the caller folds it into a later one). Cost: 1 round, ``16·|x|`` logged bytes."""
    from protocols.rounds import together
    return together(matmul_step(plain(_arith(x).share), w, transpose_w=transpose_w))[0]


def matmul_step(x: torch.Tensor, w: FixedMaskOperand, *, transpose_w: bool = False):
    """``fixed_matmul_raw`` of a plain share ``x`` as a ``protocols.rounds.Pending`` step."""
    from protocols.rounds import Pending
    out_size = product_size(x.size(), w.shape, transpose_w)  # raises on a shape mismatch
    a, c = w._provider.pair(w.key, x.size(), w.shape, transpose_w, device=x.device)
    appends = w._appends.step() if w._appends is not None else Pending([], lambda _: None)
    n = len(appends.opens)

    def finish(opened: list[torch.Tensor]) -> torch.Tensor:
        appends.finish(opened[:n])  # the operand's pending rows, opened in this round
        # ε@δ + ε@[B] + [A]@δ + [C] = ε@[W] + [A]@δ + [C]   (party 0's [W] share already holds δ)
        z = c.share + torch.matmul(wrap(opened[n]), _t(w._share, transpose_w))
        z += torch.matmul(a.share, _t(w._delta, transpose_w))
        assert z.size() == out_size, f"product shape {tuple(z.size())} != {tuple(out_size)}"
        return plain(z)

    return Pending(appends.opens + [x - plain(a.share)], finish)


def fuses_truncation(x: Untruncated, w: Operand, *, transpose_w: bool = False) -> bool:
    """Whether ``[⌊z/d⌋] @ [W]`` runs as ``trunc_matmul_step``: a fixed-mask W and an m ⊗ B correlation
    (|z|·J elements: a SmolLM2 decode token's largest is 576·3072) within ``ProtocolConfig.trunc_matmul_limit``
    (default 2^22: a 32-token prefill or the LM head would need 10–28M per product, so they settle the
    truncation first). Public: a function of the shapes and the config."""
    limit = active_config().trunc_matmul_limit
    return isinstance(w, FixedMaskOperand) and outer_size(x.share.size(), w.shape, transpose_w).numel() <= limit


def trunc_matmul_step(z: torch.Tensor, d: int, w: FixedMaskOperand, *, transpose_w: bool = False):
    """``⌊z/d⌋ @ W`` (or ``@ Wᵀ``) in the exact truncation's own round, as a ``protocols.rounds.Pending``:
    the product needs no opening of its own.

    With c = z + 2^62 + r opened, ⌊z/d⌋ = p + Q·nw⊙[m] − [q] (``protocols.truncation.truncated``: p, nw
    public) and [W] = δ + [B]:
        ⌊z/d⌋ @ W = x' @ δ + p @ [W] − [q @ B] + Q·Σ_i nw_i·[m_i·B_i·],
    x' = Q·nw⊙[m] − [q] (the secret part; party 0's share of [W] holds δ, so p @ δ is in p @ [W]).
    Correlation: r, q, m (|z| each), q @ B (|out|), m ⊗ B (|z|·J, ``protocols.dealer.outer_mask``), from
    the dealer or party 0 (TFP). Cost: 1 round and ``16·|z|`` logged bytes (the opening of c) for what
    was a truncation round and a product round (``16·|z|`` each); a pending append of W's rows goes out
    in it.
    Public: shapes, d, c (uniform), nw (a function of c). Error: the truncation's (< 2 ulps of ⌊z/d⌋).
    Returns this party's share of the product at W's scale (untruncated)."""
    from protocols.rounds import Pending
    _check_divisor(d)
    if not isinstance(d, int):
        raise ValueError("a truncation fused with a matmul needs an int divisor")
    out_size = product_size(z.size(), w.shape, transpose_w)  # raises on a shape mismatch
    r, q, m, qb, mb = w._provider.trunc_pair(w.key, z.size(), w.shape, d, transpose_w, device=z.device)
    appends = w._appends.step() if w._appends is not None else Pending([], lambda _: None)
    n = len(appends.opens)

    def finish(opened: list[torch.Tensor]) -> torch.Tensor:
        appends.finish(opened[:n])
        x, p, nw, big = truncated(opened[n], d, q, m)  # x = Q·nw·[m] − [q]: the secret part
        prod = torch.matmul(wrap(x), _t(w._delta, transpose_w)) + torch.matmul(wrap(p), _t(w._share, transpose_w))
        prod = plain(prod) - qb + big * (nw.unsqueeze(-1) * mb).sum(-2)
        assert prod.size() == out_size, f"product shape {tuple(prod.size())} != {tuple(out_size)}"
        return prod

    return Pending(appends.opens + [opening(z, r)], finish)


def share_weight(tensor: torch.Tensor | None, src: int, shape: tuple[int, ...], *,
                 grow_dim: int | None = None) -> FixedMaskOperand:
    """Secret-share a plaintext weight held by party ``src`` and mask it once.

    The owner passes the tensor; every other party passes ``None`` and the public ``shape``.
    Cost: ``16·|W|`` logged bytes per party, once (input sharing itself is free).
    """
    if comm.get().get_rank() == src:
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"party {src} must pass the weight of shape {tuple(shape)}, got {got}")
    else:
        tensor = torch.zeros(shape)
    return FixedMaskOperand(crypten.cryptensor(tensor, src=src), grow_dim=grow_dim)
