"""The API's handlers: OpenAI-compatible generation, feedback, health and metrics.

What the handlers share (params, the request log, the keys, the engine once loaded) is a Server
on app.state.server, made by flywheel/serving/app.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request  # FastAPI reads handler annotations from module globals
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from flywheel.config import ServeParams
from flywheel.serving.auth import CANARY_HEADER, CANARY_PREFIX, RateLimiter, key_name
from flywheel.serving.batching import Job, stream_generate
from flywheel.serving.engine import Engine
from flywheel.serving.schemas import ApiError, ChatRequest, CompletionRequest, FeedbackRequest, GenerationRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = frozenset({CHAT, COMPLETIONS, "/v1/models", "/v1/feedback", "/healthz", "/readyz", "/metrics"})

router = APIRouter()


@dataclass
class Server:
    """The state every handler shares."""

    config: ServeParams
    request_log: object
    api_keys: list[str]
    registry: object  # prometheus_client's CollectorRegistry
    limiter: RateLimiter = field(init=False)
    engine: Engine | None = None
    load_error: str | None = None

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.config.rate_limit_per_minute)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is still loading", "server_error")
        return self.engine


def server_of(request: Request) -> Server:
    return request.app.state.server


# ---------------------------------------------------------------------------------------------
# Checks every generation request passes


def authorise(request: Request) -> str:
    """The client's name (a key's hash prefix, or its address when the API is open)."""
    server = server_of(request)
    if server.api_keys:
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        matched = [key for key in server.api_keys if hmac.compare_digest(given.encode(), key.encode())]
        if not matched:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        client = key_name(matched[0])
    else:
        client = request.client.host if request.client else "unknown"
    if not server.limiter.allow(client):
        raise ApiError(
            429, f"rate limit of {server.config.rate_limit_per_minute} requests per minute exceeded", "rate_limit_error"
        )
    return client


def budget(body: GenerationRequest, config: ServeParams) -> int:
    asked = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if asked > config.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is above this server's limit of {config.max_tokens}")
    return asked


def prepare(server: Server, endpoint: str, messages: list[dict], prompt: str, body: GenerationRequest):
    """(the engine, the job) for a request, after its limits are checked."""
    config = server.config
    if len(prompt) > config.max_prompt_chars:
        raise ApiError(
            400, f"the prompt is {len(prompt):,} characters; this server takes at most {config.max_prompt_chars:,}"
        )
    engine = server.ready_engine()
    job = Job(
        prompt=engine.chat_prompt(messages) if endpoint == CHAT else prompt,
        max_tokens=budget(body, config),
        temperature=body.temperature,
        top_p=body.top_p,
    )
    return engine, job


def new_id(endpoint: str) -> str:
    return f"{'chatcmpl' if endpoint == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# Generation: whole answers (batched) and streams


async def complete(
    server: Server,
    endpoint: str,
    client: str,
    messages: list[dict],
    prompt: str,
    body: GenerationRequest,
    canary: bool = False,
):
    engine, job = prepare(server, endpoint, messages, prompt, body)
    started = time.perf_counter()
    logged_key = client if server.api_keys else None  # without keys the client is an address: not logged
    logged_endpoint = f"{CANARY_PREFIX}{endpoint}" if canary else endpoint
    try:
        answer = await asyncio.wrap_future(engine.batcher.submit(job))
    except Exception as error:
        server.request_log.log_request(
            endpoint=logged_endpoint,
            messages=messages,
            response=None,
            status=500,
            model_version=engine.version,
            api_key=logged_key,
            error=str(error),
        )
        raise ApiError(500, "generation failed; see the server log", "server_error") from None
    request_id = server.request_log.log_request(
        endpoint=logged_endpoint,
        messages=messages,
        response=answer.text,
        status=200,
        model_version=engine.version,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        latency_ms=1000 * (time.perf_counter() - started),
        api_key=logged_key,
        request_id=new_id(endpoint),
    )
    usage = {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
    return request_id, answer, usage, engine


def stream(
    server: Server, endpoint: str, client: str, messages: list[dict], prompt: str, body: GenerationRequest, chunk
) -> StreamingResponse:
    """Server-sent events: a chunk per piece of text as it is generated, a last chunk with the
    finish reason, then [DONE]. The whole answer is logged when the stream ends."""
    engine, job = prepare(server, endpoint, messages, prompt, body)
    request_id, started = new_id(endpoint), time.perf_counter()
    pieces = stream_generate(engine.model, engine.tokenizer, job)

    @functools.cache
    def count_tokens(text: str) -> int:
        """Tokens in the answer, by re-tokenising it: the streamer hands over text, not tokens."""
        return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def events():
        text = ""
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                piece = piece if text else piece.lstrip()  # the answer starts after a space
                if piece:
                    text += piece
                    yield f"data: {json.dumps(chunk(request_id, engine, piece, None))}\n\n"
            finish = "length" if count_tokens(text) >= job.max_tokens else "stop"
            yield f"data: {json.dumps(chunk(request_id, engine, '', finish))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: what was sent is logged
            server.request_log.log_request(
                endpoint=endpoint,
                messages=messages,
                response=text.strip(),
                status=200,
                model_version=engine.version,
                latency_ms=1000 * (time.perf_counter() - started),
                completion_tokens=count_tokens(text),
                api_key=client if server.api_keys else None,
                request_id=request_id,
            )

    return StreamingResponse(events(), media_type="text/event-stream")


def completion(request_id: str, engine: Engine, kind: str, choice: dict, **extra) -> dict:
    """An OpenAI completion object (or chunk) of one choice; the model version is its fingerprint."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": engine.name,
        "system_fingerprint": engine.version,
        "choices": [{"index": 0, **choice}],
        **extra,
    }


