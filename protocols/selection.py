"""Oblivious selection on secret shares: max / argmax one-hot, top-k, one-hot gather (compaction).

Masks and top-k one-hots are secret 0/1 tensors in CrypTen's comparison encoding (scale 1, exact
integers: multiplying a secret by them needs no truncation, so a one-hot gather is exact up to the
values' own encoding); ``argmax_onehot`` returns exact 0/1 at the default fixed-point scale. Only the *shapes* (n, k) are public; which positions win never
is. ``reveal_to`` is the one audited way to open a secret.

Cost notation: one secure comparison ``cmp`` = 8 rounds and 432 logged bytes per element per party
(CrypTen A2B adder + B2A, measured); one Beaver product ``mul`` = 1 round, 32 bytes per element.
With ``ProtocolConfig.comparison = "digits"`` (the default) the decode-time selection (``maximum``, the
pairwise top-k and the by-position one-hots) runs on ``protocols.compare`` (an exact comparison in 2
rounds, 32 bytes per element) and exact one-round look-ups of small integers (``protocols.lut``):
a pairwise top-k one-hot in 4 rounds instead of 2·9 + 9 + ⌈log2 k⌉. The bitonic path (n > ``PAIRWISE_MAX``,
static eviction over the prompt) and the knockout trees keep CrypTen's comparisons: their volume
(≈ n·log²n elements) would make the one-hot digits' dealer material (≈ 1.4 k elements each) dominate.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from protocols.compat import comm, crypten
from protocols.compare import ge_zero_many
from protocols.config import active_config
from protocols.fixed_mask import FixedMaskOperand, fixed_matmul
from protocols.lut import Request, Table, lookup_many
from protocols.rounds import share_of, to_secret
from protocols.types import Public, Secret

logger = logging.getLogger(__name__)
_ptype = crypten.mpc.ptype

# Padding value for tournament trees (must lie below every real input): inputs need |x| < 2^30.
PAD_VALUE = -float(2**30)

_reveals: list[tuple[int, tuple[int, ...]]] = []


def reveal_to(x: Secret, dst: int) -> torch.Tensor | None:
    """Open ``[x]`` to party ``dst`` only; every party returns ``None`` except ``dst``.

    THE audited reveal: each call is counted (``reveal_count()``) and logged at debug level with
    the recipient and shape, so a secrecy test can assert exactly what a decode step opened.
    Public: shape of x, dst. Cost: 1 round, 8·|x| bytes (the other party's share to dst).
    """
    _reveals.append((dst, tuple(x.size())))
    logger.debug("reveal #%d: shape %s to party %d", len(_reveals), tuple(x.size()), dst)
    return x.get_plain_text(dst=dst)


def reveal_count() -> int:
    """Number of ``reveal_to`` calls in this process since the last ``reset_reveals``."""
    return len(_reveals)


def reveal_log() -> list[tuple[int, tuple[int, ...]]]:
    """``(dst, shape)`` of each reveal since the last ``reset_reveals``."""
    return list(_reveals)


def reset_reveals() -> None:
    _reveals.clear()


def mul_public_int(x: Secret, m: Public) -> Secret:
    """``[x] · m`` for a public integer tensor (e.g. a 0/1 mask): exact, local, no truncation."""
    out = x.clone()
    out.share = out.share * torch.as_tensor(m, device=out.share.device).long()
    return out


def _digits() -> bool:
    return active_config().comparison == "digits"


def maximum(a: Secret, b: Secret) -> Secret:
    """``max([a], [b])`` element-wise: ``[b] + [a − b ≥ 0]·([a] − [b])`` (the selected value is a or b
    exactly). Digits (``protocols.compare``): 2 rounds, 48 logged bytes per element, domain
    |a − b| < 2^16 at scale 2^16 (raw 2^32); CrypTen: cmp + mul, 9 rounds."""
    d = a - b
    if not _digits():
        return b + d.ge(0) * d
    ((_, prod),) = ge_zero_many([(share_of(d), share_of(d))], 16 + _frac_bits(d))
    return b + to_secret(prod, precision=_frac_bits(d))


def _frac_bits(x: Secret) -> int:
    return int(math.log2(x.encoder.scale))


def _pad_last(x: Secret, n_pad: int) -> Secret:
    """Append ``n_pad − n`` public ``PAD_VALUE`` entries along the last dim (local)."""
    n = x.size(-1)
    if n_pad == n:
        return x
    pad = crypten.cryptensor(torch.full((*x.size()[:-1], n_pad - n), PAD_VALUE, device=x.device), src=0)
    return crypten.cat([x, pad], dim=-1)


def _tournament(x: Secret) -> Secret:
    """Pairwise knockout along the last dim: the winner's index (..., 1).

    Level l compares winners 2i and 2i+1: ``[c] = [a ≥ b]``; ``[max] = [b] + [c]([a] − [b])`` and
    ``[idx] = [idx_b] + [c]([idx_a] − [idx_b])`` (one batched product). Ties keep the left (lower
    index). The index is carried at the default fixed-point scale (exact small integers).
    """
    n = x.size(-1)
    n_pad = 1 << max(0, math.ceil(math.log2(n)))
    v = _pad_last(x, n_pad)
    idx = crypten.cryptensor(torch.arange(n_pad, dtype=torch.float, device=v.device).expand(v.size()), src=0)
    while v.size(-1) > 1:
        a, b = v[..., 0::2], v[..., 1::2]
        c = a.ge(b)  # (..., m/2), scale-1 bits
        ia, ib = idx[..., 0::2], idx[..., 1::2]
        prod = c * crypten.stack([a - b, ia - ib])
        v, idx = b + prod[0], ib + prod[1]
    return idx


_PAIRS4 = [(i, j) for i in range(4) for j in range(i + 1, 4)]


def _max4(v: Secret) -> Secret:
    """One 4-ary knockout level along the last dim (length divisible by 4): ``[max]`` of each group.

    All 6 pairwise bits ``[c_ij] = [x_i ≥ x_j]`` (i < j) in one batched comparison; the winner of a
    group is the i with ``c_ij = 1`` for every j > i and ``c_ji = 0`` for every j < i (a strict total
    order with ties to the lower index: exactly one winner), its indicator the product of 3 bits
    (2 rounds), and the max ``Σ_i [w_i][x_i]`` (1 round). Bits are scale-1: no truncation.
    Cost: 8 + 2 + 1 = 11 rounds (two binary levels: 18) for 1.5 comparisons per element.
    """
    x = [v[..., i::4] for i in range(4)]
    c = (crypten.stack([x[i] for i, _ in _PAIRS4]) - crypten.stack([x[j] for _, j in _PAIRS4])).ge(0)
    bit = {pair: c[k] for k, pair in enumerate(_PAIRS4)}
    factors = [[bit[(i, j)] if i < j else 1 - bit[(j, i)] for j in range(4) if j != i] for i in range(4)]
    first = crypten.stack([f[0] for f in factors]) * crypten.stack([f[1] for f in factors])
    w = first * crypten.stack([f[2] for f in factors])  # (4, ..., m/4), one 1 per group
    return (w * crypten.stack(x)).sum(0)


def tree_max(x: Secret, dim: int = -1, keepdim: bool = False) -> Secret:
    """``[max_i x_i]`` along ``dim`` by a knockout tree of 4-ary levels (``_max4``), plus one binary
    level (cmp + mul) when ⌈log2 n⌉ is odd (no one-hot, no tie sampling).

    Public: shape. Cost: L = ⌈log2 n⌉: 11·⌊L/2⌋ + 9·(L mod 2) rounds (a binary tree: 9L), ≈ 1.5 cmp
    per element per 4-ary level (≈ (1.5·432 + 3·32)·n·R bytes for R rows). Error: exact (selection
    only). Domain: |x| < 2^30.
    """
    xt = x.transpose(dim, -1) if dim not in (-1, x.dim() - 1) else x
    n = xt.size(-1)
    levels = max(0, math.ceil(math.log2(n)))
    v = _pad_last(xt, 1 << levels)
    for _ in range(levels // 2):
        v = _max4(v)
    if levels % 2:
        a, b = v[..., 0::2], v[..., 1::2]
        v = b + a.ge(b) * (a - b)
    m = v.transpose(dim, -1) if xt is not x else v
    return m if keepdim else m.squeeze(dim)


def argmax_onehot(x: Secret, dim: int = -1) -> Secret:
    """One-hot ``[e]`` of the maximum of ``[x]`` along ``dim``: exactly one 1, ties → lowest index.

    Steps: 1. knockout tree on (value, index) pairs, see ``_tournament`` (padded to a power of two
    with public ``PAD_VALUE`` entries that never win). 2. bits of ``[idx]`` (A2B, 8 + 1 rounds).
    3. one-hot as the tensor product of the L bits (L − 1 rounds, ≈ 2·n_pad products).
    Public: shape. Cost: L = ⌈log2 n⌉; ≈ 10L + 8 rounds; per row ≈ n_pad comparisons + 4·n_pad
    products ≈ 560·n_pad bytes (V = 49152: 167 rounds, 32.5 MB measured). Error: exact. Domain: |x| < 2^30.
    """
    if x.dim() == 0:
        return crypten.cryptensor(torch.ones((), device=x.device), src=0)
    xt = x.transpose(dim, -1) if dim not in (-1, x.dim() - 1) else x
    n = xt.size(-1)
    idx = _tournament(xt)  # (..., 1)
    n_bits = max(1, math.ceil(math.log2(n)))
    onehot = _onehot_from_bits(_index_bits(idx, n_bits, shift=_frac_bits(idx)))[..., 0, :n]  # (..., n)
    return onehot.transpose(dim, -1) if xt is not x else onehot


def _distinct_keys(x: Secret) -> Secret:
    """Raw-integer keys ``x·2^b − i`` (b = ⌈log2 n⌉, last dim): distinct, ordered like x with ties
    broken towards the lower index. Local. Needs |x| < 2^(46 − b)."""
    n = x.size(-1)
    bits = max(1, math.ceil(math.log2(n)))
    key = mul_public_int(x, 2**bits)
    if comm.get().get_rank() == 0:
        key.share = key.share - torch.arange(n, device=key.share.device)
    return key


def _bitonic_sort_desc(v: Secret) -> Secret:
    """Sort the last dim (a power of two) in descending order with Batcher's bitonic network.

    Each of the L(L+1)/2 stages compares n/2 disjoint pairs: ``[c] = [a ≥ b]``,
    ``[hi] = [b] + [c]([a] − [b])``, ``[lo] = [a] + [b] − [hi]``; the direction is public.
    """
    n = v.size(-1)
    idx = torch.arange(n)
    size = 2
    while size <= n:
        step = size // 2
        while step >= 1:
            first = idx[(idx & step) == 0]
            second = first | step
            desc = ((first & size) == 0).long()  # pairs in descending blocks
            a, b = v[..., first], v[..., second]
            c = a.ge(b)
            hi = b + c * (a - b)
            lo = a + b - hi
            new_first = mul_public_int(hi - lo, desc) + lo  # desc: max first; else min first
            new_second = hi + lo - new_first
            order = torch.argsort(torch.cat([first, second]))
            v = crypten.cat([new_first, new_second], dim=-1)[..., order]
            step //= 2
        size *= 2
    return v


# Up to this many entries the top-k mask ranks by all pairwise comparisons (2 comparison rounds)
# instead of a bitonic sort (L(L+1)/2 + 1 rounds): n = 32 → 18 vs 144 rounds for ≈ 2× the bytes;
# n = 256 → 18 vs 333 rounds for ≈ 6× the bytes (break-even on a 1 Gbps, 0.5 ms LAN; a clear win on WAN).
PAIRWISE_MAX = 256


def _sorted_keys(key: Secret) -> Secret:
    """The distinct keys of the last dim bitonic-sorted descending, padded to a power of two."""
    n = key.size(-1)
    n_pad = 1 << max(0, math.ceil(math.log2(n)))
    if n_pad == n:
        return _bitonic_sort_desc(key)
    pad = key[..., :1] * 0
    pad = crypten.cat([pad] * (n_pad - n), dim=-1)
    pad.share = pad.share - 2**60  # raw keys below every real key (|real| < 2^62); added by all
    return _bitonic_sort_desc(crypten.cat([key, pad], dim=-1))


def _pairwise_rank(key: Secret, bits: int | None = None) -> Secret:
    """``[r_i] = #{j : key_j > key_i}`` (scale-1 integers) for distinct keys along the last dim.

    One batched comparison ``[c_p] = [key_i ≥ key_j]`` per unordered pair p = (i < j); then, locally,
    j beats i iff (j < i and c_(j,i)) or (j > i and not c_(i,j)): a public gather of [c ‖ 1 − c ‖ 0]
    into an (n, n) matrix summed over j. Cost: n(n−1)/2 comparisons: CrypTen's (9 rounds), or with
    ``bits`` (|key_i − key_j| < 2^bits raw) ``protocols.compare`` (2 rounds, 32 bytes each). Exact.
    """
    n = key.size(-1)
    first, second = torch.triu_indices(n, n, 1, device=key.device)  # pairs p = (i < j)
    if bits is None:
        c = key[..., first].ge(key[..., second])  # (..., P), scale-1 bits
    else:
        ((ge, _),) = ge_zero_many([(share_of(key[..., first] - key[..., second]), None)], bits)
        c = to_secret(ge, precision=0)
    beats = crypten.cat([c, 1 - c, key[..., :1] * 0], dim=-1)  # (..., 2P + 1), scale 1 (c's encoder)
    n_pairs = first.numel()
    pair = torch.full((n, n), 2 * n_pairs, dtype=torch.long, device=key.device)  # diagonal: the 0
    p = torch.arange(n_pairs, device=key.device)
    pair[second, first] = p  # row i = second > j = first: j beats i iff c_(j,i)
    pair[first, second] = n_pairs + p  # row i = first < j = second: j beats i iff 1 − c_(i,j)
    return beats[..., pair.view(-1)].view(*key.size(), n).sum(-1)


@functools.lru_cache(maxsize=None)
def _below_table(n: int, k: int) -> Table:
    """[v < k] for the integers v ∈ [0, N), N = 2^⌈log2 n⌉ ≥ 2 (exact: step 1)."""
    size = 1 << max(1, math.ceil(math.log2(n)))
    return Table(0, 0, (torch.arange(size) < k).long().unsqueeze(0))


@functools.lru_cache(maxsize=None)
def _slot_table(k: int) -> Table:
    """Rows r < k of [v = 2r + 1] for v ∈ [0, 2^⌈log2(2k + 1)⌉) (exact: step 1)."""
    size = 1 << math.ceil(math.log2(2 * k + 1))
    return Table(0, 0, (torch.arange(size) == 2 * torch.arange(k).unsqueeze(1) + 1).long())


def _rank_below(rank: Secret, k: int) -> Secret:
    """``[r_i < k]`` for exact integer ranks in [0, n): one exact look-up (1 round, 16 B per element)."""
    ((below, _),) = lookup_many([Request(share_of(rank), _below_table(rank.size(-1), k))])
    return to_secret(below[0], precision=0)


def _slots_by_position(mask: Secret, k: int) -> Secret:
    """One-hot rows ``[E]`` (..., k, n) of a 0/1 mask with exactly k ones, in position order.

    u_i = 2·Σ_{j ≤ i} m_j − m_i is odd (2r + 1, r the slot) exactly where m_i = 1 and even elsewhere
    (local), so E[r, i] = [u_i = 2r + 1]: one exact look-up with k table rows (1 round, 16 B per element)."""
    u = share_of(mask.cumsum(-1)) * 2 - share_of(mask)
    ((rows, _),) = lookup_many([Request(u, _slot_table(k))])
    return to_secret(rows.movedim(0, -2), precision=0)


def _top_mask(key: Secret, k: int, bits: int | None = None) -> Secret:
    """0/1 ``[m]`` (scale 1) of the k largest distinct keys along the last dim: pairwise ranks
    ``[r_i < k]`` for n ≤ ``PAIRWISE_MAX`` (digits with ``bits``: ``_rank_below``), else the bitonic
    k-th key ``τ`` and ``[key_i ≥ τ]`` (CrypTen's comparisons)."""
    if key.size(-1) <= PAIRWISE_MAX:
        rank = _pairwise_rank(key, bits)
        return rank.lt(k) if bits is None else _rank_below(rank, k)
    return (key - _sorted_keys(key)[..., k - 1: k]).ge(0)


RANK_VALUE_LOG2 = 13  # digits path: the pairwise top-k's inputs need |x| < 2^13


def _rank_bits(x: Secret) -> int | None:
    """``protocols.compare``'s bound for the distinct keys of x (|x| < 2^13), or None (CrypTen)."""
    if not _digits():
        return None
    return RANK_VALUE_LOG2 + 1 + _frac_bits(x) + max(1, math.ceil(math.log2(x.size(-1))))


def topk_mask(x: Secret, k: int, dim: int = -1) -> Secret:
    """0/1 ``[m]`` with exactly ``k`` ones at the k largest entries of ``[x]`` along ``dim``.

    Steps: 1. distinct keys ``x·2^b − i`` (local; ties → lower index wins). 2. n ≤ ``PAIRWISE_MAX``:
    ``[m_i] = [#{j : key_j > key_i} < k]`` from all n(n−1)/2 pairwise comparisons (CrypTen: 2
    comparison rounds, 18 rounds, ≈ 432·(n(n−1)/2 + n) bytes per row; digits: 2 + 1 rounds,
    32·n(n−1)/2 + 16·n bytes per row, domain |x| < 2^13). Larger n: bitonic sort of the keys,
    padded to n_pad = 2^⌈log2 n⌉ with public keys below every real one, ``[τ]`` = the k-th sorted
    key, ``[m_i] = [key_i ≥ τ]``: L = log2 n_pad, (L(L+1)/2 + 1)·9 rounds (n = 256: 333, n = 8192:
    828), bytes ≈ (L(L+1)/4·464 + 432)·n_pad per row (n = 8192: 21 MB per row).
    Public: shape, k. Error: exact (selection). Domain: |x| < 2^(46 − ⌈log2 n⌉), 1 ≤ k ≤ n.
    """
    xt = _last(x, dim)
    _check_k(k, xt.size(-1))
    return _unlast(_top_mask(_distinct_keys(xt), k, _rank_bits(xt)), dim, x)


def topk_onehot(x: Secret, k: int, dim: int = -1, *, sort_by_index: bool = True) -> Secret:
    """One-hot rows ``[E]`` (..., k, n) of the k largest entries of ``[x]`` along ``dim``.

    ``sort_by_index=True``: rows in ascending position (order-preserving compaction, cluster
    adjacency): ``[m]`` = the top-k mask (as ``topk_mask``); digits: ``_slots_by_position`` (1 round);
    CrypTen: ``[p] = cumsum([m]) − 1`` (local), bits of ``[p]`` (A2B), ``E[r, i] = [m_i]·[p_i = r]`` as
    a tensor product of the T = ⌈log2 k⌉ bits.
    ``sort_by_index=False``: rows by descending value (always a bitonic sort): the low b bits of the
    first k sorted keys are the indices; their one-hots over n by the same tensor product.
    ``dim`` must be the last dim (rows are added before it).
    Public: shape, k. Cost: the mask + 1 (digits) or + 8 (A2B) + 1 (B2A) + T rounds, ≈ 2·2^T·n
    products per row (by position); ≈ 2·n_pad·k (by value). Error: exact (0/1, scale 1).
    """
    if dim not in (-1, x.dim() - 1):
        raise ValueError("topk_onehot works on the last dim")
    n = x.size(-1)
    _check_k(k, n)
    key = _distinct_keys(x)
    if sort_by_index:
        mask = _top_mask(key, k, _rank_bits(x))  # (..., n)
        if _digits():
            return _slots_by_position(mask, k)
        pos = mask.cumsum(-1) - 1
        n_bits = max(1, math.ceil(math.log2(k)))
        rows = _onehot_from_bits(_index_bits(pos, n_bits), gate=mask)  # (..., n, 2^T)
        return rows.transpose(-1, -2)[..., :k, :]
    n_bits = max(1, math.ceil(math.log2(n)))
    rows = _onehot_from_bits(_index_bits(-_sorted_keys(key)[..., :k], n_bits))  # (..., k, 2^b)
    return rows[..., :n]


def onehot_gather(onehot: Secret, values: Secret | FixedMaskOperand) -> Secret:
    """``[E] @ [V]``: (..., k, n) @ (..., n, d) -> (..., k, d), the rows of V that E selects.

    With E from ``topk_onehot(..., sort_by_index=True)`` this is the order-preserving compaction of
    static eviction, ``[V[S]]`` for the kept set S in position order (clusters rely on adjacency).
    ``values`` may be a secret or a ``FixedMaskOperand`` (cached K/V with a persistent mask: only
    ``[E] − [A]`` is opened). Public: shapes. Cost: 1 round; 16·(|E| + |V|) bytes (Beaver) or
    16·|E| (fixed mask). Error: exact for scale-1 one-hots (no truncation).
    """
    length = values.shape[-2] if isinstance(values, FixedMaskOperand) else values.size(-2)
    if onehot.size(-1) != length:
        raise ValueError(f"one-hot width {onehot.size(-1)} does not match the values' length {length}")
    if isinstance(values, FixedMaskOperand):
        return fixed_matmul(onehot, values)
    return onehot.matmul(values)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")


def _last(x: Secret, dim: int) -> Secret:
    return x if dim in (-1, x.dim() - 1) else x.transpose(dim, -1)


def _unlast(y: Secret, dim: int, x: Secret) -> Secret:
    return y if dim in (-1, x.dim() - 1) else y.transpose(dim, -1)


def _index_bits(p: Secret, n_bits: int, shift: int = 0) -> Secret:
    """Bits ``shift … shift + n_bits − 1`` of a secret's raw ring value: ``[b_t]`` (..., n_bits),
    LSB first (A2B once: 8 rounds, 432 B per element; B2A of the bits: 1 round)."""
    binary = p._to_ptype(_ptype.binary)
    share = binary.share
    raw = share.tensor() if hasattr(share, "tensor") else share  # CrypTen wraps CUDA shares (CUDALongTensor)
    bits = (raw.unsqueeze(-1) >> (torch.arange(n_bits, device=raw.device) + shift)) & 1
    binary.share = bits if raw is share else type(share)(bits)
    binary.encoder = type(binary.encoder)(precision_bits=0)  # raw integer bits, scale 1
    return binary._to_ptype(_ptype.arithmetic, precision=0, bits=1)


def _onehot_from_bits(bits: Secret, gate: Secret | None = None) -> Secret:
    """``[e]`` (..., 2^T) with e_r = g·Π_t (b_t if bit t of r else 1 − b_t), bits LSB first.

    Tensor product, MSB first, one level per bit: ``[f] ← ([f] − [f][b_t]) ‖ [f][b_t]`` interleaved
    (index 2r + b_t). T rounds (T − 1 without a gate), ≈ 2·2^T products per element. Exact.
    """
    order = list(reversed(range(bits.size(-1))))
    if gate is None:
        b = bits[..., order[0] : order[0] + 1]
        f, order = crypten.cat([1 - b, b], dim=-1), order[1:]
    else:
        f = gate.unsqueeze(-1)
    for t in order:
        fb = f * bits[..., t : t + 1]
        f = crypten.stack([f - fb, fb], dim=-1).flatten(-2)
    return f
