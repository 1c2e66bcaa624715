"""Serving engines side by side in one run, on the same model and prompts: (a) the built-in engine
through Flywheel's gateway, (b) vLLM through the gateway, (c) the same vLLM process asked directly
on its private port, interleaved with (b) so that the gateway's overhead is one number, and (d) the
model's 8-bit GGUF export (flywheel export) on llama.cpp's server, through the gateway and directly.
At each concurrency, whole answers (requests/s, output tokens/s, p50/p99 latency) and then streams
(time to first token, p50/p99). Every setup must answer every request (no 4xx/5xx), and every
answer the gateway gave must be in its request log.

    python benchmarks/serve_engines.py [--model models/aligned] [--concurrency 1 16 64]
        [--engines builtin vllm llamacpp] [--vllm-arg=--dtype --vllm-arg=float32]    # the CPU defaults
    python benchmarks/serve_engines.py --engines vllm --vllm-arg=--dtype --vllm-arg=bfloat16  # on a GPU

vLLM runs from .venv-vllm (make engine-vllm), or FLYWHEEL_ENGINE_PYTHON: a GPU build there on a GPU;
llama.cpp from .llama.cpp (make engine-llamacpp), or FLYWHEEL_LLAMACPP_SERVER. The export is
models/export/<model>-q8_0, written and judged first (flywheel export) when it is not there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel import paths  # noqa: E402
from flywheel.net import free_port  # noqa: E402
from flywheel.serving.request_log import RequestLog  # noqa: E402

PHRASES = ["red cat", "big dog", "old house", "blue sea", "green tree", "small bird", "hot bread", "new book"]


ENGINES = ("builtin", "vllm", "llamacpp")


def exported(model: str) -> str:
    """The model's 8-bit export for llama.cpp, written and judged by the gate when missing."""
    export = paths.EXPORTS / f"{Path(model).name}-q8_0"
    if not (export / "export.json").is_file():
        flywheel = str(Path(sys.executable).parent / "flywheel")
        if subprocess.run([flywheel, "export", "--model", model, "--out", str(export)]).returncode != 0:
            raise SystemExit(f"no export of {model} to serve: flywheel export failed or its gate rejected it")
    return str(export)


@dataclass
class Server:
    process: subprocess.Popen
    base: str
    log_url: str
    model: str
    engine_base: str | None = None  # the external engine's private address, asked directly
    lines: list[str] = field(default_factory=list)


def start(model: str, engine: str, engine_args: list[str], workdir: Path) -> Server:
    params = workdir / f"params-{engine}.yaml"
    params.write_text(Path("params.yaml").read_text())
    flywheel = str(Path(sys.executable).parent / "flywheel")
    settings = [f"serve.engine={'transformers' if engine == 'builtin' else engine}", "serve.max_tokens=256"]
    settings += ["serve.rate_limit_per_minute=100000000", "serve.max_batch_size=64", "serve.max_streams=256"]
    settings.append(f"serve.engine_args={json.dumps(engine_args)}")
    subprocess.run([flywheel, "--params", str(params), "params", "apply", *settings], check=True, capture_output=True)
    port, log_url = free_port(), f"sqlite:///{workdir / f'requests-{engine}.sqlite'}"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "FLYWHEEL_REQUEST_LOG_URL": log_url}
    # absolute(), not resolve(): a venv's python is a link, and Python finds its venv from the link's path.
    environment.setdefault("FLYWHEEL_ENGINE_PYTHON", str(Path(".venv-vllm/bin/python").absolute()))
    environment.setdefault("FLYWHEEL_LLAMACPP_SERVER", str(Path(".llama.cpp/bin/llama-server").absolute()))
    # On the CPU vLLM reserves 92% of the memory unless told its KV cache's size (GiB).
    environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    process = subprocess.Popen(
        [flywheel, "--params", str(params), "serve", "--port", str(port), "--model", model],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}", log_url, Path(model).name)
    # Read its output all along (a full pipe would block the server); the engine's port is in it.
    threading.Thread(target=lambda: server.lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{server.base}/readyz")
            if ready.json().get("status") == "failed":
                process.terminate()
                raise SystemExit(f"flywheel serve ({engine}) could not load its engine: {ready.json()['error']}")
            if ready.status_code == 200:
                started = [re.search(r"starting (?:vLLM|llama.cpp): .* --port (\d+)", line) for line in server.lines]
                ports = [found.group(1) for found in started if found]
                server.engine_base = f"http://127.0.0.1:{ports[0]}" if ports else None
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"flywheel serve ({engine}) exited:\n{''.join(server.lines[-30:])}")
        time.sleep(0.5)
    raise SystemExit(f"flywheel serve ({engine}) was not ready within 15 minutes")


def stop(server: Server) -> None:
    """SIGTERM: the gateway drains, writes its request log and stops its engine."""
    server.process.terminate()
    server.process.wait(timeout=120)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    wall: float = 0.0


def prompts(tokenizer_dir: str) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Translate to French: {phrase}"}], add_generation_prompt=True, tokenize=False
        )
        for phrase in PHRASES
    ]


