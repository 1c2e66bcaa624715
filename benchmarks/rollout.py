"""A health-gated rollout under load, and what the stable endpoint costs, in one run.

Deploys a model with `flywheel deploy --model` (local target) in a scratch directory, then:
  1. drives 16 concurrent loopback clients for a fixed time straight at the serving process and
     then through the deploy endpoint (the router), side by side: req/s and p50/p99 of each;
  2. rolls out a second deployment while the clients keep asking: how long the rollout took, and
     how many requests failed (any non-200 or connection error) during it;
  3. tries to roll out a broken copy of the model under the same load: the rollout must fail and
     no request may fail.

    python benchmarks/rollout.py [--model models/aligned] [--seconds 15] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_batching import PHRASES  # noqa: E402

from flywheel.net import free_port  # noqa: E402

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def flywheel(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [FLYWHEEL, *args], cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if check and result.returncode != 0:
        raise SystemExit(f"flywheel {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


class Load:
    """`concurrency` clients asking until stopped; latencies of answers, every failure counted."""

    def __init__(self, base: str, concurrency: int):
        self.base, self.concurrency = base, concurrency
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(w,)) for w in range(concurrency)]

    def _client(self, worker: int) -> None:
        index = worker
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                body = {
                    "messages": [{"role": "user", "content": f"Translate to French: {PHRASES[index % len(PHRASES)]}"}],
                    "max_tokens": 16,
                }
                started = time.perf_counter()
                try:
                    response = http.post(f"{self.base}/v1/chat/completions", json=body)
                    if response.status_code == 200:
                        self.latencies.append(time.perf_counter() - started)
                    else:
                        self.failures.append(f"{response.status_code}: {response.text[:120]}")
                except httpx.TransportError as error:
                    self.failures.append(repr(error))
                index += self.concurrency

    def __enter__(self) -> Load:
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.wall = time.perf_counter() - self.started

    def summary(self) -> str:
        quantiles = statistics.quantiles(self.latencies, n=100)
        return (
            f"{len(self.latencies):,} answered, {len(self.latencies) / self.wall:.1f} req/s, "
            f"p50 {1000 * statistics.median(self.latencies):.0f} ms, p99 {1000 * quantiles[98]:.0f} ms, "
            f"failed {len(self.failures)}"
        )


def timed_load(base: str, seconds: float, concurrency: int) -> Load:
    with Load(base, concurrency) as load:
        time.sleep(seconds)
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/aligned")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    model = Path(args.model).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        shutil.copy("params.yaml", workdir / "params.yaml")
        flywheel(workdir, "params", "apply", f"deploy.port={free_port()}", "serve.rate_limit_per_minute=1000000")
        flywheel(workdir, "deploy", "--model", str(model))
        try:
            state = json.loads(flywheel(workdir, "status", "--json").stdout)
            direct = f"http://127.0.0.1:{state['backend']['port']}"
            print(
                f"direct to the server ({args.concurrency} clients, {args.seconds:.0f} s): "
                f"{timed_load(direct, args.seconds, args.concurrency).summary()}"
            )
            print(
                f"through the endpoint ({args.concurrency} clients, {args.seconds:.0f} s): "
                f"{timed_load(state['url'], args.seconds, args.concurrency).summary()}"
            )

            with Load(state["url"], args.concurrency) as load:
                time.sleep(2)
                started = time.perf_counter()
                flywheel(workdir, "deploy", "--model", str(model))
                took = time.perf_counter() - started
                time.sleep(2)
            print(f"rollout under load: took {took:.1f} s; during it {load.summary()}")

            broken = workdir / "broken-model"
            shutil.copytree(model, broken)
            weights = broken / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
            with Load(state["url"], args.concurrency) as load:
                time.sleep(2)
                refused = flywheel(workdir, "deploy", "--model", str(broken), check=False)
                time.sleep(2)
            outcome = "rolled back" if refused.returncode == 2 else f"NOT rolled back (exit {refused.returncode})"
            print(f"broken model under load: {outcome}; during it {load.summary()}")
            for failure in (load.failures or [])[:5]:
                print(f"  failure: {failure}")
        finally:
            flywheel(workdir, "undeploy", check=False)


if __name__ == "__main__":
    main()
