"""Non-linear functions on secret shares with stated domains and error bounds.

CrypTen's built-ins fail on the ranges an LLM produces (research/env_probe.md §1c): its exp explodes
below −512, its reciprocal is garbage above ~200 (softmax over long flat rows), its inv_sqrt is good
only on [1, 100] while RMSNorm mean squares of SmolLM2-135M span [7e-3, 1.0e6]. The versions here
use CrypTen only for products and comparisons, and never read ``crypten.cfg``:

* ``exp``: clamp, then e^x = (e^(x/32))^32 with a degree-8 Taylor base (8 rounds, ~8× more
  accurate than CrypTen's (1 + x/256)^256 at the same depth).
* reciprocal / inv_sqrt: a piecewise-constant initial guess from one batched comparison of the
  input against public powers of two (one threshold per octave), then 2–4 Newton–Raphson steps.
  This covers any stated range in a fixed number of rounds.

Measured input ranges (forward hooks; SmolLM2-135M on 512–1024 tokens of vim/GPL text, tiny models
on 256 tokens):

| model | RMS/LayerNorm mean square | max abs norm input | SiLU/GELU input |
|---|---|---|---|
| smollm2 | [6.9e-3, 4.4e3]; token 0 of layers 12–28: 1.0e6 | 2.4e4 (token 0), else ≤ 1.2e3 | [−31.3, 49.9] |
| tiny-llama | [2.6e-4, 2.0e-3] | 0.11 | [−0.77, 0.68] |
| tiny-gpt2 | [4.9e-4, 2.0e-3] | 0.14 | [−0.76, 0.71] |

Cost notation: ``cmp`` = one secure comparison, 8 rounds, 432 logged bytes per element per party
(measured); ``mul`` = one Beaver product, 1 round, 32 bytes per element (sizes in elements), plus
its exact truncation (``protocols.truncation``: 1 round, 16 bytes per element) — as is every
division by a public integer. Round counts are for the default ``truncation="exact"``; the count
under ``"local"`` (CrypTen's 0-round truncation, with its wrap hazard) is given as "local: …".

Config: every constant of these approximations is a field of ``protocols.config.ProtocolConfig``
(documented there; each function's ``Config:`` line names the ones it reads). A function takes it
as ``cfg=``; ``None`` means ``active_config()``, the config of the enclosing ``protocol_context``
(the defaults outside one). The bounds below are for the defaults.
"""
from __future__ import annotations

import math

import torch

from protocols import lut_nonlinear
from protocols.compat import MPCTensor, crypten
from protocols.config import ProtocolConfig, active_config
from protocols.selection import mul_public_int, tree_max
from protocols.types import Public, Secret


def _weighted_bits(bits: Secret, coefs: list[float], scale: int) -> Secret:
    """``Σ_j [b_j]·c_j`` over the last dim of scale-1 bits, exact (integer share arithmetic)."""
    weights = torch.tensor([round(c * scale) for c in coefs], dtype=torch.long, device=bits.share.device)
    return MPCTensor.from_shares((bits.share * weights).sum(-1))


def _dot_public(terms: list[Secret], coefs: list[float], frac_bits: int) -> Secret:
    """``Σ_k [t_k]·c_k`` with each c_k rounded to ``2^−frac_bits`` and one truncation in all.

    CrypTen's ``mul`` by a public float encodes it by truncation toward zero at 2^−16 (1/8! becomes
    1/65536, 38 % low) and truncates every product; here the integer products are summed exactly
    and divided once. Raw size Σ|t_k·c_k|·2^(16+frac_bits) must stay ≪ 2^63 (failure odds = its ratio to 2^64).
    """
    acc = sum(t.share * round(c * 2**frac_bits) for t, c in zip(terms, coefs))
    return MPCTensor.from_shares(acc).div(2**frac_bits)


def _mul_public(x: Secret, w: Public, frac_bits: int) -> Secret:
    """``[x]·w`` for a public float tensor w (broadcast), w rounded to ``2^−frac_bits``, one truncation."""
    w_int = torch.round(torch.as_tensor(w, dtype=torch.float64, device=x.share.device) * 2**frac_bits).long()
    return MPCTensor.from_shares(x.share * w_int).div(2**frac_bits)


