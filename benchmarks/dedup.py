"""Near-duplicate detection: Flywheel's MinHash LSH against rensa's and datasketch's, and the
clean stage's dedup on 1M documents in one process against the same on a local Ray cluster.

    python benchmarks/dedup.py [--docs 20000] [--million] [--ray-cpus 2]

Generates ~100-word documents and plants near-duplicates of a share of them with known edit rates
(word substitutions, insertions, deletions, and a swap of two passages). Every implementation gets
the same documents, shingles (word 3-grams), 128 permutations, 32 bands x 4 rows and threshold,
and the same final step (a candidate pair counts if its estimated Jaccard reaches the threshold;
clusters are connected components). Quality is pairwise precision / recall / F1 of "same
cluster" against the planted clusters; speed is documents per second through the whole of
signatures + LSH + clustering, in one process with numpy and rayon limited to one thread. The
columns: Flywheel as clean runs it (numpy shingle hashes, rensa's minima); Flywheel's earlier
all-numpy minima (kept here as the measured alternative); rensa end to end (its R-MinHash and
LSH, shingles as strings); datasketch.

--million runs the clean stage's own dedup path (signatures a batch at a time, then
flywheel.data.dedup.decide) on 1,000,000 documents read from a Parquet file: once in this process
on one CPU, once on a local Ray cluster of --ray-cpus CPUs (tasks per 10,000 documents, the dedup
shuffles). It reports docs/s, peak RSS of the driver and of the largest Ray worker, and F1 of the
stage's decisions (each removed document joined to the one kept in its place).
Goals (issues #3, #21): F1 >= 0.95 and not below datasketch's; Ray on 2 CPUs >= 1.7x one process
on 1 CPU at the same F1.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"  # measure per core

import argparse  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from math import comb  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse.csgraph  # noqa: E402,F401  (imported up front: neither side pays for it)

from flywheel.data import minhash  # noqa: E402

SETTINGS = minhash.MinHashSettings(shingle_size=3, num_perm=128, bands=32, rows=4, threshold=0.7, seed=1)
# Per word: substitute, insert after, delete; per document: swap two adjacent 10-word passages.
EDITS = {"substitute": 0.01, "insert": 0.005, "delete": 0.005, "swap_passages": 0.3}


class Corpus:
    """Documents from a Zipf-like vocabulary; a third of originals get 1-3 edited copies."""

    def __init__(self, seed: int = 0, vocabulary: int = 30_000):
        self.rng = random.Random(seed)
        self.vocab = [f"w{n}" for n in range(vocabulary)]
        weights = 1 / np.arange(1, vocabulary + 1) ** 0.8
        self.cumulative = list(np.cumsum(weights / weights.sum()))

    def _words(self, count: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cumulative, k=count)

    def _edit(self, words: list[str]) -> list[str]:
        rng, out = self.rng, []
        for word in words:
            roll = rng.random()
            if roll < EDITS["delete"]:
                continue
            out.append(self._words(1)[0] if roll < EDITS["delete"] + EDITS["substitute"] else word)
            if rng.random() < EDITS["insert"]:
                out.append(self._words(1)[0])
        if rng.random() < EDITS["swap_passages"] and len(out) > 40:
            start = rng.randrange(0, len(out) - 20)
            out[start : start + 20] = out[start + 10 : start + 20] + out[start : start + 10]
        return out

    def batch(self, originals: int, first_label: int) -> tuple[list[str], list[int]]:
        docs, labels = [], []
        for n in range(originals):
            words = self._words(self.rng.randint(80, 120))
            docs.append(" ".join(words))
            labels.append(first_label + n)
            if self.rng.random() < 1 / 3:
                for _ in range(self.rng.randint(1, 3)):
                    docs.append(" ".join(self._edit(words)))
                    labels.append(first_label + n)
        return docs, labels


def pairwise_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    def same_cluster_pairs(labels: np.ndarray) -> int:
        return sum(comb(int(c), 2) for c in np.unique(labels, return_counts=True)[1])

    joint = predicted.astype(np.int64) * (int(truth.max()) + 1) + truth
    true_positive = same_cluster_pairs(joint)
    precision = true_positive / max(same_cluster_pairs(predicted), 1)
    recall = true_positive / max(same_cluster_pairs(truth), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def flywheel_clusters(docs: list[str]) -> np.ndarray:
    signatures = minhash.MinHasher(SETTINGS).signatures(docs)
    pairs, _ = minhash.near_duplicate_pairs(signatures, SETTINGS)
    return minhash.cluster_labels(len(docs), pairs)


class NumpyMinima(minhash.MinHasher):
    """Flywheel's signatures before rensa: the minimum of each hash function h(x) = (a*x + b) >> 32
    over the shingles, in numpy, one multiply and one reduction over (num_perm, shingles)."""

    def __init__(self, settings: minhash.MinHashSettings):
        super().__init__(settings)
        rng = np.random.default_rng(settings.seed)
        self._a = rng.integers(1, 2**63, settings.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, settings.num_perm, dtype=np.uint64)

    def signatures(self, texts, batch_size: int = 128) -> np.ndarray:
        texts = list(texts)
        result = np.empty((len(texts), self.settings.num_perm), dtype=np.uint32)
        for start in range(0, len(texts), batch_size):
            shingles, offsets = self._shingle_hashes(texts[start : start + batch_size])
            permuted = np.empty((len(self._a), len(shingles)), dtype=np.uint64)
            np.add(shingles[None, :], self._b[:, None], out=permuted)
            permuted *= self._a[:, None]
            minima = np.minimum.reduceat(permuted, offsets, axis=1)
            result[start : start + len(offsets)] = (minima >> np.uint64(32)).T
        return result


def numpy_minima_clusters(docs: list[str]) -> np.ndarray:
    signatures = NumpyMinima(SETTINGS).signatures(docs)
    pairs, _ = minhash.near_duplicate_pairs(signatures, SETTINGS)
    return minhash.cluster_labels(len(docs), pairs)


def shingle_strings(doc: str) -> list[str]:
    words = minhash.tokenize(doc)
    return [" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1))]


def rensa_clusters(docs: list[str]) -> np.ndarray:
    from rensa import RMinHash, RMinHashLSH

    hashes = RMinHash.from_token_sets([shingle_strings(doc) for doc in docs], SETTINGS.num_perm, SETTINGS.seed)
    lsh = RMinHashLSH(SETTINGS.threshold, SETTINGS.num_perm, SETTINGS.bands)
    lsh.insert_many(hashes)
    pairs = [
        (index, other)
        for index, candidates in enumerate(lsh.query_all(hashes))
        for other in candidates
        if other > index and hashes[index].jaccard(hashes[other]) >= SETTINGS.threshold
    ]
    return minhash.cluster_labels(len(docs), np.array(pairs, dtype=np.int64).reshape(-1, 2))


def datasketch_clusters(docs: list[str]) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=SETTINGS.threshold, num_perm=SETTINGS.num_perm, params=(SETTINGS.bands, SETTINGS.rows))
    hashes = []
    for index, doc in enumerate(docs):
        words = minhash.tokenize(doc)
        shingles = {" ".join(words[i : i + 3]).encode() for i in range(max(len(words) - 2, 1))}
        signature = MinHash(num_perm=SETTINGS.num_perm, seed=SETTINGS.seed)
        signature.update_batch(list(shingles))
        lsh.insert(index, signature)
        hashes.append(signature)
    pairs = [
        (index, other)
        for index, signature in enumerate(hashes)
        for other in lsh.query(signature)
        if other > index and signature.jaccard(hashes[other]) >= SETTINGS.threshold
    ]
    return minhash.cluster_labels(len(docs), np.array(pairs, dtype=np.int64).reshape(-1, 2))


def true_jaccard_of_planted(docs: list[str], labels: list[int], sample: int = 300) -> float:
    def shingles(doc: str) -> set:
        words = doc.split()
        return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}

    values, first = [], {}
    for doc, label in zip(docs, labels):
        if label in first and len(values) < sample:
            a, b = shingles(first[label]), shingles(doc)
            values.append(len(a & b) / len(a | b))
        first.setdefault(label, doc)
    return float(np.mean(values))


def compare(count: int) -> None:
    corpus = Corpus()
    docs, labels = corpus.batch(int(count / 1.67), 0)  # about `count` documents in all
    truth = np.array(labels)
    planted = len(docs) - len(set(labels))
    print(
        f"corpus: {len(docs):,} documents, {planted:,} planted near-duplicates "
        f"(edits {EDITS}); mean true Jaccard of planted pairs "
        f"{true_jaccard_of_planted(docs, labels):.2f}"
    )
    print(f"settings: {SETTINGS}\n")
    rows = []
    methods = {
        "flywheel": flywheel_clusters,
        "flywheel-numpy": numpy_minima_clusters,
        "rensa": rensa_clusters,
        "datasketch": datasketch_clusters,
    }
    for name, method in methods.items():
        method(docs[:2000])  # warm-up: imports, first calls, CPU caches; the first column paid for them
        started = time.perf_counter()
        predicted = method(docs)
        elapsed = time.perf_counter() - started
        rows.append((name, *pairwise_scores(predicted, truth), len(docs) / elapsed, elapsed))
    print(f"{'':<16}{'precision':>10}{'recall':>9}{'F1':>8}{'docs/s':>11}{'seconds':>9}{'vs flywheel':>13}")
    ours = rows[0][4]
    for name, precision, recall, f1, rate, elapsed in rows:
        print(f"{name:<16}{precision:>10.4f}{recall:>9.4f}{f1:>8.4f}{rate:>11,.0f}{elapsed:>9.1f}{rate / ours:>12.2f}x")


def write_corpus(path: Path, total: int, batch_originals: int = 30_000) -> np.ndarray:
    """`total` documents with planted near-duplicates, in Parquet row groups; their true labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, labels = Corpus(seed=1), []
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        while len(labels) < total:
            docs, batch_labels = corpus.batch(batch_originals, len(labels) and labels[-1] + 1)
            docs = docs[: total - len(labels)]
            labels += batch_labels[: len(docs)]
            writer.write_table(pa.table({"text": docs}), row_group_size=10_000)
    return np.array(labels)


