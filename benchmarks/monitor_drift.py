"""How well and how fast `flywheel monitor` judges drift, in one run, on the pipeline's own splits
(run `dvc repro split` first).

Accuracy: windows of traffic judged by the monitor's drift verdict with the params.yaml settings,
against the reference it uses in production (the training prompts):
  reference   prompts drawn from the held-out eval + test splits: the training distribution, unseen
  topic       the same, with a share of the window (--topic-share) replaced by questions on a topic
              the sample never trains on (operations questions)
  task mix    held-out prompts without the `translations` source: instruction-style requests go
              from about 19 % to 38 % of the traffic (a milder shift: chats and transcripts ask
              for translations in the same words)
Each kind: --windows windows of each --sizes size, sampled without replacement (real traffic does
not repeat a held-out split). Prints the true-positive rate of each shift and the
false-positive rate on the reference windows.

Speed: 100,000 requests written to a fresh SQLite request log (drawn from the held-out prompts,
so each distinct prompt repeats ~100 times), then one whole monitoring run over them (window
load, sampling, embeddings, the Evidently report, quality and operations checks).

    python benchmarks/monitor_drift.py [--windows 20] [--sizes 200 500] [--requests 100000]
    python benchmarks/monitor_drift.py --windows 0     # the speed figure alone
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

from flywheel.config import load_params  # noqa: E402
from flywheel.data.sample import off_topic_prompts  # noqa: E402
from flywheel.evaluation.hallucination import load_embedder  # noqa: E402
from flywheel.modeling import record_messages  # noqa: E402
from flywheel.monitoring import drift, monitor  # noqa: E402
from flywheel.serving.request_log import RequestLog  # noqa: E402


class CachedEmbedder:
    """The monitor's embedder, remembering each prompt's vector: every window is compared with the
    same reference, which a real run embeds once."""

    def __init__(self, embedder):
        self.embedder, self.vectors = embedder, {}

    def encode(self, texts: list[str]):
        import numpy as np

        missing = [text for text in dict.fromkeys(texts) if text not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.embedder.encode(missing)))
        return np.stack([self.vectors[text] for text in texts])


def held_out() -> list[dict]:
    """Held-out records with their user turn as a client sends it (what the log holds)."""
    rows = []
    for split in ("eval", "test"):
        rows += pq.read_table(f"data/processed/{split}.parquet").to_pylist()
    for row in rows:
        row["turn"] = drift.prompt_of(record_messages(row, with_response=False))
    return rows


def window(kind: str, rows: list[dict], size: int, topic_share: float, rng: random.Random) -> list[str]:
    if kind == "task mix":
        rows = [row for row in rows if row["source"] != "translations"]
    if kind == "topic":
        off_topic = round(size * topic_share)
        return off_topic_prompts(off_topic, seed=rng.randrange(10**9)) + [
            row["turn"] for row in rng.sample(rows, size - off_topic)
        ]
    return [row["turn"] for row in rng.sample(rows, size)]


def accuracy(params, rows, count: int, sizes: list[int], topic_share: float) -> None:
    config = params.monitor
    embedder = CachedEmbedder(load_embedder(config.embedding_model))
    reference = drift.reference_prompts(config)
    print(
        f"drift verdict (any of 3 signals at p < {config.drift.p_value:g} / 3) against "
        f"{len(reference)} training prompts, {count} windows of each kind and size:"
    )
    for size in sizes:
        for kind in ("reference", "topic", "task mix"):
            rng = random.Random(f"{kind}-{size}")
            started = time.perf_counter()
            flagged = sum(
                not drift.drift(reference, window(kind, rows, size, topic_share, rng), embedder, config)[0][-1].passed
                for _ in range(count)
            )
            rate = "false-positive rate" if kind == "reference" else "true-positive rate "
            label = f"{kind} ({topic_share:.0%} off-topic)" if kind == "topic" else kind
            print(
                f"  {size:>5} prompts  {label:<22} {rate} {flagged / count:.2f} ({flagged}/{count})  "
                f"{(time.perf_counter() - started) / count:.1f} s a window"
            )


def speed(params, rows, requests: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/requests.sqlite"
        log = RequestLog(url, batch_size=2000)
        rng = random.Random(0)
        for _ in range(requests):
            row = rng.choice(rows)
            log.log_request(
                endpoint="/v1/chat/completions",
                messages=[{"role": "user", "content": row["turn"]}],
                response=row["response"],
                status=200,
                latency_ms=rng.uniform(20, 80),
                model_version="v0.0.1",
            )
        log.close()
        log = RequestLog(url)
        config = params.monitor.model_copy(update={"canaries": 0, "consistency_prompts": 0})
        params = params.model_copy(update={"monitor": config})
        started = time.perf_counter()
        result = monitor.run(params, request_log=log)
        elapsed = time.perf_counter() - started
        log.close()
    print(
        f"one monitoring run over {result['requests']:,} logged requests: {elapsed:.1f} s "
        f"(drift on a seeded sample of {result['sampled_prompts']:,}; verdict {result['verdict']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--topic-share", type=float, default=0.2)
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
            if args.windows:
                accuracy(params, rows, args.windows, args.sizes, args.topic_share)
            speed(params, rows, args.requests)
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
