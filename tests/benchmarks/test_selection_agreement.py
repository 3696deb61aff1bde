"""benchmarks.selection_agreement: the tie/mismatch classifier on planted selections, and one real audit
run on tiny-llama (two parties) that must find no mismatch and write its report."""
import json

import pytest
import torch

from benchmarks.selection_agreement import Verdict, compare_dynamic, compare_static, main, twin_levels
from plaintext_ref.mpcache_config import MPCacheConfig
from plaintext_ref.policies import mpcache as twin

CFG = MPCacheConfig(cluster_sizes=(16, 8), level_ratios=(0.5, 0.25))


def _encode(levels: list[tuple], cfg: MPCacheConfig, t: int) -> tuple[list, list, torch.Tensor]:
    """The twin's selection in the MPC's layout: middle ranges, [m] masks, finest one-hot rows, scores."""
    from mpcache.policy.mpcache import middle
    picks, ranges, scores = [], [], []
    for level, (picked, score, _, n) in enumerate(levels):
        lo, hi = middle(cfg.n_clusters(t, level), cfg)
        mid = picked[..., lo:hi].float()
        if level == len(levels) - 1:  # one-hot rows in cluster order
            rows = torch.zeros(*mid.shape[:2], n, hi - lo)
            for b in range(mid.shape[0]):
                for h in range(mid.shape[1]):
                    for r, c in enumerate(mid[b, h].nonzero().flatten().tolist()):
                        rows[b, h, r, c] = 1.0
            mid = rows
        picks.append(mid)
        ranges.append((lo, hi))
        scores.append(score[..., lo:hi])
    return picks, ranges, torch.cat(scores, dim=-1)


def test_classifier_same_tie_and_mismatch():
    gen = torch.Generator().manual_seed(0)
    t = 130
    q, k = torch.randn(1, 2, 16, generator=gen), torch.randn(1, 2, t, 16, generator=gen)
    levels = twin_levels(q, k, CFG)
    picks, ranges, scores = _encode(levels, CFG, t)
    same = compare_dynamic(q, k, picks, ranges, scores + 1e-6, CFG)
    assert [v.status for row in same for v in row] == ["same"] * 4

    # plant a wrong level-0 pick for head 1: swap its lowest pick with the best non-pick
    wrong = [p.clone() for p in picks]
    lo, hi = ranges[0]
    score0 = levels[0][1][0, 1, lo:hi]
    mine = wrong[0][0, 1]
    worst = int(score0.masked_fill(mine == 0, float("inf")).argmin())
    best = int(score0.masked_fill(mine == 1, -float("inf")).argmax())
    mine[worst], mine[best] = 0.0, 1.0
    gap = float(score0[worst] - score0[best])
    bad = compare_dynamic(q, k, wrong, ranges, scores, CFG)
    assert [v.status for v in bad[0]] == ["same", "mismatch"] and len(bad[1]) == 1  # head 1 not compared deeper
    assert bad[0][1].gap == pytest.approx(gap)
    # the same swap is a fixed-point tie when the MPC's own scores are that far from the twin's
    noisy = scores.clone()
    noisy[0, 1, worst] -= gap
    assert compare_dynamic(q, k, wrong, ranges, noisy, CFG)[0][1].status == "tie"


def test_static_classifier():
    gen = torch.Generator().manual_seed(1)
    q_win, k = torch.randn(1, 4, 5, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen)
    s = twin.static_scores(twin.window_attention(q_win, k, q_win.shape[-1] ** -0.5)) * 4
    kept = twin.static_keep(s, 12)
    assert compare_static(s, kept, q_win, k, 12)[0].status == "same"
    order = s[0].argsort(descending=True)
    swapped = kept.clone()
    swapped[0][swapped[0] == order[11]] = order[12]
    swapped = swapped.sort(dim=-1).values
    assert compare_static(s, swapped, q_win, k, 12)[0].status == "mismatch"
    assert Verdict.of(True, 1e-5, 1e-4, 1.0).status == "tie"
    assert Verdict.of(False, 1e-5, 2.0, 1.0).status == "fault"  # a wrap, whatever was selected
    fault = s.clone()
    fault[0, 3] -= 2.0**20  # what one wrapped probability (2^32 / T0) does to a score
    assert compare_static(fault, kept, q_win, k, 12)[0].status == "fault"


@pytest.mark.mpc
def test_audit_run_on_tiny_llama(tmp_path):
    out = tmp_path / "sa.json"
    assert main(["--model", "tiny-llama", "--layers", "2", "--lengths", "300", "--steps", "2",
                 "--out", str(out), "--timeout", "600"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["static"]["compared"] == 2 and row["static"]["mismatches"] == row["static"]["faults"] == 0
    l0, l1 = row["levels"]  # 2 layers x 2 steps x 2 KV heads; a head that differed is not compared deeper
    assert l0["compared"] == 8 and l1["compared"] == 8 - l0["ties"] - l0["mismatches"]
    assert all(x["mismatches"] == x["faults"] == 0 for x in row["levels"])
    assert len(row["tokens"]["mpc"]) == 2
    assert row["truncation"] == "exact"
    assert "tiny-llama | cpu | exact | 300" in out.with_suffix(".md").read_text()
