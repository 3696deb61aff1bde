"""MPC baselines (StreamingLLM, H2O, SnapKV, Quest) vs plaintext statements of the same rules, on real parties.

Static evictions (H2O, SnapKV) and Quest's page selection run on fresh random secret-shared inputs;
the compacted caches / gathered attention are decoded IN THE TEST ONLY and compared with torch. Scores
are separated (random permutations), so no fixed-point tie can flip a selection. StreamingLLM runs
end to end on tiny-llama against the plaintext twin's greedy tokens.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from launch.local import run_parties
from tests.mpcache.helpers import to_lists as _lists
from tests.mpcache.helpers import to_tensors as _tensors

pytestmark = pytest.mark.mpc

B, HKV, G, D = 1, 2, 2, 8


def _window_probs(gen: torch.Generator, w: int, t0: int) -> torch.Tensor:
    """Random window 'probabilities' (B, Hkv, G, W, T0) whose head/window sums are well separated."""
    base = torch.randperm(t0, generator=gen).float() / t0  # distinct token importances
    return base.expand(B, HKV, G, w, t0) / (HKV * G * w) + 1e-5 * torch.rand(B, HKV, G, w, t0, generator=gen)


def _static_job(seed: int, t0: int) -> dict:
    from mpcache.cache import SecretKVCache
    from mpcache.policy import H2O, SnapKV
    from protocols.compat import crypten

    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, HKV, t0, D, generator=gen), torch.randn(B, HKV, t0, D, generator=gen)
    out = {"k": k, "v": v}
    for policy in (H2O(budget=0.25), SnapKV(budget=0.5, window_size=8)):
        w = policy.window(t0)
        p = _window_probs(gen, w, t0)
        cache = SecretKVCache()
        cache.append(crypten.cryptensor(k, src=0), crypten.cryptensor(v, src=0))
        policy.after_prefill(0, cache, crypten.cryptensor(p, src=0), None)
        out[policy.name] = {"p": p, "k": cache.keys.secret.get_plain_text(),
                            "v": cache.values.secret.get_plain_text()}
    return _lists(out)


def _plain_static(name: str, p: torch.Tensor, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions (ascending) by the documented rule of each baseline, in plaintext, and the scores."""
    s = p.sum(dim=(1, 2, 3))[0]  # (T0,)
    if name == "h2o":
        keep_n = int(t0 * 0.25)
        recent = keep_n // 2
        protect = torch.arange(t0) >= t0 - recent
    else:
        w = p.shape[-2]
        keep_n = max(w, int(t0 * 0.5))
        prefix = F.avg_pool1d(s[None, None, : t0 - w], 7, 1, 3, count_include_pad=True)[0, 0] * 7
        s = torch.cat([prefix, s[t0 - w:]])
        protect = torch.arange(t0) >= t0 - w
    s = s + protect.float() * 1e4
    return s.topk(keep_n).indices.sort().values, s


@pytest.mark.parametrize("t0", [40, 129])
def test_static_baselines_keep_plaintext_set(t0):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    r = _tensors(run_parties(_static_job, seed, t0, timeout=240)[0])
    for name in ("h2o", "snapkv"):
        idx, scores = _plain_static(name, r[name]["p"], t0)
        # positions the MPC kept, read off the compacted keys (rows are distinct random vectors)
        got = (r[name]["k"][0, 0, :, None] - r["k"][0, 0, None]).abs().amax(-1).argmin(-1)
        assert torch.equal(got, got.sort().values), f"seed {seed} {name}: kept rows out of position order"
        if not torch.equal(got, idx):  # allowed only at a near-tie of the (pooled) plaintext scores
            flipped = torch.tensor(sorted(set(got.tolist()) ^ set(idx.tolist())))
            kth = scores.sort(descending=True).values[len(idx) - 1]
            assert (scores[flipped] - kth).abs().max() < 1e-3, f"seed {seed} {name}: kept {got} != {idx}"
        assert torch.allclose(r[name]["k"], r["k"][:, :, got], atol=2e-5), f"seed {seed} {name}: kept K"
        assert torch.allclose(r[name]["v"], r["v"][:, :, got], atol=2e-5), f"seed {seed} {name}: kept V"


