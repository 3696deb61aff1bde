"""Token agreement of private (MPC) greedy decoding with the plaintext reference, over a prompt set.

For each prompt, two real parties generate ``--new-tokens`` greedy tokens on secret shares
(``mpcache.generate``, EOS ignored so every run has the same length) with the full cache or with
MPCache. The plaintext reference then scores the MPC continuation:

- *position agreement* (the issue's metric): at every position t, MPC token_t equals the plaintext
  argmax given the prompt and the MPC tokens before t (teacher forcing, so one early divergence
  does not count as many). For ``--policy mpcache`` the reference is the plaintext twin
  ``plaintext_ref.policies.mpcache.MPCache`` with the same ``MPCacheConfig``.
- *sequence match*: the MPC continuation equals the plaintext free-running greedy continuation.
- the plaintext top-1 − top-2 logit margin at each position, so a disagreement can be told apart
  from a near-tie that the fixed-point error (|Δlogit| ≲ 1e-2) may legitimately flip.

Prompts run concurrently (``--jobs``, each a pair of processes). Writes ``--out`` (.json + .md).

    python -m benchmarks.secure_agreement --device cuda --jobs 5
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from launch.local import run_parties
from plaintext_ref.mpcache_config import MPCacheConfig
from protocols.config import ProtocolConfig

logger = logging.getLogger(__name__)

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
    "Explain what a prime number is.",
    "How do I reverse a list in Python?",
)
# Shared public context for --policy mpcache so that eviction and selection really act (~150 tokens).
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wiped the great lens, "
    "trimmed the wick and wrote the weather in a worn leather log: wind from the west, a grey swell, "
    "two fishing boats returning late. In winter the storms came in long lines off the Atlantic and "
    "the keeper counted the seconds between the flashes of the neighbouring lights to be sure that "
    "each one still turned. His daughter learned to read from the log, and later she kept the light "
    "herself, until the lamp was automated and the house became a small museum by the harbour. "
)
MPCACHE = MPCacheConfig(static_keep=0.5, cluster_sizes=(16, 8), level_ratios=(0.5, 0.25))
NEAR_TIE = 2e-2  # twice the measured MPC logit error bound (tests/mpcache/test_secure_model.py)


def prompt_ids(tokenizer, i: int, policy: str) -> list[int]:
    from mpcache.generate import encode_prompt
    text = (PASSAGE + PROMPTS[i]) if policy == "mpcache" else PROMPTS[i]
    return encode_prompt(tokenizer, text, raw=False)


def party(model_name: str, ids: list[int], n_new: int, policy: str, device: str) -> dict | None:
    """One party: share SmolLM2, generate greedily; the client returns tokens and timings."""
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, _, config = load_model(model_name)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, ModelArgs.from_hf(config), device=device)
    del hf
    kv = session.policy("mpcache", config=MPCACHE) if policy == "mpcache" else None
    gen = session.generate(ids if rank == 0 else None, len(ids), n_new, policy=kv)
    if rank != 0:
        return None
    return {"tokens": gen.tokens, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s}


def reference(hf, ids: list[int], mpc: list[int], policy: str) -> dict:
    """Plaintext argmax and top-2 margin per position under teacher forcing on the MPC tokens, and
    the free-running plaintext greedy continuation."""
    from plaintext_ref.policies.mpcache import MPCache
    from plaintext_ref.runtime import generate, teacher_forced_logits

    def twin():
        return MPCache(config=MPCACHE) if policy == "mpcache" else None

    seq = torch.tensor([ids + mpc])
    with torch.no_grad():
        logits = teacher_forced_logits(hf, seq, len(ids), twin())[0].float()  # row t predicts mpc[t]
        free = generate(hf, torch.tensor([ids]), twin(), max_new_tokens=len(mpc), eos_token_id=[])
    top = logits.topk(2, dim=-1)
    return {"plain_argmax": top.indices[:, 0].tolist(),
            "margin": (top.values[:, 0] - top.values[:, 1]).tolist(),
            "plain_free": free[0, len(ids):].tolist()}


def run(ns) -> dict:
    from plaintext_ref.models import load_model
    hf, tok, _ = load_model(ns.model, device=ns.device)
    prompts = [prompt_ids(tok, i, ns.policy) for i in range(min(ns.prompts, len(PROMPTS)))]

    def one(i: int) -> dict:
        t0 = time.perf_counter()
        got = run_parties(party, ns.model, prompts[i], ns.new_tokens, ns.policy, ns.device,
                          timeout=ns.timeout)[0]
        logger.info("prompt %d: %s (%.0f s)", i, got["tokens"], time.perf_counter() - t0)
        return got

    with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        results = list(pool.map(one, range(len(prompts))))
    rows = []
    for i, (ids, got) in enumerate(zip(prompts, results)):
        ref = reference(hf, ids, got["tokens"], ns.policy)
        agree = [g == p for g, p in zip(got["tokens"], ref["plain_argmax"])]
        rows.append({"prompt": PROMPTS[i], "prompt_tokens": len(ids), "mpc": got["tokens"], **ref,
                     "agree": agree, "sequence_match": got["tokens"] == ref["plain_free"],
                     "text": tok.decode(got["tokens"]), "prefill_s": got["prefill_s"],
                     "decode_s": got["decode_s"]})
    positions = sum(len(r["agree"]) for r in rows)
    agreed = sum(sum(r["agree"]) for r in rows)
    near = sum(1 for r in rows for a, m in zip(r["agree"], r["margin"]) if not a and m < NEAR_TIE)
    return {"model": ns.model, "policy": ns.policy, "device": ns.device,
            "gpu": torch.cuda.get_device_name() if ns.device == "cuda" else None,
            "mpcache_config": MPCACHE.__dict__ if ns.policy == "mpcache" else None,
            "nonlinear": ProtocolConfig().nonlinear, "new_tokens": ns.new_tokens, "positions": positions, "agreed": agreed,
            "agreement": agreed / positions, "disagreements_near_tie": near,
            "sequences_matched": sum(r["sequence_match"] for r in rows), "rows": rows}


def markdown(runs: list[dict]) -> str:
    lines = [f"# MPC vs plaintext greedy tokens ({runs[0]['model']})", "",
             "Position agreement = MPC token equals the plaintext argmax given the same prefix (teacher "
             "forcing on the MPC tokens); reference = HF full cache (`full`) or the plaintext MPCache twin "
             f"(`mpcache`). A disagreement is a near-tie when the plaintext top-2 margin < {NEAR_TIE}.", "",
             "Non-linears: `poly` = comparisons and Newton steps (runs before issue 14), `lut` = one-round "
             "look-ups (`protocols.lut_nonlinear`, the default since).", "",
             "| policy | non-linears | device | prompts × tokens | agreement | near-tie misses | sequences = plaintext greedy |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['policy']} | {r.get('nonlinear', 'poly')} | {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''} | "
                     f"{len(r['rows'])} × {r['new_tokens']} | {r['agreed']}/{r['positions']} = "
                     f"{100 * r['agreement']:.1f}% | {r['disagreements_near_tie']} | "
                     f"{r['sequences_matched']}/{len(r['rows'])} |")
    for r in runs:
        lines += ["", f"## {r['policy']}", "", "| prompt | P | MPC text | min margin | s/token (decode) |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            dec = sorted(row["decode_s"])[len(row["decode_s"]) // 2] if row["decode_s"] else 0.0
            lines.append(f"| {row['prompt']} | {row['prompt_tokens']} | {row['text']!r} | "
                         f"{min(row['margin']):.3f} | {dec:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--policy", default="full", choices=("full", "mpcache"))
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--jobs", type=int, default=1, help="prompts run concurrently")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default="benchmarks/reports/secure_agreement.json")
    ns = p.parse_args(argv)
    if ns.prompts < 1 or ns.new_tokens < 1 or ns.jobs < 1:
        p.error("need --prompts, --new-tokens and --jobs >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(ns.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    result = run(ns)
    runs = [r for r in runs if (r["policy"], r["device"]) != (ns.policy, ns.device)] + [result]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1))
    out.with_suffix(".md").write_text(markdown(runs))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
