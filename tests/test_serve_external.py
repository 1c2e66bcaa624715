"""flywheel serve as the gateway in front of a real external engine, which the gateway starts
itself: vLLM's CPU build (in its own environment: make engine-vllm) on the fine-tuned sample model,
and llama.cpp's server (make engine-llamacpp) on its 8-bit GGUF export; queried with the official
openai client; stopped with SIGTERM while a request is in flight."""

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

import httpx
import pytest

from flywheel.serving.request_log import RequestLog
from tests.conftest import BIN, REPO, free_port, run, subprocess_env, wait_until_ready

openai = pytest.importorskip("openai")

KEY = "test-key-external"
RED_CAT = [{"role": "user", "content": "Translate to French: red cat"}]


@dataclass
class External:
    """What differs from one engine to the other."""

    executable: str  # relative to the repository: what make engine-<name> installs
    process_pattern: str  # pgrep -f: the engine's processes
    metric: str  # one of its own metrics, re-exported
    params: list[str]
    env: dict


ENGINES = {
    # float32 as the model was trained (vLLM's CPU default is bfloat16); a small KV cache: 2 cores;
    # eager: compiling the model made vLLM ready after 53 s instead of 31.
    "vllm": External(
        ".venv-vllm/bin/python",
        "vllm.entrypoints",
        "vllm:generation_tokens_total",
        [
            "serve.engine=vllm",
            'serve.engine_args=["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", '
            '"--enforce-eager"]',
        ],
        {"FLYWHEEL_ENGINE_PYTHON": ".venv-vllm/bin/python", "VLLM_CPU_KVCACHE_SPACE": "1"},
    ),
    "llamacpp": External(
        ".llama.cpp/bin/llama-server",
        "llama-server",
        "llamacpp:tokens_predicted_total",
        ["serve.engine=llamacpp"],
        {"FLYWHEEL_LLAMACPP_SERVER": ".llama.cpp/bin/llama-server"},
    ),
}


def _served_model(engine: str, trained_sft, root):
    """The model directory the engine serves: vLLM the fine-tuned weights, llama.cpp their export."""
    if engine == "vllm":
        return trained_sft / "models/sft"
    export = root / "export/sft-q8_0"
    run([str(BIN / "flywheel"), "export", "--model", "models/sft", "--out", str(export), "--no-judge"], trained_sft)
    return export


