"""benchmarks.mpcache_cost: projection, 30-layer extrapolation, merge keying and budgets (no parties)."""
import json

import pytest

from benchmarks.mpcache_cost import LAN, WAN, build_policy, markdown, merge, summarise
from protocols.config import ProtocolConfig


def _raw(policy: str, length: int, layer_bytes: float, comparison: str = ProtocolConfig().comparison) -> dict:
    cost = lambda b, r, c: {"wire_bytes": b, "rounds": r, "compute_s": c}  # noqa: E731
    head, layer = cost(30e6, 190, 4.0), cost(layer_bytes, 160, 0.5)
    total = cost(head["wire_bytes"] + 2 * layer_bytes, 190 + 2 * 160, 5.0)
    return {"policy": policy, "length": length, "mode": "simulation", "step_s": [3.0, 1.0, 2.0],
            "sim_prefill_s": 1.0, "decode": {"total": total, "head": head, "per_layer": layer, "stages": {}},
            "sim_prefill": cost(1e6, 10, 0.1), "describe": {"attended_last_step": length}, "provider": "TTP",
            "comparison": comparison}


def test_summarise_projects_and_extrapolates():
    rec = summarise(_raw("full", 512, 4e6), layers=2, device="cpu")
    assert rec["median_step_s"] == 2.0
    assert rec["decode"]["WAN_s"] == pytest.approx(5.0 + 8 * 38e6 / WAN["bandwidth_bps"] + 510 * WAN["rtt_s"])
    ext = rec["extrapolated_30_layers"]
    assert ext["wire_bytes"] == pytest.approx(30e6 + 30 * 4e6) and ext["rounds"] == 190 + 30 * 160
    assert ext["LAN_s"] == pytest.approx(4.0 + 15.0 + 8 * ext["wire_bytes"] / LAN["bandwidth_bps"] + ext["rounds"] * 5e-4)


def test_sharing_extrapolation_skips_selection_of_sharing_layers():
    raw = _raw("mpcache", 1024, 4e6)
    raw["decode"]["stages"] = {"kv_select": {"wire_bytes": 2e6, "rounds": 100, "wall_s": 0.4}}
    rec = summarise(raw, layers=2, device="cpu")
    ext, shr = rec["extrapolated_30_layers"], rec["extrapolated_30_layers_shared"]
    assert shr["shared_layers"] == 14  # default pattern: layers 2..29 in pairs, the second of each reuses
    assert shr["wire_bytes"] == pytest.approx(ext["wire_bytes"] - 14 * 1e6)
    assert shr["rounds"] == pytest.approx(ext["rounds"] - 14 * 50)
    assert "extrapolated_30_layers_shared" not in summarise(_raw("full", 1024, 4e6), 2, "cpu")


def test_merge_replaces_same_key_and_keeps_others(tmp_path):
    path = tmp_path / "c.json"
    first = [summarise(_raw(p, t, 4e6), 2, "cpu") for p in ("full", "mpcache") for t in (512, 1024)]
    path.write_text(json.dumps({"records": first}))
    redo = summarise(_raw("mpcache", 512, 1e6), 2, "cpu")
    recs = merge(path, [redo])
    assert len(recs) == 4
    got = [r for r in recs if (r["policy"], r["length"]) == ("mpcache", 512)]
    assert got == [redo]
    md = markdown(recs, {"cpu": "test machine"})
    assert "SIMULATION (NOT PRIVATE)" in md and "| 512 | mpcache |" in md


def test_merge_keeps_comparison_baselines_apart(tmp_path):
    """A run with the non-default comparisons of the same (policy, length) is a separate, labelled
    row; records from before the option count as CrypTen's."""
    path = tmp_path / "c.json"
    old = summarise(_raw("mpcache", 512, 4e6), 2, "cpu")
    del old["comparison"]
    path.write_text(json.dumps({"records": [old, summarise(_raw("full", 512, 4e6), 2, "cpu")]}))
    recs = merge(path, [summarise(_raw("mpcache", 512, 1e6, "digits"), 2, "cpu"),
                        summarise(_raw("mpcache", 512, 3e6, "crypten"), 2, "cpu")])
    assert len(recs) == 3  # the new CrypTen record replaced the unlabelled one
    md = markdown(recs, {"cpu": "test machine"})
    assert "| 512 | mpcache |" in md and "| 512 | mpcache (CrypTen cmp) |" in md  # digits: the default


def test_baselines_get_mpcache_budget():
    budget = build_policy("mpcache", None, 1024).describe(1024)["attended_last_step"]
    for name in ("streaming_llm", "h2o", "snapkv", "quest"):
        assert build_policy(name, None, 1024).describe(1024)["attended_last_step"] <= budget + 16
    assert build_policy("full", None, 1024).describe(1024)["attended_last_step"] == 1024
    with pytest.raises(ValueError):
        build_policy("nope", None, 1024)
