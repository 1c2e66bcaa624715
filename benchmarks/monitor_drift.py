"""How well and how fast `flywheel monitor` judges drift, in one run, on the pipeline's own splits
(run `dvc repro split` first).

Accuracy: 20 windows drawn from the reference distribution (held-out eval + test prompts, the
training mix) and 20 from a shifted one (the same held-out prompts with another task mix: no
translations, which are half of normal traffic), each judged by the monitor's drift verdict with
the params.yaml settings. Prints the true-positive and false-positive rates.

Speed: 100,000 requests written to a fresh SQLite request log, then one whole monitoring run over
them (window load, sampling, embeddings, the Evidently report, quality and operations checks).

    python benchmarks/monitor_drift.py [--windows 20] [--window-size 200] [--requests 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import monitor  # noqa: E402
from pipelines.config import load_params  # noqa: E402
from pipelines.hallucination import load_embedder  # noqa: E402
from pipelines.request_log import RequestLog  # noqa: E402


def held_out() -> list[dict]:
    rows = []
    for split in ("eval", "test"):
        rows += pq.read_table(f"data/processed/{split}.parquet", columns=["prompt", "response", "source"]).to_pylist()
    return rows


def windows(rows: list[dict], count: int, size: int, shifted: bool, seed: int) -> list[list[str]]:
    pool = [r["prompt"] for r in rows if not shifted or r["source"] != "translations"]
    rng = random.Random(seed)
    return [rng.choices(pool, k=size) for _ in range(count)]


def accuracy(params, rows, count: int, size: int) -> None:
    config = params.monitor
    embedder = load_embedder(config.embedding_model)
    reference = monitor.reference_prompts(config)
    verdicts = {}
    started = time.perf_counter()
    for shifted in (False, True):
        drifted = 0
        for window in windows(rows, count, size, shifted, seed=int(shifted)):
            checks, _ = monitor.drift(reference, window, embedder, config)
            drifted += not checks[-1].passed
        verdicts[shifted] = drifted
    elapsed = time.perf_counter() - started
    print(f"drift verdict over {count} reference and {count} shifted windows of {size} prompts "
          f"({elapsed / (2 * count):.1f} s a window):")
    print(f"  true-positive rate  {verdicts[True] / count:.2f} ({verdicts[True]}/{count} shifted windows flagged)")
    print(f"  false-positive rate {verdicts[False] / count:.2f} ({verdicts[False]}/{count} reference windows flagged)")


def speed(params, rows, requests: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/requests.sqlite"
        log = RequestLog(url, batch_size=2000)
        rng = random.Random(0)
        for _ in range(requests):
            row = rng.choice(rows)
            log.log_request(endpoint="/v1/chat/completions", messages=[{"role": "user", "content": row["prompt"]}],
                            response=row["response"], status=200, latency_ms=rng.uniform(20, 80),
                            model_version="v0.0.1")
        log.close()
        log = RequestLog(url)
        config = params.monitor.model_copy(update={"canaries": 0, "consistency_prompts": 0})
        params = params.model_copy(update={"monitor": config})
        started = time.perf_counter()
        result = monitor.run(params, request_log=log)
        elapsed = time.perf_counter() - started
        log.close()
    print(f"one monitoring run over {result['requests']:,} logged requests: {elapsed:.1f} s "
          f"(drift on a seeded sample of {result['sampled_prompts']:,}; verdict {result['verdict']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=200)
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    params = load_params("params.yaml")
    rows = held_out()
    with tempfile.TemporaryDirectory() as scratch:
        # The run writes its report and workspace under the working directory: keep them out of
        # the project, with only the splits linked in.
        here = os.getcwd()
        (Path(scratch) / "data").mkdir()
        (Path(scratch) / "data/processed").symlink_to(Path(here) / "data/processed")
        os.chdir(scratch)
        try:
            accuracy(params, rows, args.windows, args.window_size)
            speed(params, rows, args.requests)
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
