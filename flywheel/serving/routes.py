"""The API's handlers: OpenAI-compatible generation, feedback, health and metrics.

What the handlers share (params, the request log, the keys, the engine once loaded) is a Server
on app.state.server, made by flywheel/serving/app.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request  # FastAPI reads handler annotations from module globals
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from flywheel.config import ServeParams
from flywheel.serving.auth import CANARY_HEADER, CANARY_PREFIX, RateLimiter, key_name
from flywheel.serving.batching import Answer, Job
from flywheel.serving.engine import Engine, Generation
from flywheel.serving.schemas import ApiError, ChatRequest, CompletionRequest, FeedbackRequest, GenerationRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = frozenset({CHAT, COMPLETIONS, "/v1/models", "/v1/feedback", "/healthz", "/readyz", "/metrics"})

router = APIRouter()
MISSING_KEY = "missing or invalid API key (Authorization: Bearer <key>)"


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
        if (failure := self.engine.failure()) is not None:
            raise ApiError(503, failure, "server_error")
        return self.engine


def server_of(request: Request) -> Server:
    return request.app.state.server


# ---------------------------------------------------------------------------------------------
# Checks every generation request passes


def matching_key(server: Server, request: Request) -> str | None:
    """The configured key the request carries (compared in constant time), or None."""
    header = request.headers.get("authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    matched = [key for key in server.api_keys if hmac.compare_digest(given.encode(), key.encode())]
    return matched[0] if matched else None


def authorise(request: Request) -> str:
    """The client's name (a key's hash prefix, or its address when the API is open)."""
    server = server_of(request)
    if server.api_keys:
        key = matching_key(server, request)
        if key is None:
            raise ApiError(401, MISSING_KEY, "authentication_error", code="invalid_api_key")
        client = key_name(key)
    else:
        client = request.client.host if request.client else "unknown"
    if not server.limiter.allow(client):
        raise ApiError(
            429,
            f"rate limit of {server.config.rate_limit_per_minute} requests per minute exceeded",
            "rate_limit_error",
            code="rate_limit_exceeded",
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
    if (field_name := body.unsupported()) is not None:
        raise ApiError(
            400, f"{field_name} is not supported by this server", code="unsupported_parameter", param=field_name
        )
    if len(prompt) > config.max_prompt_chars:
        raise ApiError(
            400, f"the prompt is {len(prompt):,} characters; this server takes at most {config.max_prompt_chars:,}"
        )
    engine = server.ready_engine()
    if (refused := engine.refusal(body)) is not None:
        raise ApiError(400, refused[1], code="unsupported_parameter", param=refused[0])
    check_model(engine, body.model)
    job = Job(
        prompt=engine.chat_prompt(messages) if endpoint == CHAT else prompt,
        max_tokens=budget(body, config),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences,
        logprobs=logprobs_asked(endpoint, body),
        user=body.user,
    )
    check_prompt_tokens(engine, job)
    return engine, job


def logprobs_asked(endpoint: str, body: GenerationRequest) -> int | None:
    """How many top log-probabilities a token gets, or None: chat asks with logprobs: true and
    top_logprobs: k; completions with logprobs: k."""
    if endpoint == CHAT:
        return (body.top_logprobs or 0) if body.logprobs else None
    return None if body.logprobs is None or body.logprobs is False else int(body.logprobs)


def check_model(engine: Engine, name: str | None) -> None:
    """A request names one of the served model's ids (its directory's name, its version or the
    registry's stable name), as /v1/models lists them: any name used to be answered, so a client
    asking for "gpt-4" got this model."""
    if name is not None and name not in engine.ids:
        raise ApiError(
            404,
            f"The model {name!r} does not exist; this server serves {' or '.join(map(repr, engine.ids))}",
            code="model_not_found",
            param="model",
        )


def check_prompt_tokens(engine: Engine, job: Job) -> None:
    """Refuse, alone, a prompt the model cannot take: no tokens to continue from, or more than
    fit its context with the answer (many short messages pass max_prompt_chars)."""
    tokens = engine.prompt_tokens(job.prompt)
    if tokens == 0:
        raise ApiError(400, "the prompt has no tokens to continue from")
    if tokens + job.max_tokens > engine.context_tokens:
        raise ApiError(
            400,
            f"the prompt is {tokens:,} tokens; with max_tokens {job.max_tokens} that is more than "
            f"the model's context of {engine.context_tokens:,} tokens",
        )


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
) -> tuple[str, Generation, Engine]:
    engine, job = prepare(server, endpoint, messages, prompt, body)
    started = time.perf_counter()
    logged_key = client if server.api_keys else None  # without keys the client is an address: not logged
    logged_endpoint = f"{CANARY_PREFIX}{endpoint}" if canary else endpoint
    try:
        generation = await engine.generate(job, body.n)
    except ApiError:  # the engine refused the request (a 400 in its words): the client's, not logged
        raise
    except Exception as error:
        raise failed(server, engine, logged_endpoint, messages, logged_key, error) from None
    # With n > 1 the log keeps the first choice (the row's response); the token counts are all of them.
    request_id = server.request_log.log_request(
        endpoint=logged_endpoint,
        messages=messages,
        response=generation.choices[0].text,
        status=200,
        model_version=engine.version,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        latency_ms=1000 * (time.perf_counter() - started),
        api_key=logged_key,
        request_id=new_id(endpoint),
    )
    return request_id, generation, engine


def failed(server: Server, engine: Engine, endpoint: str, messages: list[dict], key: str | None, error) -> ApiError:
    """A generation that failed: said in the server's output, logged with status 500, and the 500
    the client gets."""
    print(f"flywheel serve: generation failed ({endpoint}): {error!r}", flush=True)  # what the 500 points to
    server.request_log.log_request(
        endpoint=endpoint,
        messages=messages,
        response=None,
        status=500,
        model_version=engine.version,
        api_key=key,
        error=str(error),
    )
    return ApiError(500, "generation failed; see the server log", "server_error")


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def stream(
    server: Server, endpoint: str, client: str, messages: list[dict], prompt: str, body: GenerationRequest, chunk
) -> StreamingResponse:
    """Server-sent events: a chunk per piece of text as it is generated, a last chunk with the
    finish reason, then [DONE]. The whole answer is logged when the stream ends."""
    engine, job = prepare(server, endpoint, messages, prompt, body)
    request_id, started = new_id(endpoint), time.perf_counter()
    try:
        generation = await engine.stream(job)  # refused (429, 400) before any event is sent
    except ApiError:
        raise
    except Exception as error:  # the engine could not be reached
        raise failed(server, engine, endpoint, messages, client if server.api_keys else None, error) from None

    async def events():
        try:
            async for piece in generation.pieces():
                yield f"data: {json.dumps(chunk(request_id, engine, piece, None))}\n\n"
            if generation.error is not None:
                print(f"flywheel serve: stream {request_id} failed: {generation.error!r}", flush=True)
                failure = ApiError(500, "generation failed; see the server log", "server_error")
                yield f"data: {json.dumps(failure.body())}\n\n"
            else:
                yield f"data: {json.dumps(chunk(request_id, engine, '', generation.finish_reason))}\n\n"
                if body.include_usage:  # OpenAI's last chunk: no choices, the whole answer's usage
                    last = chunk(request_id, engine, "", None) | {"choices": []}
                    last["usage"] = token_usage(generation.prompt_tokens, generation.completion_tokens)
                    yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: generation stops, what was sent is logged
            await generation.close()
            server.request_log.log_request(
                endpoint=endpoint,
                messages=messages,
                response=generation.text.strip(),
                status=200 if generation.error is None else 500,
                model_version=engine.version,
                latency_ms=1000 * (time.perf_counter() - started),
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                api_key=client if server.api_keys else None,
                request_id=request_id,
                error=None if generation.error is None else repr(generation.error),
            )

    return StreamingResponse(events(), media_type="text/event-stream")


def completion(request_id: str, engine: Engine, kind: str, choices: list[dict], **extra) -> dict:
    """An OpenAI completion object (or chunk); the model version is its fingerprint."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": engine.name,
        "system_fingerprint": engine.version,
        "choices": [{"index": index, **choice} for index, choice in enumerate(choices)],
        **extra,
    }


