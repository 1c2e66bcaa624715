"""The engines that generate behind the API, and what the gateway asks of each.

`serve.engine` picks one: `transformers` is built in (model.generate in this process, concurrent
requests batched: flywheel/serving/batching.py); `vllm` is an external server Flywheel starts and
proxies to (flywheel/serving/external.py). Whatever the engine, the gateway (routes.py) does the
rest the same way: keys and limits, the chat template (rendered here, with the model's own
tokenizer, so every engine sees the same prompt), the request log, metrics and the drain.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import ServeParams
from flywheel.serving.batching import STREAM_STALL_S, Answer, Job, first_stop
from flywheel.serving.schemas import ApiError, GenerationRequest


@dataclass
class Generation:
    """A whole answer: its choices (n of them) and the tokens counted for the request."""

    choices: list[Answer]
    prompt_tokens: int
    completion_tokens: int  # all choices together, as OpenAI counts them


class Engine:
    """What the gateway needs of any engine: its names, the tokenizer's counts and chat template,
    and (subclasses) generate, stream, close."""

    name: str
    version: str
    tokenizer: object
    max_positions: int

    # A request field this engine cannot honour, with why: a 400 that says so (see refusal()).
    def refusal(self, body: GenerationRequest) -> tuple[str, str] | None:
        return None

    @property
    def ids(self) -> list[str]:
        """The names a request may give in `model`: the directory's, the version, the stable name."""
        return list(dict.fromkeys([self.name, self.version, paths.MODEL_NAME]))

    @property
    def context_tokens(self) -> int:
        """How many tokens the model attends to: prompt and answer together."""
        return self.max_positions or 2**31

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def generate(self, job: Job, n: int) -> Generation:
        raise NotImplementedError

    async def stream(self, job: Job) -> TextStream:
        """A stream, started: an engine's refusal is a status code, not an event in the stream."""
        raise NotImplementedError

    async def metrics_text(self) -> str:
        """The engine's own Prometheus metrics, re-exported on the gateway's /metrics."""
        return ""

    def failure(self) -> str | None:
        """Why the engine can no longer answer (its process ended), or None."""
        return None

    def close(self) -> None:
        """Finish what is in flight, then stop."""


class TextStream:
    """One streamed answer as the gateway reads it from any engine: `async for piece in
    stream.pieces()`; then `text` (all of it), `finish_reason`, the token counts, and `error` if
    generation failed. `close()` stops generating (the client went away)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None

    def pieces(self):
        raise NotImplementedError

    async def close(self) -> None:
        pass


def max_positions(model_dir: Path) -> int:
    """The context the model's config.json declares (0: it does not say)."""
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    return int(config.get("max_position_embeddings") or 0)


class TransformersEngine(Engine):
    """The model loaded here; whole answers batched on one worker thread, streams each on its own."""

    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from prometheus_client import Counter, Histogram

        from flywheel.serving import batching

        modeling.require_model(model_dir)
        self.model, self.tokenizer = modeling.load_pretrained(str(model_dir))
        self.model.eval()
        self.name, self.version = model_dir.name, modeling.model_version(model_dir)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.batch_sizes = Histogram(
            "flywheel_batch_size", "requests per generated batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.tokens = Counter("flywheel_generated_tokens", "tokens generated", registry=registry)
        self.generation_seconds = Counter(
            "flywheel_generation_seconds",
            "seconds spent generating (tokens/s = rate of tokens / rate of this)",
            registry=registry,
        )

        def record(size, tokens, seconds):
            self.batch_sizes.observe(size)
            self.tokens.inc(tokens)
            self.generation_seconds.inc(seconds)

        self.batcher = batching.Batcher(
            lambda jobs: batching.generate_batch(self.model, self.tokenizer, jobs),
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            on_batch=record,
        )
        self.max_streams = config.max_streams
        self.stream_slots = threading.BoundedSemaphore(config.max_streams)  # each stream is a thread

    def refusal(self, body: GenerationRequest) -> tuple[str, str] | None:
        if body.logprobs or body.top_logprobs:
            field = "logprobs" if body.logprobs else "top_logprobs"
            return field, f"{field} is not supported by the built-in engine (serve.engine: vllm returns them)"
        if body.stream and body.n > 1:
            return "n", "n > 1 with stream is not supported by the built-in engine (serve.engine: vllm streams them)"
        return None

    async def generate(self, job: Job, n: int) -> Generation:
        # n choices are n copies of the job: they decode the same way, so they share a batch.
        copies = [replace(job) for _ in range(n)]
        answers = await asyncio.gather(*(asyncio.wrap_future(self.batcher.submit(copy)) for copy in copies))
        return Generation(list(answers), answers[0].prompt_tokens, sum(a.completion_tokens for a in answers))

    async def stream(self, job: Job) -> TextStream:
        if not self.stream_slots.acquire(blocking=False):
            raise ApiError(
                429,
                f"this server generates at most {self.max_streams} streams at once; retry shortly",
                "rate_limit_error",
                code="rate_limit_exceeded",
            )
        return BuiltinStream(self, job)

    def close(self) -> None:
        self.batcher.close()


class BuiltinStream(TextStream):
    """A generation thread's text, held back while it could be the start of a stop sequence."""

    def __init__(self, engine: TransformersEngine, job: Job):
        from flywheel.serving.batching import Stream

        self._engine, self._job = engine, job
        self._generation = Stream(engine.model, engine.tokenizer, job, on_end=engine.stream_slots.release)
        self.prompt_tokens = engine.prompt_tokens(job.prompt)

    async def pieces(self):
        generated, sent, stopped = iter(self._generation), 0, None
        held = max((len(stop) for stop in self._job.stop), default=1) - 1
        try:
            while (piece := await asyncio.to_thread(next, generated, None)) is not None:
                self.text += piece if self.text else piece.lstrip()  # the answer starts after a space
                if (stopped := first_stop(self.text, self._job.stop)) is not None:
                    break
                if len(self.text) - held > sent:
                    yield self.text[sent : len(self.text) - held]
                    sent = len(self.text) - held
            self.error = self._generation.error
        except queue.Empty:
            self.error = TimeoutError(f"no text for {STREAM_STALL_S} s")
        if self.error is not None:
            return
        self.completion_tokens = self._engine.prompt_tokens(self.text)  # up to and with the stop sequence
        if stopped is not None:
            await self.close()
            self.text, self.finish_reason = self.text[:stopped], "stop"
        else:
            self.finish_reason = "length" if self.completion_tokens >= self._job.max_tokens else "stop"
        if len(self.text) > sent:
            yield self.text[sent:]

    async def close(self) -> None:
        self._generation.cancel()


def load_engine(config: ServeParams, model_dir: Path, registry) -> Engine:
    if config.engine == "vllm":
        from flywheel.serving.external import VllmEngine

        return VllmEngine(config, model_dir, registry)
    return TransformersEngine(config, model_dir, registry)
