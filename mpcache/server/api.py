"""The HTTP side: request checks, the JSON API and the page (FastAPI on uvicorn).

    POST /v1/generate               {"prompt": ..., "kv_policy": ..., "budget": ..., "stream": ...}
    POST /v1/generate/{id}/cancel   stop a queued or running request (running: after its current token)
    GET  /v1/health                 200 when the parties are ready (503 while they start), party PIDs
    GET  /v1/config                 model, public shapes, security mode, policies and their knobs, limits
    GET  /                          the page (``static/index.html``)

Every error is ``{"error": "one line"}`` with a 4xx/5xx status. A request is checked completely
before it is queued: body size (413), content type (415), UTF-8 and JSON (400), fields, policy and
knobs (``mpcache.options.PolicyOptions``), prompt tokens vs the model context (422). Streaming
responses are server-sent events: ``accepted``, ``queued`` (place in line), ``start`` (per run),
``token``, ``run_done``, then ``done`` (the same body as the non-streaming answer) or ``error``.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpcache.options import KNOBS, POLICIES, PolicyOptions, flag
from mpcache.server.supervisor import Job, QueueFull, Supervisor

_KNOB_NAMES = tuple(dict.fromkeys(k for p in POLICIES for k in KNOBS[p]))
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEEPALIVE_S = 15.0
_TYPES = {  # field -> (python types accepted, description for the message)
    "prompt": ((str,), "a string"), "max_new_tokens": ((int,), "an integer"),
    "kv_policy": ((str,), "a string"), "raw": ((bool,), "true or false"),
    "stream": ((bool,), "true or false"), "compare_full": ((bool,), "true or false"),
    "id": ((str,), "a string"),
    "static_keep": ((int, float), "a number"), "alpha": ((int, float), "a number"),
    "budget": ((int, float), "a number"), "share": ((bool,), "true or false"),
    "n_sink": ((int,), "an integer"), "n_recent": ((int,), "an integer"),
    "page_size": ((int,), "an integer"),
    "cluster_sizes": ((list,), "a list of integers"), "level_ratios": ((list,), "a list of numbers"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_new_tokens: int = 64          # the most a request may ask for
    default_new_tokens: int = 8


class ClientSide:
    """The client's tokenizer in the server process (thread-safe: one lock around it)."""

    def __init__(self, tokenizer, spec: str) -> None:
        self.tokenizer, self.spec = tokenizer, spec
        self._lock = threading.Lock()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if eos is not None else [])

    def encode(self, prompt: str, raw: bool) -> list[int]:
        from mpcache.generate import encode_prompt
        with self._lock:
            return encode_prompt(self.tokenizer, prompt, raw)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class GenerateRequest:
    prompt: str
    kv: PolicyOptions
    max_new_tokens: int
    raw: bool = False
    stream: bool = False
    compare_full: bool = False
    id: str | None = None
    ids: list[int] = field(default_factory=list)


def _api_message(text: str) -> str:
    """PolicyOptions speaks in CLI flags (``--budget``); the API's fields are ``budget``."""
    names = {flag(k): k for k in _TYPES} | {"--kv-policy": "kv_policy", "--no-share": "share"}
    for cli, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(cli, name)
    return text


