"""flywheel serve: the model behind an HTTP API the OpenAI client library speaks.

  POST /v1/chat/completions, POST /v1/completions (both also with stream: true, as server-sent
       events), GET /v1/models
  POST /v1/feedback     {request_id, rating | preferred_response | alternative + preferred}
  GET  /healthz         the process is up;  GET /readyz: the model is loaded
  GET  /metrics         Prometheus: requests, latency, batch sizes, tokens, errors

The handlers are in flywheel/serving/routes.py. The engine that generates (serve.engine) is built in
(flywheel/serving/engine.py: concurrent requests in batches) or vLLM behind this gateway
(flywheel/serving/external.py). Every request is logged, PII-redacted, to the request log
(flywheel/serving/request_log.py) by a background thread; SIGTERM stops the server gracefully and
the log is drained before the process exits. Responses name the model version. API keys: see
flywheel/serving/auth.py; with none configured the API is open (a warning says so).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.config import ServeParams
from flywheel.serving import routes
from flywheel.serving.auth import KEYS_FILE_VARIABLE, KEYS_VARIABLE, RateLimiter, load_api_keys
from flywheel.serving.engine import load_engine
from flywheel.serving.engine_commands import require_servable
from flywheel.serving.schemas import ApiError

DRAIN_SECONDS = 20
FAILED_KEYS_PER_MINUTE = 30


def create_app(config: ServeParams, model_dir: Path, request_log, api_keys: list[str]) -> FastAPI:
    from prometheus_client import CollectorRegistry

    server = routes.Server(config, request_log, api_keys, CollectorRegistry())

    def load() -> None:
        try:
            server.engine = load_engine(config, model_dir, server.registry)
        except Exception as error:  # readyz reports it; the process stays up to say so
            server.load_error = f"{type(error).__name__}: {error}"
            print(f"flywheel serve: the model could not be loaded: {server.load_error}", flush=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="load-model", daemon=True).start()  # readyz: 503 until loaded
        yield
        # Shutdown (SIGTERM, Ctrl-C) runs this before uvicorn returns or re-raises the signal:
        # queued generations finish, then every logged request is written.
        if server.engine is not None:
            server.engine.close()
        request_log.close()
        print(f"flywheel serve: stopped; {request_log.written:,} requests logged", flush=True)

    app = FastAPI(title="Flywheel serving", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(guard_with(server))
    app.middleware("http")(observe_with(server.registry))
    app.include_router(routes.router)
    return app


def error_response(status: int, message: str, kind: str, **fields) -> JSONResponse:
    return JSONResponse(ApiError(status, message, kind, **fields).body(), status_code=status)


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """404, 405 and the like in OpenAI's error shape, not FastAPI's {"detail": ...}."""
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(error.status_code, message, "invalid_request_error", code=code)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(400, message, "invalid_request_error", param=where or None)


def guard_with(server: routes.Server):
    """HTTP middleware run before a body is read: a request without a valid key, or with a body
    larger than any valid request, is refused without parsing it (33 MB of JSON without a key
    used to be parsed and validated first)."""
    body_limit = 6 * server.config.max_prompt_chars + 64_000  # a JSON escape (\\u00e9): 6 bytes a character
    too_large = f"the request body is over this server's limit of {body_limit:,} bytes"
    # Guessing keys costs: an address gets FAILED_KEYS_PER_MINUTE 401s, then 429s.
    failed_keys = RateLimiter(FAILED_KEYS_PER_MINUTE)

    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if server.api_keys and routes.matching_key(server, request) is None:
                if not failed_keys.allow(request.client.host if request.client else "unknown"):
                    return error_response(
                        429, "too many requests without a valid API key", "rate_limit_error", code="rate_limit_exceeded"
                    )
                return error_response(401, routes.MISSING_KEY, "authentication_error", code="invalid_api_key")
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit() or int(declared) > body_limit:
                return error_response(413, too_large, "invalid_request_error")
        return await call_next(request)

    return guard


def observe_with(registry):
    """HTTP middleware counting requests, errors and latency per endpoint."""
    from prometheus_client import Counter, Histogram

    requests_total = Counter("flywheel_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("flywheel_request_latency_seconds", "request latency", ["endpoint"], registry=registry)
    errors = Counter("flywheel_errors", "responses with status >= 400", ["endpoint", "status"], registry=registry)

    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # Label by route, not by whatever path a client sent: metrics cardinality stays bounded.
        endpoint = request.url.path if request.url.path in routes.ENDPOINTS else "other"
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        if response.status_code >= 400:
            errors.labels(endpoint, str(response.status_code)).inc()
        return response

    return observe


def serve(config: ServeParams, *, host: str | None = None, port: int | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C; the model loads after the port opens (readyz)."""
    import uvicorn

    from flywheel.serving.request_log import RequestLog

    keys = load_api_keys()
    if not keys:
        print(
            f"flywheel serve: no API keys ({KEYS_VARIABLE} / {KEYS_FILE_VARIABLE} unset): the API "
            "is open to anyone who can reach it",
            flush=True,
        )
    model_dir = Path(config.model)
    require_servable(config, model_dir)  # before the port opens: a typo'd path fails at once, not at readyz
    request_log = RequestLog()
    app = create_app(config, model_dir, request_log, keys)
    host, port = host or config.host, port or config.port
    print(
        f"flywheel serve: http://{host}:{port}/v1 (model {model_dir}, request log {request_log._safe_url()})",
        flush=True,
    )
    # SIGTERM: graceful (see lifespan), but bounded: open streams get DRAIN_SECONDS to finish,
    # inside Kubernetes' default 30 s grace plus the request log's flush.
    # X-Forwarded-For is not trusted (uvicorn trusts it from 127.0.0.1, where the router and any
    # local client connect from): a client could name itself anew each request and never be limited.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=DRAIN_SECONDS,
        proxy_headers=False,
    )
    return 0
