"""``python -m mpcache.server [--model M] [--port P]``: serve private generations over HTTP (see README)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from launch.banner import security_mode
from plaintext_ref.model_specs import DEFAULT_MODEL, TINY_CONFIGS, check_model_spec, check_tokenizer_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpcache.server",
        description="Private generations over HTTP: a demo server on the client's side (rank 0) that "
                    "starts and supervises the parties and shares the weights once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="The page is at http://HOST:PORT/; the API under /v1 (README, 'Demo server').")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model owner's side: {DEFAULT_MODEL!r}, one of "
                   f"{sorted(TINY_CONFIGS)} (random test models, fast) or a local HuggingFace directory")
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="client's side: its own tokenizer "
                   f"({DEFAULT_MODEL!r}, which also serves the tiny models, or a directory)")
    p.add_argument("--dealer", action="store_true", help="a separate dealer process (TTP: the secure "
                   "mode); default: the dealer emulated inside party 0 (TFP), NOT secure")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the parties compute")
    p.add_argument("--max-new-tokens-limit", type=int, default=64, help="the most tokens one request may ask for")
    p.add_argument("--default-new-tokens", type=int, default=8, help="max_new_tokens of a request that gives none")
    p.add_argument("--queue-limit", type=int, default=32, help="requests that may wait; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies get 413")
    p.add_argument("--timeout-s", type=float, default=120.0, help="seconds for the parties to meet at start-up")
    p.add_argument("--op-timeout-s", type=float, default=600.0, help="one gloo send/recv waits at most this long")
    p.add_argument("--heartbeat-s", type=float, default=5.0, help="idle heartbeat from client to owner")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        check_model_spec(ns.model)
        check_tokenizer_spec(ns.tokenizer)
        if not 1 <= ns.default_new_tokens <= ns.max_new_tokens_limit:
            raise ValueError(f"--default-new-tokens must be in [1, --max-new-tokens-limit "
                             f"{ns.max_new_tokens_limit}], got {ns.default_new_tokens}")
        if ns.queue_limit < 1 or ns.max_body_bytes < 1024:
            raise ValueError("--queue-limit must be >= 1 and --max-body-bytes >= 1024")
        if not 0 < ns.heartbeat_s < ns.op_timeout_s:
            raise ValueError("--heartbeat-s must be > 0 and below --op-timeout-s")
        if ns.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise ValueError("--device cuda but no CUDA device is visible")
    except ValueError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="[server] %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from mpcache.launch import client_tokenizer, vocab_digest
    from mpcache.server.api import ClientSide, Limits, create_app
    from mpcache.server.parties import PartyConfig
    from mpcache.server.supervisor import Supervisor

    tok = client_tokenizer(ns.tokenizer)
    client = ClientSide(tok, ns.tokenizer)
    cfg = PartyConfig(model=ns.model, vocab_digest=vocab_digest(tok), dealer=ns.dealer, device=ns.device,
                      timeout_s=ns.timeout_s, op_timeout_s=ns.op_timeout_s, heartbeat_s=ns.heartbeat_s)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        print(f"mpcache.server: the parties could not start: {message}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    supervisor = Supervisor(cfg, client.decode, eos_ids=client.eos_ids, queue_limit=ns.queue_limit,
                            start_timeout_s=ns.timeout_s + 600, on_fatal=on_fatal)
    limits = Limits(ns.max_body_bytes, ns.max_new_tokens_limit, ns.default_new_tokens)
    app = create_app(supervisor, client, limits)
    server = uvicorn.Server(uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level,
                                           timeout_graceful_shutdown=5, lifespan="off"))
    rule = "=" * 78
    print(f"{rule}\n MPCache demo server: http://{ns.host}:{ns.port}/\n{rule}\n"
          f"security : {security_mode(ns.dealer)}\nparties  : client (rank 0, this side: prompts, tokenizer) · "
          f"model owner (rank 1: weights){' · dealer (rank 2)' if ns.dealer else ''}\n{rule}", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; then leave through ``finally`` (parties stopped)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    supervisor.start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.close()
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
