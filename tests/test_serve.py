"""flywheel serve as a real process on a loopback port, queried with the official openai client,
logging to SQLite and to the PostgreSQL server on 127.0.0.1:5432; stopped with SIGTERM."""

import contextlib
import json
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.serving.request_log import RequestLog
from tests.conftest import BIN, REPO, free_port, postgres_database, run, subprocess_env, wait_until_ready

openai = pytest.importorskip("openai")

KEY, OTHER_KEY, THIRD_KEY = "test-key-1", "test-key-2", "test-key-3"  # each its own rate limit


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request, trained_sft, tmp_path_factory):
    """The fine-tuned sample model served; yields (base URL, process, request log URL)."""
    root = tmp_path_factory.mktemp("serve")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            log_url = f"sqlite:///{root / 'requests.sqlite'}"
        else:
            log_url = stack.enter_context(postgres_database("flywheel_serve"))
        port = free_port()
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        run(
            [
                str(BIN / "flywheel"),
                "params",
                "apply",
                "serve.rate_limit_per_minute=60",
                "serve.max_tokens=64",
                "serve.max_prompt_chars=2000",
            ],
            root,
        )
        process = subprocess.Popen(
            [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(trained_sft / "models/sft")],
            cwd=root,
            env=subprocess_env(FLYWHEEL_API_KEYS=f"{KEY},{OTHER_KEY},{THIRD_KEY}", FLYWHEEL_REQUEST_LOG_URL=log_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(f"{base}/readyz", process)
        yield base, process, log_url
        if process.poll() is None:
            process.kill()
            process.wait()


def _client(base, key=KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_the_openai_client_gets_chat_and_text_completions_with_the_model_version(server):
    base, _, _ = server
    client = _client(base)
    chat = client.chat.completions.create(
        model="sft",
        messages=[
            {"role": "system", "content": "You are a precise translator. Answer with the French words only."},
            {"role": "user", "content": "Translate to French: red cat"},
        ],
    )
    assert chat.choices[0].message.content == "rouge chat"
    assert chat.choices[0].finish_reason == "stop" and chat.id.startswith("chatcmpl-")
    assert chat.system_fingerprint.startswith("md5-") and chat.usage.completion_tokens >= 2
    text = client.completions.create(
        model="sft", prompt="<|user|> French for: big dog<|end|><|assistant|>", max_tokens=1
    )
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 1
    listed = [m.id for m in client.models.list()]
    assert listed == ["sft", chat.system_fingerprint, "flywheel-model"]  # its name, its version, the stable name
    by_version = client.chat.completions.create(model=chat.system_fingerprint, messages=[RED_CAT])
    assert by_version.choices[0].message.content == "rouge chat"


RED_CAT = {"role": "user", "content": "Translate to French: red cat"}


def test_openai_clients_are_told_what_this_server_does_not_do(server):
    base, _, _ = server
    client = _client(base)
    with pytest.raises(openai.NotFoundError) as unknown:  # "gpt-4" used to get this model's answer
        client.chat.completions.create(model="gpt-4", messages=[RED_CAT])
    assert unknown.value.code == "model_not_found" and "'sft'" in unknown.value.message
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused_here = ({"tools": [tool]}, {"response_format": {"type": "json_object"}}, {"logprobs": True})
    for asked in (*refused_here, {"n": 2, "stream": True}):
        with pytest.raises(openai.BadRequestError) as refused:  # ignored before: plain text came back
            client.chat.completions.create(model="sft", messages=[RED_CAT], **asked)
        assert refused.value.code == "unsupported_parameter" and refused.value.param == next(iter(asked))
    plain = client.chat.completions.create(model="sft", messages=[RED_CAT], response_format={"type": "text"})
    assert plain.choices[0].message.content == "rouge chat"  # what asks for nothing is accepted
    chunks = list(
        client.chat.completions.create(
            model="sft", messages=[RED_CAT], stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_n_choices_stop_sequences_and_seeds_as_openai_clients_use_them(server):
    base, _, _ = server
    client = _client(base)
    two = client.chat.completions.create(model="sft", messages=[RED_CAT], n=2)
    assert [c.message.content for c in two.choices] == ["rouge chat"] * 2  # greedy: the same twice
    one = client.chat.completions.create(model="sft", messages=[RED_CAT])
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    stopped = client.chat.completions.create(model="sft", messages=[RED_CAT], stop=[" chat", "zz"])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("rouge", "stop")
    assert stopped.usage.completion_tokens < one.usage.completion_tokens
    pieces = list(client.chat.completions.create(model="sft", messages=[RED_CAT], stop=" chat", stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == "rouge"
    sampled = [
        client.completions.create(model="sft", prompt="the", max_tokens=12, temperature=2.0, seed=seed).choices[0]
        for seed in (1, 1, 2)
    ]
    assert sampled[0].text == sampled[1].text != sampled[2].text


def test_streamed_answers_arrive_as_server_sent_events_and_match_the_whole_answer(server):
    base, _, _ = server
    client = _client(base)
    messages = [{"role": "user", "content": "Translate to French: red cat"}]
    chunks = list(client.chat.completions.create(model="sft", messages=messages, stream=True))
    assert len(chunks) >= 3  # the pieces, then the finish reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "rouge chat"
    assert chunks[-1].choices[0].finish_reason == "stop" and len({c.id for c in chunks}) == 1
    prompt = "<|user|> French for: big dog<|end|><|assistant|>"
    whole = client.completions.create(model="sft", prompt=prompt, max_tokens=16).choices[0].text
    pieces = list(client.completions.create(model="sft", prompt=prompt, stream=True, max_tokens=16))
    assert "".join(p.choices[0].text for p in pieces) == whole != ""


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    base, _, _ = server
    words = ["red cat", "big dog", "old house", "blue sea", "green tree", "small bird", "hot bread", "new book"] * 2
    client = _client(base, OTHER_KEY)

    def ask(phrase, stream):
        messages = [{"role": "user", "content": f"Translate to French: {phrase}"}]
        answer = client.chat.completions.create(model="sft", messages=messages, max_tokens=16, stream=stream)
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, words, [False] * 8 + [True] * 8))  # half of them streamed
    assert answers[:8] == answers[8:]  # the same prompt gets the same answer whatever its batch
    assert answers[0] == "rouge chat"
    metrics = httpx.get(f"{base}/metrics").text
    batches = float(_metric(metrics, "flywheel_batch_size_count"))
    requests = float(_metric(metrics, "flywheel_batch_size_sum"))
    assert requests / batches > 1.5, "concurrent requests were not batched"
    streams = float(_metric(metrics, "flywheel_streams_per_batch_sum"))
    batches_with_streams = batches - float(_metric(metrics, 'flywheel_streams_per_batch_bucket{le="0.0"}'))
    assert streams / batches_with_streams > 1.5, "concurrent streams were not batched"


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, {}, 401, "missing or invalid API key"),
        ({"messages": [{"role": "user", "content": "hi"}]}, {"Authorization": "Bearer wrong"}, 401, "invalid API key"),
        ({"messages": []}, None, 400, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000},
            None,
            400,
            "max_tokens 1000 is above this server's limit of 64",
        ),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, None, 400, "at most 2,000"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, None, 400, "temperature"),
    ],
)
def test_bad_requests_get_clear_json_errors(server, body, headers, status, message):
    base, _, _ = server
    response = httpx.post(
        f"{base}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"} if headers is None else headers,
    )
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_a_request_the_model_cannot_take_fails_alone_and_never_with_a_5xx(server):
    base, _, _ = server
    headers = {"Authorization": f"Bearer {THIRD_KEY}", "Content-Type": "application/json"}
    chat, text = f"{base}/v1/chat/completions", f"{base}/v1/completions"
    innocent = json.dumps({"messages": [{"role": "user", "content": "Translate to French: red cat"}], "max_tokens": 8})
    # Valid JSON, but no tokenizer takes a lone surrogate: it used to fail every request batched with it.
    surrogate = '{"messages": [{"role": "user", "content": "x\\ud800y"}], "max_tokens": 8}'
    with ThreadPoolExecutor(13) as pool:
        bad = pool.submit(httpx.post, chat, content=surrogate, headers=headers)
        good = [pool.submit(httpx.post, chat, content=innocent, headers=headers) for _ in range(12)]
        responses = [bad.result(), *(g.result() for g in good)]
    assert responses[0].status_code == 400, responses[0].text
    assert "lone surrogate" in responses[0].json()["error"]["message"]
    assert [r.status_code for r in responses[1:]] == [200] * 12
    assert {r.json()["choices"][0]["message"]["content"] for r in responses[1:]} == {"rouge chat"}

    def post(url, body):
        return httpx.post(url, content=json.dumps(body), headers=headers)

    empty = post(text, {"prompt": "", "max_tokens": 4})
    assert empty.status_code == 400 and "prompt" in empty.json()["error"]["message"]
    red_cat = [{"role": "user", "content": "Translate to French: red cat"}]
    tiny = post(chat, {"messages": red_cat, "temperature": 1e-300})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == "rouge chat"
    # 700 empty messages pass max_prompt_chars (2,000) but not the model's 512 positions.
    many = post(chat, {"messages": [{"role": "user", "content": ""}] * 700, "max_tokens": 4})
    assert many.status_code == 400 and "the model's context of 512 tokens" in many.json()["error"]["message"]
    # Without a key nothing is read; a body larger than any valid request is not parsed.
    unkeyed = httpx.post(chat, content=b"[" * 1_000_000, headers={"Content-Type": "application/json"})
    assert unkeyed.status_code == 401 and "API key" in unkeyed.json()["error"]["message"]
    oversized = httpx.post(chat, content=b"{" + b" " * 200_000 + b"}", headers=headers)
    assert oversized.status_code == 413 and "76,000 bytes" in oversized.json()["error"]["message"]
    # Unknown paths and methods answer in OpenAI's error shape too, not FastAPI's {"detail": ...}.
    for method, url, status, code in (
        ("GET", f"{base}/v1/nope", 404, "unknown_url"),
        ("GET", chat, 405, "method_not_allowed"),
    ):
        answer = httpx.request(method, url, headers=headers)
        assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text