def chat_chunk(request_id: str, engine: Engine, piece: str, finish: str | None) -> dict:
    delta = {"role": "assistant", "content": piece} if piece else {}
    return completion(request_id, engine, "chat.completion.chunk", [{"delta": delta, "finish_reason": finish}])


def text_chunk(request_id: str, engine: Engine, piece: str, finish: str | None) -> dict:
    return completion(
        request_id, engine, "text_completion", [{"text": piece, "finish_reason": finish, "logprobs": None}]
    )


def chat_logprobs(logprobs: dict | None) -> dict | None:
    """The completions API's log-probabilities (tokens, token_logprobs, top_logprobs) in the chat
    API's shape (content: a {token, logprob, bytes, top_logprobs} per token)."""
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return {
        "content": [
            {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)
        ]
    }


def chat_choice(answer: Answer) -> dict:
    message = {"role": "assistant", "content": answer.text}
    return {"finish_reason": answer.finish_reason, "message": message, "logprobs": chat_logprobs(answer.logprobs)}


def text_choice(answer: Answer) -> dict:
    return {"text": answer.text, "finish_reason": answer.finish_reason, "logprobs": answer.logprobs}


# ---------------------------------------------------------------------------------------------
# Endpoints


@router.post(CHAT)
async def chat_completions(body: ChatRequest, request: Request):
    server, client = server_of(request), authorise(request)
    messages = [m.model_dump() for m in body.messages]
    prompt = "\n".join(m["content"] for m in messages)
    if body.stream:
        return await stream(server, CHAT, client, messages, prompt, body, chat_chunk)
    # The monitor's canary queries are marked so that they are not counted as user traffic.
    request_id, generation, engine = await complete(
        server, CHAT, client, messages, prompt, body, canary=CANARY_HEADER in request.headers
    )
    usage = token_usage(generation.prompt_tokens, generation.completion_tokens)
    choices = [chat_choice(answer) for answer in generation.choices]
    return completion(request_id, engine, "chat.completion", choices, usage=usage)


