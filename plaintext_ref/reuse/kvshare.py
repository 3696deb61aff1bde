"""KVShare: multi-tenant reuse of *similar* (not identical) earlier requests' KV, with dual-stage high-deviation
recompute and a cache-aware scheduler (Yang et al., arXiv 2503.16525); no code released, read from the paper.

Rule.
1. Match: the most similar cached request (``difflib.SequenceMatcher`` ratio over token ids) is aligned to the new
   prompt; equal runs of at least ``min_match`` tokens are *matched*: new slot i reuses the cached K/V of old slot
   j, its pre-RoPE key re-positioned from j to i.
2. Prefill stage of DHD (dual-stage high deviation): unmatched tokens and the last token are recomputed; of the
   matched ones, the top ⌊n_matched·ρ⌋ by check-layer value deviation ``Σ (V_new − V_old)²`` are recomputed too
   (the CacheBlend rule, :func:`~plaintext_ref.reuse.cacheblend.selective_prefill`).
3. Decode stage of DHD: every ``decode_every`` steps the reused (never recomputed) slots that received the most
   attention from the newest token (mean over layers and heads) — the top ⌊n_reused·ρ_d⌋ — are recomputed through
   every layer (``LayerRunner.refresh_slots``): new tokens shift attention onto stale entries, which are corrected.
4. Scheduler: waiting requests are served in descending order of cache hit rate (reusable tokens / prompt tokens),
   ties by arrival, with linear aging ``priority = hit_rate + aging · wait`` so a cold request is not starved.

Defaults: ρ = 0.16 and check layer 1 (CacheBlend's, since KVShare builds on it), ρ_d = 0.05, decode_every = 8,
min_match = 4, aging = 0.1 per second of simulated time. The paper's exact thresholds are unverified
(kv_methods.md §9.2); these are ours.

Deviations:
1. Token-level alignment with difflib (the earlier "semantic-aware" version's edit operations), not the paper's
   implementation; runs shorter than ``min_match`` are treated as unmatched (short coincidental matches carry
   context-dependent K/V).
2. Decode-stage selection uses received attention as the deviation proxy (the deviation itself is unknowable without
   recomputing); recomputed slots are refreshed through all layers, one refresh forward per trigger.
3. The scheduler is the priority rule plus a deterministic single-server simulation (:func:`simulate_schedule`), not
   a continuous-batching engine.

Checks: identical prompts reuse 100% and equal full prefill; a disjoint prompt recomputes everything (= full).
GQA: as CacheBlend. Needs: what CacheBlend needs, plus decode-step attention weights for stage 2.
MPC: not ported.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plaintext_ref.reuse.cacheblend import BlendResult, selective_prefill
from plaintext_ref.reuse.runner import LayerRunner, SeqKV, causal_rows
from plaintext_ref.reuse.store import KVStore, content_key, model_fingerprint

KIND = "kvshare-request"


def align(old: list[int], new: list[int], min_match: int = 4) -> Tensor:
    """For each new slot i the old slot it reuses, or −1: (len(new),) int64 from equal runs >= min_match tokens."""
    src = torch.full((len(new),), -1, dtype=torch.long)
    for a, b, size in difflib.SequenceMatcher(None, old, new, autojunk=False).get_matching_blocks():
        if size >= min_match:
            src[b:b + size] = torch.arange(a, a + size)
    return src


def similarity(old: list[int], new: list[int]) -> float:
    return difflib.SequenceMatcher(None, old, new, autojunk=False).ratio()


@dataclass
class ShareResult(BlendResult):
    source_key: str | None = None
    matched: int = 0


@dataclass
class KVShare:
    """KVShare over a :class:`KVStore` of earlier requests' caches.

    Parameters
    ----------
    recompute_ratio : float in [0, 1], default 0.16, prefill-stage ρ over matched tokens.
    check_layer : int, default 1.
    decode_ratio : float in [0, 1], default 0.05, decode-stage ρ_d over still-reused slots (0 = stage off).
    decode_every : int >= 1, default 8, decode steps between stage-2 refreshes.
    min_match : int >= 1, default 4, shortest aligned run reused.
    """

    recompute_ratio: float = 0.16
    check_layer: int = 1
    decode_ratio: float = 0.05
    decode_every: int = 8
    min_match: int = 4

    def __post_init__(self) -> None:
        for name in ("recompute_ratio", "decode_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"KVShare.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.decode_every < 1 or self.min_match < 1 or self.check_layer < 0:
            raise ValueError(f"KVShare: decode_every, min_match must be >= 1 and check_layer >= 0, got "
                             f"{self.decode_every}, {self.min_match}, {self.check_layer}")

    @staticmethod
    def remember(runner: LayerRunner, store: KVStore, ids: list[int], cache: SeqKV) -> str:
        """Put a finished request's prompt cache (slots 0..len(ids)−1) into the store; returns its key."""
        key = content_key(model_fingerprint(runner.model), KIND, [], ids)
        store.put(key, cache.take(torch.arange(len(ids), device=runner.device)), {"ids": list(ids), "kind": KIND})
        return key

    @staticmethod
    def best_match(runner: LayerRunner, store: KVStore, ids: list[int]) -> tuple[str, list[int]] | None:
        fp = model_fingerprint(runner.model)
        best, best_score = None, 0.0
        for key, entry in store.items():
            if entry.meta.get("kind") != KIND or entry.meta.get("model", fp) != fp:
                continue
            score = similarity(entry.meta["ids"], ids)
            if score > best_score:
                best, best_score = (key, entry.meta["ids"]), score
        return best

    def hit_rate(self, runner: LayerRunner, store: KVStore, ids: list[int]) -> float:
        """Fraction of ``ids`` that would reuse cached K/V (the scheduler's priority)."""
        match = self.best_match(runner, store, ids)
        return 0.0 if match is None else float((align(match[1], ids, self.min_match) >= 0).float().mean())

    @torch.no_grad()
    def prefill(self, runner: LayerRunner, store: KVStore, ids: list[int]) -> ShareResult:
        """Prefill ``ids`` reusing the most similar stored request (full prefill when there is none)."""
        dev = runner.device
        t = len(ids)
        match = self.best_match(runner, store, ids)
        src = align(match[1], ids, self.min_match).to(dev) if match else torch.full((t,), -1, device=dev)
        reusable = src >= 0
        if match:
            old_kv = store.get(match[0]).kv
            take = src.clamp(min=0)
            old = SeqKV([k[:, :, take] for k in old_kv.k], [v[:, :, take] for v in old_kv.v],
                        torch.arange(t, device=dev))           # re-positioned: old slot j -> new slot i
        else:
            zeros = torch.zeros(1, runner.n_kv, t, runner.head_dim, device=dev)
            old = SeqKV([zeros] * runner.num_layers, [zeros] * runner.num_layers, torch.arange(t, device=dev))
        res = selective_prefill(runner, torch.tensor(ids, device=dev), old, reusable, ~reusable,
                                self.recompute_ratio, self.check_layer)
        res.stats["matched"] = int(reusable.sum())
        return ShareResult(res.logits, res.cache, res.recomputed, res.deviation, res.stats,
                           None if match is None else match[0], int(reusable.sum()))

    @torch.no_grad()
    def decode(self, runner: LayerRunner, res: ShareResult, prompt: list[int], tokens: list[int]
               ) -> tuple[Tensor, dict]:
        """Teacher-forced decode of ``tokens`` after the KVShare prefill, with the decode stage of DHD.

        Returns log-probs (len(tokens), V) of each token given the ones before it, and counters
        (refreshes, refreshed slots).
        """
        dev = runner.device
        cache = res.cache
        ids = torch.tensor(prompt + tokens, device=dev)
        stale = torch.ones(cache.n, dtype=torch.bool, device=dev)
        stale[res.recomputed] = False
        rows, logits = [res.logits[0]], res.logits
        refreshes = refreshed = 0
        for i, tok in enumerate(tokens[:-1]):
            logits, cache, received = self._step(runner, cache, tok)
            rows.append(logits[0])
            stale = torch.cat([stale, torch.zeros(1, dtype=torch.bool, device=dev)])
            n_pick = int(int(stale.sum()) * self.decode_ratio)
            if self.decode_ratio > 0 and (i + 1) % self.decode_every == 0 and n_pick > 0:
                idx = received.masked_fill(~stale, float("-inf")).topk(n_pick).indices.sort().values
                cache = runner.refresh_slots(cache, ids[: cache.n], idx)
                stale[idx] = False
                refreshes, refreshed = refreshes + 1, refreshed + n_pick
        return torch.cat(rows).log_softmax(-1), dict(refreshes=refreshes, refreshed_slots=refreshed)

    @staticmethod
    def _step(runner: LayerRunner, cache: SeqKV, tok: int) -> tuple[Tensor, SeqKV, Tensor]:
        """One decode step that also returns the attention each slot received (T + 1,), mean over layers/heads."""
        dev = runner.device
        pos = cache.pos.max()[None] + 1
        all_pos = torch.cat([cache.pos, pos])
        h = runner.embed(torch.tensor([tok], device=dev))
        allowed = causal_rows(torch.tensor([cache.n], device=dev), cache.n + 1)
        ks, vs, received = [], [], torch.zeros(cache.n + 1, device=dev)
        for l in range(runner.num_layers):
            q, k, v = runner.qkv(l, h, pos)
            k_all, v_all = torch.cat([cache.k[l], k], 2), torch.cat([cache.v[l], v], 2)
            k_rot = runner.rope(k_all, all_pos)
            received += runner.attention_probs(q, k_rot, allowed)[0, :, 0].mean(0)
            h = runner.finish(l, h, runner.attend(q, k_rot, v_all, allowed))
            ks.append(k_all)
            vs.append(v_all)
        return runner.logits(h), SeqKV(ks, vs, all_pos), received / runner.num_layers


