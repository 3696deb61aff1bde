"""plaintext_ref.reuse: Continuum's TTL rule and simulator, Elastic-Cache on a seeded tiny diffusion LM."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from plaintext_ref.reuse import ElasticCache, SimConfig, ToolTTL, make_workload, simulate
from plaintext_ref.reuse.diffusion_lm import MASK_ID, DiffusionLM, DLMConfig, diffusion_loss, encode, generate

SMALL = SimConfig(n_programs=25, arrival_rate=0.8, memory_tokens=60_000)


# ---------------------------------------------------------------- Continuum


def test_simulator_is_deterministic_per_seed():
    a, b = simulate(SMALL, "continuum", seed=3), simulate(SMALL, "continuum", seed=3)
    assert a.jct == b.jct and a.ttls == b.ttls and a.evictions == b.evictions
    assert make_workload(SMALL, 3) == make_workload(SMALL, 3) != make_workload(SMALL, 4)
    assert simulate(SMALL, "continuum", seed=4).jct != a.jct


def test_ttl_zero_reproduces_lru_and_pins_respect_memory():
    for seed in range(2):
        lru = simulate(SMALL, "lru", seed)
        assert simulate(SMALL, "continuum_ttl_only", seed, fixed_ttl=0.0).jct == lru.jct
    forever = simulate(SMALL, "pin_forever", 0)
    assert forever.max_memory <= SMALL.memory_tokens and forever.unpins > 0
    assert simulate(SMALL, "no_pin", 0).hit_tokens == 0


def test_continuum_beats_lru_and_no_pin_on_bimodal_tools():
    cfg = replace(SMALL, n_programs=40, tool_mix=("run_tests",))        # bimodal durations only
    mean = {p: sum(simulate(cfg, p, s).mean_jct for s in range(3)) / 3 for p in ("no_pin", "lru", "continuum")}
    assert mean["continuum"] <= mean["lru"] <= mean["no_pin"], mean


def test_tool_ttl_rule():
    rule = ToolTTL(prior_mean=5.0, min_samples=3, cost_weight=1.0)
    assert rule.ttl("t", benefit_s=0.0, memory_fraction=0.1) == 0.0               # nothing to gain
    assert rule.ttl("t", benefit_s=100.0, memory_fraction=0.0) == pytest.approx(-5.0 * math.log(0.01))
    for d in (1.0, 1.2, 0.8, 50.0):
        rule.observe("t", d)
    assert rule.ttl("t", benefit_s=2.0, memory_fraction=0.5) == 1.2            # cover the fast mode only
    assert rule.ttl("t", benefit_s=1000.0, memory_fraction=0.5) == 50.0        # worth waiting for the slow one


# ---------------------------------------------------------------- Elastic-Cache


@pytest.fixture(scope="module")
def tiny_dlm() -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(DLMConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, max_len=64)).eval()


def test_threshold_zero_refreshes_every_step_and_equals_baseline(tiny_dlm):
    p = encode("The quick brown fox ")
    base, bstats = generate(tiny_dlm, p, 24, block_len=8, tokens_per_step=2)
    out, stats = ElasticCache(drift_threshold=0.0, block_len=8, tokens_per_step=2).generate(tiny_dlm, p, 24)
    assert torch.equal(out, base) and (out[len(p):] != MASK_ID).all()
    assert stats["steps"] == bstats["steps"] == 12 and stats["refresh_rate"] == 1.0
    assert stats["refresh_layers"] == [0] * 12 and stats["compute_fraction"] == 1.0


def test_positive_threshold_reuses_cache(tiny_dlm):
    p = encode("The quick brown fox ")
    _, stats = ElasticCache(drift_threshold=0.5, block_len=8).generate(tiny_dlm, p, 24)
    assert stats["refreshes"] >= 3 and stats["refresh_rate"] < 1.0 and stats["compute_fraction"] < 1.0


def test_diffusion_loss_trains():
    torch.manual_seed(0)
    model = DiffusionLM(DLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=32))
    x0 = encode("abcabcabcabcabcabcabcabcabcabcab")[None].repeat(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    first = diffusion_loss(model, x0, gen).item()
    for _ in range(60):
        loss = diffusion_loss(model, x0, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_shipped_diffusion_weights_are_small_and_load():
    from plaintext_ref.reuse.diffusion_lm import WEIGHTS, load
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not shipped (python -m plaintext_ref.reuse.diffusion_lm trains it)")
    assert WEIGHTS.stat().st_size < 2 * 1024 * 1024
    model = load(WEIGHTS)
    with torch.no_grad():
        logits = model(encode("def f(x):\n    return x")[None])
    assert logits.shape[-1] == model.cfg.vocab and torch.isfinite(logits).all()
