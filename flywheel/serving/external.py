"""External engines behind the gateway: vLLM's OpenAI-compatible server, or llama.cpp's
(`llama-server`, serving a GGUF export), started by Flywheel as a process of its own on a private
loopback port. vLLM runs from a Python of its own (`serve.engine_python`: it pins its own torch and
transformers), llama.cpp is one executable (`serve.llamacpp_server`, built by make engine-llamacpp).

The gateway renders the chat template and sends every request to the engine's /v1/completions,
so every engine sees exactly the prompt the built-in engine would; the engine answers with its
own batching (continuous; paged KV cache in vLLM, slots in llama.cpp) and exact token counts. Its
Prometheus metrics (vllm:*, llamacpp:*) are re-exported on the gateway's /metrics.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from flywheel import modeling
from flywheel.config import ServeParams
from flywheel.errors import FlywheelError
from flywheel.net import free_port
from flywheel.serving import engine_commands
from flywheel.serving.batching import STREAM_STALL_S, Answer, Job
from flywheel.serving.engine import Engine, Generation, TextStream, max_positions
from flywheel.serving.engine_commands import ENGINE_MODEL_NAME, ENGINE_URL_VARIABLE, VLLM_SERVER_MODULE, judged_export
from flywheel.serving.schemas import ApiError

STOP_GRACE_S = 30  # the engine's own drain after the gateway's, before it is killed
OUTPUT_LINES_KEPT = 40  # the engine's last lines, quoted when it fails to start or dies


class ExternalEngine(Engine):
    """An OpenAI-compatible server process; subclasses say how to start it and what it serves."""

    label: str  # in messages and in the prefix of its relayed output
    metric_prefix: str  # its own Prometheus metrics, re-exported

    def __init__(self, config: ServeParams, model_dir: Path, registry):
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.process: subprocess.Popen | None = None
        if attached := os.environ.get(ENGINE_URL_VARIABLE):
            self.base_url = attached.rstrip("/")
            print(f"flywheel serve: {self.label} at {self.base_url} ({ENGINE_URL_VARIABLE}; not started here)")
        else:
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            # 127.0.0.1: private, every request goes through the gateway's keys and log.
            arguments = self.server_args(config, str(model_dir.resolve()), "127.0.0.1", port)
            self.process = self._start([*self.executable(config), *arguments])
        self._wait_until_healthy(config.engine_start_timeout_s)
        import httpx

        # One connection per request in flight: the engine batches them; a pool limit would queue them here.
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(STREAM_STALL_S, connect=10),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    def executable(self, config: ServeParams) -> list[str]:
        """How the engine's server is run here."""
        raise NotImplementedError

    def server_args(self, config: ServeParams, model: str, host: str, port: int) -> list[str]:
        """Its arguments: the same here and in a sidecar container (flywheel/release/kubernetes.py)."""
        raise NotImplementedError

    # -- the process ----------------------------------------------------------------------------

    def _start(self, command: list[str]) -> subprocess.Popen:
        print(f"flywheel serve: starting {self.label}: {' '.join(command)}", flush=True)
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
        prefix = f"[{self.label.lower()}]"
        for line in process.stdout:
            self.output.append(line.rstrip())
            print(f"{prefix} {line.rstrip()}", flush=True)

    def _wait_until_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (failure := self.failure()) is not None:
                raise FlywheelError(failure)
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self._stop()
        raise FlywheelError(f"{self.label} was not ready within serve.engine_start_timeout_s ({timeout_s:.0f} s)")

    def failure(self) -> str | None:
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return None
        last = "\n".join(list(self.output)[-15:])
        return f"the {self.label} engine exited with status {code}; its last lines:\n{last}"

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
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
                    logprobs=self.completion_logprobs(choice.get("logprobs")),
                )
                for choice in choices
            ],
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )

    @staticmethod
    def completion_logprobs(logprobs: dict | None) -> dict | None:
        """The engine's log-probabilities in the completions API's shape (vLLM's already are)."""
        return logprobs

    async def stream(self, job: Job) -> TextStream:
        request = self.client.build_request("POST", "/v1/completions", json=self._payload(job, 1, stream=True))
        response = await self.client.send(request, stream=True)
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            _raise_for_engine(response.status_code, content)
        return EngineStream(response)

    async def metrics_text(self) -> str:
        """The engine's own metrics (vllm:*, llamacpp:*) for the gateway's /metrics; its process
        metrics would clash with the gateway's."""
        import httpx

        try:
            response = await self.client.get("/metrics", timeout=5)
        except httpx.HTTPError:  # the gateway's metrics must not fail with the engine's
            return ""
        lines = response.text.splitlines()
        return "\n".join(line for line in lines if _metric_name(line).startswith(self.metric_prefix))


