"""Few-round softmax, norms and SiLU from one-round look-ups (``protocols.lut``) and batched rounds.

The polynomial/Newton versions in ``protocols.nonlinear`` spend 8 rounds per comparison and 2 per
product (softmax over 42 keys: 91 rounds; a norm 36; SiLU 39). Here every non-linear step is a
table look-up whose index is the input stochastically rounded to a grid (1 round, no comparison),
interpolated to first order, with independent openings of a step sharing one round
(``protocols.rounds``) and products left untruncated until their scale has to come down.

Scales: inputs and outputs at 2^16 (CrypTen's encoding); "@2^k" marks an intermediate at scale 2^k.

* ``silu``: fine table of silu on [−16, 16) (step 1/32) with its tangent, silu(x) ≈ a_i + b_i·x
  (the multiplier form, 1 round); coarse table (step 2) on [−64, 64) giving sel = [|x| < 12] and
  far = [x ≥ 12]; silu = sel·fine + far·x (1 product round), one truncation.
  Cost 3 rounds. Error ≤ 5e-4 (tangent: max|silu''|·h²/2 = 2.4e-4 plus the slope's rounding for
  |x| < 10; silu ≈ relu beyond, |x|·σ(−|x|) ≤ 4.6e-4). Domain |x| < 62 (beyond, the coarse index wraps).
  ``silu_mul`` (the gated MLP's silu(g)·u): the same look-ups with the product folded into the
  selection, 4 rounds instead of 3 + 2; ``silu_mul_raw`` from a projection's untruncated output, its
  truncation riding the look-ups' round (``protocols.lut``, truncated multipliers): 3, its last
  truncation left ``Untruncated`` (the down projection fuses it). ``gelu_tanh`` (GPT-2): the same
  with GELU's tables (error ≤ 4e-4: max|f''|·h²/2 = 3.9e-4).
* ``softmax``: masked entries take the value of the row's first kept entry (public choice, local),
  so the row max is unchanged; a max tree of m = b + relu(a − b) with relu looked up at step 1/4
  on [−256, 256) (⌈log2 n⌉ rounds; |m − max| ≤ ⌈log2 n⌉/4); e = exp(x − m) in two look-ups
  (coarse e^(o_c) ≈ e^c at integers c ∈ [−496, 16), exact at its offset o_c, then e^(x−o_c) ≈
  e^f(1 + (x − o_c − f)) at step 1/32 on [−6, 2); keys down to 18.5 below the max keep their mass),
  one product, one truncation; the reciprocal of s = Σe by ``_wide``; p = e·(1/s), one truncation.
  Cost ⌈log2 n⌉ + 10 rounds for n ≤ 8192 rows whose entries spread ≤ 250 (measured on SmolLM2-135M
  logits: ≤ 81; secret padding slots sit at ``PAD_LOGIT`` = −128). Error ≤ 2e-3 absolute (exp 5e-4
  relative, reciprocal ≤ 3e-4 relative).
* ``rms_norm`` / ``layer_norm``: x², x·w in one product round; mean(x²) (kept @2^32, so rows of
  tiny activations keep their precision) divided by E in the same round as x·w's truncation;
  1/√(mean + eps) by ``_wide`` on [2^−12, 2^21] (every SmolLM2 norm, token 0's 1.1e6 included) in 3
  levels of 2^18-entry tables; x·w folded into the level selection (``_scale_by_levels``: u_0·u_1·xw
  as one three-factor product, the level differences' truncations fused with their products) and one
  truncation. Cost 6 rounds (layer_norm + 1 for the mean). Error ≤ 2e-3 of the row's max |output|.
  Without w (the model folds a norm's w, β into the matrix it feeds): √E/√(Σx² + E·eps) looked up on
  the sum @2^32 straight from the squares' round (range ``sum_range``), 5 rounds; 4 from given squares
  (``rms_norm_of_squares``: the residual's truncation makes them, ``protocols.truncation``), the last
  of them a truncation it leaves ``Untruncated`` for the next projection to fuse
  (``protocols.fixed_mask.trunc_matmul_step``).

``_wide``: f on [2^lo, 2^hi] for f = 1/v or 1/√v, from G look-ups of the same v at grids of step
h_g = 2^(hi+1−g·a)/N (level g covers [0, 2^(hi+1−g·a))): level g gives f(c), f'(c) and
[c < 2^(hi−(g+1)·a)] at its grid point c; y_g = f(c) + f'(c)·(v − c) (lo-form: the slope times the
small v − c, so no large cancellation), and y = y_0 + Σ_g P_g·(y_g − y_{g−1}), P_g the product of the
first g level bits (a level that wrapped is multiplied by an exact 0). Relative grid step at a
level's lower end 2^(a+1)/N = 2^−6, so the tangent's relative error ≤ 2^−12·(f''c²/2f) (1/v: 2.4e-4,
1/√v: 9e-5). Cost: 1 + max(1, G − 1) rounds (+1 truncation), y @2^52.

Public: shapes, masks, all grids and tables. Security: as ``protocols.lut``; nothing else opened.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

from protocols.compat import MPCTensor
from protocols.lut import Request, Table, encode, grid, lookup_many, lookup_step, table
from protocols.fixed_mask import FixedMaskOperand, fixed_matmul_raw, matmul_step
from protocols.rounds import Pending, add_public, mul3_step, mul_many, mul_step, share_of, to_secret, together
from protocols.truncation import Untruncated, exact_div_many, trunc_mul_step, trunc_step
from protocols.types import Public, Secret

F = 16  # fraction bits of CrypTen's encoding (ProtocolConfig.precision_bits must be 16 here)
_WIDE_FRAC = 52  # scale of _wide's output
_RELU_LOW, _RELU_BITS = -1024, 11  # relu's grid: step 1/4 on [−256, 256)
PAD_LOGIT = -128.0  # logit of a secret padding slot: exp(−128 − max) is 0, and it stays in the tables' domain


def _silu_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x)


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)


_ACTS = {"silu": (_silu_ref, _silu_grad), "gelu_tanh": (_gelu_ref, _gelu_grad)}


@functools.lru_cache(maxsize=None)
def _act_tables(act: str = "silu") -> tuple[Table, Table]:
    """Fine: a = f(c) − f'(c)·c @2^40, b = f'(c) @2^24 (× x @2^16); coarse: sel, far (f ≈ relu beyond 12)."""
    f, df = _ACTS[act]
    fine = table([lambda c: f(c) - df(c) * c], shift=F - 5, low=-512, bits=10, in_frac=F,
                 out_frac=40, slopes=[df], slope_frac=24)
    coarse = table([lambda c: (c.abs() < 12).double(), lambda c: (c >= 12).double()],
                   shift=F + 1, low=-32, bits=6, in_frac=F, out_frac=0)
    return fine, coarse


def silu(x: Secret) -> Secret:
    """``[x·σ(x)]`` in 3 rounds (module docstring)."""
    return _relu_like(x, "silu")


def gelu_tanh(x: Secret) -> Secret:
    """GPT-2's gelu_new ``½x(1 + tanh(√(2/π)(x + 0.044715x³)))`` as ``silu``: 3 rounds, error ≤ 4e-4
    (tangent at a grid point up to h away: max|f''|·h²/2 = 3.9e-4), |x| < 62."""
    return _relu_like(x, "gelu_tanh")


def _relu_like(x: Secret, act: str) -> Secret:
    fine, coarse = _act_tables(act)
    xs = share_of(x)
    (a, bx), (bits, _) = lookup_many([Request(xs, fine, xs), Request(xs, coarse)])
    sel_fine, far_x = mul_many([(bits[0], a[0] + bx[0]), (bits[1], xs)])
    (out,) = exact_div_many([(sel_fine + far_x * (1 << 24), 1 << 24)])
    return to_secret(out)


@functools.lru_cache(maxsize=None)
def _silu_table_32(in_frac: int = F) -> Table:
    """Fine silu for ``silu_mul``: a = silu(c) − b̂·c @2^32 with b̂ = silu'(c) rounded to 2^−16 (the slope
    column): a + b̂·x = silu(c) + b̂·(x − c), so the slope's rounding only scales the residual |x − c| < 1/32.
    Indexed by an input @2^in_frac."""
    c = grid(F - 5, -512, 10, F)
    b = encode(_silu_grad(c), 16)
    a = encode(_silu_ref(c) - b.double() / 2**16 * c, 32)
    return Table(in_frac - 5, -512, a.unsqueeze(0), b.unsqueeze(0))


@functools.lru_cache(maxsize=None)
def _silu_gates_raw() -> Table:
    """``silu``'s coarse bits sel = [|x| < 12], far = [x ≥ 12] as slope columns (× the multiplier),
    indexed by an input @2^32."""
    c = grid(F + 1, -32, 6, F)
    gates = torch.stack([(c.abs() < 12).long(), (c >= 12).long()])
    return Table(2 * F + 1, -32, torch.zeros((0, 64), dtype=torch.long), gates)


def silu_mul(x: Secret, u: Secret) -> Secret:
    """``[silu(x)·u]`` (the gated MLP) in 4 rounds: the look-ups (``silu``'s coarse one, and the fine one
    at 2^32 with x as multiplier); f·u and far·u; sel·(f·u) and (far·u)·x; one truncation (``silu`` then
    a product and its truncation: 5). Error ≤ 5e-4·|u| + 2^−15; domain as ``silu`` and |silu(x)·u|,
    |x·u| < 2^15 (a wrapped fine entry beyond |x| ≥ 12 is multiplied by an exact 0)."""
    fine, (_, coarse) = _silu_table_32(), _act_tables("silu")
    xs, us = share_of(x), share_of(u)
    (a, bx), (bits, _) = lookup_many([Request(xs, fine, xs), Request(xs, coarse)])
    fu, far_u = mul_many([(a[0] + bx[0], us), (bits[1], us)])  # @2^48, @2^16
    sel_fu, far_ux = mul_many([(bits[0], fu), (far_u, xs)])  # @2^48, @2^32
    (out,) = exact_div_many([(sel_fu + far_ux * (1 << 16), 1 << 32)])
    return to_secret(out)


def silu_mul_raw(g: torch.Tensor, u: torch.Tensor) -> Untruncated:
    """``[silu(x)·y]`` @2^16 from the untruncated shares g = x·2^32, u = y·2^32 of a projection, in 3 rounds
    (``silu_mul``'s 4 + the projection's truncation: 5): the look-ups index g directly, the fine one with
    the truncated x = ⌊g/2^16⌋ as multiplier (f = a + b̂·x) and the coarse one with the truncated y, giving
    sel·y and far·y (``Request.div``: both truncations ride the look-ups' round, which also yields x);
    f·(sel·y) and (far·y)·x; one truncation. Domain as ``silu_mul``; error as ``silu_mul`` on the
    truncated x, y, i.e. ≤ 5e-4·|y| + 2^−15·(1 + |x|) against the exact inputs (y's truncation is off by
    < 2 ulps, as the projection's own truncation was)."""
    (a, bx, x), (_, gates_y, _) = lookup_many([Request(g, _silu_table_32(2 * F), g, div=1 << F),
                                               Request(g, _silu_gates_raw(), u, div=1 << F)])
    sel_fy, far_yx = mul_many([(a[0] + bx[0], gates_y[0]), (gates_y[1], x)])  # @2^48, @2^32
    return Untruncated(sel_fy + far_yx * (1 << 16), 1 << 32)


# ---------------------------------------------------------------- softmax

@functools.lru_cache(maxsize=None)
def _relu_table(in_frac: int = F) -> Table:
    """relu at step 1/4 on [−256, 256) of an input @2^in_frac, output @2^16."""
    return table([lambda c: c.clamp(min=0)], shift=in_frac - 2, low=_RELU_LOW, bits=_RELU_BITS,
                 in_frac=in_frac, out_frac=F)


_FINE_LOW, _FINE_BITS = -192, 8  # the fine exp grids: step 1/32 on [−6, 2) (lo reaches −5.14, see _exp_coarse)
_TAIL_LOW = -18  # lowest coarse point kept by the tail entries (below: e^c = 0, ≤ e^−18.5 per key)


def _exp_coarse() -> Table:
    """Coarse e^c at the integers c ∈ [−496, 16): (V_c @2^20, o_c @2^16) with V_c/2^20 = e^(o_c) almost
    exactly, o_c (the offset the fine table sees, lo = z − o_c) on the 2^−16 grid within 1/4 of c.

    V_c = encode(e^c, 20) (round to nearest) was off by a fixed, c-dependent relative amount (−16 % … +15 %
    at c = −13 … −10, −100 % for c ≤ −15 where e^c < 2^−21) that the stochastic index rounding cannot
    average away: with thousands of keys 9–18 below a sink, Σe came out ~1e-4 low (4K SmolLM2) and
    every p of a sink row the same ~1e-4 high. Here each V_c = n is the integer whose ln(n·2^−20),
    rounded to 2^−16, is closest to matching (≤ 3.3e-6 relative, ≤ 1e-8 for c ≥ −9), and the tail
    c ∈ [_TAIL_LOW, −15] takes V = 1 at o = ln 2^−20 ≈ −13.86 (the fine table reaches lo ≥ −5.14)."""
    vals, offs = [], []
    o_one = round(math.log(2.0**-20) * 2**F)
    for c in range(-496, 16):
        n_lo, n_hi = max(1, math.ceil(math.exp(c - 0.25) * 2**20)), math.floor(math.exp(c + 0.25) * 2**20)
        if n_hi < n_lo:  # e^c·2^20 < 1/√e: the tail, or 0
            vals.append(1 if c >= _TAIL_LOW else 0)
            offs.append(o_one if c >= _TAIL_LOW else c << F)
            continue
        mid = round(math.exp(c) * 2**20)
        n = torch.arange(max(n_lo, mid - 2048), min(n_hi, mid + 2048) + 1, dtype=torch.float64)
        o = torch.round(torch.log(n / 2**20) * 2**F)
        k = int((n / 2**20 / torch.exp(o / 2**F) - 1).abs().argmin())
        vals.append(int(n[k]))
        offs.append(int(o[k]))
    return Table(F, -496, torch.tensor([vals, offs], dtype=torch.long))


@functools.lru_cache(maxsize=None)
def _exp_tables() -> tuple[Table, Table]:
    """Coarse: ``_exp_coarse``; fine: the tangent of e^f at step 1/32 on [−6, 2): a = e^f(1 − f) @2^32,
    b = e^f @2^16 (× the residual x − o_c @2^16)."""
    fine = table([lambda f: torch.exp(f) * (1 - f)], shift=F - 5, low=_FINE_LOW, bits=_FINE_BITS, in_frac=F,
                 out_frac=32, slopes=[torch.exp], slope_frac=16)
    return _exp_coarse(), fine


def _tree_max(xs: torch.Tensor) -> torch.Tensor:
    """Row max over the last dim (keepdim) by m = b + relu(a − b): ⌈log2 n⌉ rounds."""
    relu = _relu_table()
    while xs.shape[-1] > 1:
        half = xs.shape[-1] // 2
        a, b, rest = xs[..., :half], xs[..., half:2 * half], xs[..., 2 * half:]
        ((r,), _), = lookup_many([Request(a - b, relu)])
        xs = torch.cat([b + r, rest], dim=-1)
    return xs


@functools.lru_cache(maxsize=None)
def _exp_fine_24() -> Table:
    """The fine exp table of the attention's untruncated e @2^44: a = e^f − b̂·f @2^24 with b̂ = e^f
    rounded to 2^−8 (the slope column, × the residual @2^16): a + b̂·lo = e^f + b̂·(lo − f), so the
    slope's rounding (≤ 2^−9) only scales |lo − f| < 2^−5 (≤ 2^−14 absolute)."""
    f = grid(F - 5, _FINE_LOW, _FINE_BITS, F)
    b = encode(torch.exp(f), 8)
    a = encode(torch.exp(f) - b.double() / 2**8 * f, 24)
    return Table(F - 5, _FINE_LOW, a.unsqueeze(0), b.unsqueeze(0))


def _exp_product(z: torch.Tensor, fine: Table) -> torch.Tensor:
    """e^z @2^(20 + the fine table's scale) for z @2^16 in [−494, 14], untruncated: 2 look-up rounds
    (coarse e^(o_c), then the tangent of e^(z − o_c)), 1 product."""
    coarse, _ = _exp_tables()
    ((ec, c), _), = lookup_many([Request(z, coarse)])
    lo = z - c
    ((a,), (b_lo,)), = lookup_many([Request(lo, fine, lo)])
    (e,) = mul_many([(ec, a + b_lo)])
    return e


def _exp(z: torch.Tensor) -> torch.Tensor:
    """e^z @2^16 for z @2^16 in [−494, 14]: 2 look-up rounds, 1 product, 1 truncation."""
    (out,) = exact_div_many([(_exp_product(z, _exp_tables()[1]), 1 << 36)])  # @2^52 -> @2^16
    return out


def softmax(x: Secret, dim: int = -1, mask: Public | None = None) -> Secret:
    """``[softmax(x)]`` along ``dim`` (optionally under a public 0/1 keep-mask): ⌈log2 n⌉ + 10 rounds
    (+1 when the reciprocal needs more than 3 levels, n > 2^11)."""
    xs = share_of(x).movedim(dim, -1)
    m = _keep_mask(mask, x.size(), dim, xs.device)
    if m is not None:
        xs = _fill_masked(xs, m)
    e = _masked_exp(xs, _tree_max(xs), m)
    y = _wide(e.sum(-1, keepdim=True), "recip", *recip_range(xs.shape[-1]))  # @2^52
    (y,) = exact_div_many([(y, 1 << 20)])  # @2^32
    (p,) = mul_many([(e, y)])  # @2^48
    (p,) = exact_div_many([(p, 1 << 32)])
    return to_secret(p.movedim(-1, dim))


def _keep_mask(mask: Public | None, size, dim: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=device).long().expand(size).movedim(dim, -1)
    if not bool((m.sum(-1) > 0).all()):
        raise ValueError("softmax mask leaves a row with no kept entry")
    return m


def _fill_masked(xs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Masked entries take the row's first kept entry (a public position): the row max is unchanged
    and no difference leaves the kept logits' spread (local)."""
    ref = xs.gather(-1, m.argmax(-1, keepdim=True))
    return xs * m + ref * (1 - m)


# A public offset added to x − m before exp (a factor e^0.0066 that every normalisation cancels): the
# tangent's mean loss under stochastic rounding is e^f·w(1 − w)·h²/2 at cell position w, 1/6·h²/2 on
# average, 0 on a grid point, and the max tree leaves one key of each row exactly on the grid (the
# base leaf b of m = b + relu(a − b), at z = −k/4; under a causal mask the sink's copies in the masked
# slots make that the sink in most rows): that key came out unbiased while the rest lost 8e-5, so its p
# was ~8e-5·(1 − p) high. Shifted by w*·h, w* = 1/2 − 1/√12, an on-grid z sits where w(1 − w) = 1/6.
_EXP_SHIFT = round((0.5 - 12 ** -0.5) * 2 ** (F - 5))  # 433 ulps @2^16


def _masked_exp(xs: torch.Tensor, mx: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    e = _exp(add_public(xs - mx, _EXP_SHIFT))
    return e if m is None else e * m


_E_FRAC = 44  # scale of the attention's untruncated e (e^c @2^20 × the fine tangent @2^24)


def attention(q: Secret, keys: FixedMaskOperand, values: FixedMaskOperand, mask: Public | None = None,
              probs: bool = False) -> tuple[Secret | Untruncated, Secret | None]:
    """``softmax(q·Kᵀ, mask)·V`` (and the probabilities if ``probs``) with the normalisation moved after
    the value product: q (…, S, D) @2^16, K, V (…, T, D) fixed-mask operands, mask (S, T) or None.
    Without ``probs`` the output comes back ``Untruncated`` (its last round below is left to the
    consumer, e.g. fused with the output projection: ``protocols.fixed_mask.trunc_matmul_step``).

    Rounds: q·Kᵀ (1, left at 2^32); its truncation shares a round with the max tree's first level
    (relu looked up on the untruncated differences); the rest of the tree; exp's look-ups and product
    (3, e left at 2^44); e's truncation shares a round with the reciprocal's look-up, which reads the
    untruncated row sum Σe @2^44 (range ``recip_range``: needs its top + 44 ≤ 62, i.e. T ≤ 5,080;
    beyond, the sum of the truncated e is looked up a round later); e·V shares a round with the
    reciprocal's residual products; the selection, with e·V's truncation in its last round; y's
    truncation with (e·V)·y (and e·y for ``probs``) in its round (``trunc_mul_step``); a truncation
    (left to the consumer without ``probs``: one round fewer here):
    ⌈log2 T⌉ + 9 rounds for T ≤ 2^11 (T ≤ 4: one reciprocal level, e·V's truncation takes the round
    the selection would), + 1 for a 4th reciprocal level (2^11 < T ≤ 2^13) + 1 for the later look-up (T > 5,080); vs
    ⌈log2 T⌉ + 14 for ``softmax`` then two matmuls. Error: as ``softmax``, plus ≤ 2^−14 absolute in e from the fine table's 2^−8 slope.
    """
    raw = fixed_matmul_raw(q, keys, transpose_w=True)  # (…, S, T) @2^32
    m = _keep_mask(mask, raw.shape, -1, raw.device)
    if m is not None:
        raw = _fill_masked(raw, m)
    n = raw.shape[-1]
    if n == 1:
        (xs,) = exact_div_many([(raw, 1 << F)])
        mx = xs
    else:
        half = n // 2
        (xs,), (((r,), _),) = together(trunc_step([(raw, 1 << F)]),
                                       lookup_step([Request(raw[..., :half] - raw[..., half:2 * half],
                                                            _relu_table(2 * F))]))
        mx = _tree_max(torch.cat([xs[..., half:2 * half] + r, xs[..., 2 * half:]], dim=-1))
    lo, hi = recip_range(n)
    if hi + _E_FRAC <= 62:
        e = _exp_product(add_public(xs - mx, _EXP_SHIFT), _exp_fine_24())  # @2^44
        if m is not None:
            e = e * m
        (e,), state = together(trunc_step([(e, 1 << (_E_FRAC - F))]),
                               _wide_step(e.sum(-1, keepdim=True), "recip", lo, hi, in_frac=_E_FRAC))
        y, _, ((ev,),) = _wide_select(state, [matmul_step(e, values)],
                                      then=lambda side: [trunc_step([(side[0], 1 << F)])])
    else:
        e = _masked_exp(xs, mx, m)
        ev, state = together(matmul_step(e, values), _wide_step(e.sum(-1, keepdim=True), "recip", lo, hi))
        y, ((ev,),), _ = _wide_select(state, [trunc_step([(ev, 1 << F)])])
    # y's truncation (@2^52 -> @2^32) with the products (e·V)·y (and e·y) in its round, then theirs
    fused = together(*[trunc_mul_step(y, 1 << 20, t) for t in [ev] + ([e] if probs else [])])
    if not probs:
        return Untruncated(fused[0][1], 1 << 32), None  # @2^48: the consumer truncates (or fuses) it
    outs = exact_div_many([(prod, 1 << 32) for _, prod in fused])  # @2^48 -> @2^16
    return to_secret(outs[0]), to_secret(outs[1])


def recip_range(n: int) -> tuple[int, int]:
    """log2 range of s = Σ e^(x − m) over n entries: e^(±slack)·[1, n], slack = ⌈log2 n⌉/4 (the max
    tree's error bound), widened by one octave each side."""
    slack = math.ceil(math.log2(max(n, 2))) / 4 / math.log(2)
    return math.floor(-slack) - 1, math.ceil(math.log2(max(n, 1)) + slack) + 1


# ---------------------------------------------------------------- wide-range 1/v and 1/√v

_WIDE = {"recip": (7, 14), "rsqrt": (11, 18)}  # (a: octaves per level, bits: log2 N); rsqrt (norms:
# one input per row) uses 2^18-entry tables so that a norm's 33 octaves take 3 levels


def _fn(kind: str, gain: float = 1.0):
    if kind == "recip":
        return (lambda v: gain / v), (lambda v: -gain / v**2)
    return (lambda v: gain * v.rsqrt()), (lambda v: -0.5 * gain * v.rsqrt() / v)


def wide_levels(lo: int, hi: int, kind: str) -> int:
    """G, the number of look-up levels ``_wide`` uses on [2^lo, 2^hi]."""
    return max(1, math.ceil((hi - lo) / _WIDE[kind][0]))


def wide_rounds(lo: int, hi: int, kind: str) -> int:
    """Rounds of ``_wide`` (its look-up, residual products, level selection)."""
    g = wide_levels(lo, hi, kind)
    return 1 + (1 if g == 1 else max(2, g - 1))


@functools.lru_cache(maxsize=None)
def _wide_levels(kind: str, lo: int, hi: int, in_frac: int, gain: float = 1.0) -> tuple[tuple[Table, int], ...]:
    """Per level: its table (gain·f(c) @2^52, its slope at the scale that puts the product with the
    truncated residual at 2^52, c @2^16, the switch bit [c < next level's top / 2]) and that truncation t.
    Needs hi + in_frac ≤ 62 (the top grid inside the positive ring)."""
    assert hi + in_frac <= 62, f"wide range 2^{hi} at 2^{in_frac} leaves the positive ring"
    a, bits = _WIDE[kind]
    f, df = _fn(kind, gain)
    n_levels = wide_levels(lo, hi, kind)
    levels = []
    for g in range(n_levels):
        top = hi + 1 - g * a  # level g's grid covers [0, 2^top)
        shift = max(0, top - bits + in_frac)  # at the input's ulp the grid covers more than [0, 2^top)
        t = max(0, shift - 12)  # the residual |v − c| < 2^shift keeps 12 bits
        c = grid(shift, 0, bits, in_frac)
        cc = c.clamp(min=2.0 ** (shift - in_frac))  # index 0 stands for (0, h): its upper end
        switch = (c < 2.0 ** (top - 1 - a)).double() if g + 1 < n_levels else torch.zeros_like(c)
        values = torch.stack([encode(f(cc), _WIDE_FRAC), encode(df(cc), _WIDE_FRAC - in_frac + t),
                              torch.arange(1 << bits, dtype=torch.long) << shift,
                              switch.long()])
        levels.append((Table(shift, 0, values), t))
    return tuple(levels)


def _wide(v: torch.Tensor, kind: str, lo: int, hi: int, in_frac: int = F) -> torch.Tensor:
    """f(v) @2^52 for v @2^in_frac in [2^lo, 2^hi] (module docstring; ``wide_rounds`` rounds)."""
    (state,) = together(_wide_step(v, kind, lo, hi, in_frac))
    return _wide_select(state)[0]


def _wide_step(v: torch.Tensor, kind: str, lo: int, hi: int, in_frac: int = F, gain: float = 1.0) -> Pending:
    """``_wide``'s look-up round (of gain·f); its finish gives the state ``_wide_select`` continues from."""
    levels = _wide_levels(kind, lo, hi, in_frac, gain)
    step = lookup_step([Request(v, t) for t, _ in levels])
    return Pending(step.opens, lambda opened: (v, levels, step.finish(opened)))


def _wide_select(state, side: Sequence[Pending] = (),
                 then: Callable[[list], Sequence[Pending]] | None = None) -> tuple[torch.Tensor, list, list]:
    """The residual products and the level selection (``wide_rounds`` − 1 rounds); the ``side`` steps
    share the first of those rounds, the steps ``then(side results)`` the last (a round of their own
    when there is only one, G = 1). Returns (f(v) @2^52, the side steps' results, the then steps')."""
    v, levels, outs = state
    pairs, bits = [], []
    for (_, t), ((_, slope, c, bit), _) in zip(levels, outs):
        pairs.append((slope, _local_trunc(v - c, t)))
        bits.append(bit)
    g_max = len(levels) - 1
    extend = g_max >= 2
    got, *side_out = together(mul_step(pairs + ([(bits[0], bits[1])] if extend else [])), *side)
    late = list(then(side_out)) if then is not None else []
    late_out: list = []
    ys = [fc + p for ((fc, *_), _), p in zip(outs, got)]
    prefix = {1: bits[0]} if g_max >= 1 else {}
    if extend:
        prefix[2] = got[-1]
    acc, applied = ys[0], set()
    while len(applied) < g_max:
        todo = [g for g in sorted(prefix) if g not in applied]
        k = max(prefix)
        grow = k + 1 <= g_max
        step = mul_step([(prefix[g], ys[g] - ys[g - 1]) for g in todo] + ([(prefix[k], bits[k])] if grow else []))
        if len(applied) + len(todo) == g_max:  # the last round
            got, *late_out = together(step, *late)
            late = []
        else:
            (got,) = together(step)
        for g, p in zip(todo, got):
            acc = acc + p
            applied.add(g)
        if grow:
            prefix[k + 1] = got[-1]
    if late:
        late_out = together(*late)
    return acc, side_out, late_out


def _local_trunc(share: torch.Tensor, t: int) -> torch.Tensor:
    """Each party floors its share by 2^t: exact to 2 units for a value |z| ≪ 2^63 (off by 2^(64−t) with
    probability ≈ |z|/2^63: ≈ 2^−38 for these residuals)."""
    return torch.div(share, 1 << t, rounding_mode="floor") if t else share


# ---------------------------------------------------------------- norms

NORM_RANGE_LOG2 = (-12, 21)  # mean squares of SmolLM2-135M (token 0's 1.1e6 included) and the tiny models


def sum_range(e: int) -> tuple[int, int]:
    """log2 range of Σx² + E·eps over a row of E for mean squares in ``NORM_RANGE_LOG2`` (the top capped
    at 2^30 so that the sum @2^32 stays in the positive ring: mean(x²) < 2^31/E)."""
    lo, hi = NORM_RANGE_LOG2
    return math.floor(lo + math.log2(e)), min(30, math.ceil(hi + math.log2(e)))


def _normalise_weighted(x: torch.Tensor, w: torch.Tensor | None, eps: float, w_secret: bool,
                        sq: torch.Tensor | None = None) -> Untruncated:
    """(x·w)/√(mean(x²) + eps) @2^16 (its last truncation pending) for x @2^16 (rows over the last dim) and w @2^16; w None (a norm
    folded into the next matrix): x/√(mean(x²) + eps) = √E·x/√(Σx² + E·eps), the sum read by the
    look-up at 2^32 as it comes out of the squares (no truncation round), or straight from [x²] @2^32
    when the caller has it (``sq``: no squaring round either)."""
    e = x.shape[-1]
    if w is None:
        if sq is None:
            (sq,) = mul_many([(x, x)])  # @2^32
        v = add_public(sq.sum(-1, keepdim=True), round(e * eps * 2**(2 * F)))
        (state,) = together(_wide_step(v, "rsqrt", *sum_range(e), in_frac=2 * F, gain=math.sqrt(e)))
        return _scale_by_levels(state, x)
    if w_secret:
        sq, xw = mul_many([(x, x), (x, w)])
    else:
        (sq,) = mul_many([(x, x)])
        xw = x * w
    ms, xw = exact_div_many([(sq.sum(-1, keepdim=True), e), (xw, 1 << F)])  # ms @2^32: tiny rows keep bits
    ms = add_public(ms, round(eps * 2**(2 * F)))
    (state,) = together(_wide_step(ms, "rsqrt", *NORM_RANGE_LOG2, in_frac=2 * F))
    return _scale_by_levels(state, xw)


def _scale_by_levels(state, xw: torch.Tensor) -> Untruncated:
    """xw·y @2^16 (its last truncation pending) from ``_wide_step``'s state (y = f(v), up to 3 levels), with xw folded into the level
    selection, y = y_0 + u_0·(y_1 − y_0) + u_0·u_1·(y_2 − y_1): A: the levels' residual products, u_0·xw
    and u_0·u_1·xw (``mul3_step``); B: each y_g − y_{g−1} truncated to 2^24 with its product by xw,
    u_0·xw, u_0·u_1·xw in the truncation's round (``trunc_mul_step``); C: the sum's truncation, left
    to the caller (3 rounds after the look-up, instead of ``_wide_select``'s 3 + y's truncation + the product + its
    truncation)."""
    v, levels, outs = state
    g_max = len(levels) - 1
    assert g_max <= 2, "norm ranges of up to 3 levels"
    pairs = [(slope, _local_trunc(v - c, t)) for (_, t), ((_, slope, c, _), _) in zip(levels, outs)]
    u = [bit for ((_, _, _, bit), _) in outs]
    got, triple = together(mul_step(pairs + ([(u[0], xw)] if g_max >= 1 else [])),
                           mul3_step([(u[0], u[1], xw)] if g_max >= 2 else []))
    ys = [fc + p for ((fc, *_), _), p in zip(outs, got)]  # @2^52
    gated = [xw] + got[len(pairs):] + triple  # xw, u_0·xw, u_0·u_1·xw
    diffs = [ys[0]] + [ys[g] - ys[g - 1] for g in range(1, g_max + 1)]
    prods = together(*[trunc_mul_step(dy, 1 << 28, w) for dy, w in zip(diffs, gated)])  # @2^40
    return Untruncated(sum((p for _, p in prods[1:]), prods[0][1]), 1 << 24)  # @2^40


def _weight_share(x: Secret, weight: Secret | Public | None) -> tuple[torch.Tensor | None, bool]:
    if weight is None:
        return None, False
    if isinstance(weight, MPCTensor):
        return share_of(weight), True
    w = torch.as_tensor(weight, dtype=torch.float64, device=share_of(x).device)
    return encode(w, F), False


def rms_norm(x: Secret, weight: Secret | Public | None, eps: float) -> Secret:
    """``[x / √(mean(x²) + eps) · w]`` over the last dim: 6 rounds, 5 without w (module docstring)."""
    w, secret = _weight_share(x, weight)
    return _normalise_weighted(share_of(x), w, eps, secret).settle()


def rms_norm_of_squares(x: Secret, sq: torch.Tensor, eps: float) -> Untruncated:
    """``[x / √(mean(x²) + eps)]`` given this party's share of [x²] @2^32 (e.g. from
    ``protocols.truncation.trunc_step(square=True)``), its last truncation pending: 3 rounds (the
    look-up, 2 of ``_scale_by_levels``) + the truncation (``Untruncated.settle``, or fused into the
    next fixed-mask product)."""
    return _normalise_weighted(share_of(x), None, eps, False, sq)


def layer_norm(x: Secret, weight: Secret | Public | None, bias: Secret | Public | None, eps: float) -> Secret:
    """``[(x − μ)/√(var + eps) · w + b]``: the mean (1 truncation round), then ``rms_norm``'s steps
    (w, b None: folded into the next matrix)."""
    xs = share_of(x)
    (mean,) = exact_div_many([(xs.sum(-1, keepdim=True), xs.shape[-1])])
    w, secret = _weight_share(x, weight)
    out = _normalise_weighted(xs - mean, w, eps, secret).settle()
    return out if bias is None else out + bias