# ---------------------------------------------------------------------------- multi-tenant scheduling


@dataclass(frozen=True)
class Request:
    name: str
    arrival: float      # seconds
    tokens: int         # prompt length
    hit_rate: float     # fraction of the prompt served from cache


def priority(req: Request, now: float, aging: float) -> tuple[float, float, str]:
    """Sort key (smaller first): higher hit rate + aging·wait first, then earlier arrival, then name."""
    return (-(req.hit_rate + aging * (now - req.arrival)), req.arrival, req.name)


@dataclass
class ScheduleResult:
    order: list[str]
    ttft: dict[str, float] = field(default_factory=dict)   # queueing + prefill seconds per request

    @property
    def mean_ttft(self) -> float:
        return sum(self.ttft.values()) / len(self.ttft)


def simulate_schedule(requests: list[Request], seconds_per_token: float, recompute_ratio: float,
                      rule: str = "hit_rate", aging: float = 0.1) -> ScheduleResult:
    """One prefill server, non-preemptive. A request's prefill costs recomputed tokens × seconds_per_token, with
    recomputed = tokens·(1 − hit_rate) + ρ·tokens·hit_rate. rule: "fcfs" or "hit_rate" (KVShare's priority)."""
    if rule not in ("fcfs", "hit_rate"):
        raise ValueError(f"rule must be fcfs or hit_rate, got {rule!r}")
    pending = sorted(requests, key=lambda r: (r.arrival, r.name))
    now, waiting, out = 0.0, [], ScheduleResult([])
    while pending or waiting:
        if not waiting:
            now = max(now, pending[0].arrival)
        while pending and pending[0].arrival <= now:
            waiting.append(pending.pop(0))
        key = (lambda r: (r.arrival, r.name)) if rule == "fcfs" else (lambda r: priority(r, now, aging))
        req = min(waiting, key=key)
        waiting.remove(req)
        recomputed = req.tokens * (1 - req.hit_rate) + recompute_ratio * req.tokens * req.hit_rate
        now += recomputed * seconds_per_token
        out.order.append(req.name)
        out.ttft[req.name] = now - req.arrival
    return out
