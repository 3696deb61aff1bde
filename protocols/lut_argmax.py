"""Few-round argmax of secret logits, revealed to one party as a token id (``protocols.lut`` look-ups).

Packing: with b = ⌈log2 n⌉, each entry i of a row becomes the ring integer P_i = x_i·2^b + i
(x_i its @2^16 fixed-point share: party 0 adds the public i, local). The packed values order like
the logits (the index sits below the value's last bit), and carry their index along.

Tree: ⌈log2 n⌉ levels of P = P_b + [P_a − P_b > 0]·(P_a − P_b), the bit and its product in ONE
look-up (``protocols.lut``: the sign table as the slope column, the difference as the multiplier;
ring-exact, no truncation), an odd entry passing up unchanged. The look-up's index is the difference
stochastically rounded to a grid of step h on [−128, 128): a pair is decided right whenever its
logits differ by ≥ h, else either (near-tied) entry goes on, so the winner's logit is within
Σ h_level of the max (never a wrong value: packed values are only ever selected, not computed).
The step shrinks as the pairs thin out (``_STEPS``: h = 1/2 with N = 2^9 one-hot entries per pair
while > 256 pairs, 1/32 (2^13) while > 16, 2^−9 (2^17) for the last ones), so the material stays
≈ 2^9·n per row and a near-tie decides a token only when the two top logits meet early (V = 49152:
in the first 7 levels with probability 2^7/V per row) or are within 2^−9.
Scale: ``shift`` multiplies the logits by a public 2^shift before packing (exact, local), so a model
whose logits are known to stay far inside the domain (``mpcache.model.logit_shift``: tiny random
models, |logits| < 1) is decided at a finer step.

Reveal: the winner P = x·2^b + idx times 2^(64−b) is idx·2^(64−b) in the ring (the value's bits
leave the ring), opened to ``dst`` alone: nothing but the index.

Cost: ⌈log2 n⌉ + 1 rounds (the tree, the reveal); per pair 32 logged bytes per party (index and
multiplier openings), 2N dealer elements; the reveal 8 bytes per row. Domain: |x| < 64 (pair
differences inside the grid; a difference outside it wraps and is decided wrongly; SmolLM2-135M's
logits lie in [−32, 41]). n ≤ 2^20.
Public: shapes, the grids; nothing about x is opened.
"""
from __future__ import annotations

import functools
import math

import torch

from protocols.lut import Request, Table, lookup_many
from protocols.rounds import add_public, share_of, to_secret
from protocols.selection import reveal_to
from protocols.types import Secret

F = 16  # fraction bits of the logits' encoding
_DOMAIN_LOG2 = 7  # the grids cover differences in [−2^7, 2^7) logits
_STEPS = ((256, -1), (16, -5), (0, -9))  # (more pairs than this, step log2) per level


def _step_log2(pairs: int) -> int:
    return next(step for above, step in _STEPS if pairs > above)


@functools.lru_cache(maxsize=None)
def _sign_table(b: int, step_log2: int) -> Table:
    """Slope column [c > 0] (scale 1) on the grid of step 2^step_log2 over [−128, 128), for packed
    inputs (@2^(16+b)); no plain column."""
    shift = F + b + step_log2
    bits = _DOMAIN_LOG2 + 1 - step_log2
    low = -(1 << (bits - 1))
    slopes = (torch.arange(1 << bits) + low > 0).long().unsqueeze(0)
    return Table(shift, low, torch.zeros(0, 1 << bits, dtype=torch.long), slopes)


DOMAIN = 64.0  # |2^shift·x| must stay below this


def packed_max(x: Secret, shift: int = 0) -> torch.Tensor:
    """Shares of the packed winner 2^shift·x_idx·2^b + idx per row of the last dim, (..., 1):
    ⌈log2 n⌉ rounds."""
    n = x.shape[-1]
    b = max(1, math.ceil(math.log2(n)))
    assert b <= 20 and 0 <= shift <= 16, f"argmax over {n} entries (at most 2^20), shift {shift} (0..16)"
    p = add_public(share_of(x) << (b + shift), torch.arange(n, device=share_of(x).device))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        a, c, rest = p[..., :half], p[..., half:2 * half], p[..., 2 * half:]
        d = a - c
        ((_, prod),) = lookup_many([Request(d, _sign_table(b, _step_log2(half)), d)])
        p = torch.cat([c + prod[0], rest], dim=-1)
    return p


def argmax_to(x: Secret, dst: int, shift: int = 0) -> torch.Tensor | None:
    """The index of each row's max of [x] (last dim), opened to party ``dst`` only (module
    docstring): a long tensor (...,) on ``dst``, ``None`` elsewhere. ⌈log2 n⌉ + 1 rounds, 32 logged
    bytes per pair and 8 per row for every party. Domain |2^shift·x| < ``DOMAIN``."""
    n = x.shape[-1]
    b = max(1, math.ceil(math.log2(n)))
    top = packed_max(x, shift) << (64 - b)  # idx·2^(64−b): the logit's bits shift out of the ring
    opened = reveal_to(to_secret(top.squeeze(-1), precision=0), dst)
    if opened is None:
        return None
    return (opened.long() >> (64 - b)) & ((1 << b) - 1)
