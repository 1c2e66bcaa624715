"""Decontamination by word n-gram overlap: which train records share long word sequences with
evaluation data (the eval and test splits, the safety probe, benchmark files).

The definition is GPT-3's (Brown et al. 2020, appendix C): text is lower-cased, punctuation becomes
white space, and a train record is contaminated by an evaluation item when they share a 13-gram
(`n`, `min_ngrams` distinct n-grams). Two additions:
- an item shorter than `n` words but at least `min_words` long (a safety-probe prompt, a short
  answer) contaminates a train record that contains the whole item;
- `exact`: a train prompt (+ context) equal, after normalisation, to an item's text, whatever its
  length ("What is 2 + 2?" has no 8-gram).

Why not MinHash, as clean's near-dedup: clean has already removed every pair its MinHash finds, so
the same test at split finds nothing by construction; and a near copy that keeps a long run of the
original (a reworded question over a copied worked solution) shares an n-gram while its Jaccard
similarity is low. Long n-grams are also what a model can memorise.

The evaluation side is small and indexed once (the hash of each n-gram -> the items holding it);
train records stream past it, and only a hit costs more than a hash lookup. The hashes are 64 bits
and the same in every process (the index travels to Ray workers): a chance collision is ~1e-19 per
lookup, and a whole-item match is verified word by word.
"""

from __future__ import annotations

import glob
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.config import BenchmarkParams, DecontaminateParams, Params
from flywheel.data import formats, minhash
from flywheel.errors import FlywheelError

EXACT = "exact_contamination"
NGRAM = "ngram_contamination"
# Punctuation (and "_", which \w keeps) becomes a space: "48/2=24" is three words, not "48224".
_NOT_WORD = re.compile(r"[^\w\s]|_")


def words(text: str | None) -> list[str]:
    """GPT-3's normalisation: NFKC, case-folded, punctuation as white space, split into words."""
    if not text:
        return []
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def record_exact_text(record: dict) -> str:
    """What `exact` compares of a record: its prompt and context, normalised."""
    return " ".join(words(record["prompt"]) + words(record.get("context")))


@dataclass(frozen=True)
class Item:
    source: str  # eval | test | safety_probe | a benchmark's name
    ref: str  # the record's id, or file:line


@dataclass(frozen=True)
class Match:
    reason: str  # EXACT or NGRAM
    item: Item
    ngram: str  # a shared n-gram (or the whole item), normalised
    overlap: int  # distinct n-grams shared with the item (a whole short item counts as one)
    coverage: float  # share of the item's n-grams found in the train record


@dataclass
class _Hits:
    grams: set[int] = field(default_factory=set)
    first: str = ""


