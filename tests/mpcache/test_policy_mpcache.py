"""mpcache.policy.MPCache vs its plaintext twin (plaintext_ref.policies.mpcache), on real parties.

1. Components on fresh random secret-shared q/K at lengths 40, 100, 129, 300 (multiples and
   non-multiples of 16 and 32): cluster summaries (built once, then updated token by token), the
   selected clusters at each level, static top-K + order-preserving compaction, and attention on the
   selection. One-hots are decoded IN THE TEST ONLY (get_plain_text). A selection may differ only where
   the twin's scores at the top-k boundary lie within the fixed-point error (counted, reported).
2. tiny-llama end to end (layer 1 shares layer 0's indices): MPCache greedy tokens == plaintext
   runtime.generate with the twin, and teacher-forced logits within 1e-2 of the twin's (the random
   model's tokens barely depend on the cache; its logits do); the full budget == the full-cache tokens;
   prefill and decode open only the output tokens, to rank 0 (get_plain_text spied on, reveal_log).
3. SmolLM2 (slow): teacher-forced greedy choices == the twin's at >= 99 % of positions; a static set or a
   dynamic selection may differ from the twin's only at a fixed-point near-tie (opened in the test), which
   the twin then replays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import pytest
import torch

from benchmarks.selection_agreement import boundary_gap, compare_dynamic, mpc_picked, twin_levels
from launch.local import run_parties
from plaintext_ref.mpcache_config import MPCacheConfig
from plaintext_ref.policies import mpcache as twin
from tests.mpcache.helpers import spy_openings
from tests.mpcache.helpers import to_lists as _lists
from tests.mpcache.helpers import to_tensors as _tensors

pytestmark = pytest.mark.mpc
log = logging.getLogger(__name__)

LENGTHS = [40, 100, 129, 300]
B, HKV, G, D = 1, 2, 2, 16
SCORE_TOL = 5e-3  # fixed-point error of a cluster score (one truncated dot product over D = 16)
N_UPDATES = 3     # summaries built on T' − 3 tokens, then updated with the last 3


def _inputs(seed: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + t)
    k = torch.randn(B, HKV, t, D, generator=gen)
    v = torch.randn(B, HKV, t, D, generator=gen)
    q = torch.randn(B, HKV, G, D, generator=gen)
    return q, k, v


def _components_job(seed: int, cfg: MPCacheConfig, comparison: str) -> dict:
    """Runs on each party under ``ProtocolConfig.comparison``; decoding with get_plain_text is test-only."""
    from protocols.config import active_config, protocol_context
    with protocol_context(dataclasses.replace(active_config(), comparison=comparison)):
        return _components_runs(seed, cfg)


def _components_runs(seed: int, cfg: MPCacheConfig) -> dict:
    from mpcache.cache import SecretKVCache
    from mpcache.policy.base import compact_cache, static_onehot
    from protocols.cost import NullMeter
    from mpcache.policy.mpcache import attend_selected, build_summaries, select_clusters, update_summaries
    from protocols.compat import crypten

    out: dict = {}
    for t in LENGTHS:
        q, k, v = _inputs(seed, t)
        sk, sv, sq = (crypten.cryptensor(x, src=0) for x in (k, v, q))
        levels = build_summaries(sk[:, :, : t - N_UPDATES], cfg.cluster_sizes)
        for j in range(t - N_UPDATES, t):
            levels = update_summaries(levels, sk[:, :, j: j + 1], j, cfg.cluster_sizes)
        sel = select_clusters(sq.sum(dim=2), levels, cfg, t)
        cache = SecretKVCache()
        cache.append(sk, sv)
        att = attend_selected(sq, cache, sel, cfg.cluster_sizes[-1], NullMeter())
        # static: separated scores (a permutation) -> top-K one-hot rows -> compaction
        gen = torch.Generator().manual_seed(seed - t)
        scores = torch.randperm(t, generator=gen).float()[None] * 0.01
        n_keep = cfg.n_keep(t)
        compact_cache(cache, static_onehot(crypten.cryptensor(scores, src=0), n_keep))
        out[t] = {"summaries": [(a.get_plain_text(), b.get_plain_text()) for a, b in levels],
                  "picks": [None if p is None else p.get_plain_text() for p in sel.picks],
                  "ranges": sel.ranges, "attention": att.get_plain_text(),
                  "static_scores": scores, "kept_k": cache.keys.secret.get_plain_text(),
                  "kept_v": cache.values.secret.get_plain_text()}
    return _lists(out)


def _compare(t: int, res: dict, q: torch.Tensor, k: torch.Tensor, cfg: MPCacheConfig) -> int:
    """Assert MPC == twin at every level; return the number of (head, level) near-tie differences."""
    ties = 0
    levels = twin_levels(q.mean(dim=2), k, cfg)
    diverged = torch.zeros(B, HKV, dtype=torch.bool)
    for level, (want, score, cand, n) in enumerate(levels):
        c = want.shape[-1]
        last = level == len(levels) - 1
        got = mpc_picked(res["picks"][level], res["ranges"][level], (B, HKV, c), last, twin.forced_clusters(c, cfg))
        for b in range(B):
            for h in range(HKV):
                if diverged[b, h] or torch.equal(got[b, h], want[b, h]):
                    continue
                gap = boundary_gap(score[b, h][cand[b, h]], n)
                assert gap < SCORE_TOL, (f"T'={t} level {level} head {h}: MPC picked "
                                         f"{got[b, h].nonzero().flatten().tolist()}, twin "
                                         f"{want[b, h].nonzero().flatten().tolist()} (boundary gap {gap:.2e})")
                ties += 1
                diverged[b, h] = True  # deeper levels follow different parents: not comparable
    return ties


@pytest.mark.parametrize("comparison", ["crypten", "digits"])
def test_components_match_twin(comparison):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    cfg = MPCacheConfig(level_ratios=(0.5, 0.25))
    res = _tensors(run_parties(_components_job, seed, cfg, comparison, timeout=240)[0])
    ties = 0
    for t in LENGTHS:
        q, k, v = _inputs(seed, t)
        r = res[t]
        for level, s in enumerate(cfg.cluster_sizes):  # summaries: built + incrementally updated
            lo, hi = twin.cluster_minmax(k, s)
            assert torch.allclose(r["summaries"][level][0], lo, atol=1e-4), f"seed {seed} T'={t} r_min level {level}"
            assert torch.allclose(r["summaries"][level][1], hi, atol=1e-4), f"seed {seed} T'={t} r_max level {level}"
        ties_t = _compare(t, r, q, k, cfg)
        ties += ties_t
        # attention over the selection == masked attention with the twin's token mask
        mask = twin.dynamic_token_mask(q.reshape(B, HKV * G, D), k, cfg)  # (B, Hkv, T')
        if not ties_t:
            logits = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, :, None, :], -math.inf)
            want = logits.softmax(-1) @ v  # (B, Hkv, G, D)
            err = (r["attention"] - want).abs().max().item()
            assert err < 5e-3, f"seed {seed} T'={t}: attention on the selection off by {err}"
        # static top-K + compaction keep K[idx], V[idx] in position order
        idx = twin.static_keep(r["static_scores"], cfg.n_keep(t))[0]
        assert torch.allclose(r["kept_k"], k[:, :, idx], atol=2e-5), f"seed {seed} T'={t}: compacted K"
        assert torch.allclose(r["kept_v"], v[:, :, idx], atol=2e-5), f"seed {seed} T'={t}: compacted V"
    log.info("seed %d: %d near-tie selection differences", seed, ties)
    assert ties <= 2, f"seed {seed}: {ties} near-tie differences (random scores rarely tie)"


# ---- tiny-llama end to end ---------------------------------------------------------------------
PROMPT = ("The quick brown fox jumps over the lazy dog while the farmer counts sheep in the meadow; "
          "meanwhile, in the city, engineers design bridges, poets write sonnets about the sea, and "
          "children learn to read numbers such as 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 before lunch. ") * 2
N_NEW = 5  # 1 token from the prefill + 4 decode steps
LOGIT_ATOL = 1e-2  # as tests/mpcache/test_secure_model.py
# clusters of 16/8 so a ~60-token compacted cache has several competing clusters at both levels;
# share_start=0 makes layer 1 reuse layer 0's static set and selections (tiny-llama has 2 layers);
# window_tokens=8: the fixed observation window of config_for_budget (deviation 7), both sides
SMALL = MPCacheConfig(static_keep=0.5, cluster_sizes=(16, 8), level_ratios=(0.25, 0.25), share_start=0,
                      window_tokens=8)
FULL_BUDGET = MPCacheConfig(static_keep=1.0, cluster_sizes=(16, 8), level_ratios=(1.0, 1.0),
                            share_layers=False)


def _generate_job(ids: list[int], runs: list[tuple[MPCacheConfig | None, int]], forced: list[int]) -> dict:
    """Each party: greedy tokens per (config, n_new) (None = full cache); the first run is spied on.
    Then the first config teacher-forced on ``forced``: its logits per step (revealed: test-only)."""
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm
    from protocols.selection import reset_reveals, reveal_log

    rank = comm.get().get_rank()
    hf, _, config = load_model("tiny-llama")
    args = ModelArgs.from_hf(config)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    out: dict = {"tokens": []}
    for i, (cfg, n_new) in enumerate(runs):
        policy = session.policy() if cfg is None else session.policy("mpcache", config=cfg)
        reset_reveals()
        opened: list = []
        with spy_openings(opened) if i == 0 else contextlib.nullcontext():
            gen = session.generate(ids if rank == 0 else None, len(ids), n_new, policy=policy)
        out["tokens"].append(gen.tokens)
        if i == 0:
            out["opened"], out["audited"] = opened, reveal_log()
    seq = session.sequence(session.policy("mpcache", config=runs[0][0]))
    n, model = len(ids), session.model
    steps = [model.forward(share_tokens(ids if rank == 0 else None, n, args.vocab_size), torch.arange(n), seq)]
    out["picks"] = []
    for j, t in enumerate(forced):
        x = share_tokens([t] if rank == 0 else None, 1, args.vocab_size)
        steps.append(model.forward(x, torch.tensor([n + j]), seq))
        sel = seq.caches[0].aux["selection"]  # layer 1 shares it
        out["picks"].append(([None if p is None else p.get_plain_text() for p in sel.picks], sel.ranges))
    out["static"] = seq.caches[0].aux["static"].get_plain_text()[0].argmax(-1)  # layer 0 (= 1)
    out["logits"] = [x.get_plain_text()[0, 0] for x in steps]
    return _lists(out)


class _Recorder(twin.MPCache):
    """The twin, recording its layer-0 static scores and each decode step's (q, K) for ``_compare``."""

    def on_prefill(self, ctx, kv):
        out = super().on_prefill(ctx, kv)
        if ctx.layer_idx == 0:
            w = self.config.window(kv.n)
            attn = twin.window_attention(ctx.q[:, :, -w:], kv.k, ctx.scaling, kv.valid)
            self.static_scores, self.steps = twin.static_scores(attn)[0], []
            self.kept = out.aux[twin.STATIC][0]  # (K,) positions kept at layer 0
        return out

    def select(self, ctx, kv):
        if ctx.phase == "decode" and ctx.layer_idx == 0:
            self.steps.append((ctx.q[:, :, -1].view(B, HKV, G, D), kv.k.clone()))
        return super().select(ctx, kv)


