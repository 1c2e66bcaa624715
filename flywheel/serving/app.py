"""flywheel serve: the model behind an HTTP API the OpenAI client library speaks.

  POST /v1/chat/completions, POST /v1/completions (both also with stream: true, as server-sent
       events), GET /v1/models
  POST /v1/feedback     {request_id, rating | preferred_response | alternative + preferred}
  GET  /healthz         the process is up;  GET /readyz: the model is loaded
  GET  /metrics         Prometheus: requests, latency, batch sizes, tokens, errors

Concurrent requests are generated in batches (flywheel/serving/batching.py). Every request is logged,
PII-redacted, to the request log (flywheel/serving/request_log.py) by a background thread; SIGTERM
stops the server gracefully and the log is drained before the process exits. Responses name the
model version. API keys: FLYWHEEL_API_KEYS (comma-separated) or a file named by
FLYWHEEL_API_KEYS_FILE (one per line); with neither, the API is open (a warning says so).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Request  # FastAPI reads handler annotations from module globals
from pydantic import BaseModel, ConfigDict, Field

from flywheel.config import ServeParams
from flywheel.errors import FlywheelError

CANARY_HEADER = "x-flywheel-canary"
CANARY_PREFIX = "canary:"  # as flywheel.serving.request_log.CANARY_PREFIX (not imported: it loads SQLAlchemy)
KEYS_VARIABLE = "FLYWHEEL_API_KEYS"
KEYS_FILE_VARIABLE = "FLYWHEEL_API_KEYS_FILE"
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback",
                       "/healthz", "/readyz", "/metrics"})


# ---------------------------------------------------------------------------------------------
# Requests (OpenAI's shapes; unknown fields are accepted and ignored, as OpenAI's server does)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    rating: Literal["up", "down"] | None = None
    preferred_response: str | None = None
    alternative: str | None = None
    preferred: Literal["response", "alternative"] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# ---------------------------------------------------------------------------------------------
# Keys and rate limits


def load_api_keys() -> list[str]:
    keys = [k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()]
    path = os.environ.get(KEYS_FILE_VARIABLE)
    if path:
        try:
            keys += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise FlywheelError(f"{KEYS_FILE_VARIABLE}={path}: cannot read it ({error.strerror})") from None
    return keys


def client_headers() -> dict[str, str]:
    """Headers for this project's own clients of the API (deploy's checks, the monitor's
    canaries): the first configured key as a bearer token, none when the API is open."""
    keys = load_api_keys()
    return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def key_name(key: str) -> str:
    """What the log and metrics call a key: a hash prefix, never the key."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class RateLimiter:
    """A token bucket per client: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int):
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            allowed = tokens >= 1
            self._buckets[client] = (tokens - 1 if allowed else tokens, now)
            return allowed


# ---------------------------------------------------------------------------------------------
# The model


def require_model(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FlywheelError(f"{model_dir} is not a model (no config.json there); set serve.model in "
                            "params.yaml or run the pipeline first (dvc repro)")


def model_version(model_dir: Path) -> str:
    """The registry version recorded with the model (by deploy), else a hash of its weights."""
    lineage = model_dir / "lineage.json"
    if lineage.is_file():
        version = json.loads(lineage.read_text()).get("version")
        if version:
            return str(version)
    weights = sorted(model_dir.glob("*.safetensors"))
    if weights:
        from flywheel.modeling import file_md5

        return f"md5-{file_md5(weights[0])[:12]}"
    return "unversioned"


class Engine:
    """The loaded model, its batcher and its metrics."""

    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from prometheus_client import Counter, Histogram

        from flywheel.serving import batching
        from flywheel import modeling

        require_model(model_dir)
        self.model, self.tokenizer = modeling.load_pretrained(str(model_dir))
        self.model.eval()
        self.name = model_dir.name
        self.version = model_version(model_dir)
        self.batch_sizes = Histogram("flywheel_batch_size", "requests per generated batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.tokens = Counter("flywheel_generated_tokens", "tokens generated", registry=registry)
        self.generation_seconds = Counter("flywheel_generation_seconds", "seconds spent generating "
                                          "(tokens/s = rate of tokens / rate of this)", registry=registry)

        def record(size, tokens, seconds):
            self.batch_sizes.observe(size)
            self.tokens.inc(tokens)
            self.generation_seconds.inc(seconds)

        self.batcher = batching.Batcher(
            lambda jobs: batching.generate_batch(self.model, self.tokenizer, jobs),
            max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms, on_batch=record)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(config: ServeParams, model_dir: Path, request_log, api_keys: list[str]):
    import asyncio

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    requests_total = Counter("flywheel_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("flywheel_request_latency_seconds", "request latency", ["endpoint"], registry=registry)
    errors = Counter("flywheel_errors", "responses with status >= 400", ["endpoint", "status"], registry=registry)
    state = {"engine": None}
    limiter = RateLimiter(config.rate_limit_per_minute)

    def load() -> None:
        try:
            state["engine"] = Engine(config, model_dir, registry)
        except Exception as error:  # readyz reports it; the process stays up to say so
            state["error"] = f"{type(error).__name__}: {error}"
            print(f"flywheel serve: the model could not be loaded: {state['error']}", flush=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="load-model", daemon=True).start()  # readyz: 503 until loaded
        yield
        # Shutdown (SIGTERM, Ctrl-C) runs this before uvicorn returns or re-raises the signal:
        # queued generations finish, then every logged request is written.
        if state["engine"] is not None:
            state["engine"].batcher.close()
        request_log.close()
        print(f"flywheel serve: stopped; {request_log.written:,} requests logged", flush=True)

    app = FastAPI(title="Flywheel serving", docs_url=None, redoc_url=None, lifespan=lifespan)

    def engine() -> Engine:
        if state["engine"] is None:
            raise ApiError(503, state.get("error") or "the model is still loading", "server_error")
        return state["engine"]

    def error_response(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                            status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"], "invalid_request_error")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # Label by route, not by whatever path a client sent: metrics cardinality stays bounded.
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        if response.status_code >= 400:
            errors.labels(endpoint, str(response.status_code)).inc()
        return response

    def authorise(request: Request) -> str:
        """The client's name (a key's hash prefix, or its address when the API is open)."""
        if api_keys:
            header = request.headers.get("authorization", "")
            given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            matched = [key for key in api_keys if hmac.compare_digest(given.encode(), key.encode())]
            if not matched:
                raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                               "authentication_error")
            client = key_name(matched[0])
        else:
            client = request.client.host if request.client else "unknown"
        if not limiter.allow(client):
            raise ApiError(429, f"rate limit of {config.rate_limit_per_minute} requests per minute "
                                "exceeded", "rate_limit_error")
        return client

    def budget(body: _Request) -> int:
        asked = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        if asked > config.max_tokens:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {config.max_tokens}")
        return asked

    def prepare(endpoint: str, messages: list[dict], prompt: str, body: _Request):
        """(the engine, the job) for a request, after its limits are checked."""
        from flywheel.serving.batching import Job

        if len(prompt) > config.max_prompt_chars:
            raise ApiError(400, f"the prompt is {len(prompt):,} characters; this server takes at most "
                                f"{config.max_prompt_chars:,}")
        serving = engine()
        job = Job(prompt=serving.chat_prompt(messages) if endpoint.endswith("chat/completions") else prompt,
                  max_tokens=budget(body), temperature=body.temperature, top_p=body.top_p)
        return serving, job

    def new_id(endpoint: str) -> str:
        return f"{'chatcmpl' if endpoint.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"

    async def complete(endpoint: str, client: str, messages: list[dict], prompt: str, body: _Request,
                       canary: bool = False):
        serving, job = prepare(endpoint, messages, prompt, body)
        started = time.perf_counter()
        logged_key = client if api_keys else None  # without keys the client is an address: not logged
        logged_endpoint = f"{CANARY_PREFIX}{endpoint}" if canary else endpoint
        try:
            answer = await asyncio.wrap_future(serving.batcher.submit(job))
        except Exception as error:
            request_log.log_request(endpoint=logged_endpoint, messages=messages, response=None, status=500,
                                    model_version=serving.version, api_key=logged_key, error=str(error))
            raise ApiError(500, "generation failed; see the server log", "server_error") from None
        request_id = request_log.log_request(
            endpoint=logged_endpoint, messages=messages, response=answer.text, status=200,
            model_version=serving.version, prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            latency_ms=1000 * (time.perf_counter() - started),
            api_key=logged_key, request_id=new_id(endpoint))
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                 "total_tokens": answer.prompt_tokens + answer.completion_tokens}
        return request_id, answer, usage, serving

    def stream(endpoint: str, client: str, messages: list[dict], prompt: str, body: _Request, chunk):
        """Server-sent events: a chunk per piece of text as it is generated, a last chunk with the
        finish reason, then [DONE]. The whole answer is logged when the stream ends."""
        from fastapi.responses import StreamingResponse

        from flywheel.serving.batching import stream_generate

        serving, job = prepare(endpoint, messages, prompt, body)
        request_id, started = new_id(endpoint), time.perf_counter()
        pieces = stream_generate(serving.model, serving.tokenizer, job)

        @functools.cache
        def count_tokens(text: str) -> int:
            """Tokens in the answer, by re-tokenising it: the streamer hands over text, not tokens."""
            return len(serving.tokenizer(text, add_special_tokens=False)["input_ids"])

        async def events():
            text = ""
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    piece = piece if text else piece.lstrip()  # the answer starts after a space
                    if piece:
                        text += piece
                        yield f"data: {json.dumps(chunk(request_id, serving, piece, None))}\n\n"
                finish = "length" if count_tokens(text) >= job.max_tokens else "stop"
                yield f"data: {json.dumps(chunk(request_id, serving, '', finish))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away mid-stream: what was sent is logged
                request_log.log_request(
                    endpoint=endpoint, messages=messages, response=text.strip(), status=200,
                    model_version=serving.version, latency_ms=1000 * (time.perf_counter() - started),
                    completion_tokens=count_tokens(text), api_key=client if api_keys else None,
                    request_id=request_id)

        return StreamingResponse(events(), media_type="text/event-stream")

    def chat_chunk(request_id, serving, piece, finish):
        return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": serving.name, "system_fingerprint": serving.version,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece} if piece else {},
                             "finish_reason": finish}]}

    def text_chunk(request_id, serving, piece, finish):
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": serving.name, "system_fingerprint": serving.version,
                "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        client = authorise(request)
        messages = [m.model_dump() for m in body.messages]
        prompt = "\n".join(m["content"] for m in messages)
        if body.stream:
            return stream("/v1/chat/completions", client, messages, prompt, body, chat_chunk)
        # The monitor's canary queries are marked so that they are not counted as user traffic.
        request_id, answer, usage, serving = await complete("/v1/chat/completions", client, messages, prompt,
                                                            body, canary=CANARY_HEADER in request.headers)
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": serving.name, "system_fingerprint": serving.version,
                "choices": [{"index": 0, "finish_reason": answer.finish_reason,
                             "message": {"role": "assistant", "content": answer.text}}],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        client = authorise(request)
        messages = [{"role": "user", "content": body.prompt}]
        if body.stream:
            return stream("/v1/completions", client, messages, body.prompt, body, text_chunk)
        request_id, answer, usage, serving = await complete("/v1/completions", client, messages, body.prompt, body)
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": serving.name, "system_fingerprint": serving.version,
                "choices": [{"index": 0, "text": answer.text, "finish_reason": answer.finish_reason,
                             "logprobs": None}],
                "usage": usage}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        serving = engine()
        return {"object": "list", "data": [{"id": serving.name, "object": "model", "created": 0,
                                            "owned_by": "flywheel", "version": serving.version}]}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        from flywheel.serving.request_log import FeedbackError

        authorise(request)
        fields = body.model_dump(exclude={"request_id"})
        try:
            feedback_id = await asyncio.to_thread(request_log.log_feedback, body.request_id, **fields)
        except FeedbackError as error:
            status = 404 if str(error).startswith("no logged request") else 400
            raise ApiError(status, str(error)) from None
        return {"id": feedback_id, "request_id": body.request_id, "status": "recorded"}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state["engine"] is None:
            return JSONResponse({"status": "failed" if "error" in state else "loading",
                                 "error": state.get("error")}, status_code=503)
        return {"status": "ready", "model": state["engine"].name, "version": state["engine"].version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app


def serve(config: ServeParams, *, host: str | None = None, port: int | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C; the model loads after the port opens (readyz)."""
    import uvicorn

    from flywheel.serving.request_log import RequestLog

    keys = load_api_keys()
    if not keys:
        print(f"flywheel serve: no API keys ({KEYS_VARIABLE} / {KEYS_FILE_VARIABLE} unset): the API "
              "is open to anyone who can reach it", flush=True)
    model_dir = Path(config.model)
    require_model(model_dir)  # before the port opens: a typo'd path fails at once, not at readyz
    request_log = RequestLog()
    app = create_app(config, model_dir, request_log, keys)
    host, port = host or config.host, port or config.port
    print(f"flywheel serve: http://{host}:{port}/v1 (model {model_dir}, request log "
          f"{request_log._safe_url()})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")  # SIGTERM: graceful, see lifespan
    return 0
