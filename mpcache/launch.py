"""``mpirun -n 3 python -m mpcache.launch < prompt.txt``: private greedy generation on secret shares.

Each party's secret input reaches that party's process only. Rank 0, the client, reads the prompt
from standard input (Open MPI forwards stdin to rank 0 alone) or from ``--prompt-file`` and uses its
own ``--tokenizer``; it learns only the generated tokens. Rank 1, the model owner, alone reads
``--model`` and secret-shares the weights. Rank 2 (``mpirun -n 3``) is a separate dealer. Before
any work every rank checks its own inputs and all ranks check that they were given the same public
options; then the client prints the security banner, progress bars for weight sharing and prefill,
one line per token, the text and a cost table; ``--json-out`` writes them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launch.agreement import code_digest, options_digest
from launch.banner import PublicInfo, banner, security_mode
from launch.config import LaunchConfig, add_arguments, from_args
from launch.errors import LaunchError, describe_rank
from launch.mpi import Topology, env_rank, under_mpi
from launch.role import run_role
from mpcache.options import PolicyOptions, add_policy_arguments, policy_options
from plaintext_ref.model_specs import DEFAULT_MODEL, NAMED, TINY_CONFIGS, check_model_spec, check_tokenizer_spec
from protocols.config import ProtocolConfig, protocol_context

CLIENT, OWNER = 0, 1
STARTED = time.monotonic()  # the others' rendezvous deadlines run from about their start, too
STDIN_HINT_AFTER_S = 1.0
STDIN_IDLE_S = 0.5
PROMPT_FLAG_WARNING = ("warning: --prompt is on the command line of every rank, so the model owner's "
                       "process can read it (and a hostfile launch ships it to the owner's host); "
                       "pipe the prompt on standard input or use --prompt-file")


@dataclass(frozen=True)
class RunOptions:
    """What to generate.

    Public, agreed by every rank: ``max_new_tokens``, ``kv``. Client only (ignored elsewhere):
    ``prompt_file`` / ``prompt`` (stdin when neither), ``tokenizer``, ``raw``, ``json_out``.
    Model owner only: ``model``. Per rank: ``log_level``.
    """

    model: str = DEFAULT_MODEL
    tokenizer: str = DEFAULT_MODEL
    prompt_file: str | None = None
    prompt: str | None = None
    max_new_tokens: int = 16
    raw: bool = False
    json_out: str | None = None
    log_level: str = "warning"
    kv: PolicyOptions = PolicyOptions()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give the prompt once: --prompt-file or --prompt (or standard input), not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty: give the text to continue")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"--log-level must be debug|info|warning|error, got {self.log_level!r}")

    def public(self, protocol: ProtocolConfig) -> dict[str, object]:
        """What every rank must agree on (all public): token count, policy and budgets, protocol, code."""
        return {"max_new_tokens": self.max_new_tokens, "kv": self.kv.public(),
                "protocol": asdict(protocol), "code": code_digest()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line and exit code 2 (argparse would print the whole usage block first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mpcache.launch", description=__doc__.split("\n\n")[0],
        epilog="Run under mpirun, prompt on standard input: `echo 'Hi!' | mpirun --oversubscribe -n 3 "
               "python -m mpcache.launch` (client, model owner, dealer; -n 2 puts the dealer inside party 0: "
               "NOT secure). Two hosts: README, 'Running a private generation'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = RunOptions()
    client = p.add_argument_group("client (rank 0) only; other ranks never read these")
    client.add_argument("--prompt-file", help="read the prompt from this file (default: standard input)")
    client.add_argument("--prompt", help="the prompt as a flag: a local convenience only, since every "
                        "rank, the model owner's included, receives the same command line")
    client.add_argument("--tokenizer", default=d.tokenizer, help=f"{DEFAULT_MODEL!r} (also serves "
                        f"{sorted(TINY_CONFIGS)}) or a local directory with the model's tokenizer files")
    client.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    client.add_argument("--json-out", help="write tokens, text and costs to this JSON file")
    owner = p.add_argument_group("model owner (rank 1) only")
    owner.add_argument("--model", default=d.model, help=f"{DEFAULT_MODEL!r}, one of {sorted(TINY_CONFIGS)} "
                       "(random test models), or a local HuggingFace Llama/Qwen2/Mistral/GPT-2 directory")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="generate at most this many tokens (greedy; stops early at end-of-sequence)")
    p.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error"),
                   help="logging level (rank-tagged lines on stderr)")
    add_policy_arguments(p)  # --kv-policy --static-keep --alpha --cluster-sizes ...
    add_arguments(p)  # --master-addr --port --timeout-s --device --dealer ...
    return p


def parse(argv: list[str] | None) -> tuple[RunOptions, LaunchConfig]:
    """Flags -> options; a bad flag exits with one line + usage (code 2). Light: no torch, no CrypTen."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        opts = RunOptions(ns.model, ns.tokenizer, ns.prompt_file, ns.prompt, ns.max_new_tokens, ns.raw,
                          ns.json_out, ns.log_level, policy_options(ns))
        return opts, from_args(ns)
    except ValueError as err:
        parser.error(str(err))