def test_tiny_llama_tokens_match_twin_and_full_budget():
    from plaintext_ref.models import load_model
    from plaintext_ref.runtime import generate as plain_generate
    from plaintext_ref.runtime import teacher_forced_logits

    hf, tok, _ = load_model("tiny-llama")
    ids = tok(PROMPT)["input_ids"][:120]
    # full budget vs full cache: one decode step each (the argmax over V = 49152 dominates the run time)
    forced = [42, 4242, 777, 1234]
    r0, r1 = (_tensors(r) for r in run_parties(_generate_job, ids, [(SMALL, N_NEW), (FULL_BUDGET, 2), (None, 2)],
                                                  forced, timeout=900))
    want = plain_generate(hf, torch.tensor([ids]), twin.MPCache(config=SMALL), max_new_tokens=N_NEW,
                          eos_token_id=[])[0, len(ids):].tolist()
    mpc, mpc_full_budget, mpc_full = r0["tokens"]
    log.info("MPCache %s, twin %s, full budget %s, full %s", mpc, want, mpc_full_budget, mpc_full)
    assert mpc == want, f"MPC MPCache {mpc} != plaintext twin {want}"
    # the random tiny model's greedy tokens barely depend on the cache: compare teacher-forced logits too
    x = torch.tensor([ids + forced + [0]])  # row j: logits after ids + forced[:j]
    rec = _Recorder(config=SMALL)
    twin_logits = teacher_forced_logits(hf, x, len(ids), rec)[0]  # (1 + 4, V)
    full_logits = teacher_forced_logits(hf, x, len(ids), None)[0]
    # selections: identical, or different only at a near-tie of the twin's scores (then stop comparing)
    ranked = rec.static_scores.sort(descending=True).values
    k = SMALL.n_keep(len(ids))
    rows = len(forced) + 1
    if not torch.equal(r0["static"], rec.kept):
        assert ranked[k - 1] - ranked[k] < 1e-2, f"static sets differ: {r0['static']} vs {rec.kept}"
        rows = 1
    for j, (picks, ranges) in enumerate(r0["picks"]):
        if j + 1 < rows and _compare(-1, {"picks": picks, "ranges": ranges}, *rec.steps[j], SMALL):
            rows = j + 1  # a near-tie flipped a cluster: later logits are not comparable
    mpc_logits = torch.stack(r0["logits"])
    err = (mpc_logits[:rows] - twin_logits[:rows]).abs().max().item()
    gap = (twin_logits - full_logits).abs().max().item()
    log.info("teacher-forced logits: %d/%d rows comparable; MPC vs twin max |Δ| %.2e (per row %s); twin vs "
             "full cache %.2e", rows, len(forced) + 1, err, (mpc_logits - twin_logits).abs().amax(-1).tolist(), gap)
    # rows after a tie-explained flip are not compared (the random model's static scores often tie)
    assert err < LOGIT_ATOL < gap / 4, f"MPC vs twin logits |Δ| {err:.3g} (twin vs full {gap:.3g})"
    assert mpc_full_budget == mpc_full, f"full-budget MPCache {mpc_full_budget} != full cache {mpc_full}"
    assert r1["tokens"] == [None] * 3, "the model owner must not learn the tokens"
    for r in (r0, r1):  # only the N_NEW output tokens were opened, each (1, 1), to rank 0
        assert r["opened"] == [(0, (1, 1))] * N_NEW, r["opened"]
        assert r["audited"] == [(0, (1, 1))] * N_NEW, r["audited"]


