"""Offline evaluation harness: deterministic tasks, metrics, errors, CLI, and the SmolLM2 baseline."""
import json
import math

import pytest
import torch

from plaintext_ref.eval import corpus, metrics
from plaintext_ref.eval.__main__ import main
from plaintext_ref.eval.runner import check_length, evaluate, parse_budget, policy_factory
from plaintext_ref.eval.tasks import GENERATION_TASKS, TASKS, ProseTask, fit_prompt, noise_haystack, resolve_tasks
from plaintext_ref.models import load_model

PROSE = "A quick brown fox jumps over the lazy dog while the river runs past old mills. " * 80


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def prose_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prose")
    (folder / "a.txt").write_text(PROSE)
    return folder


@pytest.mark.parametrize("name", [n for n in GENERATION_TASKS if not GENERATION_TASKS[n].needs_corpus])
def test_samples_are_deterministic_and_fill_the_length(tiny, name):
    tok, task, length = tiny.tokenizer, GENERATION_TASKS[name](), 1024
    a, b = (task.sample(tok, length, 7, 1, 3) for _ in range(2))
    assert a == b
    other = task.sample(tok, length, 8, 1, 3)
    assert other.answers != a.answers and other.input_ids != a.input_ids
    budget = length - task.max_new_tokens
    assert len(a.input_ids) == budget  # exactly, so that samples batch without padding
    text = tok.decode(a.input_ids)
    assert all(ans in text for ans in a.answers)
    if "answer_span" in a.meta:
        lo, hi = a.meta["answer_span"]
        assert a.answers[0] in tok.decode(a.input_ids[lo:hi])


