"""Near-duplicate detection: MinHash signatures and LSH banding, vectorised over batches.

Signatures: each document's word n-gram shingles are hashed to 64 bits (numpy, a batch at a
time), and each of `num_perm` seeded hash functions keeps its minimum over the shingles (rensa's
R-MinHash, in Rust). Two documents agree on a signature position with probability equal to the
Jaccard similarity of their shingle sets.

LSH: signatures are cut into `bands` bands of `rows` rows; documents whose band matches in any
band become candidate pairs, and a candidate is kept only if its estimated Jaccard similarity
(the share of equal positions) reaches the threshold. Components of the kept pairs are the
near-duplicate clusters.

Everything per document happens in numpy or Rust over a batch at once; the Python-level work
per document is tokenising and a dictionary lookup per word. The LSH steps are split into band
keys and the pairs within a bucket, so a cluster can shuffle the keys and find the same pairs.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import rensa

if TYPE_CHECKING:
    from flywheel.config import MinHashParams

# Words are what is left between white space once punctuation is blanked out: str.translate and
# str.split run in C, which makes tokenising cheaper than a regular expression.
_PUNCTUATION_TO_SPACE = str.maketrans(
    {
        char: " "
        for char in string.punctuation.replace("_", "") + "\u2014\u2013\u2026\u00ab\u00bb"
        "\u201c\u201d\u2018\u2019\u00bf\u00a1\u00b7"
    }
)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROW_MULTIPLIERS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x87C37B91114253D5,
        0x4CF5AD432745937F,
    ],
    dtype=np.uint64,
)
_WORD_CACHE_LIMIT = 2_000_000


def tokenize(text: str) -> list[str]:
    return text.casefold().translate(_PUNCTUATION_TO_SPACE).split()


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit word."""
    values = (values ^ (values >> np.uint64(30))) * _M1
    values = (values ^ (values >> np.uint64(27))) * _M2
    return values ^ (values >> np.uint64(31))


def word_hashes(words: list[str], cache: dict[str, int]) -> np.ndarray:
    """64-bit hashes of words, the same in every process (Python's str hash is salted per
    process, and hashes travel to and from Ray workers); `cache` keeps the ones computed."""
    if len(cache) >= _WORD_CACHE_LIMIT:
        cache.clear()  # bounded memory on open-ended vocabularies
    for word in set(words).difference(cache):
        cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(word_hash_values: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every run of n consecutive words (a polynomial over the word hashes, mixed)."""
    count = len(word_hash_values) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    combined = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        combined = combined * _ROW_MULTIPLIERS[0] + word_hash_values[k : k + count]
    return _mix(combined)


@dataclass(frozen=True)
class MinHashSettings:
    shingle_size: int = 3
    num_perm: int = 128
    bands: int = 32
    rows: int = 4
    threshold: float = 0.7
    seed: int = 1


def settings_from(params: MinHashParams) -> MinHashSettings:
    return MinHashSettings(**params.model_dump())


def dedup_text(record: dict) -> str:
    """The text of a record that near-duplicate detection compares: prompt, context and response."""
    return "\n".join(record[name] for name in ("prompt", "context", "response") if record[name])


class MinHasher:
    def __init__(self, settings: MinHashSettings):
        if settings.bands * settings.rows > settings.num_perm:
            raise ValueError("bands * rows must not exceed num_perm")
        self.settings = settings
        self._word_hashes: dict[str, int] = {}

    def _shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All shingle hashes of the batch, and where each document's shingles start."""
        n = self.settings.shingle_size
        tokens = [tokenize(text) for text in texts]
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        # Each document's word hashes are followed by n zeros, so an n-gram never reaches into
        # the next document, and a document shorter than n words is one shingle of all its words.
        flat = np.zeros(int(lengths.sum()) + n * (len(tokens) + 1), dtype=np.uint64)
        word_positions = np.arange(int(lengths.sum())) + n * np.repeat(np.arange(len(tokens)), lengths)
        flat[word_positions] = word_hashes([word for words in tokens for word in words], self._word_hashes)
        combined = np.zeros(len(flat) - n, dtype=np.uint64)
        for k in range(n):
            combined += flat[k : k + len(combined)] * _ROW_MULTIPLIERS[k]
        shingle_counts = np.maximum(lengths - n + 1, 1)
        doc_starts = np.concatenate([[0], np.cumsum(lengths + n)[:-1]])
        offsets = np.concatenate([[0], np.cumsum(shingle_counts)[:-1]])
        positions = (
            np.arange(int(shingle_counts.sum()))
            - np.repeat(offsets, shingle_counts)
            + np.repeat(doc_starts, shingle_counts)
        )
        return _mix(combined[positions]), offsets

    def signatures(self, texts: Iterable[str], batch_size: int = 128) -> np.ndarray:
        """(documents, num_perm) uint32 MinHash signatures."""
        texts = list(texts)
        result = np.empty((len(texts), self.settings.num_perm), dtype=np.uint32)
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            shingles, offsets = self._shingle_hashes(batch)
            # The minimum over num_perm hash functions per document is rensa's (Rust): 7 times
            # faster than the same step in numpy here (benchmarks/dedup.py), half of the time.
            boundaries = np.append(offsets, len(shingles)).astype(np.uint64)
            digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
                shingles, boundaries, self.settings.num_perm, self.settings.seed
            )
            result[start : start + len(batch)] = digests.to_rows()
        return result


def band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit bucket key per document for one band: equal keys, equal band (up to 2^-64)."""
    block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.full(len(signatures), band, dtype=np.uint64)
    for k in range(rows):
        key = _mix(key ^ (block[:, k] * _ROW_MULTIPLIERS[k]))
    return key


def star_pairs(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(k, 2) pairs joining every member of a bucket (documents with equal keys) to the bucket's
    smallest position: linear in the bucket size, and enough to connect the bucket's component.
    `positions` must be ascending (one band's documents in order, however many partitions they
    came from): a stable sort by key then leaves each bucket's members in position order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    is_start = np.ones(len(order), dtype=bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    if is_start.all():
        return np.empty((0, 2), dtype=np.int64)
    sorted_positions = positions[order]
    first = sorted_positions[np.flatnonzero(is_start)[np.cumsum(is_start) - 1]]
    members = ~is_start
    return np.stack([first[members], sorted_positions[members]], axis=1).astype(np.int64)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(k, 2) unique index pairs i < j that share at least one LSH band."""
    positions = np.arange(len(signatures), dtype=np.int64)
    found = [star_pairs(band_keys(signatures, band, rows), positions) for band in range(bands)]
    return unique_pairs(found)


def unique_pairs(found: list[np.ndarray]) -> np.ndarray:
    """The distinct pairs (i < j), sorted. Each pair is packed into one int64 (i << 32 | j): numpy's
    unique over rows sorts them as structured values, several times slower."""
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    packed = np.unique((pairs[:, 0] << 32) | pairs[:, 1])
    return np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=1)


def estimated_similarity(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    similarity = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        similarity[start : start + chunk] = (signatures[part[:, 0]] == signatures[part[:, 1]]).mean(axis=1)
    return similarity


def near_duplicate_pairs(signatures: np.ndarray, settings: MinHashSettings) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs whose estimated Jaccard similarity reaches the threshold, with it."""
    pairs = candidate_pairs(signatures, settings.bands, settings.rows)
    similarity = estimated_similarity(signatures, pairs)
    keep = similarity >= settings.threshold
    return pairs[keep], similarity[keep]


def cluster_labels(count: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components over the pairs: one label per document."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]