# ---- SmolLM2 (slow) ------------------------------------------------------------------------------
SMOL = MPCacheConfig(static_keep=0.5, cluster_sizes=(16, 8), level_ratios=(0.5, 0.25))
SMOL_NEW = 8
# A static set may differ from the twin's only at a near-tie: every swapped pair's twin scores (Σ of
# ≤ H·W = 180 window probabilities) within this of each other. The MPC's static scores on its own
# (drifted) inputs lie within ≈ 1.5e-3 of the twin's at the top-K boundary on this prompt, where the
# twin's boundary gaps go down to 6e-4 (layer 6), so the kept set there is a coin flip between runs.
STATIC_TIE = 1e-2


def _smollm2_forced_job(ids: list[int], forced: list[int]) -> tuple[list[int], dict, dict] | None:
    """MPC MPCache on SmolLM2, teacher-forced on the twin's tokens: the MPC greedy choice per position,
    and (AUDIT, test only: opened to both parties) the kept static set of every layer that selects and,
    per (decode step, selecting layer), its dynamic selection: (picks per level, ranges, scores)."""
    from mpcache.generate import next_token, share_tokens
    from mpcache.model import ModelArgs
    from mpcache.policy import MPCache
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    class Audited(MPCache):
        def __init__(self, meter, config: MPCacheConfig) -> None:
            super().__init__(meter, config)
            self.kept: dict[int, list] = {}
            self.dynamic: dict[tuple[int, int], tuple] = {}
            self.step = 0

        def after_prefill(self, layer, cache, p_win, partner) -> None:
            super().after_prefill(layer, cache, p_win, partner)
            if partner is None and cache.aux["static"] is not None:
                self.kept[layer] = cache.aux["static"].get_plain_text().argmax(-1).tolist()  # lists: picklable

        def decode(self, layer, q, cache, partner):
            out = super().decode(layer, q, cache, partner)
            if partner is None:
                sel = cache.aux["selection"]
                self.dynamic[(self.step, layer)] = (
                    [None if p is None else p.get_plain_text().tolist() for p in sel.picks], sel.ranges,
                    sel.scores.get_plain_text().tolist())
            return out

    rank = comm.get().get_rank()
    hf, _, config = load_model("smollm2")
    args = ModelArgs.from_hf(config)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    del hf
    model, meter = session.model, session.meter
    policy = Audited(meter, SMOL)
    seq = session.sequence(policy)
    n = len(ids)
    logits = model.forward(share_tokens(ids if rank == 0 else None, n, args.vocab_size), torch.arange(n), seq)
    got = [next_token(logits, frozenset(), meter)[1]]
    for i, tok in enumerate(forced[:-1]):
        policy.step = i + 1
        x = share_tokens([tok] if rank == 0 else None, 1, args.vocab_size)
        got.append(next_token(model.forward(x, torch.tensor([n + i]), seq), frozenset(), meter)[1])
    return (got, policy.kept, policy.dynamic) if rank == 0 else None


