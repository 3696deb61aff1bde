"""Invariants of TRIM-KV (kv_methods.md §8.1, item (e)) and of its gate training.

Gates lie in (0, 1); the score (t − i)·log β decreases with age for a fixed β, and a token's retention never
grows as t advances; every KV head of every layer holds exactly the budget after the prompt and after every
step, the newest token included; with one β everywhere (or one per head) TRIM-KV is StreamingLLM without sinks,
bit for bit; a budget covering the context is the full cache; the kept slots are the top-scored ones by gates
recomputed from HF's own hidden states; two interleaved sequences equal their solo runs; wrapped in ``Metered``
(as the eval runner runs every policy) it is unchanged; the training attention is plain attention when β = 1;
the shipped SmolLM2 gates load, moved off their init, and give finite outputs.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from plaintext_ref.eval.meter import Metered
from plaintext_ref.policies import POLICIES, LayerKV, StreamingLLM, TrimKV, get_policy
from plaintext_ref.policies.trim_kv import GATES_FILE, LOG_BETA, RetentionGates, retention_scores
from plaintext_ref.policies.trim_kv_train import GATED_ATTN, GateRun, gated_attention
from plaintext_ref.runtime import generate, teacher_forced_logits
from tests.plaintext_ref.helpers import interleaved, prefill, prompt, same_snapshots


def _random_gates(config, scale: float = 0.5, seed: int = 0) -> RetentionGates:
    gates = RetentionGates.for_config(config, bias_init=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gates.weight.copy_(scale * torch.randn(gates.weight.shape, generator=g))
        gates.bias.add_(torch.randn(gates.bias.shape, generator=g))
    return gates


def _constant_gates(config, per_head: bool) -> RetentionGates:
    """Zero weights: β depends on (layer, head) only, or is one value everywhere."""
    gates = RetentionGates.for_config(config, bias_init=3.0)
    if per_head:
        with torch.no_grad():
            gates.bias.copy_(torch.linspace(-2.0, 8.0, gates.bias.numel()).view_as(gates.bias))
    return gates


def test_registry_and_validation(tiny_llama):
    assert POLICIES["trim_kv"] is TrimKV
    policy = get_policy("trim_kv", budget=0.1)
    assert policy.budget.ratio == pytest.approx(0.9) and policy.evict_on == "both"
    with pytest.raises(ValueError):
        TrimKV(strategy="random")
    with pytest.raises(FileNotFoundError):
        TrimKV(weights="/nonexistent/gates.pt")
    with pytest.raises(ValueError):          # SmolLM2's gates do not fit the tiny model
        prefill(tiny_llama.model, prompt(1, 8), TrimKV(budget=4))


@pytest.mark.parametrize("scale", [0.1, 3.0, 1e4])
def test_gates_lie_in_open_unit_interval(tiny_llama, scale):
    """log β < 0 and finite, i.e. β = e^{log β} ∈ (0, 1), even for saturating inputs (β rounds to 1 in fp32)."""
    gates = _random_gates(tiny_llama.config, scale=2.0)
    hidden = scale * torch.randn(4, 50, tiny_llama.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in range(tiny_llama.config.num_hidden_layers):
        log_beta = gates(layer, hidden)                                     # (B, Hkv, S)
        assert log_beta.shape == (4, 2, 50) and torch.isfinite(log_beta).all() and (log_beta < 0).all()
        assert (log_beta.exp() > 0).all() and (log_beta.exp() <= 1).all()
    untrained = RetentionGates.for_config(tiny_llama.config)               # bias 10, zero weights
    assert torch.allclose(untrained(0, hidden).exp(), torch.tensor(0.9999546), atol=1e-7)


def test_score_decreases_with_age_and_grows_with_beta():
    pos = torch.arange(100).expand(2, 3, 100)
    for beta in (0.5, 0.9, 0.999, 0.9999546):
        score = retention_scores(torch.full((2, 3, 100), float(torch.tensor(beta).log())), pos)
        assert (score.diff(dim=-1) > 0).all()                               # older (smaller pos) scores lower
        assert (score[..., -1] == 0).all()                                  # the newest token: ᾱ = 1
    log_beta = -torch.rand(2, 3, 100, generator=torch.Generator().manual_seed(2))
    assert (retention_scores(log_beta / 2, pos)[..., :-1] > retention_scores(log_beta, pos)[..., :-1]).all()
    by_time = torch.stack([retention_scores(log_beta[..., :t], pos[..., :t])[..., :50] for t in range(50, 101)])
    assert (by_time.diff(dim=0) <= 0).all()                                 # log ᾱ_{t,i} non-increasing in t
    kv = LayerKV(torch.randn(2, 3, 100, 4), torch.randn(2, 3, 100, 4), pos.clone(), aux={LOG_BETA: log_beta})
    gates = RetentionGates(1, 4, 3)
    knorm = TrimKV(budget=10, strategy="knorm_alpha", gates=gates).score(None, kv)
    torch.testing.assert_close(knorm, retention_scores(log_beta, pos) + kv.k.norm(dim=-1).log())


@pytest.mark.parametrize("budget", [5, 16, 0.5])
def test_budget_is_respected_exactly(tiny_llama, budget):
    model, config = tiny_llama.model, tiny_llama.config
    ids, prefix = prompt(2, 40, seed=3), 24
    [(logits, snaps)] = interleaved(model, TrimKV(budget=budget, gates=_random_gates(config)), [(ids, prefix)])
    cap = budget if isinstance(budget, int) else int(prefix * budget)
    assert torch.isfinite(logits).all() and len(snaps) == ids.shape[1] - prefix
    for j, snap in enumerate(snaps):
        for layer in snap:
            assert layer["pos"].shape == (2, config.num_key_value_heads, cap)    # exactly M per KV head
            assert layer[LOG_BETA].shape == layer["pos"].shape
            assert (layer["pos"][..., -1] == prefix - 1 + j).all()              # ᾱ = 1: the newest token stays
            assert (layer["pos"].diff(dim=-1) > 0).all()                         # distinct slots, in time order


@pytest.mark.parametrize("per_head", [False, True])
def test_equal_betas_are_a_sliding_window(tiny_llama, per_head):
    model = tiny_llama.model
    ids, prefix, budget = prompt(2, 44, seed=4), 30, 12
    trim = TrimKV(budget=budget, gates=_constant_gates(tiny_llama.config, per_head))
    window = StreamingLLM(n_sink=0, budget=budget)
    assert torch.equal(teacher_forced_logits(model, ids, prefix, trim),
                       teacher_forced_logits(model, ids, prefix, window))
    cache = prefill(model, ids, trim)
    for layer in range(cache.num_layers):
        assert torch.equal(cache.kv(layer).pos, torch.arange(44 - budget, 44).expand(2, 2, budget))


def test_budget_covering_the_context_is_the_full_cache(tiny_llama):
    model = tiny_llama.model
    ids = prompt(2, 30, seed=5)
    full = teacher_forced_logits(model, ids, 20)
    assert torch.equal(teacher_forced_logits(model, ids, 20, TrimKV(budget=64, gates=_random_gates(tiny_llama.config))),
                       full)


@torch.no_grad()
def test_kept_slots_are_the_top_scored(tiny_llama):
    """Gates recomputed from HF's hidden states (input_layernorm of each layer's input) pick the kept slots."""
    model, config = tiny_llama.model, tiny_llama.config
    gates = _random_gates(config, scale=1.0, seed=6)
    ids, budget = prompt(2, 40, seed=6), 15
    cache = prefill(model, ids, TrimKV(budget=budget, gates=gates))
    states = model(ids, output_hidden_states=True).hidden_states                    # L + 1 of (B, S, E)
    for layer, block in enumerate(model.model.layers):
        log_beta = gates(layer, block.input_layernorm(states[layer]))               # (B, Hkv, S)
        score = retention_scores(log_beta, torch.arange(40).expand(2, 2, 40))
        expected = score.topk(budget, dim=-1).indices.sort(dim=-1).values
        kv = cache.kv(layer)
        assert torch.equal(kv.pos, expected)
        torch.testing.assert_close(kv.aux[LOG_BETA], log_beta.gather(2, expected))


def test_interleaved_sequences_equal_solo_runs(tiny_llama):
    model = tiny_llama.model
    policy = TrimKV(budget=10, gates=_random_gates(tiny_llama.config, seed=7))
    runs = [(prompt(2, 36, seed=8), 20), (prompt(1, 30, seed=9), 12)]
    together = interleaved(model, policy, runs)
    for run, (logits, snaps) in zip(runs, together):
        [(alone, alone_snaps)] = interleaved(model, policy, [run])
        assert torch.equal(logits, alone) and same_snapshots(snaps, alone_snaps)
    assert not policy.pending


def test_metered_wrapper_is_transparent(tiny_llama):
    """The eval runner wraps every policy in Metered; the gate hook must find the TrimKV inside it."""
    model = tiny_llama.model
    ids, policy = prompt(2, 32, seed=13), TrimKV(budget=9, gates=_random_gates(tiny_llama.config, seed=13))
    [(plain, plain_snaps)] = interleaved(model, policy, [(ids, 20)])
    [(metered, metered_snaps)] = interleaved(model, Metered(policy), [(ids, 20)])
    assert torch.equal(plain, metered) and same_snapshots(plain_snaps, metered_snaps)


def test_generate_end_to_end_and_q_head_granularity(tiny_llama):
    model, config = tiny_llama.model, tiny_llama.config
    ids = prompt(2, 20, seed=10)
    for granularity in ("kv_head", "q_head"):
        out = generate(model, ids, TrimKV(budget=8, gates=_random_gates(config), granularity=granularity),
                       max_new_tokens=6)
        assert out.shape == (2, 26) and torch.equal(out[:, :20], ids)


@torch.no_grad()
def test_gated_training_attention_is_plain_attention_at_beta_one(tiny_llama):
    model = tiny_llama.model
    ids = prompt(2, 24, seed=11)
    reference = model(ids).logits
    AttentionInterface.register(GATED_ATTN, gated_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(GATED_ATTN)
    try:
        run = GateRun(RetentionGates.for_config(tiny_llama.config))
        layers = range(tiny_llama.config.num_hidden_layers)
        run.log_beta.update({i: torch.zeros(2, 2, 24) for i in layers})            # β = 1: ᾱ ≡ 1
        torch.testing.assert_close(model(ids, trimkv=run, use_cache=False).logits, reference, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(run.soft_size[i], torch.arange(1.0, 25.0).expand(2, 2, 24)) for i in layers)
        run.log_beta.update({i: torch.full((2, 2, 24), -50.0) for i in layers})    # ᾱ = 0 off the diagonal
        gated = model(ids, trimkv=run, use_cache=False).logits
        assert torch.allclose(run.soft_size[0], torch.ones(2, 2, 24)) and torch.isfinite(gated).all()
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.slow
def test_shipped_gates_load_and_give_finite_outputs(smollm2):
    model, tok, config = smollm2
    gates = RetentionGates.load(GATES_FILE)
    assert GATES_FILE.stat().st_size < 1_000_000
    assert gates.weight.shape == (config.num_hidden_layers, config.num_key_value_heads, config.hidden_size)
    assert gates.weight.abs().max() > 0 and not torch.allclose(gates.bias, torch.full_like(gates.bias, 10.0))
    assert {"steps", "tokens", "seconds", "command", "machine", "last10"} <= set(gates.meta)
    ids = tok("The Python tutorial explains lists, dictionaries and classes. " * 8, return_tensors="pt").input_ids
    policy = TrimKV(budget=32)
    logits = teacher_forced_logits(model, ids, ids.shape[1] - 8, policy)
    assert torch.isfinite(logits).all()
    cache = prefill(model, ids, policy)
    log_beta = torch.cat([cache.kv(i).aux[LOG_BETA] for i in range(cache.num_layers)])
    assert cache.kv(0).n == 32 and (log_beta < 0).all() and torch.isfinite(log_beta).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_runs_and_matches_window(dtype):
    from plaintext_ref.models import load_model
    loaded = load_model("tiny-llama", device="cuda", dtype=dtype)
    ids = prompt(2, 30, seed=12).cuda()
    trim = TrimKV(budget=10, gates=_random_gates(loaded.config))
    assert torch.isfinite(teacher_forced_logits(loaded.model, ids, 20, trim)).all()
    assert generate(loaded.model, ids[:, :20], trim, max_new_tokens=4).shape == (2, 24)
    equal = TrimKV(budget=10, gates=_constant_gates(loaded.config, per_head=True))
    assert torch.equal(teacher_forced_logits(loaded.model, ids, 20, equal),
                       teacher_forced_logits(loaded.model, ids, 20, StreamingLLM(n_sink=0, budget=10)))
