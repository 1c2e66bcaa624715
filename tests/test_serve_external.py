"""flywheel serve as the gateway in front of a real vLLM server (vLLM's CPU build, in its own
environment: make engine-vllm), which the gateway starts itself; queried with the official openai
client; stopped with SIGTERM while a request is in flight."""

import json
import os
import shutil
import signal
import subprocess

import httpx
import pytest

from flywheel.serving.request_log import RequestLog
from tests.conftest import BIN, REPO, free_port, run, subprocess_env, wait_until_ready

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

KEY = "test-key-vllm"
VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
RED_CAT = [{"role": "user", "content": "Translate to French: red cat"}]


@pytest.fixture(scope="module")
def gateway(trained_sft, tmp_path_factory):
    """The fine-tuned sample model served through vLLM; yields (base URL, process, log URL)."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: make engine-vllm installs it (make test VLLM_TESTS=0 skips this)")
    root = tmp_path_factory.mktemp("serve-vllm")
    log_url = f"sqlite:///{root / 'requests.sqlite'}"
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    # float32 as the model was trained (vLLM's CPU default is bfloat16); a small KV cache: 2 cores;
    # eager: compiling the model made vLLM ready after 53 s instead of 31.
    engine_args = '["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager"]'
    run([str(BIN / "flywheel"), "params", "apply", "serve.engine=vllm", f"serve.engine_args={engine_args}"], root)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(trained_sft / "models/sft")],
        cwd=root,
        env=subprocess_env(
            FLYWHEEL_API_KEYS=KEY,
            FLYWHEEL_REQUEST_LOG_URL=log_url,
            FLYWHEEL_ENGINE_PYTHON=str(VLLM_PYTHON),
            VLLM_CPU_KVCACHE_SPACE="1",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{base}/readyz", process, timeout=600)
    yield base, process, log_url
    if process.poll() is None:
        process.kill()
        process.wait()


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def test_the_openai_client_gets_what_the_built_in_engine_answers_and_what_only_vllm_does(gateway):
    base, _, _ = gateway
    client = _client(base)
    chat = client.chat.completions.create(model="sft", messages=RED_CAT)
    assert chat.choices[0].message.content == "rouge chat"  # the built-in engine's answer (test_serve.py)
    assert chat.model == "sft" and chat.system_fingerprint.startswith("md5-") and chat.id.startswith("chatcmpl-")
    streamed = list(client.chat.completions.create(model="sft", messages=RED_CAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "rouge chat"
    assert streamed[-1].choices[0].finish_reason == "stop"

    sampled = client.chat.completions.create(model="sft", messages=RED_CAT, n=2, temperature=1.5, seed=7)
    assert len(sampled.choices) == 2 and [c.index for c in sampled.choices] == [0, 1]
    assert sampled.usage.completion_tokens >= 2 * 2  # both choices counted
    again = client.chat.completions.create(model="sft", messages=RED_CAT, n=2, temperature=1.5, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]

    stopped = client.chat.completions.create(model="sft", messages=RED_CAT, stop=["chat"])
    assert stopped.choices[0].message.content == "rouge" and stopped.choices[0].finish_reason == "stop"
    with_logprobs = client.chat.completions.create(model="sft", messages=RED_CAT, logprobs=True, top_logprobs=2)
    tokens = with_logprobs.choices[0].logprobs.content
    assert len(tokens) == with_logprobs.usage.completion_tokens
    assert all(len(token.top_logprobs) >= 1 and token.logprob <= 0 for token in tokens)


def test_the_gateway_keeps_its_contract_and_shows_the_engines_metrics(gateway):
    base, _, _ = gateway
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        _client(base).chat.completions.create(model="gpt-4", messages=RED_CAT)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(base).chat.completions.create(model="sft", messages=RED_CAT, response_format={"type": "json_object"})
    assert refused.value.param == "response_format"
    assert httpx.get(f"{base}/readyz").json()["engine"] == "vllm"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'flywheel_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "vllm:generation_tokens_total" in metrics  # the engine's own, re-exported


def test_sigterm_drains_the_stream_in_flight_logs_every_answer_and_stops_the_engine(gateway):
    base, process, log_url = gateway
    client = _client(base)
    prompts = [f"<|user|> French for: red cat {i}<|end|><|assistant|>" for i in range(3)]
    answered = [client.completions.create(model="sft", prompt=prompt) for prompt in prompts]
    engine_pids = subprocess.run(["pgrep", "-f", "vllm.entrypoints"], capture_output=True, text=True).stdout.split()
    assert engine_pids
    request = {"prompt": prompts[0], "max_tokens": 200, "temperature": 1.0, "stream": True}
    with httpx.stream(
        "POST", f"{base}/v1/completions", json=request, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        first = json.loads(next(events).removeprefix("data: "))
        process.send_signal(signal.SIGTERM)  # mid-stream
        rest = list(events)
    assert rest[-1] == "data: [DONE]" and '"finish_reason"' in rest[-2]
    output, _ = process.communicate(timeout=120)
    assert "stopped;" in output
    assert not [pid for pid in engine_pids if os.path.exists(f"/proc/{pid}")], "the engine outlived the gateway"
    log = RequestLog(log_url)
    try:
        for completion in answered:
            stored = log.get_request(completion.id)
            assert stored["status"] == 200 and stored["completion_tokens"] == completion.usage.completion_tokens
        streamed = log.get_request(first["id"])
        assert streamed["status"] == 200 and streamed["completion_tokens"] >= 1
    finally:
        log.close()