def _metric_name(line: str) -> str:
    """`x` of `# HELP x ...`, `# TYPE x ...` or a sample `x{...} 1.0`."""
    words = line.split(" ", 3)
    return words[2] if line.startswith("# ") and len(words) > 2 else line


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


class VllmEngine(ExternalEngine):
    """vLLM's OpenAI-compatible server on the model directory (merged weights), from its own Python."""

    label = "vLLM"
    metric_prefix = "vllm:"

    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from transformers import AutoTokenizer

        modeling.require_model(model_dir)
        if modeling.is_adapter(model_dir):
            raise FlywheelError(f"{model_dir} is a LoRA adapter; vLLM serves merged weights (finetune.lora.merge)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.name, self.version = model_dir.name, modeling.model_version(model_dir)
        self.max_positions = max_positions(model_dir)
        super().__init__(config, model_dir, registry)

    def executable(self, config: ServeParams) -> list[str]:
        return [str(engine_commands.vllm_python(config)), *VLLM_SERVER_MODULE]

    @staticmethod
    def server_args(config: ServeParams, model: str, host: str, port: int) -> list[str]:
        return engine_commands.vllm_args(config, model, host, port)


class LlamaCppEngine(ExternalEngine):
    """llama.cpp's server (`llama-server`) on a GGUF export (flywheel export): the 8-bit weights on
    llama.cpp's own kernels, with its tokenizer files beside it for the gateway."""

    label = "llama.cpp"
    metric_prefix = "llamacpp:"

    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from transformers import AutoTokenizer

        description = judged_export(model_dir)
        if description.get("gate") is None:
            print(f"flywheel serve: {model_dir} was exported with --no-judge: the gate never measured it", flush=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # The version it was exported from: a registered version served 8-bit is still that version
        # (deploy's smoke query checks it); /readyz names the engine.
        self.name, self.version = model_dir.name, description["source_version"]
        self.max_positions = int(description.get("context_tokens") or 0)
        super().__init__(config, model_dir, registry)

    def executable(self, config: ServeParams) -> list[str]:
        return [str(engine_commands.llamacpp_server(config))]

    def server_args(self, config: ServeParams, model: str, host: str, port: int) -> list[str]:
        return engine_commands.llamacpp_args(config, Path(model), host, port, self.max_positions)

    async def generate(self, job: Job, n: int) -> Generation:
        """llama.cpp's usage counts one choice whatever n is: n requests of one choice each, for
        exact counts (its slots batch them like any concurrent requests); seeded, choice i gets seed+i."""
        if n == 1:
            return await super().generate(job, 1)
        jobs = [job if job.seed is None else replace(job, seed=job.seed + index) for index in range(n)]
        generations = await asyncio.gather(*(super(LlamaCppEngine, self).generate(one, 1) for one in jobs))
        return Generation(
            [generation.choices[0] for generation in generations],
            generations[0].prompt_tokens,
            sum(generation.completion_tokens for generation in generations),
        )

    @staticmethod
    def completion_logprobs(logprobs: dict | None) -> dict | None:
        """llama.cpp answers the completions API with chat's shape (content: a token each)."""
        if not logprobs or "content" not in logprobs:
            return logprobs
        content = logprobs["content"]
        offsets, offset = [], 0
        for entry in content:
            offsets.append(offset)
            offset += len(entry["token"])
        tops = [entry.get("top_logprobs", []) for entry in content]
        return {
            "tokens": [entry["token"] for entry in content],
            "token_logprobs": [entry["logprob"] for entry in content],
            "top_logprobs": [{top["token"]: top["logprob"] for top in candidates} for candidates in tops],
            "text_offset": offsets,
        }
