"""``mpirun -n 2 python -m mpcache.launch``: private greedy generation with a secret-shared model.

Rank 0 is the client (prompt, tokenizer; learns only the generated tokens), rank 1 the model owner
(loads the weights and secret-shares them), rank 2 (``mpirun -n 3``) a separate dealer. Prints the
security banner, one progress line per token, the text and a cost table; ``--json-out`` writes them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from launch.banner import PublicInfo, banner, security_mode
from launch.config import LaunchConfig, add_arguments, from_args
from launch.errors import LaunchError
from launch.mpi import Topology
from launch.role import run_role
from mpcache.policy.options import PolicyOptions, add_policy_arguments, policy_options
from plaintext_ref.models import DEFAULT_MODEL, TINY_CONFIGS
from protocols.config import ProtocolConfig, protocol_context
from protocols.dealer import serve

DEFAULT_PROMPT = "What is the capital of France?"
CLIENT, OWNER = 0, 1


@dataclass(frozen=True)
class RunOptions:
    """What to generate (flags ``--model --prompt --max-new-tokens --raw --json-out --log-level``)."""

    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 16
    raw: bool = False
    json_out: str | None = None
    log_level: str = "warning"
    kv: PolicyOptions = PolicyOptions()  # --kv-policy and its knobs

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("--prompt is empty: give the text to continue")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.model not in (DEFAULT_MODEL, *TINY_CONFIGS):
            folder = Path(self.model).expanduser()
            if not (folder / "config.json").is_file():
                raise ValueError(f"--model {self.model!r}: not {DEFAULT_MODEL!r}, one of "
                                 f"{sorted(TINY_CONFIGS)}, or a HuggingFace model directory with a config.json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"--log-level must be debug|info|warning|error, got {self.log_level!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpcache.launch", description=__doc__.split("\n\n")[0],
        epilog="Run under mpirun: `mpirun -n 2 python -m mpcache.launch` (add --oversubscribe -n 3 "
               "for a separate dealer rank).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = RunOptions()
    p.add_argument("--model", default=d.model, help=f"{DEFAULT_MODEL!r}, one of {sorted(TINY_CONFIGS)} "
                   "(random test models), or a local HuggingFace Llama/Qwen2/Mistral/GPT-2 directory")
    p.add_argument("--prompt", default=d.prompt, help="the client's prompt (kept secret)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="generate at most this many tokens (greedy; stops early at end-of-sequence)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--json-out", default=None, help="write tokens, text and costs to this JSON file")
    p.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error"),
                   help="logging level (rank-tagged lines on stderr)")
    add_policy_arguments(p)  # --kv-policy --static-keep --alpha --cluster-sizes ...
    add_arguments(p)  # --master-addr --port --timeout-s --device --dealer ...
    return p


def parse(argv: list[str] | None) -> tuple[RunOptions, LaunchConfig]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        opts = RunOptions(ns.model, ns.prompt, ns.max_new_tokens, ns.raw, ns.json_out, ns.log_level,
                          policy_options(ns))
        return opts, from_args(ns)
    except ValueError as err:
        parser.error(str(err))  # one line + usage, exit 2


def _agree(value, error: str | None, src: int):
    """Broadcast ``(value, error)`` from ``src``; every party raises the same error if one failed."""
    from protocols.compat import comm
    value, error = comm.get().broadcast_obj((value, error), src)
    if error:
        raise LaunchError(error)
    return value


def load_owner_side(opts: RunOptions, rank: int):
    """Model owner loads the weights; everybody gets the public ModelArgs. -> (state_dict|None, args)."""
    from mpcache.model import ModelArgs
    from plaintext_ref.models import load_model
    state, args, error = None, None, None
    if rank == OWNER:
        try:
            model, _, config = load_model(opts.model)
            state, args = model.state_dict(), asdict(ModelArgs.from_hf(config))
        except (OSError, ValueError) as err:
            error = f"model owner cannot load --model {opts.model!r}: {err}"
    return state, ModelArgs(**_agree(args, error, OWNER))  # plain dict: CrypTen's restricted unpickler


def client_tokenizer(spec: str):
    """The client's tokenizer only (never the weights)."""
    from plaintext_ref.models import load_tokenizer
    if spec == DEFAULT_MODEL or spec in TINY_CONFIGS:
        return load_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(spec).expanduser())