# ---- the client's own input, read and checked before any rank does work ---------------------------
def _check_output(path: str) -> None:
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"--json-out {path!r} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"--json-out {path!r}: folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--json-out {path!r}: folder {str(out.parent)!r} is not writable")


def _read_stdin(wait_s: float) -> bytes:
    """Standard input up to EOF, or up to the first pause of ``STDIN_IDLE_S`` after some data.

    The pause rule exists because Open MPI 5 never forwards the end of mpirun's standard input to
    rank 0 (measured with 5.0.11: ``echo x | mpirun -n 1 cat`` never ends); a pipe or a file arrives
    in one burst, and a terminal sends a line at a time, so a prompt typed by hand is one line.
    Raises ValueError when nothing arrives within ``wait_s`` (the other ranks wait that long).
    """
    fd, data = sys.stdin.fileno(), b""
    start = last = time.monotonic()
    hinted = False
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)
        now = time.monotonic()
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return data
            data, last = data + chunk, now
        elif data and now - last >= STDIN_IDLE_S:
            return data
        elif not data and now - start >= wait_s:
            raise ValueError(f"no prompt on standard input within {wait_s:.0f} s: pipe it "
                             "(echo 'text' | mpirun ...) or give --prompt-file FILE")
        elif not data and not hinted and now - start >= STDIN_HINT_AFTER_S:
            print("client: waiting for the prompt on standard input (type it on one line, or pipe "
                  "it, or pass --prompt-file FILE)", file=sys.stderr, flush=True)
            hinted = True


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"the prompt ({source}) is not UTF-8 text: byte {data[err.start]:#04x} at "
                         f"offset {err.start}") from None


def read_prompt(opts: RunOptions, wait_s: float) -> str:
    """The prompt, from ``--prompt-file``, ``--prompt`` (with a warning) or standard input."""
    if opts.prompt_file is not None:
        try:
            text = _decode(Path(opts.prompt_file).expanduser().read_bytes(), f"--prompt-file {opts.prompt_file}")
        except OSError as err:
            raise ValueError(f"--prompt-file {opts.prompt_file!r}: {err.strerror}") from None
    elif opts.prompt is not None:
        print(PROMPT_FLAG_WARNING, file=sys.stderr, flush=True)
        try:
            opts.prompt.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogate escapes
            raise ValueError("--prompt is not UTF-8 text") from None
        text = opts.prompt
    else:
        text = _decode(_read_stdin(wait_s), "standard input")
    text = text.removesuffix("\n")
    if not text.strip():
        raise ValueError("the prompt is empty: pipe it on standard input (echo 'text' | mpirun ...) "
                         "or give --prompt-file FILE")
    return text


def client_tokenizer(spec: str):
    """The client's own tokenizer (never the weights)."""
    if spec in NAMED:
        from plaintext_ref.models import load_tokenizer
        return load_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(spec).expanduser())


