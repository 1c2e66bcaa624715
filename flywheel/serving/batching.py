"""Dynamic batching for serving: concurrent requests are generated together.

One worker thread owns the model. A request waits at most `max_wait_ms` for others to join it, and
a batch holds at most `max_batch_size`; requests batch together only when they decode the same way
(greedy, or sampling at the same temperature and top_p). Each request keeps its own `max_tokens`:
the batch generates up to the largest, and each answer is cut at its own limit, which gives the
same text as generating it alone (a token never depends on the tokens after it).
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
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def decoding(self) -> tuple:
        return ("greedy",) if self.temperature < MIN_TEMPERATURE else ("sample", self.temperature, self.top_p)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model ended it; "length": max_tokens reached


def _options(job: Job, tokenizer) -> dict:
    """model.generate's decoding arguments for a job."""
    sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": 0}
    return {
        **(sampling if job.temperature >= MIN_TEMPERATURE else {"do_sample": False}),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def generate_batch(model, tokenizer, jobs: list[Job]) -> list[Answer]:
    """One model.generate call for jobs that decode the same way."""
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right edge
    encoded = tokenizer([job.prompt for job in jobs], return_tensors="pt", padding=True, add_special_tokens=False).to(
        model.device
    )
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=max(job.max_tokens for job in jobs), **_options(jobs[0], tokenizer)
        )
    answers = []
    for row, job in enumerate(jobs):
        new = output[row, encoded["input_ids"].shape[1] :].tolist()[: job.max_tokens]
        ended = tokenizer.eos_token_id in new
        if ended:
            new = new[: new.index(tokenizer.eos_token_id)]
        answers.append(
            Answer(
                text=tokenizer.decode(new, skip_special_tokens=True).strip(),
                prompt_tokens=int(encoded["attention_mask"][row].sum()),
                completion_tokens=len(new) + int(ended),
                finish_reason="stop" if ended else "length",
            )
        )
    return answers


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