def encode_client_side(opts: RunOptions, args, rank: int):
    """Client tokenizes and checks the prompt; everybody gets its (public) length. -> (tok, ids, n)."""
    from mpcache.generate import encode_prompt
    tok, ids, error = None, None, None
    if rank == CLIENT:
        tok = client_tokenizer(opts.model)
        ids = encode_prompt(tok, opts.prompt, opts.raw)
        if not ids:
            error = "the prompt encodes to zero tokens"
        elif len(ids) + opts.max_new_tokens > args.max_seq_len:
            error = (f"prompt of {len(ids)} tokens + --max-new-tokens {opts.max_new_tokens} exceeds "
                     f"the model context of {args.max_seq_len} tokens")
    n = _agree(len(ids) if ids else 0, error, CLIENT)
    return tok, ids, n


def architecture(args) -> str:
    """Public shapes, e.g. ``llama L=30 E=576 H=9 Hkv=3 D=64 F=1536 V=49152``."""
    return (f"{args.family} L={args.n_layers} E={args.dim} H={args.n_heads} Hkv={args.n_kv_heads} "
            f"D={args.head_dim} F={args.hidden_dim} V={args.vocab_size}")


def party_main(opts: RunOptions, topo: Topology, protocol: ProtocolConfig) -> None:
    """What ranks 0 and 1 run after CrypTen is up."""
    from mpcache.generate import generate
    from mpcache.model import share_model
    from mpcache.policy import set_policy
    from protocols.cost import CostMeter
    logging.getLogger().setLevel(opts.log_level.upper())
    rank = topo.rank
    state, args = load_owner_side(opts, rank)
    tok, ids, n_prompt = encode_client_side(opts, args, rank)
    if rank == CLIENT:
        public = PublicInfo(architecture(args), n_prompt, opts.max_new_tokens, protocol.precision_bits)
        print(banner(f"{opts.model} on {topo.device}", topo.dealer, public), flush=True)
    meter = CostMeter()
    t0 = time.perf_counter()
    with meter.phase("setup"), meter.stage("share_weights"):
        model = share_model(state, args, meter, src=OWNER, device=topo.device)
    del state
    set_policy(model, opts.kv.build(meter))
    setup_s = time.perf_counter() - t0
    eos = frozenset(t for t in (getattr(tok, "eos_token_id", None),) if t is not None)

    def progress(step: int, token: int | None, seconds: float) -> None:
        if rank == CLIENT:
            print(f"token {step + 1:>3}/{opts.max_new_tokens}  id {token:>6}  "
                  f"{tok.decode([token])!r:<16} {seconds:6.2f} s", flush=True)

    gen = generate(model, ids, n_prompt, opts.max_new_tokens, eos, meter, on_token=progress)
    report(opts, topo, tok, gen, meter.aggregate(), setup_s)


def report(opts: RunOptions, topo: Topology, tok, gen, costs, setup_s: float) -> None:
    """Client prints the text and the cost table and writes --json-out."""
    if topo.rank != CLIENT:
        return
    text = tok.decode(gen.tokens, skip_special_tokens=True)
    print(f"\n{text}\n", flush=True)
    Console(width=140, color_system=None).print(costs.to_rich())
    decode = sum(gen.decode_s) / max(len(gen.decode_s), 1)
    print(f"tokens {gen.n_generated} | setup {setup_s:.1f} s | prefill {gen.prefill_s:.2f} s | "
          f"decode {decode:.2f} s/token | provider {topo.provider} | {security_mode(topo.dealer)}")
    kv = opts.kv.build().describe(gen.n_prompt, gen.n_generated)  # public budget numbers
    print(f"kv policy {kv['policy']} | cache after prefill {kv['cache_after_prefill']} tokens | "
          f"attended at the last step {kv['attended_last_step']} tokens | effective budget {kv['budget']:.1%}")
    if opts.json_out:
        out = {"options": asdict(opts), "tokens": gen.tokens, "text": text, "n_prompt": gen.n_prompt,
               "setup_s": setup_s, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
               "provider": topo.provider, "dealer": topo.dealer, "device": topo.device,
               "costs": costs.to_dict(), "kv_policy": kv}
        Path(opts.json_out).write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> int:
    opts, cfg = parse(argv)
    protocol = ProtocolConfig()

    def party(topo: Topology) -> None:
        with protocol_context(protocol):
            party_main(opts, topo, protocol)

    return run_role(party, cfg, dealer_main=lambda: serve(protocol), verbose=opts.log_level == "debug")


if __name__ == "__main__":
    sys.exit(main())