class Index:
    """The evaluation side: n-gram hashes, short items, exact texts -> the items they came from."""

    def __init__(self, config: DecontaminateParams):
        self.config = config
        self.items: list[Item] = []
        self._units: list[int] = []  # per item: distinct n-grams + whole short texts (coverage's denominator)
        self._ngrams: dict[int, int | list[int]] = {}  # most n-grams belong to one item: no list for those
        self._short: dict[int, list[tuple[int, tuple[str, ...]]]] = {}  # hash of first min_words words -> items
        self._exact: dict[str, int] = {}
        self._word_cache: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ngrams(self) -> int:
        return len(self._ngrams)

    def add(self, item: Item, texts: list[str | None], exact_texts: list[str] = ()) -> None:
        """Index an item: its texts for n-grams, its exact texts (normalised) for `exact`."""
        number = len(self.items)
        self.items.append(item)
        n, min_words = self.config.n, self.config.min_words
        own: set[int] = set()
        units = 0
        for text in texts:
            tokens = words(text)
            if len(tokens) >= n:
                own.update(self._gram_hashes(tokens, n))
            elif len(tokens) >= min_words:
                first_words = self._gram_hashes(tokens[:min_words], min_words)[0]
                self._short.setdefault(first_words, []).append((number, tuple(tokens)))
                units += 1
        for gram in own:
            holders = self._ngrams.get(gram)
            if holders is None:
                self._ngrams[gram] = number
            elif isinstance(holders, int):
                self._ngrams[gram] = [holders, number]
            else:
                holders.append(number)
        self._units.append(units + len(own))
        for text in exact_texts:
            if text:
                self._exact.setdefault(text, number)

    def _gram_hashes(self, tokens: list[str], n: int) -> list[int]:
        return minhash.ngram_hashes(minhash.word_hashes(tokens, self._word_cache), n).tolist()

    def match(self, texts: list[str | None], exact_text: str | None = None) -> Match | None:
        """The item a train record (its texts, its exact text) is contaminated by, or None."""
        if self.config.exact and exact_text and exact_text in self._exact:
            item = self.items[self._exact[exact_text]]
            return Match(EXACT, item, exact_text, 0, 1.0)
        if not self.config.ngram:
            return None
        hits: dict[int, _Hits] = {}
        for text in texts:
            tokens = words(text)
            self._find_ngrams(tokens, hits)
            self._find_short_items(tokens, hits)
        return self._strongest(hits)

    def _find_ngrams(self, tokens: list[str], hits: dict[int, _Hits]) -> None:
        n = self.config.n
        for i, gram in enumerate(self._gram_hashes(tokens, n)):
            holders = self._ngrams.get(gram)
            if holders is None:
                continue
            for number in (holders,) if isinstance(holders, int) else holders:
                found = hits.setdefault(number, _Hits())
                found.grams.add(gram)
                found.first = found.first or " ".join(tokens[i : i + n])

    def _find_short_items(self, tokens: list[str], hits: dict[int, _Hits]) -> None:
        if not self._short:
            return
        width = self.config.min_words
        for i, first_words in enumerate(self._gram_hashes(tokens, width)):
            for number, item_words in self._short.get(first_words, ()):
                if tuple(tokens[i : i + len(item_words)]) == item_words:
                    found = hits.setdefault(number, _Hits())
                    found.grams.add(hash(item_words))
                    found.first = found.first or " ".join(item_words)

    def _strongest(self, hits: dict[int, _Hits]) -> Match | None:
        best = None
        for number, found in hits.items():
            # An item with fewer n-grams than min_ngrams is contaminating when all of them are shared.
            if len(found.grams) < min(self.config.min_ngrams, self._units[number]):
                continue
            coverage = len(found.grams) / self._units[number]
            if best is None or coverage > best.coverage:
                best = Match(NGRAM, self.items[number], found.first, len(found.grams), round(coverage, 4))
        return best


def load_safety_probe(params: Params, root: Path) -> list[tuple[Item, str]]:
    """(item, prompt) per probe line. The probe belongs to evaluate; split and retain keep its
    prompts out of training."""
    path = root / params.evaluate.safety_probe
    if not path.is_file():
        raise FlywheelError(
            f"safety probe {path} not found (evaluate.safety_probe); set it, or remove safety_probe "
            "from split.decontaminate.against"
        )
    probe = []
    for row in formats.read_rows(path, "jsonl"):
        prompt = row.value.get("prompt") if row.problem is None and isinstance(row.value, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise FlywheelError(f'{path}:{row.line}: expected {{"prompt": "...", ...}} ({row.problem or row.snippet})')
        probe.append((Item("safety_probe", f"{params.evaluate.safety_probe}:{row.line}"), prompt))
    return probe


def benchmark_rows(benchmark: BenchmarkParams, root: Path) -> Iterator[tuple[Item, list[str]]]:
    """(item, its texts in the named fields) per row; a row with none of them has no texts."""
    files = sorted(Path(name) for name in glob.glob(str(root / benchmark.path), recursive=True))
    files = [path for path in files if path.is_file()]
    if not files:
        raise FlywheelError(
            f"split.decontaminate.benchmarks[{benchmark.name}]: no file matches {benchmark.path!r}; "
            "fix the path (relative to the project root) or remove the benchmark"
        )
    for path in files:
        fmt = formats.detect_format(path, benchmark.format)
        for row in formats.read_rows(path, fmt):
            if row.problem is not None:
                raise FlywheelError(f"benchmark {path}:{row.line}: {row.problem} {row.detail}".strip())
            values = row.value if isinstance(row.value, dict) else {}
            texts = [_as_text(values.get(name)) for name in benchmark.fields]
            texts = [text for text in texts if text]
            yield Item(benchmark.name, f"{path.relative_to(root)}:{row.line}"), texts


def _as_text(value) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)
