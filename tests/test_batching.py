"""The serving batcher and streams: one bad job fails only itself; a stream whose generation fails
ends at once; a cancelled one stops generating."""

import threading
import time

import pytest

from flywheel.serving.batching import MIN_TEMPERATURE, Answer, Batcher, Job, Stream


def _generate_failing_on(word: str, batches: list[int]):
    """Generation that fails a whole batch when any of its prompts holds `word`, as a tokenizer
    failing on one text does."""

    def generate(jobs: list[Job]) -> list[Answer]:
        batches.append(len(jobs))
        if any(word in job.prompt for job in jobs):
            raise ValueError(f"cannot encode a prompt holding {word!r}")
        return [Answer(job.prompt.upper(), 1, 1, "stop") for job in jobs]

    return generate


def test_a_job_that_fails_its_batch_fails_alone_and_the_others_get_their_answers():
    batches: list[int] = []
    generate = _generate_failing_on("bad", batches)

    batcher = Batcher(generate, max_batch_size=8, max_wait_ms=2000)
    first = batcher.submit(Job("first", 4))
    jobs = [Job(f"innocent {n}", 4) for n in range(6)] + [Job("bad one", 4)]
    futures = [batcher.submit(job) for job in jobs]
    batcher.close()

    assert first.result().text == "FIRST"
    assert [f.result().text for f in futures[:6]] == [f"INNOCENT {n}" for n in range(6)]
    with pytest.raises(ValueError, match="bad"):
        futures[6].result()
    assert batches == [8] + [1] * 8, batches  # batched together, then retried one by one


def test_a_temperature_too_small_to_sample_with_decodes_greedily():
    assert Job("x", 1, temperature=1e-300).decoding == ("greedy",)
    assert Job("x", 1, temperature=MIN_TEMPERATURE).decoding[0] == "sample"


# ---------------------------------------------------------------------------------------------
# Streams


@pytest.fixture(scope="module")
def tiny_model():
    """An untrained tiny Llama and a tokenizer trained on a few words: it babbles, at length."""
    from flywheel.config import TinyModelParams
    from flywheel.modeling import build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(["rouge chat grand chien bleu maison vert arbre"] * 50, vocab_size=300)
    return build_tiny_model(tokenizer, TinyModelParams(), seed=0), tokenizer


def _drain(stream: Stream, seconds: float = 60) -> list[str]:
    pieces, deadline = [], time.monotonic() + seconds
    for piece in stream:
        pieces.append(piece)
        assert time.monotonic() < deadline, "the stream did not end"
    return pieces


def test_a_stream_whose_generation_fails_ends_at_once_with_the_error(tiny_model):
    _, tokenizer = tiny_model

    class FailingModel:  # generation dying mid-way (a kernel or an out-of-memory error on a GPU)
        device = "cpu"

        def generate(self, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ended = threading.Event()
    stream = Stream(FailingModel(), tokenizer, Job("rouge chat", 16), on_end=ended.set)
    started = time.monotonic()
    assert _drain(stream) == [""] and time.monotonic() - started < 5  # it used to wait 300 s
    assert "illegal memory access" in str(stream.error) and ended.wait(5)


def test_a_cancelled_stream_stops_generating(tiny_model):
    model, tokenizer = tiny_model
    whole = _drain(Stream(model, tokenizer, Job("rouge chat", 120)))
    ended = threading.Event()
    stream = Stream(model, tokenizer, Job("rouge chat", 120), on_end=ended.set)
    first = next(iter(stream))
    stream.cancel()  # the client went away
    assert ended.wait(10)
    assert len([first, *_drain(stream)]) < len(whole) / 4, "it generated on after the client left"
