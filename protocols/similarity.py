"""MPCache's MPC-friendly cluster similarity on secret keys (mpcache.md §4.1–4.3).

Clusters are ``s`` consecutive cached tokens; each is summarised by its per-channel min and max.
The score of cluster c for query q is the linearised Quest bound
``Σ_i α q_i r^max_{c,i} + (1−α) q_i r^min_{c,i} = q · k̃_c`` with ``k̃_c = α r^max_c + (1−α) r^min_c``,
so scoring costs one secret dot product per cluster and no max.
Twin: ``plaintext_ref.policies.mpcache`` (same padding rule: the last, partial cluster summarises its
real tokens only — deviation 6 of ``plaintext_ref.mpcache_config``; the authors pad it with earlier tokens).
"""
from __future__ import annotations

import math

from protocols.compat import crypten
from protocols.config import active_config
from protocols.selection import maximum, tree_max
from protocols.types import Secret


def cluster_minmax(K: Secret, s: int) -> tuple[Secret, Secret]:
    """``([r_min], [r_max])`` of K (..., T, D), each (..., C, D), C = ⌈T/s⌉.

    Steps: pad the last cluster with copies of its own last real token (local; duplicates do not
    change a min or max), view as (..., C, s, D), then one knockout tree over s on the stacked
    ``[K] ‖ −[K]`` gives max and −min together.
    Public: shapes, s. Cost: ⌈log2 s⌉·9 rounds (s = 32: 45); 2·C·s·D comparisons and products in all
    (≈ 930 bytes per key element). Error: exact (selection).
    """
    T, D = K.size(-2), K.size(-1)
    C = math.ceil(T / s)
    pad = C * s - T
    if pad:
        K = crypten.cat([K] + [K[..., T - 1 : T, :]] * pad, dim=-2)
    blocks = K.view(*K.size()[:-2], C, s, D).transpose(-1, -2)  # (..., C, D, s)
    both = tree_max(crypten.stack([blocks, -blocks]), dim=-1)  # (2, ..., C, D)
    return -both[1], both[0]


def update_last_cluster(rmin: Secret, rmax: Secret, k_new: Secret, t: int, s: int
                        ) -> tuple[Secret, Secret]:
    """Summaries after appending ``[k_new]`` (..., 1, D) as token ``t`` (0-based) of the cache.

    If t starts a cluster (t % s == 0) a new row ``r_min = r_max = k_new`` is appended (free);
    otherwise only the last row is updated: ``min(r_min, k)``, ``max(r_max, k)`` in one batched
    ``maximum`` of 2·D elements (2 rounds with digit comparisons, 9 with CrypTen's). Equals
    ``cluster_minmax`` of the grown cache.
    Public: t, s, shapes.
    """
    if t % s == 0:
        return crypten.cat([rmin, k_new], dim=-2), crypten.cat([rmax, k_new], dim=-2)
    last = crypten.stack([-rmin[..., -1:, :], rmax[..., -1:, :]])  # (2, ..., 1, D)
    new = crypten.stack([-k_new, k_new])
    upd = maximum(last, new)
    return (crypten.cat([rmin[..., :-1, :], -upd[0]], dim=-2),
            crypten.cat([rmax[..., :-1, :], upd[1]], dim=-2))


def representative_keys(rmin: Secret, rmax: Secret, alpha: float) -> Secret:
    """``[k̃] = α[r_max] + (1−α)[r_min]`` (..., C, D): coefficients rounded to 2^−coef_frac_bits, one
    exact truncation (1 round, ``protocols.nonlinear._dot_public``)."""
    from protocols.nonlinear import _dot_public
    return _dot_public([rmax, rmin], [alpha, 1 - alpha], active_config().coef_frac_bits)


def cluster_scores(q: Secret, krep: Secret) -> Secret:
    """``[q · k̃_c]``: q (..., D), k̃ (..., C, D) -> (..., C).

    Cost: 1 round, one secret dot product per cluster (Beaver: 16·(|q| + |k̃|) bytes). Error: one
    fixed-point product (±1e-4 relative). No 1/√D: irrelevant to ranking.
    """
    return krep.matmul(q.unsqueeze(-1)).squeeze(-1)