def chat_chunk(request_id: str, engine: Engine, piece: str, finish: str | None) -> dict:
    delta = {"role": "assistant", "content": piece} if piece else {}
    return completion(request_id, engine, "chat.completion.chunk", {"delta": delta, "finish_reason": finish})


def text_chunk(request_id: str, engine: Engine, piece: str, finish: str | None) -> dict:
    return completion(request_id, engine, "text_completion", {"text": piece, "finish_reason": finish, "logprobs": None})


# ---------------------------------------------------------------------------------------------
# Endpoints


@router.post(CHAT)
async def chat_completions(body: ChatRequest, request: Request):
    server, client = server_of(request), authorise(request)
    messages = [m.model_dump() for m in body.messages]
    prompt = "\n".join(m["content"] for m in messages)
    if body.stream:
        return stream(server, CHAT, client, messages, prompt, body, chat_chunk)
    # The monitor's canary queries are marked so that they are not counted as user traffic.
    request_id, answer, usage, engine = await complete(
        server, CHAT, client, messages, prompt, body, canary=CANARY_HEADER in request.headers
    )
    message = {"role": "assistant", "content": answer.text}
    return completion(
        request_id, engine, "chat.completion", {"finish_reason": answer.finish_reason, "message": message}, usage=usage
    )


@router.post(COMPLETIONS)
async def completions(body: CompletionRequest, request: Request):
    server, client = server_of(request), authorise(request)
    messages = [{"role": "user", "content": body.prompt}]
    if body.stream:
        return stream(server, COMPLETIONS, client, messages, body.prompt, body, text_chunk)
    request_id, answer, usage, engine = await complete(server, COMPLETIONS, client, messages, body.prompt, body)
    choice = {"text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
    return completion(request_id, engine, "text_completion", choice, usage=usage)


@router.get("/v1/models")
async def models(request: Request):
    authorise(request)
    engine = server_of(request).ready_engine()
    return {
        "object": "list",
        "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "flywheel", "version": engine.version}
        ],
    }


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request):
    from flywheel.serving.request_log import FeedbackError

    authorise(request)
    fields = body.model_dump(exclude={"request_id"})
    try:
        feedback_id = await asyncio.to_thread(server_of(request).request_log.log_feedback, body.request_id, **fields)
    except FeedbackError as error:
        status = 404 if str(error).startswith("no logged request") else 400
        raise ApiError(status, str(error)) from None
    return {"id": feedback_id, "request_id": body.request_id, "status": "recorded"}


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    server = server_of(request)
    if server.engine is None:
        return JSONResponse(
            {"status": "failed" if server.load_error else "loading", "error": server.load_error}, status_code=503
        )
    return {"status": "ready", "model": server.engine.name, "version": server.engine.version}


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import generate_latest

    return PlainTextResponse(
        generate_latest(server_of(request).registry).decode(), media_type="text/plain; version=0.0.4"
    )
