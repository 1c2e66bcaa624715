"""Ingest throughput and peak memory on a generated JSONL file (default 1,000,000 records).

    python benchmarks/ingest_throughput.py [--records N]

Generates records of varied length (a few malformed lines among them), runs `flywheel ingest` on
it in a child process in a scratch project, and prints records/s and the child's peak RSS.
Goal (issue #2): peak RSS under 1.5 GB for 1M records.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "river stone cloud apple window train music garden paper silver morning letter "
    "forest engine market planet candle bridge winter harbor"
).split()


def generate(path: Path, count: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for index in range(count):
            if index % 10_000 == 9_999:
                out.write('{"question": "broken", \n')  # a malformed line now and then
                continue
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 120)))
            out.write(json.dumps({"question": question, "answer": answer, "n": index}) + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "data/raw").mkdir(parents=True)
        started = time.perf_counter()
        size = generate(root / "data/raw/big.jsonl", args.records)
        print(f"generated {args.records:,} records ({size / 1e6:,.0f} MB) in {time.perf_counter() - started:.1f} s")
        (root / "params.yaml").write_text(
            "ingest:\n  sources:\n    - name: big\n      path: data/raw/big.jsonl\n"
            "      kind: pair\n      fields: {prompt: question, response: answer}\n"
        )

        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flywheel", "ingest"], cwd=root, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        metrics = json.loads((root / "metrics/ingest.json").read_text())

    print(f"ingest: {metrics['read']:,} read, {metrics['records']:,} records, {metrics['quarantined']:,} quarantined")
    print(f"  wall time      {elapsed:8.1f} s (process start included)")
    print(f"  throughput     {metrics['read'] / elapsed:8,.0f} records/s")
    print(f"  input rate     {size / 1e6 / elapsed:8.1f} MB/s")
    print(f"  peak RSS       {peak_rss_mb:8,.0f} MB   (goal: < 1,536 MB)")


if __name__ == "__main__":
    main()