def parse_body(body: bytes, content_type: str | None, limit: int) -> dict:
    """Raw bytes -> a JSON object, or ApiError 413 / 415 / 400 / 422."""
    if len(body) > limit:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limit} bytes")
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"send the request as application/json, got content type {content_type or 'none'!r}")
    charset = re.search(r"charset=([\w-]+)", content_type or "", re.I)
    if charset and charset.group(1).lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ApiError(415, f"the body must be UTF-8 JSON, got charset {charset.group(1)!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8: byte {body[err.start]:#04x} at offset {err.start}") from None
    if not text.strip():
        raise ApiError(400, "the body is empty: send a JSON object such as {\"prompt\": \"Hello\"}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err}") from None
    if not isinstance(value, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def parse_generate(obj: dict, limits: Limits) -> GenerateRequest:
    """A JSON object -> a checked request (ApiError 422 with one line on any bad field)."""
    unknown = sorted(set(obj) - set(_TYPES))
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_TYPES)}")
    for name, value in obj.items():
        types, what = _TYPES[name]
        if value is None and name not in ("prompt",):
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ApiError(422, f"{name} must be {what}, got {json.dumps(value)[:40]}")
    if "prompt" not in obj:
        raise ApiError(422, "prompt is required: the text to continue")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ApiError(422, f"prompt must be a string, got {json.dumps(prompt)[:40]}")
    if not prompt.strip():
        raise ApiError(422, "prompt is empty: give the text to continue")
    n_new = obj.get("max_new_tokens")
    n_new = limits.default_new_tokens if n_new is None else n_new
    if not 1 <= n_new <= limits.max_new_tokens:
        raise ApiError(422, f"max_new_tokens must be in [1, {limits.max_new_tokens}] (this server's limit), "
                            f"got {n_new}")
    rid = obj.get("id")
    if rid is not None and not _ID.match(rid):
        raise ApiError(422, "id must be 1 to 64 characters of letters, digits, '.', '_' or '-'")
    policy = obj.get("kv_policy") or "full"
    if policy not in POLICIES:
        raise ApiError(422, f"unknown kv_policy {policy!r}; choose one of {', '.join(POLICIES)}")
    knobs = {k: obj[k] for k in _KNOB_NAMES if obj.get(k) is not None}  # a stray knob: PolicyOptions says so
    for name in ("cluster_sizes", "level_ratios"):
        if name in knobs:
            kind = int if name == "cluster_sizes" else (int, float)
            if not knobs[name] or any(isinstance(x, bool) or not isinstance(x, kind) for x in knobs[name]):
                raise ApiError(422, f"{name} must be {_TYPES[name][1]}, got {json.dumps(knobs[name])[:40]}")
            knobs[name] = tuple(knobs[name])
    try:
        kv = PolicyOptions(kv_policy=policy, **knobs)
    except ValueError as err:
        raise ApiError(422, _api_message(str(err))) from None
    return GenerateRequest(prompt, kv, n_new, bool(obj.get("raw", False)), bool(obj.get("stream", False)),
                           bool(obj.get("compare_full", False)), rid)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it is over ``limit`` (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def create_app(supervisor: Supervisor, client: ClientSide, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="MPCache demo server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        text = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return JSONResponse({"error": text}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.get("/")
    async def page() -> Response:
        html = resources.files("mpcache.server").joinpath("static/index.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    @app.get("/v1/health")
    async def health() -> JSONResponse:
        body = supervisor.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/v1/config")
    async def config() -> JSONResponse:
        info = supervisor.info or {}
        args = info.get("args") or {}
        return JSONResponse({
            "status": supervisor.state, "model": info.get("model"), "architecture": info.get("architecture"),
            "max_seq_len": args.get("max_seq_len"), "vocab_size": args.get("vocab_size"),
            "device": info.get("device"), "tokenizer": client.spec,
            "security": supervisor.security(),
            "setup": {k: info.get(k) for k in ("setup_s", "setup_wire_bytes", "setup_rounds")},
            "policies": list(POLICIES), "knobs": {p: list(k) for p, k in KNOBS.items()},
            "limits": {"max_new_tokens": limits.max_new_tokens, "default_new_tokens": limits.default_new_tokens,
                       "max_body_bytes": limits.max_body_bytes, "queue_limit": supervisor.queue_limit},
            "public_by_design": ("architecture and shapes, prompt length, number of generated tokens, every "
                                 "KV budget, fixed-point precision"),
            "secret": ("prompt and token ids (the generated tokens go to the client only), weights, "
                       "activations, KV cache, attention scores, which tokens/clusters were kept")})

    @app.post("/v1/generate/{job_id}/cancel")
    async def cancel(job_id: str) -> JSONResponse:
        try:
            state = supervisor.cancel(job_id)
        except KeyError as err:
            raise ApiError(404, err.args[0]) from None
        except ValueError as err:
            raise ApiError(409, str(err)) from None
        return JSONResponse({"id": job_id, **state})

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        body = await _read_body(request, limits.max_body_bytes)
        req = parse_generate(parse_body(body, request.headers.get("content-type"), limits.max_body_bytes), limits)
        info = supervisor.info
        if info is None:
            raise ApiError(503, f"the parties are {supervisor.state} ({supervisor.detail}); retry shortly",
                           {"Retry-After": "5"})
        ids = await asyncio.to_thread(client.encode, req.prompt, req.raw)
        if not ids:
            raise ApiError(422, "the prompt encodes to zero tokens")
        context = info["args"]["max_seq_len"]
        if len(ids) + req.max_new_tokens > context:
            raise ApiError(422, f"prompt of {len(ids)} tokens + max_new_tokens {req.max_new_tokens} exceeds "
                                f"the model context of {context} tokens")
        try:  # the policy's public budgets on this prompt (mpcache.policy; no MPC)
            await asyncio.to_thread(lambda: req.kv.build().describe(len(ids), req.max_new_tokens))
        except (ValueError, AssertionError) as err:
            raise ApiError(422, _api_message(" ".join(str(err).split()))) from None
        job = Job(ids=ids, kv=req.kv.public(), max_new_tokens=req.max_new_tokens,
                  compare_full=req.compare_full, raw=req.raw, **({"id": req.id} if req.id else {}))
        job.attach()
        try:
            position = supervisor.submit(job)
        except QueueFull as err:
            raise ApiError(503, str(err), {"Retry-After": "10"}) from None
        except KeyError as err:
            raise ApiError(409, err.args[0]) from None
        if req.stream:
            return StreamingResponse(_stream(job, position), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no",
                                              "X-Request-Id": job.id})
        return await _wait(request, job)

    async def _stream(job: Job, position: int):
        try:
            yield _sse("accepted", {"id": job.id, "position": position, "prompt_tokens": len(job.ids)})
            while True:
                try:
                    kind, data = await asyncio.wait_for(job.events.get(), timeout=_KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield _sse(kind, data)
                if kind in ("done", "error"):
                    return
        finally:  # the client went away (or we are done): a request nobody reads is cancelled
            if not job.ended:
                try:
                    supervisor.cancel(job.id)
                except (KeyError, ValueError):
                    pass

    async def _wait(request: Request, job: Job) -> JSONResponse:
        while True:
            try:
                kind, data = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected() and not job.ended:
                    try:
                        supervisor.cancel(job.id)
                    except (KeyError, ValueError):
                        pass
                continue
            if kind == "done":
                return JSONResponse(data, headers={"X-Request-Id": job.id})
            if kind == "error":
                headers = {"X-Request-Id": job.id, **({"Retry-After": "10"} if data["status"] == 503 else {})}
                return JSONResponse({k: v for k, v in data.items() if k != "status"}, status_code=data["status"],
                                    headers=headers)

    return app
