"""Near-duplicate detection: quality and speed of Flywheel's MinHash LSH against datasketch's.

    python benchmarks/dedup.py [--docs 20000] [--million]

Generates ~100-word documents and plants near-duplicates of a share of them with known edit rates
(word substitutions, insertions, deletions, and a swap of two passages). Both implementations get
the same documents, shingles (word 3-grams), 128 permutations, 32 bands x 4 rows and threshold,
and the same final step (a candidate pair counts if its estimated Jaccard reaches the threshold;
clusters are connected components). Quality is pairwise precision / recall / F1 of "same
cluster" against the planted clusters; speed is documents per second through the whole of
signatures + LSH + clustering, in one process with numpy limited to one thread (per core).

--million also runs Flywheel alone on 1,000,000 documents generated batch by batch, as the clean
stage streams them, and reports time and peak RSS.
Goals (issue #3): F1 >= 0.95 and not below datasketch's; >= 5x datasketch's docs/s;
>= 3,000 docs/s per core; 1M documents on 2 cores under 4 GB peak RSS.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # measure per core

import argparse  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from math import comb  # noqa: E402

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
    for name, method in (("flywheel", flywheel_clusters), ("datasketch", datasketch_clusters)):
        started = time.perf_counter()
        predicted = method(docs)
        elapsed = time.perf_counter() - started
        rows.append((name, *pairwise_scores(predicted, truth), len(docs) / elapsed, elapsed))
    print(f"{'':<12}{'precision':>10}{'recall':>9}{'F1':>8}{'docs/s':>11}{'seconds':>9}")
    for name, precision, recall, f1, rate, elapsed in rows:
        print(f"{name:<12}{precision:>10.4f}{recall:>9.4f}{f1:>8.4f}{rate:>11,.0f}{elapsed:>9.1f}")
    (_, _, _, f1_ours, rate_ours, _), (_, _, _, f1_theirs, rate_theirs, _) = rows
    print(f"\nspeed-up over datasketch: {rate_ours / rate_theirs:.1f}x   F1 difference: {f1_ours - f1_theirs:+.4f}")


def million(total: int = 1_000_000, batch_originals: int = 30_000) -> None:
    corpus = Corpus(seed=1)
    hasher = minhash.MinHasher(SETTINGS)
    signatures, labels = [], []
    generating = hashing = 0.0
    while len(labels) < total:
        started = time.perf_counter()
        docs, batch_labels = corpus.batch(batch_originals, len(labels) and labels[-1] + 1)
        docs, batch_labels = docs[: total - len(labels)], batch_labels[: total - len(labels)]
        generating += time.perf_counter() - started
        started = time.perf_counter()
        signatures.append(hasher.signatures(docs))  # the texts of a batch are dropped after this
        hashing += time.perf_counter() - started
        labels += batch_labels
    started = time.perf_counter()
    signature_matrix = np.concatenate(signatures)
    del signatures
    pairs, _ = minhash.near_duplicate_pairs(signature_matrix, SETTINGS)
    predicted = minhash.cluster_labels(len(signature_matrix), pairs)
    clustering = time.perf_counter() - started
    precision, recall, f1 = pairwise_scores(predicted, np.array(labels))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dedup_seconds = hashing + clustering
    print(
        f"\n1M run: {len(signature_matrix):,} documents; near-dup dedup took {dedup_seconds:.0f} s "
        f"({hashing:.0f} s signatures + {clustering:.0f} s LSH and clusters; "
        f"{len(signature_matrix) / dedup_seconds:,.0f} docs/s on one core; generating the corpus "
        f"took another {generating:.0f} s)"
    )
    print(
        f"        peak RSS {peak:,.0f} MB (goal < 4,096 MB); precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--million", action="store_true", help="also run 1,000,000 documents")
    args = parser.parse_args()
    compare(args.docs)
    if args.million:
        million()


if __name__ == "__main__":
    main()