def sign(batch) -> np.ndarray:
    """What a clean task computes per batch (an Arrow record batch) for dedup; its other work is
    cleaning and filtering."""
    return minhash.MinHasher(SETTINGS).signatures(batch.column("text").to_pylist())


class PeakWorkerRss(threading.Thread):
    """The largest resident set of any Ray worker, sampled every half second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopping.wait(0.5):
            for process in psutil.process_iter(["cmdline", "memory_info"]):
                if (process.info["cmdline"] or [""])[0].startswith("ray::") and process.info["memory_info"]:
                    self.peak = max(self.peak, process.info["memory_info"].rss)


def dedup_corpus(path: Path, executor) -> dict:
    """The clean stage's dedup path over the corpus, timed; labels join each removed document to
    the one kept in its place."""
    import pyarrow.parquet as pq

    from flywheel.data import dedup

    started = time.perf_counter()
    survivors = dedup.Survivors()
    for signatures in executor.map(sign, pq.ParquetFile(path).iter_batches(10_000)):
        survivors.signatures.append(signatures)
    count = sum(len(part) for part in survivors.signatures)
    survivors.ids = [f"{n:09d}" for n in range(count)]
    signing = time.perf_counter() - started
    decisions = dedup.decide(survivors, False, True, SETTINGS, executor)
    labels = np.arange(count)
    for position, (_, kept, _) in decisions.items():
        labels[position] = kept
    return {"labels": labels, "seconds": time.perf_counter() - started, "signing": signing}


def one_run(path: Path, executor_name: str, ray_cpus: int) -> None:
    """One row of the --million table, in a process of its own (so ru_maxrss is this run's);
    prints it as JSON."""
    import json

    from flywheel.data.executor import WORKER_ENV, LocalExecutor, RayExecutor

    workers = PeakWorkerRss()
    if executor_name == "local":
        result = dedup_corpus(path, LocalExecutor())
    else:
        import ray

        ray.init(
            address="local",
            num_cpus=ray_cpus,
            include_dashboard=False,
            logging_level="ERROR",
            runtime_env={"env_vars": WORKER_ENV},
        )
        workers.start()
        try:
            result = dedup_corpus(path, RayExecutor(10_000))
        finally:
            workers.stopping.set()
            ray.shutdown()
    _, _, f1 = pairwise_scores(result["labels"], np.load(path.with_suffix(".truth.npy")))
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "seconds": result["seconds"],
        "signing": result["signing"],
        "f1": f1,
        "driver_mb": driver_mb,
        "worker_mb": workers.peak / 2**20,
    }
    print(json.dumps(row))


def million(total: int, ray_cpus: int) -> None:
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "corpus.parquet"
        started = time.perf_counter()
        truth = write_corpus(path, total)
        np.save(path.with_suffix(".truth.npy"), truth)
        print(
            f"\n{total:,} documents ({len(truth) - len(np.unique(truth)):,} planted near-duplicates) "
            f"written in {time.perf_counter() - started:.0f} s; the clean stage's dedup on them, each run "
            "in a process of its own:"
        )
        print(
            f"{'':<14}{'docs/s':>9}{'seconds':>9}{'(signing':>10}{'deciding)':>11}{'F1':>8}"
            f"{'driver RSS':>12}{'worker RSS':>12}"
        )
        rates = []
        for executor, name in (("local", "local, 1 CPU"), ("ray", f"ray, {ray_cpus} CPUs")):
            command = [
                sys.executable,
                __file__,
                "--one-run",
                executor,
                "--corpus",
                str(path),
                "--ray-cpus",
                str(ray_cpus),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rates.append(total / row["seconds"])
            worker = f"{row['worker_mb']:,.0f} MB" if row["worker_mb"] else "-"
            print(
                f"{name:<14}{rates[-1]:>9,.0f}{row['seconds']:>9.1f}{row['signing']:>10.1f}"
                f"{row['seconds'] - row['signing']:>11.1f}{row['f1']:>8.4f}{row['driver_mb']:>9,.0f} MB{worker:>12}"
            )
        print(f"ray on {ray_cpus} CPUs / one process on 1 CPU: {rates[1] / rates[0]:.2f}x (goal >= 1.7x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--million", action="store_true", help="also run the stage's dedup on 1,000,000 documents")
    parser.add_argument("--total", type=int, default=1_000_000, help="documents in the --million run")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--one-run", choices=("local", "ray"), help=argparse.SUPPRESS)  # a --million row
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.corpus, args.one_run, args.ray_cpus)
        return
    compare(args.docs)
    if args.million:
        million(args.total, args.ray_cpus)


if __name__ == "__main__":
    main()