def test_guessing_keys_is_rate_limited_and_valid_keys_are_not(server):
    base, _, _ = server
    guesses = [
        httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer guess-{n}"}).status_code for n in range(40)
    ]
    assert 401 in guesses and guesses[-1] == 429, guesses  # unlimited before
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {THIRD_KEY}"}).status_code == 200


def test_a_key_over_its_rate_limit_gets_429_and_other_keys_do_not(server):
    base, _, _ = server
    limited = "Bearer " + OTHER_KEY
    statuses = [httpx.get(f"{base}/v1/models", headers={"Authorization": limited}).status_code for _ in range(70)]
    assert 429 in statuses and statuses.count(200) <= 60
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_feedback_and_sigterm_leave_every_answered_request_in_the_log(server, tmp_path):
    base, process, log_url = server
    client = _client(base)
    answered = [
        client.chat.completions.create(
            model="sft", messages=[{"role": "user", "content": f"Mail me at ann{i}@example.com: red cat"}]
        )
        for i in range(5)
    ]
    ok = httpx.post(
        f"{base}/v1/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"request_id": answered[0].id, "preferred_response": "rouge chat"},
    )
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    unknown = httpx.post(
        f"{base}/v1/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"request_id": "chatcmpl-nope", "rating": "up"},
    )
    assert unknown.status_code == 404
    # Feedback is redacted and logged like a prompt, and held to the same size limit ("a." * 100_000
    # held the whole server 19 s): over the body limit it is not even read.
    for size, status, message in ((20_000, 400, "at most 2,000"), (100_000, 413, "request body")):
        huge = httpx.post(
            f"{base}/v1/feedback",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"request_id": answered[0].id, "preferred_response": "a." * size},
        )
        assert huge.status_code == status and message in huge.json()["error"]["message"]

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert "stopped;" in output and KEY not in output
    log = RequestLog(log_url)
    try:
        for completion in answered:
            stored = log.get_request(completion.id)
            assert stored is not None and stored["status"] == 200
            assert "[EMAIL]" in stored["messages"][-1]["content"]  # redacted before it was stored
        exported = tmp_path / "feedback.jsonl"
        assert log.export_feedback(exported) == 1
        assert json.loads(exported.read_text())["preferred_response"] == "rouge chat"
    finally:
        log.close()
