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
    # A streamed job gets each new token id here as its batch generates it (see _RowStreamer).
    tokens: queue.Queue | None = None
    emitted: int = field(default=0, init=False)
    cancelled: threading.Event = field(default_factory=threading.Event, init=False)  # the client went away
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
    """One model.generate call for jobs that decode the same way; streamed jobs get their tokens
    step by step as the batch generates them."""
    import torch
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"  # generation continues from the right edge
    encoded = tokenizer([job.prompt for job in jobs], return_tensors="pt", padding=True, add_special_tokens=False).to(
        model.device
    )
    if jobs[0].seed is not None and jobs[0].decoding[0] == "sample":
        torch.manual_seed(jobs[0].seed)  # this thread alone generates
    prompt_width = encoded["input_ids"].shape[1]
    streamed = any(job.tokens is not None for job in jobs)
    with torch.no_grad():
        output = model.generate(
            **encoded,
            max_new_tokens=max(job.max_tokens for job in jobs),
            stopping_criteria=StoppingCriteriaList([_RowsDone(jobs, prompt_width)]),
            streamer=_RowStreamer(jobs, tokenizer.eos_token_id) if streamed else None,
            **_options(jobs[0], tokenizer),
        )
    return [
        _answer(tokenizer, output[row, prompt_width:].tolist(), job, int(encoded["attention_mask"][row].sum()))
        for row, job in enumerate(jobs)
    ]


# A stream whose generation stalls this long (no new token) ends with an error.
STREAM_STALL_S = 60


class _RowsDone:
    """A StoppingCriteria: each row stops at its own max_tokens, or when its client has gone;
    generation ends when every row has (instead of at the batch's largest max_tokens)."""

    def __init__(self, jobs: list[Job], prompt_width: int):
        self.jobs, self.prompt_width = jobs, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids.shape[1] - self.prompt_width
        return torch.tensor([job.cancelled.is_set() or generated >= job.max_tokens for job in self.jobs])


class _RowStreamer:
    """A generate() streamer for a batch: each step's new token goes to the job of its row when
    that job is streamed, until the row has ended (its end token, max_tokens or cancel)."""

    def __init__(self, jobs: list[Job], eos_token_id: int):
        self.jobs, self.eos_token_id = jobs, eos_token_id
        self.prompt_seen = False
        self.ended = [False] * len(jobs)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.tolist()):
            job = self.jobs[row]
            if job.tokens is None or self.ended[row]:
                continue
            job.emitted += 1
            job.tokens.put(token)
            self.ended[row] = token == self.eos_token_id or job.emitted >= job.max_tokens or job.cancelled.is_set()

    def end(self) -> None:
        pass


class Batcher:
    """Runs `generate(jobs) -> answers` on batches of concurrently submitted jobs."""

    def __init__(self, generate, *, max_batch_size: int, max_wait_ms: float, on_batch=None):
        self._generate = generate
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000
        self._on_batch = on_batch or (lambda jobs, answers, seconds: None)
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
        self._on_batch(batch, answers, time.perf_counter() - started)
        for job, answer in zip(batch, answers):
            job.future.set_result(answer)
        return None

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if self._run(batch) is None:
                continue
            # One request can fail a whole batch; each is tried alone so that only it fails (the
            # server answers it with a 500, the others with their answers). A stream that has sent
            # tokens already fails: trying again would send them twice.
            for job in batch:
                if job.emitted:
                    job.future.set_exception(RuntimeError("generation failed mid-stream"))
                elif (error := self._run([job])) is not None:
                    job.future.set_exception(error)
        for job in self._held:
            job.future.set_exception(RuntimeError("the server is shutting down"))
