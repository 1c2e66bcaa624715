"""The engines that generate behind the API, and what the gateway asks of each.

`serve.engine` picks one: `transformers` is built in (model.generate in this process, concurrent
requests batched: flywheel/serving/batching.py); `vllm` and `llamacpp` are external servers
Flywheel starts and proxies to (flywheel/serving/external.py). Whatever the engine, the gateway
(routes.py) does the rest the same way: keys and limits, the chat template (rendered here, with
the model's own tokenizer, so every engine sees the same prompt), the request log, metrics and
the drain.
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

    def refusal(self, body: GenerationRequest) -> tuple[str, str] | None:
        """(the field, why) when the request asks for what this engine cannot do: a 400 says so."""
        if body.stream and body.n > 1:  # the gateway streams one choice and its text
            return "n", "n > 1 with stream is not supported by this server; ask for n choices without stream"
        if body.stream and body.logprobs:
            return "logprobs", "logprobs with stream are not supported by this server; ask without stream"
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
    """The model loaded here; whole answers and streams batched together on one worker thread."""

    def __init__(self, model, tokenizer, *, name: str, version: str, config: ServeParams, registry):
        from prometheus_client import Counter, Histogram

        from flywheel.serving import batching

        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        self.name, self.version = name, version
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.batch_sizes = Histogram(
            "flywheel_batch_size", "requests per generated batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.streams_per_batch = Histogram(
            "flywheel_streams_per_batch",
            "streamed requests per generated batch (they batch with each other and with whole answers)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.tokens = Counter("flywheel_generated_tokens", "tokens generated", registry=registry)
        self.generation_seconds = Counter(
            "flywheel_generation_seconds",
            "seconds spent generating (tokens/s = rate of tokens / rate of this)",
            registry=registry,
        )

        def record(jobs: list[Job], answers: list[Answer], seconds: float) -> None:
            self.batch_sizes.observe(len(jobs))
            self.streams_per_batch.observe(sum(job.tokens is not None for job in jobs))
            self.tokens.inc(sum(answer.completion_tokens for answer in answers))
            self.generation_seconds.inc(seconds)

        self.batcher = batching.Batcher(
            lambda jobs: batching.generate_batch(self.model, self.tokenizer, jobs),
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            on_batch=record,
        )
        self.max_streams = config.max_streams
        self.stream_slots = threading.BoundedSemaphore(config.max_streams)

    @classmethod
    def load(cls, config: ServeParams, model_dir: Path, registry) -> TransformersEngine:
        modeling.require_model(model_dir)
        model, tokenizer = modeling.load_pretrained(str(model_dir))
        version = modeling.model_version(model_dir)
        return cls(model, tokenizer, name=model_dir.name, version=version, config=config, registry=registry)

    def refusal(self, body: GenerationRequest) -> tuple[str, str] | None:
        if body.logprobs or body.top_logprobs:
            field = "logprobs" if body.logprobs else "top_logprobs"
            return field, f"{field} is not supported by the built-in engine (serve.engine: vllm returns them)"
        return super().refusal(body)

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
    """A streamed job in the batcher: its tokens decoded as they come, the text held back while it
    could be the start of a stop sequence."""

    def __init__(self, engine: TransformersEngine, job: Job):
        self._engine, self._job = engine, replace(job, tokens=queue.Queue())
        self._ended = False
        self.prompt_tokens = engine.prompt_tokens(job.prompt)
        future = engine.batcher.submit(self._job)
        future.add_done_callback(lambda _: self._job.tokens.put(None))  # after its last token

    def _next_token(self) -> int | None:
        return self._job.tokens.get(timeout=STREAM_STALL_S)

    async def pieces(self):
        ids, sent, stopped = [], 0, None
        held = max((len(stop) for stop in self._job.stop), default=1) - 1
        try:
            while (token := await asyncio.to_thread(self._next_token)) is not None:
                ids.append(token)
                text = self._engine.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
                if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                    continue
                self.text = text
                if (stopped := first_stop(text, self._job.stop)) is not None:
                    await self.close()
                    break
                if len(text) - held > sent:
                    yield text[sent : len(text) - held]
                    sent = len(text) - held
        except queue.Empty:
            self.error = TimeoutError(f"no token for {STREAM_STALL_S} s")
            await self.close()
            return
        finally:
            self._finish()
        answer_error = self._job.future.exception() if self._job.future.done() else None
        if answer_error is not None:
            self.error = answer_error
            return
        self.completion_tokens = len(ids)
        if stopped is not None:
            self.text, self.finish_reason = self.text[:stopped], "stop"
        else:
            self.finish_reason = self._job.future.result().finish_reason
        if len(self.text) > sent:
            yield self.text[sent:]

    def _finish(self) -> None:
        if not self._ended:
            self._ended = True
            self._engine.stream_slots.release()

    async def close(self) -> None:
        self._job.cancelled.set()
        self._finish()


def load_engine(config: ServeParams, model_dir: Path, registry) -> Engine:
    """The engine serve.engine names, loaded (an external one started and ready)."""
    if config.engine == "vllm":
        from flywheel.serving.external import VllmEngine

        return VllmEngine(config, model_dir, registry)
    if config.engine == "llamacpp":
        from flywheel.serving.external import LlamaCppEngine

        return LlamaCppEngine(config, model_dir, registry)
    return TransformersEngine.load(config, model_dir, registry)