def _octave_thresholds(lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Public thresholds 2^(lo+1) … 2^(hi−1) separating the octaves [2^j, 2^(j+1)), j ∈ [lo, hi)."""
    return torch.tensor([2.0**j for j in range(lo + 1, hi)], device=device)


def _octave_value(bits: Secret, lo: int, hi: int, value_at, scale: int) -> Secret:
    """``value_at(j)`` on the octave selected by ``bits`` = [x ≥ 2^(lo+1)], …, [x ≥ 2^(hi−1)]."""
    steps = [value_at(j) - value_at(j - 1) for j in range(lo + 1, hi)]
    return _weighted_bits(bits, steps, scale) + value_at(lo)


def _octave_guess(x: Secret, lo: int, hi: int, value_at) -> Secret:
    """Piecewise-constant ``[y0]``: ``value_at(j)`` on [2^j, 2^(j+1)), j ∈ [lo, hi), from one
    batched comparison; inputs outside [2^lo, 2^hi) get the end octaves' values."""
    if hi - lo <= 1:
        return x * 0 + value_at(lo)
    bits = (x.unsqueeze(-1) - _octave_thresholds(lo, hi, x.device)).ge(0)  # (..., hi−lo−1)
    return _octave_value(bits, lo, hi, value_at, x.encoder.scale)


def exp(x: Secret, clamp: bool = True, *, cfg: ProtocolConfig | None = None) -> Secret:
    """``[e^x]``.

    Steps: 1. (clamp) ``[x] ← m + ReLU([x] − m)``, m = ``cfg.exp_clamp_min`` (1 cmp + 1 mul).
    2. ``[y] = [x]/32`` (local). 3. ``[p] = Σ_{k≤8} [y]^k/k!`` (powers in 3 rounds; coefficients
    rounded to 2^−20 and summed before one truncation, ``_dot_public``). 4. square 5 times.
    Public: shape. Cost: 18 rounds (local: 8) and 12·n mul (+ 9 rounds, n cmp + n mul with clamp).
    Error: ``|err| ≤ 2e-3·(e^x + 0.02)`` on [−32, 8]: relative ≤ 2e-3 where e^x ≥ 0.02, absolute
    ≤ 4e-5 (3 ulps) below. The floor is 2-party truncation noise: each ulp (2^−16) of the base is
    amplified 32× (5e-4 relative). Measured (2 parties, TFP, 40 runs × 2000 inputs on [−32, 4]):
    worst relative 1.5e-3 (e^x ≥ 0.02), worst absolute 3.1e-5 (below), worst |err|/(e^x + 0.02)
    1.2e-3. Without ``clamp`` the domain is [−32, 8]; beyond it the Taylor base diverges. With
    ``clamp`` any x ≤ 8 is safe (inputs < −32 give ≈ 0).
    Config: exp_clamp_min, exp_halvings, exp_taylor_degree, coef_frac_bits.
    """
    cfg = cfg or active_config()
    if clamp:
        u = x - cfg.exp_clamp_min
        x = u * u.ge(0) + cfg.exp_clamp_min
    y = x.div(2**cfg.exp_halvings)
    degree = cfg.exp_taylor_degree
    powers = [y, y.square()]
    while len(powers) < degree:  # double the known powers each round
        top, have = powers[-1], len(powers)
        need = min(have, degree - have)
        prods = crypten.stack([top] * need) * crypten.stack(powers[:need])
        powers += [prods[i] for i in range(need)]
    coefs = [1.0 / math.factorial(k) for k in range(1, degree + 1)]
    result = _dot_public(powers, coefs, cfg.coef_frac_bits) + 1
    for _ in range(cfg.exp_halvings):
        result = result.square()
    return result


def recip_scale(n: int) -> int:
    """c = 2^⌈log2(n)/2⌉ ≈ √n: the numerator of softmax's scaled reciprocal c/s for s ∈ [1, n]."""
    return 2 ** math.ceil(math.log2(max(n, 1)) / 2)


def _reciprocal_scaled(s: Secret, n: int, c: int, iters: int) -> Secret:
    """``[z] ≈ c / [s]`` for s ∈ [1, n], c = ``recip_scale(n)``.

    Octave guess z0 = c·2^−(j+½) on [2^j, 2^(j+1)), then z ← z·(2 − s·z/c).
    Why c ≈ √n: a 2-party product of value v is truncated locally and comes out 2^32 off with
    probability ≈ |v|/2^32 (``tests/protocols/test_truncation.py``); the NR products are ≈ c, so c = n
    (1/s in [1, n] at full precision) made a corrupted row likely in a 4K window softmax
    (≈ 8·4096/2^32 per row, ~10^5 rows), while c ≈ √n cuts those odds √n-fold and keeps z ≥ 1/√n,
    whose relative precision (a few ulps·√n, 0.3 % at n = 4096) is far finer than that of the
    probabilities themselves (P ≈ 1/n has n·2^−16 relative resolution: 6 % at n = 4096).
    Cost: 1 cmp on ⌈log2 n⌉−1 thresholds + 2·iters mul rounds. Error: rel. ≤ 0.414^(2^iters).
    """
    hi = max(1, math.ceil(math.log2(n)))
    z = _octave_guess(s, 0, hi, lambda j: c * 2.0 ** -(j + 0.5))
    for _ in range(iters):
        z = z * (2 - (s * z).div(c))
    return z


def softmax(x: Secret, dim: int = -1, mask: Public | None = None, *,
            cfg: ProtocolConfig | None = None) -> Secret:
    """``[softmax(x)]`` along ``dim``, optionally restricted to a public 0/1 keep-mask.

    Steps: 1. masked logits ``[x'] = m·[x] − (1−m)·cfg.mask_fill`` (local, exact). 2. ``[μ]`` = row max
    (knockout tree). 3. ``[e] = m · exp([x'] − [μ])`` (clamped at −32, so the exp never leaves its
    domain whatever the mask or the logit spread). 4. ``[s] = Σ[e]`` ∈ [1, n]. 5. ``[z] ≈ c/[s]``,
    c = ``recip_scale(n)`` ≈ √n (the "(sum/N)" fix, precise for flat *and* peaked rows, with NR
    products near √n rather than n: √n-fold fewer truncation wraps). 6. ``[e]·[z]/c``.
    Public: shape, mask (e.g. causal). Every row must keep at least one entry; real logits > −1024.
    Cost (n = row length ≥ 3, R rows, L = ⌈log2 n⌉): 11·⌊L/2⌋ + 9·(L mod 2) (max, ``tree_max``) + 10
    (clamp) + 17 (exp) + 28 (reciprocal) + 3 = that + 58 rounds (n = 256: 102, measured; local
    truncation: + 34);
    bytes ≈ 1.25 kB·n·R per party (measured: 2 rows of 2048 → 5.1 MB).
    Error: max abs 2e-3 on rows of length 1–8192, flat or peaked, logits in [−1000, 1000]
    (dominated by exp's relative error on the largest entries).
    Config: nonlinear (``"lut"``: ``protocols.lut_nonlinear.softmax``, ⌈log2 n⌉ + 10 rounds, error ≤
    2e-3 for kept logits spread ≤ 120; the rest of this docstring is ``"poly"``), mask_fill,
    recip_nr_iters, and exp's (exp_*, coef_frac_bits).
    """
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.softmax(x, dim, mask)
    if mask is not None:
        mask = torch.as_tensor(mask, device=x.device).long()
        if not bool((mask.expand(x.size()).sum(dim) > 0).all()):
            raise ValueError("softmax mask leaves a row with no kept entry")
        x = mul_public_int(x, mask) + (mask.float() - 1) * cfg.mask_fill
    n = x.size(dim)
    e = exp(x - tree_max(x, dim, keepdim=True), cfg=cfg)
    if mask is not None:
        e = mul_public_int(e, mask)
    c = recip_scale(n)
    z = _reciprocal_scaled(e.sum(dim, keepdim=True), n, c, cfg.recip_nr_iters)
    return (e * z).div(c)


def sigmoid(x: Secret, *, cfg: ProtocolConfig | None = None) -> Secret:
    """``[σ(x)] = 1/(1 + e^−x)``.

    Steps: 1. bits ``[x<0], [x<−B], [x>B]`` (1 batched cmp on 3n). 2. ``[a] = min(|x|, B)`` (1 mul
    round). 3. ``[d] = 1 + exp(−[a])`` ∈ [1, 2]. 4. ``[r] ≈ 1/[d]`` by NR from r0 = 24/17 − 8d/17.
    5. ``σ = [r] + [x<0]·(1 − 2[r])``.
    Public: shape. Cost: 37 rounds (local: 8 + 1 + 8 + 2·sigmoid_nr_iters + 1 = 22); 3n cmp + ≈ 19n mul.
    Error: max abs 4e-4 on all reals (B = ``cfg.sigmoid_clamp`` = 32: σ is constant to 1e-14 beyond);
    dominated by exp's relative error at |x| ≈ 1. Measured: worst 2.9e-4 over 40 runs × 2000
    inputs (N(0, 20²) and N(0, 3²)).
    Config: sigmoid_clamp, sigmoid_nr_iters, and exp's (exp_halvings, exp_taylor_degree, coef_frac_bits).
    """
    cfg = cfg or active_config()
    bound = cfg.sigmoid_clamp
    bits = crypten.stack([x, x + bound, bound - x]).lt(0)  # (3, ...): neg, below −B, above B
    prods = bits * crypten.stack([x, -x - bound, x - bound])
    a = x - prods[0] - prods[0] - prods[1] - prods[2]
    d = 1 + exp(-a, clamp=False, cfg=cfg)
    r = (24.0 / 17) - d.mul(8.0 / 17)
    for _ in range(cfg.sigmoid_nr_iters):
        r = r * (2 - d * r)
    return r + bits[0] * (1 - 2 * r)


def silu(x: Secret, *, cfg: ProtocolConfig | None = None) -> Secret:
    """``[x·σ(x)]``. ``nonlinear="lut"``: ``protocols.lut_nonlinear.silu`` (3 rounds, error ≤ 5e-4 for
    |x| < 62). ``"poly"``: sigmoid + 1 mul (39 rounds; local: 23), error max abs 2e-4·(1 + |x|) on
    all reals (measured SmolLM2 inputs: [−42, 50]). Config: nonlinear, sigmoid's."""
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.silu(x)
    return x * sigmoid(x, cfg=cfg)


def silu_mul(x: Secret, u: Secret, *, cfg: ProtocolConfig | None = None) -> Secret:
    """``[silu(x)·u]`` (Llama's gated MLP). ``nonlinear="lut"``: ``protocols.lut_nonlinear.silu_mul``
    (4 rounds, error ≤ 5e-4·|u|); ``"poly"``: ``silu`` then a product."""
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.silu_mul(x, u)
    return silu(x, cfg=cfg) * u


def gelu_tanh(x: Secret, *, cfg: ProtocolConfig | None = None) -> Secret:
    """GPT-2's gelu_new, exactly ``x·σ(2√(2/π)(x + 0.044715x³))`` (= ½x(1 + tanh(…))).

    Cost: 2 mul (x², x³) + sigmoid + 1 mul = 45 rounds (local: 25). Error: max abs 2e-4·(1 + |x|) for
    |x| ≤ 40 (x³ must stay far below the fixed-point wrap). Config: nonlinear (``"lut"``:
    ``protocols.lut_nonlinear.gelu_tanh``, 3 rounds, error ≤ 4e-4 for |x| < 62), sigmoid's.
    """
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.gelu_tanh(x)
    inner = (x + x.square() * x * 0.044715) * (2 * math.sqrt(2 / math.pi))
    return x * sigmoid(inner, cfg=cfg)


def inv_sqrt(x: Secret, lo_log2: int | None = None, hi_log2: int | None = None, iters: int | None = None, *,
             cfg: ProtocolConfig | None = None) -> Secret:
    """``[1/√x]`` for x ∈ [2^lo_log2, 2^hi_log2] (each argument left None is the config's).

    Steps: 1. octave guess y0 = 2^−(j+½)/2 on [2^j, 2^(j+1)) (1 batched cmp on hi−lo−1 thresholds).
    2. NR ``y ← [y]·(1.5 − 0.5·([x][y])[y])`` (3 rounds each: [y]² alone would lose precision).
    Public: shape, the range. Cost: 8 + 7·iters rounds (29 by default; local: 8 + 3·iters); (hi−lo−1)·n cmp + 3·iters·n mul.
    Error on [2^−8, 2^12]: |Δy| ≤ y·(3e-5 + 2^−17/x + 2^−17/√x) + 3·2^−16 (NR 3e-5 relative;
    encoding x and truncating x·y ≈ √x to 2^−16 move y by the next two terms; the last products
    round y by ≤ 3 ulps), i.e. relative ≤ 2.1e-3 at the low end and ≤ 3e-3 at the top (y = 2^−6); ≤ 5e-2 on [2^−12, 2^−8] (x has only 16–256 ulps there). Outside [2^lo, 2^hi] the guess is an end octave's and NR may diverge.
    Config: inv_sqrt_range_log2 (lo_log2, hi_log2), inv_sqrt_nr_iters (iters).
    """
    cfg = cfg or active_config()
    lo, hi = cfg.inv_sqrt_range_log2
    lo = lo if lo_log2 is None else lo_log2
    hi = hi if hi_log2 is None else hi_log2
    iters = cfg.inv_sqrt_nr_iters if iters is None else iters
    return _inv_sqrt_nr(x, _octave_guess(x, lo, hi, _inv_sqrt_at), iters)


def _inv_sqrt_at(j: int) -> float:
    return 2.0 ** (-(j + 0.5) / 2)


def _inv_sqrt_nr(x: Secret, y: Secret, iters: int) -> Secret:
    """NR ``y ← y·(1.5 − 0.5·(x·y)·y)``; products ordered so none falls to a few ulps (3 rounds)."""
    for _ in range(iters):
        y = y * (1.5 - ((x * y) * y).mul(0.5))
    return y


def _normalise(x: Secret, eps: float, cfg: ProtocolConfig) -> Secret:
    """``[x / √(mean(x²) + eps)]`` over the last dim (E), for |x| ≤ 2^15 and mean(x²) ∈ [1e-4, 2^24].

    Two scalings: fine ``[u] = 2^f·[x]`` (f = norm_fine_log2 = 2: precise for tiny activations) and
    coarse ``[u] = [x]/2^c`` (c = norm_coarse_log2 = 6: its squares stay far from the 2-party
    truncation wrap even for SmolLM2's 2.4e4 outliers).
    1. both ``[m] = G·mean(u²)`` in one product round, as ``Σ u_int·u`` (one operand viewed at scale 1,
    so no per-element truncation) divided once by E·2^16/G, G = 4^g, g = norm_ms_gain_log2: the mean
    square keeps ≥ 1000 ulps where it is selected (per-element truncation lost up to 1 ulp each on
    419 ulps for the tiny models). 2. one batched cmp: the switch bit ``[mean(x²) > norm_switch]``
    and both octave guesses (on ``norm_fine_octaves``, ``norm_coarse_octaves``); 3. one product round
    selects (u, m, y0) with exact scale-1 bits (the unselected fine path may have wrapped: the product
    by the bit is exact in Z_2^64, so it cancels); 4. inv_sqrt NR (inv_sqrt_nr_iters); 5. ``2^g·[u]·[y]``.
    """
    g, f, c = cfg.norm_ms_gain_log2, cfg.norm_fine_log2, cfg.norm_coarse_log2
    fine = mul_public_int(x, 2**f)
    coarse = x.div(2**c)
    both = crypten.stack([fine, coarse])  # (2, ..., E)
    raw = MPCTensor.from_shares(both.share, precision=0) * both  # u²·2^16 per element, exact
    sq = raw.sum(-1, keepdim=True).div(x.size(-1) * (x.encoder.scale // 4**g))  # (2, ..., 1)
    gain = 4.0**g
    ms_f = sq[0] + eps * gain * 4.0**f
    ms_c = sq[1] + eps * gain * 4.0**-c
    f_lo, f_hi = cfg.norm_fine_octaves
    c_lo, c_hi = cfg.norm_coarse_octaves
    switch = cfg.norm_switch * gain * 4.0**-c
    diffs = crypten.cat([ms_f - _octave_thresholds(f_lo, f_hi, x.device), ms_c - _octave_thresholds(c_lo, c_hi, x.device),
                         ms_c - switch], dim=-1)
    bits = diffs.ge(0)  # (..., J_f + J_c + 1)
    n_f = f_hi - f_lo - 1
    scale = x.encoder.scale
    y_f = _octave_value(bits[..., :n_f], f_lo, f_hi, _inv_sqrt_at, scale).unsqueeze(-1)
    y_c = _octave_value(bits[..., n_f:-1], c_lo, c_hi, _inv_sqrt_at, scale).unsqueeze(-1)
    use_coarse = bits[..., -1:]
    both_f = crypten.cat([fine, ms_f, y_f], dim=-1)
    picked = both_f + use_coarse * (crypten.cat([coarse, ms_c, y_c], dim=-1) - both_f)
    u, ms, y0 = picked[..., :-2], picked[..., -2:-1], picked[..., -1:]
    return mul_public_int(u, 2**g) * _inv_sqrt_nr(ms, y0, cfg.inv_sqrt_nr_iters)


def rms_norm(x: Secret, weight: Secret | Public | None, eps: float, *, cfg: ProtocolConfig | None = None) -> Secret:
    """``[x / √(mean(x²) + eps) · w]`` over the last dim (E), Llama's RMSNorm (w None: no weight).

    Public: shapes, eps (and w when public). Cost: 36 rounds (37 for a secret w; local: 1 (squares)
    + 8 (cmp) + 1 (select) + 9 (NR) + 1 (+1) = 20–21); per row ≈ 4E mul + 40 cmp (E + 2 more mul for a secret w).
    Error: relative to the row's max |output| ≤ 2e-3 for |x| ≤ 2^15 and mean(x²) ∈ [1e-4, 2^24] — this covers every norm of
    SmolLM2-135M (mean squares 7e-3 … 1.0e6, |x| ≤ 2.4e4) and the tiny test models (2.6e-4 …).
    A public w is rounded to 2^−20 here (CrypTen's own product truncates w·2^16 toward zero: a
    weight of 2.5e-3 on the 2.4e4 outlier channel, which sets the row max, was 0.6 % off); a secret
    w is exact only to its owner's encoding (CrypTen: truncation to 2^−16), so the bound is
    relative to that encoded w. Measured (40 runs, the test's rows): worst 1.3e-3 (tiny), 4.1e-4
    (SmolLM2-like, public or secret w), 1.1e-3 / 4.8e-4 (layer_norm tiny / SmolLM2-like).
    Config: nonlinear (``"lut"``: ``protocols.lut_nonlinear.rms_norm``, 7 rounds (6 without w), the same error bound
    relative to the encoded w, on mean(x²) ∈ [2^−12, 2^21]; the rest of this docstring is ``"poly"``),
    norm_fine_log2, norm_coarse_log2, norm_switch, norm_ms_gain_log2, norm_fine_octaves,
    norm_coarse_octaves, inv_sqrt_nr_iters, coef_frac_bits.
    """
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.rms_norm(x, weight, eps)
    return _weight(_normalise(x, eps, cfg), weight, cfg.coef_frac_bits)


def layer_norm(x: Secret, weight: Secret | Public | None, bias: Secret | Public | None, eps: float, *,
               cfg: ProtocolConfig | None = None) -> Secret:
    """``[(x − μ)/√(var + eps) · w + b]`` over the last dim (E), GPT-2's LayerNorm.

    Steps: ``[c] = [x] − mean([x])`` (local), then ``rms_norm``'s normalisation of ``[c]``.
    Cost, error and config: as ``rms_norm`` with var in place of mean(x²) (``"lut"``: 8 rounds).
    """
    cfg = cfg or active_config()
    if cfg.nonlinear == "lut":
        return lut_nonlinear.layer_norm(x, weight, bias, eps)
    centred = x - x.mean(-1, keepdim=True)
    out = _weight(_normalise(centred, eps, cfg), weight, cfg.coef_frac_bits)
    return out if bias is None else out + bias


def _weight(x: Secret, weight: Secret | Public | None, frac_bits: int) -> Secret:
    """``[x]·w``: a public w rounded to 2^−frac_bits (``_mul_public``), a secret one by a Beaver product;
    None (a norm folded into the next matrix): x."""
    if weight is None:
        return x
    return x * weight if isinstance(weight, MPCTensor) else _mul_public(x, weight, frac_bits)