@pytest.fixture(
    scope="module",
    params=[pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("llamacpp", marks=pytest.mark.llamacpp)],
)
def gateway(request, trained_sft, tmp_path_factory):
    """The fine-tuned sample model served through an external engine; yields (base URL, process,
    log URL, the model's name, the engine)."""
    engine = ENGINES[request.param]
    if not (REPO / engine.executable).is_file():
        pytest.fail(
            f"{engine.executable} is missing: make engine-{request.param} installs it "
            f"(make test {request.param.upper()}_TESTS=0 skips this)"
        )
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    model = _served_model(request.param, trained_sft, root)
    log_url = f"sqlite:///{root / 'requests.sqlite'}"
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run([str(BIN / "flywheel"), "params", "apply", *engine.params], root)
    port = free_port()
    env = {name: str(REPO / value) if value.startswith(".") else value for name, value in engine.env.items()}
    process = subprocess.Popen(
        [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(model)],
        cwd=root,
        env=subprocess_env(FLYWHEEL_API_KEYS=KEY, FLYWHEEL_REQUEST_LOG_URL=log_url, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{base}/readyz", process, timeout=600)
    yield base, process, log_url, model.name, request.param
    if process.poll() is None:
        process.kill()
        process.wait()


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def test_the_openai_client_gets_what_the_built_in_engine_answers_and_what_it_does_not(gateway):
    base, _, _, model, _ = gateway
    client = _client(base)
    chat = client.chat.completions.create(model=model, messages=RED_CAT)
    assert chat.choices[0].message.content == "rouge chat"  # the built-in engine's answer (test_serve.py)
    assert chat.model == model and chat.system_fingerprint.startswith("md5-") and chat.id.startswith("chatcmpl-")
    streamed = list(client.chat.completions.create(model=model, messages=RED_CAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "rouge chat"
    assert streamed[-1].choices[0].finish_reason == "stop"

    sampled = client.chat.completions.create(model=model, messages=RED_CAT, n=2, temperature=1.5, seed=7)
    assert len(sampled.choices) == 2 and [c.index for c in sampled.choices] == [0, 1]
    assert sampled.usage.completion_tokens >= 2 * 2  # both choices counted
    again = client.chat.completions.create(model=model, messages=RED_CAT, n=2, temperature=1.5, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]

    stopped = client.chat.completions.create(model=model, messages=RED_CAT, stop=["chat"])
    assert stopped.choices[0].message.content == "rouge" and stopped.choices[0].finish_reason == "stop"
    with_logprobs = client.chat.completions.create(model=model, messages=RED_CAT, logprobs=True, top_logprobs=2)
    tokens = with_logprobs.choices[0].logprobs.content
    assert len(tokens) == with_logprobs.usage.completion_tokens
    assert all(len(token.top_logprobs) >= 1 and token.logprob <= 0 for token in tokens)


def test_the_gateway_keeps_its_contract_and_shows_the_engines_metrics(gateway):
    base, _, _, model, engine = gateway
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        _client(base).chat.completions.create(model="gpt-4", messages=RED_CAT)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(base).chat.completions.create(model=model, messages=RED_CAT, response_format={"type": "json_object"})
    assert refused.value.param == "response_format"
    assert httpx.get(f"{base}/readyz").json()["engine"] == engine
    metrics = httpx.get(f"{base}/metrics").text
    assert 'flywheel_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert ENGINES[engine].metric in metrics  # the engine's own, re-exported


def test_sigterm_drains_the_stream_in_flight_logs_every_answer_and_stops_the_engine(gateway):
    base, process, log_url, model, engine = gateway
    client = _client(base)
    prompts = [f"<|user|> French for: red cat {i}<|end|><|assistant|>" for i in range(3)]
    answered = [client.completions.create(model=model, prompt=prompt) for prompt in prompts]
    pgrep = ["pgrep", "-f", ENGINES[engine].process_pattern]
    engine_pids = subprocess.run(pgrep, capture_output=True, text=True).stdout.split()
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


def test_llama_cpp_serves_only_an_export_the_gate_did_not_reject(tmp_path):
    from flywheel.errors import FlywheelError
    from flywheel.serving.engine_commands import judged_export

    with pytest.raises(FlywheelError, match="not a GGUF export.*flywheel export"):
        judged_export(tmp_path)  # e.g. models/aligned itself
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    description = {"source_version": "md5-1", "quant": "q8_0", "gate": "rejected"}
    (tmp_path / "export.json").write_text(json.dumps(description))
    with pytest.raises(FlywheelError, match="the gate rejected the export"):
        judged_export(tmp_path)
    (tmp_path / "export.json").write_text(json.dumps({**description, "gate": "passed"}))
    assert judged_export(tmp_path)["quant"] == "q8_0"


def test_llama_cpps_log_probabilities_come_back_in_the_completions_shape():
    from flywheel.serving.external import LlamaCppEngine

    top = [{"token": " rouge", "logprob": -0.1}, {"token": " vert", "logprob": -2.5}]
    content = [{"token": " rouge", "logprob": -0.1, "top_logprobs": top}, {"token": " chat", "logprob": -0.3}]
    assert LlamaCppEngine.completion_logprobs({"content": content}) == {
        "tokens": [" rouge", " chat"],
        "token_logprobs": [-0.1, -0.3],
        "top_logprobs": [{" rouge": -0.1, " vert": -2.5}, {}],
        "text_offset": [0, 6],
    }


@pytest.mark.llamacpp
def test_an_engine_already_running_beside_the_gateway_is_proxied_to_and_outlives_it(trained_sft, tmp_path):
    """FLYWHEEL_ENGINE_URL (a sidecar in a Kubernetes pod): the gateway starts no engine of its own."""
    server = REPO / ENGINES["llamacpp"].executable
    if not server.is_file():
        pytest.fail(f"{server} is missing: make engine-llamacpp builds it (make test LLAMACPP_TESTS=0 skips this)")
    export = _served_model("llamacpp", trained_sft, tmp_path)
    engine_port, port = free_port(), free_port()
    arguments = ["--model", str(export / "model.gguf"), "--alias", "flywheel-engine", "--port", str(engine_port)]
    engine = subprocess.Popen([str(server), *arguments, "--host", "127.0.0.1", "--threads", "1", "--log-disable"])
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run([str(BIN / "flywheel"), "params", "apply", "serve.engine=llamacpp"], tmp_path)
    gateway = subprocess.Popen(
        [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(export)],
        cwd=tmp_path,
        env=subprocess_env(
            FLYWHEEL_API_KEYS=KEY,
            FLYWHEEL_ENGINE_URL=f"http://127.0.0.1:{engine_port}",
            FLYWHEEL_LLAMACPP_SERVER="/nonexistent",  # proof that it is not started
            FLYWHEEL_REQUEST_LOG_URL=f"sqlite:///{tmp_path / 'requests.sqlite'}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", gateway)
        chat = _client(f"http://127.0.0.1:{port}").chat.completions.create(model=export.name, messages=RED_CAT)
        assert chat.choices[0].message.content == "rouge chat"
        gateway.send_signal(signal.SIGTERM)
        assert "stopped;" in gateway.communicate(timeout=60)[0]
        assert engine.poll() is None  # the platform's to stop, not the gateway's
    finally:
        for process in (gateway, engine):
            process.kill()
            process.wait()