class _TwinReplayingTies(twin.MPCache):
    """The twin keeping the MPC's static set where the two differ only at a near-tie (``STATIC_TIE``),
    and the MPC's dynamic selection where it differs from the twin's own only at a fixed-point tie: the
    twin's scores at the top-k boundary closer than twice the largest |MPC − twin| score of that
    selection (``benchmarks.selection_agreement.Verdict``; the MPC scores its own inputs, which drift from
    the twin's through the layers below). Records each static layer's largest swapped-pair gap in
    ``gaps`` and every differing dynamic selection's verdict in ``verdicts``."""

    def __init__(self, config: MPCacheConfig, mpc_kept: dict[int, list], mpc_dynamic: dict) -> None:
        super().__init__(config=config)
        self.mpc_kept, self.mpc_dynamic, self.gaps = mpc_kept, mpc_dynamic, {}
        self.steps: dict[int, int] = {}
        self.verdicts: dict[tuple[int, int], list] = {}

    def keep(self, scores: torch.Tensor, n_keep: int, layer_idx: int) -> torch.Tensor:
        own = super().keep(scores, n_keep, layer_idx)
        mpc = torch.tensor(self.mpc_kept[layer_idx], device=own.device)
        for b in range(own.shape[0]):
            only_mpc = sorted(set(mpc[b].tolist()) - set(own[b].tolist()))
            if only_mpc:
                only_twin = sorted(set(own[b].tolist()) - set(mpc[b].tolist()))
                gap = float(scores[b, only_twin].max() - scores[b, only_mpc].min())
                self.gaps[layer_idx] = max(self.gaps.get(layer_idx, 0.0), gap)
        return mpc

    def select(self, ctx, kv):
        if ctx.phase != "decode" or ctx.partner is not None:
            return super().select(ctx, kv)
        step = self.steps[ctx.layer_idx] = self.steps.get(ctx.layer_idx, 0) + 1
        picks, ranges, scores = self.mpc_dynamic[(step, ctx.layer_idx)]
        b, hkv, _, d = kv.k.shape
        q_kv = ctx.q[:, :, -1].float().view(b, hkv, -1, d).sum(dim=2) * ctx.scaling  # the MPC's Σ_g q/√D
        picks = [None if p is None else torch.tensor(p) for p in picks]
        verdicts = [v for row in compare_dynamic(q_kv.cpu(), kv.k.float().cpu(), picks, ranges,
                                                 torch.tensor(scores), self.config) for v in row]
        if all(v.status == "same" for v in verdicts):
            return super().select(ctx, kv)
        self.verdicts[(step, ctx.layer_idx)] = [v for v in verdicts if v.status != "same"]
        c = self.config.n_clusters(kv.n, len(self.config.cluster_sizes) - 1)
        picked = mpc_picked(picks[-1], ranges[-1], (b, hkv, c), True, twin.forced_clusters(c, self.config))
        mask = twin.cluster_token_mask(picked.to(kv.k.device), self.config.cluster_sizes[-1], kv.n)[:, :, None, :]
        kv.aux[twin.DYNAMIC] = mask
        return mask if kv.valid is None else mask & kv.valid[:, :, None, :]