async def drive(base: str, model: str, texts: list[str], concurrency: int, requests: int, stream: bool) -> Result:
    """`requests` completions from `concurrency` clients at once, each asking for the next prompt."""
    result, queue = Result(), asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(texts[index % len(texts)])

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = {"model": model, "prompt": queue.get_nowait(), "max_tokens": 32, "temperature": 0, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            started = time.perf_counter()
            try:
                await (ask_stream if stream else ask)(http, base, body, started, result)
            except Exception as error:
                result.failures.append(repr(error))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        result.wall = time.perf_counter() - started
    return result


async def ask(http, base: str, body: dict, started: float, result: Result) -> None:
    response = await http.post(f"{base}/v1/completions", json=body)
    if response.status_code != 200:
        result.failures.append(f"{response.status_code}: {response.text[:200]}")
        return
    result.latencies.append(time.perf_counter() - started)
    result.tokens += response.json()["usage"]["completion_tokens"]
    result.ids.append(response.json()["id"])


async def ask_stream(http, base: str, body: dict, started: float, result: Result) -> None:
    first, identifier = None, None
    async with http.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.failures.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            identifier = identifier or event.get("id")
            if first is None and any(choice.get("text") for choice in event.get("choices", [])):
                first = time.perf_counter() - started
            if event.get("usage"):
                result.tokens += event["usage"]["completion_tokens"]
    result.latencies.append(time.perf_counter() - started)
    result.first_tokens.append(first if first is not None else result.latencies[-1])
    result.ids.append(identifier)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


COLUMNS = ("setup", "conc", "req/s", "tok/s", "p50 ms", "p99 ms", "ttft p50", "ttft p99", "failed")
WIDTHS = (22, 4, 9, 9, 8, 8, 9, 9, 6)


def line(values) -> str:
    return " ".join(
        f"{value:<{width}}" if index == 0 else f"{value:>{width}}"
        for index, (value, width) in enumerate(zip(values, WIDTHS))
    )


def row(name: str, concurrency: int, whole: Result, streamed: Result) -> str:
    def ms(seconds: float) -> str:
        return f"{1000 * seconds:.0f}"

    return line(
        (
            name,
            concurrency,
            f"{len(whole.latencies) / whole.wall:.1f}",
            f"{whole.tokens / whole.wall:.0f}",
            ms(statistics.median(whole.latencies)),
            ms(percentile(whole.latencies, 0.99)),
            ms(statistics.median(streamed.first_tokens)),
            ms(percentile(streamed.first_tokens, 0.99)),
            len(whole.failures) + len(streamed.failures),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/aligned")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=128, help="per concurrency and kind (at least 2 per client)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument(
        "--vllm-arg", action="append", default=None, help="a vllm serve argument (default: --dtype float32)"
    )
    args = parser.parse_args()
    engine_args = {"vllm": args.vllm_arg if args.vllm_arg is not None else ["--dtype", "float32"]}
    texts = prompts(args.model)
    print(f"model {args.model}; {args.requests} whole answers and {args.requests} streams per row, max_tokens 32")
    rows, throughput, unlogged = [line(COLUMNS)], {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for engine in args.engines:
            model = exported(args.model) if engine == "llamacpp" else args.model
            server = start(model, engine, engine_args.get(engine, []), Path(workdir))
            setups = [(f"{engine} via gateway", server.base, server.model)]
            if server.engine_base:
                setups.append((f"{engine} direct", server.engine_base, "flywheel-engine"))
            gateway_ids: list[str] = []
            try:
                for concurrency in args.concurrency:
                    requests = max(args.requests, 2 * concurrency)
                    for name, base, model in setups:  # interleaved: the same engine, warmed the same
                        whole = asyncio.run(drive(base, model, texts, concurrency, requests, stream=False))
                        streamed = asyncio.run(drive(base, model, texts, concurrency, requests, stream=True))
                        rows.append(row(name, concurrency, whole, streamed))
                        print(rows[-1], flush=True)
                        throughput[(name, concurrency)] = whole.tokens / whole.wall
                        if "gateway" in name:
                            gateway_ids += whole.ids + streamed.ids
                        for failure in (whole.failures + streamed.failures)[:3]:
                            print(f"    failed: {failure}")
            finally:
                stop(server)
            log = RequestLog(server.log_url)
            unlogged[engine] = sum(log.get_request(request_id) is None for request_id in gateway_ids)
            log.close()
    print("\n".join(["", *rows, ""]))
    for engine, missing in unlogged.items():
        print(f"{engine}: answered by the gateway but not in its request log: {missing}")
    for engine in args.engines:
        for concurrency in args.concurrency:
            via, direct = (throughput.get((f"{engine} {how}", concurrency)) for how in ("via gateway", "direct"))
            if via and direct:
                overhead = 100 * (1 - via / direct)
                print(f"{engine}: gateway overhead at concurrency {concurrency}: {overhead:+.1f}% output tokens/s")


if __name__ == "__main__":
    main()