def vocab_digest(tok) -> str:
    """sha256 (12 hex) of a tokenizer's vocabulary: the client's must be the model's."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]


@dataclass
class ClientInput:
    tokenizer: object
    ids: list[int]


def client_input(opts: RunOptions, wait_s: float) -> ClientInput:
    """Check the client's flags, read the prompt, tokenize it (raises ValueError with one line).

    ``wait_s``: how long standard input may stay silent (the other ranks' rendezvous deadline).
    """
    check_tokenizer_spec(opts.tokenizer)
    if opts.json_out:
        _check_output(opts.json_out)
    text = read_prompt(opts, wait_s)
    from mpcache.generate import encode_prompt  # heavy (torch, CrypTen): after the light checks
    tok = client_tokenizer(opts.tokenizer)
    ids = encode_prompt(tok, text, opts.raw)
    if not ids:
        raise ValueError("the prompt encodes to zero tokens")
    return ClientInput(tok, ids)


# ---- after bring-up: what the owner tells everybody, and the checks against it --------------------
def _agree(value, error: str | None, src: int):
    """Broadcast ``(value, error)`` from ``src``; every party raises the same error if one failed."""
    from protocols.compat import comm
    value, error = comm.get().broadcast_obj((value, error), src)
    if error:
        raise LaunchError(error)
    return value


def load_owner_side(opts: RunOptions, rank: int):
    """The owner loads the weights; everybody gets the public ModelArgs, a label and the vocabulary digest.

    -> (state_dict | None, ModelArgs, label, vocab digest). The label never shows a path.
    """
    from mpcache.model import ModelArgs
    state, public, error = None, None, None
    if rank == OWNER:
        from plaintext_ref.models import load_model
        try:
            model, tok, config = load_model(opts.model)
            state = model.state_dict()
            label = opts.model if opts.model in NAMED else f"local {config.model_type} model"
            public = (asdict(ModelArgs.from_hf(config)), label, vocab_digest(tok))
        except (OSError, ValueError) as err:
            error = f"model owner cannot load --model {opts.model!r}: {err}"
    args, label, digest = _agree(public, error, OWNER)  # plain builtins: CrypTen's restricted unpickler
    return state, ModelArgs(**args), label, digest


def check_client_side(opts: RunOptions, mine: ClientInput | None, args, digest: str) -> int:
    """The client checks its tokenizer and prompt length against the model; -> the public prompt length."""
    error, n = None, 0
    if mine is not None:
        n = len(mine.ids)
        if vocab_digest(mine.tokenizer) != digest:
            error = (f"the client's tokenizer ({opts.tokenizer}) is not the model's: give the client "
                     "--tokenizer DIR, a local copy of the model's tokenizer files")
        elif n + opts.max_new_tokens > args.max_seq_len:
            error = (f"prompt of {n} tokens + --max-new-tokens {opts.max_new_tokens} exceeds "
                     f"the model context of {args.max_seq_len} tokens")
    return _agree(n, error, CLIENT)


def architecture(args) -> str:
    """Public shapes, e.g. ``llama L=30 E=576 H=9 Hkv=3 D=64 F=1536 V=49152``."""
    return (f"{args.family} L={args.n_layers} E={args.dim} H={args.n_heads} Hkv={args.n_kv_heads} "
            f"D={args.head_dim} F={args.hidden_dim} V={args.vocab_size}")


def _bar(rank: int, desc: str, unit: str):
    """A progress callback ``(done, total)`` drawing a bar on the client's stderr (None elsewhere)."""
    if rank != CLIENT:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return update, bar.close


def party_main(opts: RunOptions, mine: ClientInput | None, topo: Topology, protocol: ProtocolConfig,
               public_digest: str) -> None:
    """What ranks 0 and 1 run after CrypTen is up."""
    import logging

    from mpcache.session import PrivateSession
    logging.getLogger().setLevel(opts.log_level.upper())
    rank = topo.rank
    state, args, label, digest = load_owner_side(opts, rank)
    n_prompt = check_client_side(opts, mine, args, digest)
    budgets = {k: v for k, v in opts.kv.build().describe(n_prompt, opts.max_new_tokens).items() if k != "policy"}
    if rank == CLIENT:
        public = PublicInfo(architecture(args), n_prompt, opts.max_new_tokens, protocol.precision_bits,
                            {"kv policy": opts.kv.kv_policy, **budgets, "options digest": public_digest})
        print(banner(f"{label} on {topo.device}", topo.dealer, public), flush=True)
    t0 = time.perf_counter()
    progress, done = _bar(rank, "sharing weights", "tensor")
    session = PrivateSession(state, args, src=OWNER, device=topo.device, progress=progress)
    done()
    del state
    setup_s = time.perf_counter() - t0
    tok = mine.tokenizer if mine else None
    eos = frozenset(t for t in (getattr(tok, "eos_token_id", None),) if t is not None)
    on_prefill, prefill_done = _bar(rank, f"prefill ({n_prompt} tokens)", "layer")

    def on_token(step) -> None:
        if step.index == 0:
            prefill_done()
        if rank == CLIENT:
            print(f"token {step.index + 1:>3}/{opts.max_new_tokens}  id {step.token:>6}  "
                  f"{tok.decode([step.token])!r:<16} {step.seconds:6.2f} s", flush=True)

    gen = session.generate(mine.ids if mine else None, n_prompt, opts.max_new_tokens,
                           policy=opts.kv.build(session.meter), eos_ids=eos, on_token=on_token,
                           on_prefill=on_prefill)
    costs = session.costs()
    if rank == CLIENT:
        report(opts, topo, tok, gen, costs, setup_s, budgets, protocol)


def report(opts: RunOptions, topo: Topology, tok, gen, costs, setup_s: float, budgets: dict,
           protocol: ProtocolConfig) -> None:
    """The client prints the text and the cost table and writes --json-out."""
    from rich.console import Console
    text = tok.decode(gen.tokens, skip_special_tokens=True)
    print(f"\n{text}\n", flush=True)
    Console(width=140, color_system=None).print(costs.to_rich(per_token=("decode",)))
    decode = (f"decode {statistics.mean(gen.decode_s):.2f} s/token mean, "
              f"{statistics.median(gen.decode_s):.2f} median over {len(gen.decode_s)}"
              if gen.decode_s else "decode: none (one token)")
    print(f"tokens {gen.n_generated} | setup {setup_s:.1f} s | prefill {gen.prefill_s:.2f} s "
          f"({gen.n_prompt} tokens) | {decode} | provider {topo.provider} | {security_mode(topo.dealer)}")
    print(f"kv policy {opts.kv.kv_policy} | cache after prefill {budgets['cache_after_prefill']} tokens | "
          f"attended at the last step {budgets['attended_last_step']} tokens | "
          f"effective budget {budgets['budget']:.1%}")
    if opts.json_out:
        out = {"options": opts.public(protocol), "tokenizer": opts.tokenizer, "tokens": gen.tokens,
               "text": text, "n_prompt": gen.n_prompt, "setup_s": setup_s, "prefill_s": gen.prefill_s,
               "decode_s": gen.decode_s, "provider": topo.provider, "dealer": topo.dealer,
               "device": topo.device, "costs": costs.to_dict(), "kv_policy": {"policy": opts.kv.kv_policy, **budgets}}
        Path(opts.json_out).expanduser().write_text(json.dumps(out, indent=2))


def _role_input(opts: RunOptions, cfg: LaunchConfig) -> ClientInput | None:
    """This rank's own input, checked before it joins the others (raises ValueError)."""
    rank = env_rank()
    if rank == CLIENT:  # give up on stdin well before the others' rendezvous deadline (from start)
        return client_input(opts, wait_s=max(1.0, 0.8 * cfg.timeout_s - 5 - (time.monotonic() - STARTED)))
    if rank == OWNER:
        check_model_spec(opts.model)
    return None


def main(argv: list[str] | None = None) -> int:
    opts, cfg = parse(argv)
    protocol = ProtocolConfig()
    public = opts.public(protocol)  # at start: the code digest is of the code this rank started with
    digest = options_digest(public)
    mine, rejected = None, False
    if under_mpi():
        try:
            mine = _role_input(opts, cfg)
        except ValueError as err:  # said at once; the rank still joins so that all stop together
            print(f"mpcache: {describe_rank(env_rank() or 0)}: {err}", file=sys.stderr, flush=True)
            rejected = True

    def party(topo: Topology) -> None:
        with protocol_context(protocol):
            party_main(opts, mine, topo, protocol, digest)

    def dealer() -> None:
        from protocols.dealer import serve
        serve(protocol)

    return run_role(party, cfg, dealer_main=dealer, verbose=opts.log_level == "debug", public=public,
                    rejected=rejected)


if __name__ == "__main__":
    sys.exit(main())