@router.post(COMPLETIONS)
async def completions(body: CompletionRequest, request: Request):
    server, client = server_of(request), authorise(request)
    messages = [{"role": "user", "content": body.prompt}]
    if body.stream:
        return await stream(server, COMPLETIONS, client, messages, body.prompt, body, text_chunk)
    request_id, generation, engine = await complete(server, COMPLETIONS, client, messages, body.prompt, body)
    usage = token_usage(generation.prompt_tokens, generation.completion_tokens)
    choices = [text_choice(answer) for answer in generation.choices]
    return completion(request_id, engine, "text_completion", choices, usage=usage)


@router.get("/v1/models")
async def models(request: Request):
    authorise(request)
    engine = server_of(request).ready_engine()
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "flywheel", "version": engine.version}
            for model_id in engine.ids
        ],
    }


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request):
    from flywheel.serving.request_log import FeedbackError

    authorise(request)
    limit = server_of(request).config.max_prompt_chars  # the same limit as a prompt: it is redacted and logged
    for name in ("preferred_response", "alternative"):
        if (size := len(getattr(body, name) or "")) > limit:
            raise ApiError(400, f"{name} is {size:,} characters; this server takes at most {limit:,}")
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
    failure = server.load_error or (server.engine.failure() if server.engine is not None else None)
    if server.engine is None or failure is not None:
        return JSONResponse({"status": "failed" if failure else "loading", "error": failure}, status_code=503)
    engine = server.engine
    return {"status": "ready", "model": engine.name, "version": engine.version, "engine": server.config.engine}


@router.get("/metrics")
async def metrics(request: Request):
    """The gateway's metrics, then the engine's own (vllm:*) when it is an external one."""
    from prometheus_client import generate_latest

    server = server_of(request)
    engine_metrics = await server.engine.metrics_text() if server.engine is not None else ""
    text = generate_latest(server.registry).decode() + (engine_metrics + "\n" if engine_metrics else "")
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
