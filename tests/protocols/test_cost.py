"""CostMeter on real parties (exact bytes/rounds per stage, phases, per token) and CostReport math."""
from __future__ import annotations

import pytest
import torch

from protocols.cost import OTHER, TOTAL, CostReport, project
from tests.protocols.conftest import run_on


def _party(records: dict, tokens: dict) -> dict:
    return {"records": records, "tokens": tokens}


def test_report_merges_parties_and_projects():
    # [bytes, rounds, comm_s, wall_s, calls] per party
    p0 = _party({"decode|total": [3000.0, 6, 0.5, 2.0, 2], "decode|qkv": [1000.0, 2, 0.1, 0.5, 2],
                 "decode|qkv/inner": [400.0, 1, 0.05, 0.2, 2]}, {"decode": 2})
    p1 = _party({"decode|total": [1000.0, 4, 0.7, 1.8, 2], "decode|qkv": [1000.0, 2, 0.2, 0.4, 2],
                 "decode|qkv/inner": [400.0, 1, 0.05, 0.2, 2]}, {"decode": 2})
    report = CostReport([p0, p1], provider="TFP")
    total = report.row("decode")
    assert total.wire_bytes == 2000.0 and total.rounds == 6 and total.wall_s == 2.0
    assert total.compute_s == pytest.approx(2.0 - 0.7)
    other = report.row("decode", OTHER)  # total minus top-level stages (qkv/inner is inside qkv)
    assert other.party_bytes == [2000.0, 0.0] and other.rounds == 4
    per = total.per_token()
    assert per.wire_bytes == 1000.0 and per.rounds == 3
    # T = compute + 8·bytes/bandwidth + rounds·RTT
    assert report.project(8e3, 0.1) == pytest.approx(1.3 + 2.0 + 0.6)
    assert report.project(8e3, 0.1, phase="decode", per_token=True) == pytest.approx(0.65 + 1.0 + 0.3)
    assert project(0.0, 1e9, 0, 1e9, 0.0) == pytest.approx(8.0)
    md = report.to_markdown()
    assert "NOT secure" in md and "| decode | qkv/inner |" in md
    assert report.to_dict()["phases"]["decode"]["stages"]["qkv"]["wire_bytes"] == 1000.0
    assert report.to_rich().row_count == len(report.rows)
    with pytest.raises(KeyError):
        report.row("prefill")


def _meter_job(seed: int, decode_steps: int) -> dict:
    from protocols.compat import comm, crypten
    from protocols.cost import CostMeter

    gen = torch.Generator().manual_seed(seed)
    meter = CostMeter()
    w = crypten.cryptensor(torch.randn(6, 4, generator=gen), src=1)
    with meter.phase("prefill", tokens=3):
        x = crypten.cryptensor(torch.randn(3, 6, generator=gen), src=0)
        with meter.stage("qkv"):
            h = x.matmul(w)                       # 16·(18 + 24) bytes, 1 round; truncation 16·12, 1
        with meter.stage("attention"):
            with meter.stage("softmax"):
                h.exp()                           # 8 squarings: 8 rounds under TFP
        (h * h).get_plain_text()                  # unattributed: lands in "other"
    for step in range(decode_steps):
        with meter.phase("decode", tokens=step % 2):  # tokens given per phase or counted inside
            meter.count_tokens(1 - step % 2)
            with meter.stage("qkv"):
                crypten.cryptensor(torch.randn(1, 6, generator=gen), src=0).matmul(w)  # 16·(6 + 24 + 4)
    before = comm.get().get_communication_stats()
    report = meter.aggregate()
    after = comm.get().get_communication_stats()
    return {"report": report.to_dict(), "uncounted": before == after, "md": report.to_markdown()}


@pytest.mark.mpc
def test_meter_on_parties(provider, seed):
    steps = 2
    r0, r1 = run_on(provider, _meter_job, seed, steps)
    assert r0["report"] == r1["report"], "parties got different reports"
    assert r0["uncounted"] and r1["uncounted"], "aggregate() changed the communication counters"
    phases = r0["report"]["phases"]
    qkv = phases["prefill"]["stages"]["qkv"]
    p1_bytes = qkv["party_bytes"][1]
    assert p1_bytes == 16 * (18 + 24 + 12) and qkv["rounds"] >= 2, (seed, qkv)
    if provider == "TFP":
        assert qkv["party_bytes"] == [16 * (18 + 24 + 12)] * 2 and qkv["rounds"] == 2
        assert qkv["wire_bytes"] == 16 * (18 + 24 + 12)
    else:  # the same online cost; the dealer's traffic is counted apart (outside a step: online)
        assert qkv["party_bytes"] == [16 * (18 + 24 + 12)] * 2 and qkv["rounds"] == 2
        assert qkv["dealer_bytes"] > 8 * (12 + 2 * 12) and qkv["dealer_trips"] == 2, qkv
    stages = phases["prefill"]["stages"]
    assert stages["attention/softmax"]["rounds"] >= 8
    assert stages["attention"]["rounds"] >= stages["attention/softmax"]["rounds"]
    assert stages[OTHER]["rounds"] >= 2  # the (h*h) multiplication and the reveal
    total = stages[TOTAL]
    top = ("qkv", "attention", OTHER)
    assert total["rounds"] == sum(stages[s]["rounds"] for s in top), stages
    decode = phases["decode"]
    assert decode["tokens"] == steps and decode["stages"]["qkv"]["calls"] == steps
    assert decode["stages"]["qkv"]["party_bytes"][1] == steps * 16 * (6 + 24 + 4)
    assert "prefill" in r0["md"] and "decode" in r0["md"]