@pytest.mark.slow
def test_smollm2_matches_twin_positions():
    """MPC greedy choices == the twin's at >= 99 % of teacher-forced positions, the twin replaying the MPC's
    static set and dynamic selection at each fixed-point near-tie (any other difference fails). On this
    prompt one dynamic selection is a coin flip: step 2, layer 14, level 2, KV head 0, where the twin's two
    best candidate clusters score 3.974 and 3.938 (mean query · k̃) and the MPC's inputs drift by ≈ 0.03
    from the twin's through the 14 layers below; taking the other cluster there moves the next logits by
    up to 3.4, so without the replay the run flips a 0.05-margin token about half of the time."""
    from plaintext_ref.models import load_model
    from plaintext_ref.runtime import generate as plain_generate
    from plaintext_ref.runtime import teacher_forced_logits

    hf, tok, _ = load_model("smollm2")
    ids = tok(PROMPT)["input_ids"][:100]
    want = plain_generate(hf, torch.tensor([ids]), twin.MPCache(config=SMOL), max_new_tokens=SMOL_NEW,
                          eos_token_id=[])[0, len(ids):].tolist()
    got, mpc_kept, mpc_dynamic = run_parties(_smollm2_forced_job, ids, want, timeout=3000)[0]
    assert sorted(mpc_kept) == [l for l in range(30) if SMOL.shares_with(l) is None], sorted(mpc_kept)
    ref = _TwinReplayingTies(SMOL, mpc_kept, mpc_dynamic)
    logits = teacher_forced_logits(hf, torch.tensor([ids + want]), len(ids), ref)[0]
    expect = logits.argmax(-1).tolist()
    log.info("static sets that differ from the twin's (largest swapped gap per layer): %s", ref.gaps)
    log.info("dynamic selections that differ from the twin's ((step, layer): (status, gap, eps)): %s",
             {k: [(v.status, round(v.gap, 4), round(v.eps, 4)) for v in vs] for k, vs in ref.verdicts.items()})
    assert max(ref.gaps.values(), default=0.0) < STATIC_TIE, f"static sets differ beyond a near-tie: {ref.gaps}"
    bad = {k: vs for k, vs in ref.verdicts.items() if any(v.status != "tie" for v in vs)}
    assert not bad, f"dynamic selections differ beyond a fixed-point tie: {bad}"
    match = sum(g == w for g, w in zip(got, expect)) / len(expect)
    top2 = logits.topk(2, dim=-1).values
    log.info("SmolLM2 MPCache vs twin (teacher-forced): %.1f%% of %d positions match (%s vs %s; margins %s)",
             100 * match, len(expect), got, expect, (top2[:, 0] - top2[:, 1]).tolist())
    assert match >= 0.99, f"only {match:.1%} of positions match: MPC {got} vs twin {expect}"
