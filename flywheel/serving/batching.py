"""Dynamic batching for serving: concurrent requests are generated together.

One worker thread owns the model. A request waits at most `max_wait_ms` for others to join it, and
a batch holds at most `max_batch_size`; requests batch together only when they decode the same way
(greedy, or sampling at the same temperature, top_p and seed). Each request keeps its own
`max_tokens` and stop sequences: the batch generates up to the largest, and each answer is cut at
its own limit, which gives the same text as generating it alone (a token never depends on the
tokens after it).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field

# Below this temperature sampling decodes greedily, its limit as the temperature goes to 0: the
# sampler divides the logits by the temperature, and 1e-300 turns them into inf and nan.
MIN_TEMPERATURE = 1e-2


@dataclass
class Job:
    prompt: str  # text after the chat template (or raw, for completions)
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling: the same seed, alone, gives the same answer
    stop: list[str] = field(default_factory=list)  # the answer ends before the first of these
    logprobs: int | None = None  # top log-probabilities per token (external engines only)
    user: str | None = None  # OpenAI's end-user id, passed on to an external engine
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, init=False)

    @property
    def decoding(self) -> tuple:
        if self.temperature < MIN_TEMPERATURE:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model ended it, or a stop sequence; "length": max_tokens reached
    logprobs: dict | None = None  # the completions API's shape (external engines)


def _options(job: Job, tokenizer) -> dict:
    """model.generate's decoding arguments for a job."""
    sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": 0}
    return {
        **(sampling if job.temperature >= MIN_TEMPERATURE else {"do_sample": False}),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence starts in `text`, or None."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(found) if found else None


def _answer(tokenizer, new: list[int], job: Job, prompt_tokens: int) -> Answer:
    """A row's new tokens as its answer: cut at the end token, or before a stop sequence (counting
    the tokens generated up to the one that completed it, as OpenAI does), or at max_tokens."""
    new = new[: job.max_tokens]
    ended = tokenizer.eos_token_id in new
    if ended:
        new = new[: new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new, skip_special_tokens=True).lstrip()  # the answer starts after a space
    if (cut := first_stop(text, job.stop)) is not None:
        spent = _tokens_until_stop(tokenizer, new, job.stop)
        return Answer(text[:cut].rstrip(), prompt_tokens, spent, "stop")
    return Answer(text.rstrip(), prompt_tokens, len(new) + int(ended), "stop" if ended else "length")


def _tokens_until_stop(tokenizer, new: list[int], stops: list[str]) -> int:
    """How many of the new tokens it took to complete a stop sequence."""
    decoded = (tokenizer.decode(new[:count], skip_special_tokens=True).lstrip() for count in range(1, len(new) + 1))
    return next(count for count, text in enumerate(decoded, 1) if first_stop(text, stops) is not None)


def generate_batch(model, tokenizer, jobs: list[Job]) -> list[Answer]:
    """One model.generate call for jobs that decode the same way."""
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right edge
    encoded = tokenizer([job.prompt for job in jobs], return_tensors="pt", padding=True, add_special_tokens=False).to(
        model.device
    )
    if jobs[0].seed is not None and jobs[0].decoding[0] == "sample":
        torch.manual_seed(jobs[0].seed)  # this thread alone generates whole answers
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=max(job.max_tokens for job in jobs), **_options(jobs[0], tokenizer)
        )
    prompt_width = encoded["input_ids"].shape[1]
    return [
        _answer(tokenizer, output[row, prompt_width:].tolist(), job, int(encoded["attention_mask"][row].sum()))
        for row, job in enumerate(jobs)
    ]


# A stream whose generation stalls this long (no new text) ends with an error.
STREAM_STALL_S = 60


class Stream:
    """One streamed answer: its text pieces as the model generates them (one request, not batched:
    a streamed answer should not wait for a batch to finish). Generation runs on its own thread;
    if it fails, the pieces end and `error` says why (instead of the reader waiting for text that
    never comes), and `cancel()` stops it when the client has gone. `on_end` runs when the
    generation thread is done, however it ended."""

    def __init__(self, model, tokenizer, job: Job, on_end=lambda: None):
        from transformers import TextIteratorStreamer

        self.error: Exception | None = None
        self._cancelled = threading.Event()
        self._streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_STALL_S
        )
        encoded = tokenizer(job.prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        arguments = {"max_new_tokens": job.max_tokens, **_options(job, tokenizer)}
        threading.Thread(
            target=self._generate, args=(model, encoded, arguments, on_end), name="stream", daemon=True
        ).start()

    def _generate(self, model, encoded, arguments: dict, on_end) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancelled = self._cancelled

        class UntilCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        try:
            with torch.no_grad():
                model.generate(
                    **encoded,
                    streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([UntilCancelled()]),
                    **arguments,
                )
        except Exception as error:  # the reader ends the stream with an error event
            self.error = error
            self._streamer.end()
        finally:
            on_end()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self):
        return iter(self._streamer)


class Batcher:
    """Runs `generate(jobs) -> answers` on batches of concurrently submitted jobs."""

    def __init__(self, generate, *, max_batch_size: int, max_wait_ms: float, on_batch=None):
        self._generate = generate
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000
        self._on_batch = on_batch or (lambda size, tokens, seconds: None)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken off the queue but decoding differently from the batch
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _next_batch(self) -> list[Job] | None:
        first = self._held.pop(0) if self._held else self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self._max_wait
        while len(batch) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            (batch if job.decoding == first.decoding else self._held).append(job)
        return batch

    def _run(self, batch: list[Job]) -> Exception | None:
        """Generate a batch and hand each job its answer; the error, if generation failed."""
        started = time.perf_counter()
        try:
            answers = self._generate(batch)
        except Exception as error:
            return error
        self._on_batch(len(batch), sum(a.completion_tokens for a in answers), time.perf_counter() - started)
        for job, answer in zip(batch, answers):
            job.future.set_result(answer)
        return None

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if self._run(batch) is None:
                continue
            # One request can fail a whole batch; each is tried alone so that only it fails (the
            # server answers it with a 500, the others with their answers).
            for job in batch:
                if (error := self._run([job])) is not None:
                    job.future.set_exception(error)
        for job in self._held:
            job.future.set_exception(RuntimeError("the server is shutting down"))
