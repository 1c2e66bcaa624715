"""Dynamic batching against batch-size-1 serving, side by side in one run: the same model served
twice by `flywheel serve` (max_batch_size 1, then 16), each driven by 16 concurrent clients over
loopback for a fixed time. Prints requests/s, generated tokens/s, p50/p99 latency, the ratio, and
checks that every answered request is in the request log and that no response was a 5xx.

    python benchmarks/serve_batching.py [--model models/aligned] [--seconds 20] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.net import free_port  # noqa: E402
from flywheel.serving.request_log import RequestLog  # noqa: E402

PHRASES = [
    "red cat",
    "big dog",
    "old house",
    "blue sea",
    "green tree",
    "small bird",
    "hot bread",
    "new book",
    "white horse",
    "cold water",
]


def start(model: str, batch_size: int, workdir: Path) -> tuple[subprocess.Popen, str, str]:
    params = workdir / f"params-{batch_size}.yaml"
    params.write_text(Path("params.yaml").read_text())
    flywheel = str(Path(sys.executable).parent / "flywheel")
    subprocess.run(
        [
            flywheel,
            "--params",
            str(params),
            "params",
            "apply",
            f"serve.max_batch_size={batch_size}",
            "serve.rate_limit_per_minute=1000000",
        ],
        check=True,
        capture_output=True,
    )
    port, log_url = free_port(), f"sqlite:///{workdir / f'requests-{batch_size}.sqlite'}"
    process = subprocess.Popen(
        [flywheel, "--params", str(params), "serve", "--port", str(port), "--model", model],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "FLYWHEEL_REQUEST_LOG_URL": log_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return process, base, log_url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server with max_batch_size={batch_size} did not become ready")


def load(base: str, seconds: float, concurrency: int) -> dict:
    latencies, tokens, statuses, ids = [], [0], [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(worker: int):
        with httpx.Client(timeout=120) as http:
            index = worker
            while time.monotonic() < stop:
                body = {
                    "messages": [{"role": "user", "content": f"Translate to French: {PHRASES[index % len(PHRASES)]}"}],
                    "max_tokens": 16,
                }
                started = time.perf_counter()
                response = http.post(f"{base}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        tokens[0] += response.json()["usage"]["completion_tokens"]
                        ids.append(response.json()["id"])
                index += concurrency

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * quantiles[98],
        "server_errors": sum(s >= 500 for s in statuses),
        "ids": ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/aligned")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for batch_size in (1, 16):
            process, base, log_url = start(args.model, batch_size, Path(workdir))
            try:
                results[batch_size] = load(base, args.seconds, args.concurrency)
            finally:
                process.terminate()  # SIGTERM: the server drains its request log
                process.wait(timeout=60)
            log = RequestLog(log_url)
            missing = sum(log.get_request(request_id) is None for request_id in results[batch_size]["ids"])
            log.close()
            result = results[batch_size]
            print(
                f"max_batch_size {batch_size:>2}: {result['requests']:,} requests in {args.seconds:.0f} s, "
                f"{result['rps']:.1f} req/s, {result['tokens_per_s']:.0f} tokens/s, p50 {result['p50_ms']:.0f} ms, "
                f"p99 {result['p99_ms']:.0f} ms, 5xx {result['server_errors']}, answered but not logged {missing}"
            )
    print(
        f"dynamic batching: {results[16]['rps'] / results[1]['rps']:.2f}x the throughput of batch-size-1 "
        f"serving at concurrency {args.concurrency}"
    )


if __name__ == "__main__":
    main()
