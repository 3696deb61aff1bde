"""Quest on shares, WITHOUT MPCache's MPC-friendly optimisations (Tang et al., ICML 2024, arXiv 2406.10774).

The honest "naive port" baseline of MPCache (its Fig. 1(d)): query-aware page selection every decode
step with the exact Quest bound, a token-level gather and no hierarchy, no static eviction, no sharing.
Rule, per KV head and step: pages of P consecutive cached tokens with secret per-channel [m], [M]
(built after the prompt, the last page updated per token); bound U_c = Σ_g Σ_i max(q_gi M_ci, q_gi m_ci)
(2·G·C·D secret products and G·C·D comparisons: the "sum" GQA reduction of the twin's upper bounds);
[O] = top-k_p one-hot rows (k_p = min(max(3, budget // P), C), no forced pages); token-level one-hot
[E] = [O] ⊗ I_P (k_p·P × T', local); [K_sel] = [E][K], [V_sel] = [E][V] (open |E| = k_p·P·T' each);
attention softmax(q [K_sel]ᵀ) [V_sel] (two Beaver products) over the k_p·P gathered tokens; slots of a
selected partial last page get the logit −1024 through [O]·pad (local).
Defaults: page size 16, budget 1024 tokens (mit-han-lab/Quest scripts).
Deviations from the twin ``plaintext_ref.policies.quest``: 1. per KV head with summed bounds (twin
default: per query head); 2. no dense layers 0 and 1 (every layer selects); 3. prefill is dense (as Quest).
Public: T', P, k_p. Secret: bounds, [O], [E]. Nothing is revealed.
"""
from __future__ import annotations

import math

import torch

from mpcache.cache import SecretKVCache
from mpcache.policy.base import Meter, MPCPolicy, new_key, register
from mpcache.policy.mpcache import build_summaries, pad_logit, update_summaries
from protocols.compat import crypten
from protocols.fixed_mask import fixed_matmul
from protocols.nonlinear import softmax
from protocols.selection import mul_public_int, topk_onehot
from protocols.types import Secret


def quest_bound(q: Secret, rmin: Secret, rmax: Secret) -> Secret:
    """[U_c] = Σ_g Σ_i max(q_gi M_ci, q_gi m_ci): q (B, Hkv, G, D), m/M (B, Hkv, C, D) -> (B, Hkv, C).

    Cost: one batched Beaver product of 2·G·C·D elements, one comparison of G·C·D elements.
    """
    qq = q.unsqueeze(-2)  # (B, Hkv, G, 1, D)
    prods = crypten.stack([rmax.unsqueeze(2), rmin.unsqueeze(2)]) * crypten.stack([qq, qq])  # (2, B, Hkv, G, C, D)
    a, b = prods[0], prods[1]
    best = b + a.ge(b) * (a - b)
    return best.sum(dim=-1).sum(dim=2)


def token_onehot(onehot: Secret, page: int, length: int) -> Secret:
    """[E] = [O] ⊗ I_page truncated to the cache: (B, Hkv, k, C) -> (B, Hkv, k·page, T'). Local."""
    b, h, k, c = onehot.shape
    e = onehot.view(b, h, k, 1, c, 1).expand(b, h, k, page, c, page)
    e = mul_public_int(e, torch.eye(page, dtype=torch.long).view(1, 1, 1, page, 1, page))
    return e.reshape(b, h, k * page, c * page)[..., :length]


class Quest(MPCPolicy):
    name = "quest"

    def __init__(self, meter: Meter | None = None, budget: int = 1024, page_size: int = 16) -> None:
        if budget < 1 or page_size < 1:
            raise ValueError(f"need budget >= 1 and page_size >= 1, got {budget}, {page_size}")
        self.budget, self.page_size = int(budget), page_size
        super().__init__(meter)

    def n_pages(self, length: int) -> int:
        return min(max(3, self.budget // self.page_size), math.ceil(length / self.page_size))

    def after_prefill(self, layer: int, cache: SecretKVCache, p_win: Secret | None,
                      partner: SecretKVCache | None) -> None:
        """Page min/max summaries into ``cache.aux["pages"]``."""
        with self.meter.stage("kv_select"):
            cache.aux["pages"] = build_summaries(cache.keys.secret, (self.page_size,))

    def decode(self, layer: int, q: Secret, cache: SecretKVCache, partner: SecretKVCache | None) -> Secret:
        t, p = cache.length, self.page_size
        c, k = math.ceil(t / p), self.n_pages(t)
        with self.meter.stage("kv_select"):
            cache.aux["pages"] = update_summaries(cache.aux["pages"], new_key(cache), t - 1, (p,))
            (rmin, rmax), = cache.aux["pages"]
            o = topk_onehot(quest_bound(q, rmin, rmax), k, sort_by_index=True)  # (B, Hkv, k, C)
            e = token_onehot(o, p, t)  # (B, Hkv, k·P, T')
        with self.meter.stage("attention"):
            k_sel, v_sel = fixed_matmul(e, cache.keys), fixed_matmul(e, cache.values)  # (B, Hkv, k·P, D)
            logits = q.matmul(k_sel.transpose(-1, -2))  # (B, Hkv, G, D) x (B, Hkv, D, k·P)
            pad = torch.zeros(c, p, device=q.device)
            pad.view(-1)[t:] = 1.0  # slots past T' in the last page
            if t % p:
                flag = o.matmul(pad)  # (B, Hkv, k, P): 1 on gathered padding slots (public matmul: local)
                bias = mul_public_int(flag, int(pad_logit() * logits.encoder.scale))
                bias.encoder = logits.encoder
                logits = logits + bias.flatten(-2).unsqueeze(2)
        with self.meter.stage("softmax"):
            probs = softmax(logits, dim=-1)
        with self.meter.stage("attention"):
            return probs.matmul(v_sel)  # (B, Hkv, G, k·P) x (B, Hkv, k·P, D) -> (B, Hkv, G, D)

    def describe(self, prompt_len: int, n_new: int = 1) -> dict:
        t = prompt_len + max(n_new - 1, 0)
        attended = min(t, self.n_pages(t) * self.page_size)
        return {"policy": self.name, "cache_after_prefill": prompt_len, "attended_last_step": attended,
                "budget": round(attended / t, 4), "page_size": self.page_size, "pages": self.n_pages(t)}


register("quest", Quest)
