"""An external engine behind the gateway: vLLM's OpenAI-compatible server, started by Flywheel as a
process of its own on a private loopback port, with its own Python (`serve.engine_python`: vLLM
pins its own torch and transformers, so it lives in an environment or image of its own).

The gateway renders the chat template and sends every request to the engine's /v1/completions,
so both endpoints see exactly the prompt the built-in engine would; the engine answers with its
own batching (continuous, paged KV cache) and exact token counts. Its Prometheus metrics (vllm:*)
are re-exported on the gateway's /metrics.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from flywheel import modeling
from flywheel.config import ServeParams
from flywheel.errors import FlywheelError
from flywheel.net import free_port
from flywheel.serving.batching import STREAM_STALL_S, Answer, Job
from flywheel.serving.engine import Engine, Generation, TextStream, max_positions
from flywheel.serving.schemas import ApiError

# The engine's Python outside the project (an image's /opt/vllm/bin/python) comes from the machine's
# environment, never from params: a run's conf must not pick what the server executes.
ENGINE_PYTHON_VARIABLE = "FLYWHEEL_ENGINE_PYTHON"
ENGINE_MODEL_NAME = "flywheel-engine"  # what the engine serves the model as; clients never see it
STOP_GRACE_S = 30  # the engine's own drain after the gateway's, before it is killed
OUTPUT_LINES_KEPT = 40  # the engine's last lines, quoted when it fails to start or dies


class VllmEngine(Engine):
    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from transformers import AutoTokenizer

        modeling.require_model(model_dir)
        if modeling.is_adapter(model_dir):
            raise FlywheelError(f"{model_dir} is a LoRA adapter; vLLM serves merged weights (finetune.lora.merge)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.name, self.version = model_dir.name, modeling.model_version(model_dir)
        self.max_positions = max_positions(model_dir)
        self.port = free_port()
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.process = self._start(config, model_dir)
        self._wait_until_healthy(config.engine_start_timeout_s)
        import httpx

        # One connection per request in flight: vLLM batches them; a pool limit would queue them here.
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=httpx.Timeout(STREAM_STALL_S, connect=10),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    # -- the process ----------------------------------------------------------------------------

    def _start(self, config: ServeParams, model_dir: Path) -> subprocess.Popen:
        python = Path(os.environ.get(ENGINE_PYTHON_VARIABLE) or config.engine_python)
        if not python.is_file():
            raise FlywheelError(
                f"the engine's Python {python} does not exist (serve.engine_python, or {ENGINE_PYTHON_VARIABLE}): "
                "make engine-vllm installs vLLM's CPU build there; docs/serving.md tells the GPU install"
            )
        command = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir.resolve()),
            "--served-model-name",
            ENGINE_MODEL_NAME,
            "--host",
            "127.0.0.1",  # private: every request goes through the gateway's keys and log
            "--port",
            str(self.port),
            "--uvicorn-log-level",
            "warning",
            "--disable-uvicorn-access-log",
            *config.engine_args,
        ]
        print(f"flywheel serve: starting vLLM: {' '.join(command)}", flush=True)
        process = subprocess.Popen(
            command,
            env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C for the gateway must not kill the engine before the drain
        )
        threading.Thread(target=self._relay, args=(process,), name="engine-output", daemon=True).start()
        atexit.register(self._stop)  # also when the gateway stops before the engine was ready
        return process

    def _relay(self, process: subprocess.Popen) -> None:
        """The engine's output, prefixed, into the gateway's (and kept, to quote on a failure)."""
        for line in process.stdout:
            self.output.append(line.rstrip())
            print(f"[vllm] {line.rstrip()}", flush=True)

    def _wait_until_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (failure := self.failure()) is not None:
                raise FlywheelError(failure)
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self._stop()
        raise FlywheelError(f"vLLM was not ready within serve.engine_start_timeout_s ({timeout_s:.0f} s)")

    def failure(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        last = "\n".join(list(self.output)[-15:])
        return f"the vLLM engine exited with status {code}; its last lines:\n{last}"

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    # -- requests -------------------------------------------------------------------------------

    def _payload(self, job: Job, n: int, stream: bool) -> dict:
        payload = {
            "model": ENGINE_MODEL_NAME,
            "prompt": job.prompt,
            "max_tokens": job.max_tokens,
            "temperature": job.temperature,
            "top_p": job.top_p,
            "n": n,
            "seed": job.seed,
            "stop": job.stop or None,
            "logprobs": job.logprobs,
            "user": job.user,
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}  # exact counts for the request log
        return {name: value for name, value in payload.items() if value is not None}

    async def generate(self, job: Job, n: int) -> Generation:
        response = await self.client.post("/v1/completions", json=self._payload(job, n, stream=False))
        _raise_for_engine(response.status_code, response.content)
        body = response.json()
        choices = sorted(body["choices"], key=lambda choice: choice["index"])
        usage = body["usage"]
        return Generation(
            [
                Answer(
                    text=_answer_text(choice["text"]),
                    prompt_tokens=usage["prompt_tokens"],
                    completion_tokens=0,
                    finish_reason=choice["finish_reason"] or "stop",
                    logprobs=choice.get("logprobs"),
                )
                for choice in choices
            ],
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )

    async def stream(self, job: Job) -> TextStream:
        request = self.client.build_request("POST", "/v1/completions", json=self._payload(job, 1, stream=True))
        response = await self.client.send(request, stream=True)
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            _raise_for_engine(response.status_code, content)
        return EngineStream(response)

    async def metrics_text(self) -> str:
        """vLLM's own metrics (vllm:*) for the gateway's /metrics; its process metrics would clash."""
        import httpx

        try:
            response = await self.client.get("/metrics", timeout=5)
        except httpx.HTTPError:  # the gateway's metrics must not fail with the engine's
            return ""
        return "\n".join(line for line in response.text.splitlines() if _is_vllm_metric(line))


def _is_vllm_metric(line: str) -> bool:
    """`# HELP vllm:x ...`, `# TYPE vllm:x ...` or a sample `vllm:x{...} 1.0`."""
    words = line.split(" ", 3)
    name = words[2] if line.startswith("# ") and len(words) > 2 else line
    return name.startswith("vllm:")


def _answer_text(text: str) -> str:
    """As the built-in engine answers: the chat template leaves a space before the answer."""
    return text.strip()


def _raise_for_engine(status: int, content: bytes) -> None:
    """The engine's refusal of a request (4xx) is the client's, with the engine's words; anything
    else is the server's failure."""
    if status == 200:
        return
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = content.decode(errors="replace")[:500]
    if 400 <= status < 500:
        raise ApiError(400, f"the engine refused the request: {message}")
    raise RuntimeError(f"the engine answered {status}: {message}")


class EngineStream(TextStream):
    """vLLM's server-sent events, read as text pieces."""

    def __init__(self, response):
        self._response = response

    async def pieces(self):
        started = False
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    self.error = RuntimeError(f"the engine failed mid-stream: {event['error']}")
                    return
                if event.get("usage"):
                    self.prompt_tokens = event["usage"]["prompt_tokens"]
                    self.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("text", "")
                    piece = piece if started else piece.lstrip()
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if piece:
                        started = True
                        self.text += piece
                        yield piece
        except Exception as error:  # the engine died or stalled: the stream ends with an error event
            self.error = error
        finally:
            await self._response.aclose()

    async def close(self) -> None:
        await self._response.aclose()