def test_niah_spreads_depths_and_places_the_needle_there(tiny):
    task = GENERATION_TASKS["niah"]()
    samples = [task.sample(tiny.tokenizer, 1024, 0, i, 5) for i in range(5)]
    assert [s.meta["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    where = [tiny.tokenizer.decode(s.input_ids).find(s.answers[0]) / len(tiny.tokenizer.decode(s.input_ids))
             for s in samples]
    assert where == sorted(where) and where[0] < 0.2 and where[-1] > 0.8


def test_fit_prompt_and_haystack():
    assert noise_haystack(2, [(0.0, "A."), (1.0, "B.")]).startswith("A. The grass")
    assert noise_haystack(2, [(0.5, "X."), (0.5, "Y.")]).count("X. Y.") == 1  # order kept at a tie

    class Chars:  # one token per character
        def __call__(self, text):
            return type("Enc", (), {"input_ids": list(text)})()
    ids, count = fit_prompt(Chars(), lambda c: "ab" + "x" * 3 * c, 20)
    assert (count, len(ids)) == (6, 20)
    with pytest.raises(ValueError, match="length too short"):
        fit_prompt(Chars(), lambda c: "q" * 30 + "x" * c, 20)


def test_metrics():
    assert metrics.string_match_all("The ABC and def", ["abc", "DEF", "ghi"]) == pytest.approx(2 / 3)
    assert metrics.exact_match(" 68231. Remember it", "68231") == 1.0
    assert metrics.exact_match(" The pass key is 68231", "68231") == 0.0
    assert metrics.perplexity(torch.zeros(5, 10), torch.arange(5)) == pytest.approx(10.0)
    p = torch.tensor([[math.log(0.5), math.log(0.5)]])
    q = torch.tensor([[math.log(0.25), math.log(0.75)]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, q) == pytest.approx(want)
    assert metrics.kl_divergence(q, q) == pytest.approx(0.0, abs=1e-12)
    assert metrics.top1_agreement(torch.eye(4), torch.eye(4).flip(0)) == 0.0


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("passkey,nope")
    assert resolve_tasks("all") == list(TASKS)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policy_factory("nope")
    with pytest.raises(ValueError, match="rejects"):
        policy_factory("full", budget=0.5)
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        check_length(9000, tiny.config)
    assert parse_budget("0.1") == 0.1 and parse_budget("256") == 256 and parse_budget(None) is None
    for bad in ("0", "1.5", "-3", "abc"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="'cwe' at length 256"):
        GENERATION_TASKS["cwe"]().sample(tiny.tokenizer, 256, 0, 0, 1)


def test_corpus_search(tmp_path, monkeypatch, prose_dir):
    assert corpus.load_corpus(prose_dir).text.startswith("A quick brown fox")
    with pytest.raises(corpus.CorpusUnavailable, match="no \\*.txt"):
        corpus.load_corpus(tmp_path)
    monkeypatch.setattr(corpus, "PYTHON_DOC", tmp_path / "none")
    monkeypatch.setattr(corpus, "VIM_DOC_GLOB", str(tmp_path / "none*"))
    with pytest.raises(corpus.CorpusUnavailable, match="python3.11-doc"):
        corpus.load_corpus()


def test_evaluate_full_cache_is_deterministic_and_fidelity_can_fail(tiny, prose_dir):
    model, tok, _ = tiny
    full = policy_factory("full")
    runs = [evaluate(model, tok, "passkey", 256, 2, 0, full) for _ in range(2)]
    assert [s["prediction"] for s in runs[0].samples] == [s["prediction"] for s in runs[1].samples]
    assert runs[0].n == 2 and runs[0].metric == "exact_match"
    ids = tok(PROSE).input_ids
    same = evaluate(model, tok, "fidelity", 256, 1, 0, full, is_full=True, corpus_ids=ids)
    assert same.score == 0.0 and same.extra["top1"] == 1.0
    # A real (non-shortcut) reference pass: StreamingLLM keeping 8 of ~200 prefix slots must diverge.
    small = policy_factory("streaming_llm", n_sink=2, n_recent=6)
    evicted = evaluate(model, tok, "fidelity", 256, 1, 0, small, corpus_ids=ids)
    assert evicted.score > 1e-4 and evicted.extra["ppl_full"] == pytest.approx(same.extra["ppl"])
    with pytest.raises(ValueError, match="fewer than length"):
        ProseTask("ppl", "perplexity").sample(ids[:100], 256, 0, 0)


def test_cli_writes_json_and_rejects_bad_input(tmp_path, prose_dir, capsys):
    out = tmp_path / "r.json"
    args = ["--model", "tiny-llama", "--task", "passkey,ppl", "--lengths", "256", "--samples", "1",
            "--device", "cpu", "--corpus", str(prose_dir), "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [(r["task"], r["length"], r["n"]) for r in data["results"]] == [("passkey", 256, 1), ("ppl", 256, 1)]
    assert data["config"]["policy"] == "full" and data["environment"]["device"] == "cpu"
    assert "passkey" in capsys.readouterr().out
    for bad, message in ((["--task", "nope"], "unknown task"), (["--policy", "nope"], "unknown policy"),
                         (["--lengths", "9000"], "exceeds the model's context")):
        assert main(["--model", "tiny-llama", "--out", str(out), *bad]) == 2
        assert message in capsys.readouterr().err


def test_cli_skips_prose_tasks_without_a_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "PYTHON_DOC", tmp_path / "none")
    monkeypatch.setattr(corpus, "VIM_DOC_GLOB", str(tmp_path / "none*"))
    out = tmp_path / "r.json"
    assert main(["--model", "tiny-llama", "--task", "ppl", "--lengths", "256", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] == [] and "python3.11-doc" in data["skipped"]["ppl"]
    assert "skipped ppl" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_full_cache_passes_passkey_at_1k():
    """Measured baseline (docs/eval_baseline.md): the full cache retrieves every passkey at 1K."""
    model, tok, _ = load_model("smollm2")
    result = evaluate(model, tok, "passkey", 1024, 2, 0, policy_factory("full"))
    assert result.score == 1.0, [s["prediction"] for s in result.samples]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_runs_on_cuda(tmp_path, prose_dir):
    out = tmp_path / "r.json"
    args = ["--model", "tiny-llama", "--task", "niah,fidelity", "--lengths", "256", "--samples", "2",
            "--device", "cuda", "--corpus", str(prose_dir), "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device"] == "cuda" and len(data["results"]) == 2
    assert data["results"][1]["score"] == 0.0 and data["results"][1]["extra"]["top1"] == 1.0


# ---- issue 19: batched runs, effective budgets, intervals, two corpora, the MPCache trace ---------------
from benchmarks import kv_quality  # noqa: E402
from plaintext_ref.eval.meter import Metered  # noqa: E402
from plaintext_ref.eval.mpcache_trace import TraceFactory, select_levels  # noqa: E402
from plaintext_ref.eval.report import quality_markdown  # noqa: E402
from plaintext_ref.mpcache_config import MPCacheConfig, config_for_budget  # noqa: E402
from plaintext_ref.policies.mpcache import select_clusters  # noqa: E402


def test_niah_prose_fills_the_length_and_locates_the_answer(tiny):
    tok, task = tiny.tokenizer, GENERATION_TASKS["niah_prose"]()
    ids = tok(PROSE * 3).input_ids
    a = task.sample(tok, 512, 0, 1, 3, corpus_ids=ids)
    assert a == task.sample(tok, 512, 0, 1, 3, corpus_ids=ids) and len(a.input_ids) == 512 - task.max_new_tokens
    lo, hi = a.meta["answer_span"]
    assert a.answers[0] in tok.decode(a.input_ids[lo:hi]) and a.meta["depth"] == 0.5
    with pytest.raises(ValueError, match="needs corpus_ids"):
        task.sample(tok, 512, 0, 0, 3)


def test_intervals_and_paired_differences():
    mean, half = metrics.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert metrics.mean_ci([5.0])[1] == math.inf
    d = metrics.paired_difference([1.0] * 5 + [0.0], [0.0] * 6)
    assert (d["wins"], d["losses"], d["mean"]) == (5, 0, pytest.approx(5 / 6)) and d["significant"] == 1.0
    assert metrics.paired_difference([1.0, 1.0, 1.0, 0.0], [0.0] * 4)["significant"] == 0.0   # ±0.80
    assert metrics.paired_difference([1.0, 0.0], [0.0, 1.0])["significant"] == 0.0
    with pytest.raises(ValueError):
        metrics.paired_difference([1.0], [1.0, 2.0])


@pytest.mark.parametrize("name,budget,kw", [("snapkv", 0.1, {}), ("mpcache", 0.1, {}),
                                             ("tokenselect", 0.1, kv_quality.policy_args("tokenselect", 0.1, 256))])
def test_batched_equals_one_by_one(tiny, name, budget, kw):
    model, tok, _ = tiny
    make, ids = policy_factory(name, budget, **kw), tok(PROSE * 3).input_ids
    one = evaluate(model, tok, "fidelity", 256, 3, 0, make, corpus_ids=ids, batch_size=1)
    three = evaluate(model, tok, "fidelity", 256, 3, 0, make, corpus_ids=ids, batch_size=3)
    assert [r["score"] for r in one.samples] == pytest.approx([r["score"] for r in three.samples], abs=1e-5)
    assert [r["attended"] for r in one.samples] == [r["attended"] for r in three.samples]
    gen = [evaluate(model, tok, "niah", 256, 3, 0, make, batch_size=b).samples for b in (1, 3)]
    assert [r["prediction"] for r in gen[0]] == [r["prediction"] for r in gen[1]]
    if name == "tokenselect":  # its windows are scaled to the budget: it attends its budget, not 640 slots
        assert one.extra["attended"] == pytest.approx(sum(int(0.1 * n) for n in range(193, 256)) / 63, abs=1)


def test_meter_counts_kept_and_attended_slots(tiny):
    model, tok, _ = tiny
    ids = tok(PROSE * 3).input_ids
    res = evaluate(model, tok, "fidelity", 256, 2, 0, policy_factory("streaming_llm", n_sink=2, n_recent=6),
                   corpus_ids=ids, batch_size=2)
    assert res.extra["kept"] == 9 and res.extra["attended"] == 9   # sink + recent + the new token
    full = evaluate(model, tok, "fidelity", 256, 1, 0, policy_factory("full"), corpus_ids=ids, is_full=True)
    assert full.extra["kept"] == pytest.approx(sum(range(193, 256)) / 63)   # the cache grows by one per step
    wrapped = Metered(policy_factory("quest", 0.1)())
    assert wrapped.needs == wrapped.inner.needs and wrapped.summary() == []


def test_reference_log_probs_are_reused(tiny):
    model, tok, _ = tiny
    ids, ref = tok(PROSE * 3).input_ids, {}
    a = evaluate(model, tok, "fidelity", 256, 2, 0, policy_factory("snapkv", 0.1), corpus_ids=ids, reference=ref)
    assert len(ref) == 2
    ref[next(iter(ref))] = ref[next(iter(ref))] * 0 - math.log(tiny.config.vocab_size)   # a uniform reference
    b = evaluate(model, tok, "fidelity", 256, 2, 0, policy_factory("snapkv", 0.1), corpus_ids=ids, reference=ref)
    assert b.samples[0]["score"] != pytest.approx(a.samples[0]["score"]) and b.samples[1]["score"] == a.samples[1]["score"]


def test_select_levels_matches_the_twin_and_traces_full_survival(tiny):
    g = torch.Generator().manual_seed(0)
    cfg = config_for_budget(0.1)
    for t in (200, 256, 301):
        q, k = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, t, 16, generator=g)
        assert torch.equal(select_levels(q, k, cfg)[-1], select_clusters(q, k, cfg))
    model, tok, _ = tiny
    everything = MPCacheConfig(static_keep=1.0, level_ratios=(1.0, 1.0))
    samples = [GENERATION_TASKS["niah"]().sample(tok, 256, 0, i, 2) for i in range(2)]
    tracer = TraceFactory(everything, [tuple(s.meta["answer_span"]) for s in samples], 2)
    evaluate(model, tok, "niah", 256, 2, 0, tracer, batch_size=2)
    per = tracer.per_sample()
    assert len(per) == 2 and all(r["static"] == r["attended"] == r["level1_exact"] == 1.0 for r in per)
    small = TraceFactory(config_for_budget(0.05), [tuple(s.meta["answer_span"]) for s in samples], 2)
    evaluate(model, tok, "niah", 256, 2, 0, small, batch_size=2)
    assert min(r["attended"] for r in small.per_sample()) < 1.0   # the trace can report a loss


def test_named_corpora(tmp_path, monkeypatch, prose_dir):
    assert corpus.load_named(str(prose_dir)).name == prose_dir.name
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus.load_named("nope")
    monkeypatch.setattr(corpus, "VIM_DOC_GLOB", str(tmp_path / "none*"))
    with pytest.raises(corpus.CorpusUnavailable, match="vim-runtime"):
        corpus.load_named("vim-doc")


def _row(policy, budget, niah, kl, attended, **extra):
    res = {"niah": {"metric": "m", "n": len(niah), "seconds": 1.0, "score": niah, "attended": attended,
                    "kept": attended},
           "fidelity@a": {"metric": "kl", "n": len(kl), "seconds": 1.0, "score": kl, "top1": [1.0] * len(kl)}}
    return {"length": 1024, "policy": policy, "budget": budget, "results": res, "seconds": 2.0, **extra}


def test_quality_report_intervals_budgets_and_mapping_relabel(tmp_path):
    new, old = (kv_quality.config_dict(config_for_budget(0.05, mapping=m)) for m in ("window32", "authors"))
    report = {"config": {"model": "m", "seed": 0, "samples": 4, "min_samples": 2, "fidelity_samples": 4,
                         "stop_kl": 0.01}, "environment": {"device_name": "cpu", "torch": "x"}, "runs": [],
              "candidate_mapping": "window32",
              "rows": [_row("full", None, [1.0] * 4, [0.0] * 4, [1012.0] * 4),
                       _row("mpcache", 0.05, [0.0, 0.0, 0.0, 1.0], [0.3] * 4, [51.0] * 4),
                       _row("mpcache[window32]", 0.05, [1.0] * 4, [0.2, 0.3, 0.2, 0.3], [51.0] * 4, config=new),
                       _row("tokenselect", 0.05, [1.0, 1.0, 0.0, 1.0], [0.1] * 4, [640.0] * 4)]}
    kv_quality.adopt_default_mapping(report)
    names = {r["policy"]: r for r in report["rows"]}
    assert set(names) == {"full", "mpcache", "mpcache[authors]", "tokenselect"}
    assert names["mpcache"]["results"]["niah"]["score"] == [1.0] * 4 and names["mpcache[authors]"]["config"] == old
    md = quality_markdown(report)
    assert "640 (63.2%) ⚠" in md and "51 (5.0%) |" in md        # effective budgets, over-budget flagged
    assert "**-0.75 ± 0.8**" not in md and "-0.75 ± 0.8" in md   # not significant: not bold
    assert "| 1024 | 5% | tokenselect | +0.25 ± 0.8 |" in md    # paired MPCache − other
    order = kv_quality.cells(kv_quality.parse_args(["--lengths", "4096,2048", "--policies", "snapkv,knorm"]))
    assert order[:4] == [(4096, "full", None), (4096, "snapkv", 0.05), (4096, "snapkv", 0.1), (4096, "snapkv", 0.2)]
    assert order[4] == (2048, "full", None) and order[-1] == (4096, "knorm", 0.2)
