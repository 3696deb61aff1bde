"""benchmarks.network_report: measured vs projected per profile, merge keying, report text (no parties)."""
import json

import pytest

from benchmarks.network_report import markdown, merge, readme_table, summarise

PROFILES = {"loopback": {"name": "loopback", "rtt_s": 0.0, "rate_bps": None},
            "LAN": {"name": "LAN", "rtt_s": 1e-3, "rate_bps": 1e9},
            "WAN": {"name": "WAN", "rtt_s": 40e-3, "rate_bps": 100e6}}


def _cost(b: float, r: float, c: float) -> dict:
    return {"wire_bytes": b, "rounds": r, "compute_s": c, "comm_s": 0.1, "wall_s": c + 0.1}


def _rec(policy: str, length: int, wan_s: float) -> dict:
    return {"policy": policy, "length": length, "layers": 2, "provider": "TFP", "attended": 64,
            "sim_prefill_s": 1.0, "sim_prefill": _cost(1e9, 10, 1.0),
            "step_s": {"loopback": [5.0, 4.0, 6.0], "LAN": [6.0, 6.0], "WAN": [wan_s, wan_s + 2]},
            "decode": {p: _cost(50e6, 600, 4.0) for p in PROFILES}}


PRIMS = {"loopback": {"all_reduce 32 B": 0.001}, "LAN": {"all_reduce 32 B": 0.003},
         "WAN": {"all_reduce 32 B": 0.081}}  # 2 RTT per all_reduce on both


def test_summarise_projects_from_the_loopback_steps():
    r = summarise(_rec("full", 512, 70.0), {"profiles": PROFILES, "primitives": PRIMS})
    assert r["measured_s"] == {"loopback": 5.0, "LAN": 6.0, "WAN": 71.0}
    assert r["projected_s"]["WAN"] == pytest.approx(4.0 + 8 * 50e6 / 100e6 + 600 * 40e-3)
    assert r["projected_network_s"]["LAN"] == pytest.approx(8 * 50e6 / 1e9 + 600 * 1e-3)
    assert r["network_s"]["WAN"] == pytest.approx(66.5)  # median of the paired steps: 70 − 5, 72 − 4
    assert r["anchored_s"]["WAN"] == pytest.approx(5.0 + 8 * 50e6 / 100e6 + 600 * 40e-3)
    assert r["rtts_per_round"]["WAN"] == pytest.approx((66.5 - 2.0) / 600 / 40e-3)  # bytes: half each way
    assert r["calibrated_s"]["WAN"] == pytest.approx(5.0 + 8 * 25e6 / 100e6 + 600 * 2.0 * 40e-3)
    assert "loopback" not in r["projected_s"]


def test_merge_replaces_same_key_and_renders(tmp_path):
    path = tmp_path / "network.json"
    first = {"backend": "tun", "profiles": PROFILES, "link_checks": {}, "primitives": {},
             "mpcache": [_rec(p, t, 70.0) for p in ("full", "mpcache") for t in (512, 1024)]}
    path.write_text(json.dumps(merge(path, first)))
    data = merge(path, {"mpcache": [_rec("mpcache", 512, 40.0)]})
    assert len(data["mpcache"]) == 4 and data["backend"] == "tun"
    got = [r for r in data["mpcache"] if (r["policy"], r["length"]) == ("mpcache", 512)]
    assert [r["measured_s"]["WAN"] for r in got] == [41.0]
    md = markdown(data)
    assert "NOT private" in md and "| 512 | mpcache |" in md and "## README table" in md
    table = readme_table(data)
    assert len(table) == 4 and table[2].startswith("| 512 |") and "1.73×" in table[2]  # 71 / 41