def _quest_job(seed: int, lengths: list[int], budget: int) -> dict:
    from mpcache.cache import SecretKVCache
    from mpcache.policy import Quest
    from protocols.compat import crypten

    out = {}
    for t in lengths:
        gen = torch.Generator().manual_seed(seed + t)
        k, v = torch.randn(B, HKV, t, D, generator=gen), torch.randn(B, HKV, t, D, generator=gen)
        q = torch.randn(B, HKV, G, D, generator=gen)
        policy = Quest(budget=budget)
        cache = SecretKVCache()
        sk, sv = crypten.cryptensor(k, src=0), crypten.cryptensor(v, src=0)
        cache.append(sk[:, :, : t - 1], sv[:, :, : t - 1])
        policy.after_prefill(0, cache, None, None)
        cache.append(sk[:, :, t - 1:], sv[:, :, t - 1:])  # one decode step: summaries updated
        y = policy.decode(0, crypten.cryptensor(q, src=0), cache, None)
        out[t] = {"q": q, "k": k, "v": v, "y": y.get_plain_text()}
    return _lists(out)


def test_quest_selects_exact_bound_pages():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    lengths, budget, page = [40, 129], 48, 16
    res = run_parties(_quest_job, seed, lengths, budget, timeout=240)[0]
    for t in lengths:
        r = _tensors(res[t])
        q, k, v = r["q"], r["k"], r["v"]
        c = math.ceil(t / page)
        kp = F.pad(k, (0, 0, 0, c * page - t), value=math.nan).view(B, HKV, c, page, D)
        mx, mn = kp.nan_to_num(-1e9).amax(3), kp.nan_to_num(1e9).amin(3)  # (B, Hkv, C, D)
        bound = torch.maximum(q[:, :, :, None] * mx[:, :, None], q[:, :, :, None] * mn[:, :, None]).sum((-1, 2))
        n_pages = min(max(3, budget // page), c)
        pages = bound.topk(n_pages, dim=-1).indices  # (B, Hkv, k)
        mask = torch.zeros(B, HKV, c, dtype=torch.bool).scatter(-1, pages, True)
        mask = mask.repeat_interleave(page, dim=-1)[..., :t]
        logits = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, :, None], -math.inf)
        want = logits.softmax(-1) @ v
        err = (r["y"] - want).abs().max().item()
        assert err < 5e-3, f"seed {seed} T'={t}: Quest attention off by {err}"


def _streaming_job(ids: list[int], n_new: int, n_sink: int, n_recent: int) -> list[int] | None:
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, _, config = load_model("tiny-llama")
    session = PrivateSession(hf.state_dict() if rank == 1 else None, ModelArgs.from_hf(config))
    policy = session.policy("streaming_llm", n_sink=n_sink, n_recent=n_recent)
    return session.generate(ids if rank == 0 else None, len(ids), n_new, policy=policy).tokens


def test_streaming_llm_tokens_match_twin():
    from plaintext_ref.models import load_model
    from plaintext_ref.policies.streaming_llm import StreamingLLM
    from plaintext_ref.runtime import generate as plain_generate

    hf, tok, _ = load_model("tiny-llama")
    ids = tok("one two three four five six seven eight nine ten " * 4)["input_ids"][:40]
    got = run_parties(_streaming_job, ids, 3, 4, 12, timeout=300)[0]
    want = plain_generate(hf, torch.tensor([ids]), StreamingLLM(n_sink=4, n_recent=12), max_new_tokens=3,
                          eos_token_id=[])[0, len(ids):].tolist()
    assert got == want, f"MPC StreamingLLM {got} != plaintext {want}"


def test_cli_options_build_every_policy_with_public_budgets():
    from mpcache.launch import parse
    from mpcache.policy import policy_names
    from mpcache.options import POLICIES

    assert sorted(POLICIES) == policy_names()
    opts, _ = parse(["--kv-policy", "mpcache", "--cluster-sizes", "16,8", "--level-ratios", "0.5,0.25",
                     "--static-keep", "0.5", "--no-share"])
    policy = opts.kv.build()
    cfg = policy.config
    assert (cfg.cluster_sizes, cfg.level_ratios, cfg.static_keep, cfg.share_layers) == ((16, 8), (0.5, 0.25), 0.5, False)
    d = policy.describe(200, 5)  # K = 100 kept, T' = 104 at the last step
    assert d["cache_after_prefill"] == 100 and d["attended_last_step"] == cfg.selected_tokens(104)
    assert d["budget"] == round(cfg.selected_tokens(104) / 204, 4)
    with pytest.raises(SystemExit):
        parse(["--kv-policy", "mpcache", "--level-ratios", "0.5"])  # one ratio for two levels
    for name, want in [("streaming_llm", 4 + 16 + 1), ("h2o", 40 + 4), ("quest", 48), ("snapkv", 200 + 4)]:
        extra = {"streaming_llm": ["--n-recent", "16"], "h2o": [], "quest": ["--budget", "48"], "snapkv": []}[name]
        kv = parse(["--kv-policy", name, *extra])[0].kv.build().describe(200, 5)
        assert kv["attended_last_step"] == want, (name, kv)
