"""split: deterministic train / eval / test split by id hash, with decontamination.

Input:  data/interim/clean/records.parquet
        data/eval/safety_probe.jsonl (evaluate.safety_probe) and the benchmark files named in
        split.decontaminate.benchmarks: evaluation data that train must not overlap
Output: data/processed/{train,eval,test}.parquet
        data/processed/decontaminated.parquet  train records removed because they overlap an
                                               evaluation item: the reason, the item, the n-gram
A record's split depends only on its id and the salt, so adding data never moves old records
between splits. Counts add up: in = train + eval + test + decontaminated, and decontaminated is
the sum of decontaminated_by_reason and of decontaminated_by_source.

Two passes over the input, both streamed: the first writes eval and test and indexes them (with the
probe and the benchmarks), the second checks each train record against that index.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from flywheel import paths
from flywheel.config import Params, SplitParams
from flywheel.data import decontaminate
from flywheel.data.decontaminate import Index, Item
from flywheel.data.executor import open_executor
from flywheel.data.records import RECORD_SCHEMA
from flywheel.errors import FlywheelError
from flywheel.io import ParquetChunkWriter, atomic_path, read_arrow_batches, read_batches

SPLITS = tuple(paths.SPLITS)
DECONTAMINATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),  # eval | test | safety_probe | a benchmark's name
        ("matches", pa.string()),  # that item: a record id, or file:line
        ("ngram", pa.string()),  # a shared n-gram (normalised), or the whole matching text
        ("overlap", pa.int64()),  # distinct n-grams shared with the item
        ("similarity", pa.float64()),  # share of the item's n-grams in the train record
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)


def assign(record_id: str, config: SplitParams) -> str:
    """The split of an id: a uniform number from hash(salt, id) against the cumulative fractions."""
    digest = hashlib.sha256(f"{config.salt}\x1f{record_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += config.fractions[name]
        if point < cumulative:
            return name
    return SPLITS[-1]


def index_extra_items(index: Index, params: Params, root: Path) -> dict[str, int]:
    """Add the safety probe and the benchmarks to the index; benchmark rows without text, by name."""
    config = params.split.decontaminate
    if "safety_probe" in config.against:
        for item, prompt in decontaminate.load_safety_probe(params, root):
            index.add(item, [prompt], [" ".join(decontaminate.words(prompt))])
    without_text = {}
    for benchmark in config.benchmarks:
        rows = empty = 0
        for item, texts in decontaminate.benchmark_rows(benchmark, root):
            rows += 1
            empty += not texts
            index.add(item, texts, [" ".join(decontaminate.words(t)) for t in texts])
        if empty == rows:
            raise FlywheelError(
                f"split.decontaminate.benchmarks[{benchmark.name}]: none of {rows} rows has a text in "
                f"fields {benchmark.fields}; name the fields the file holds"
            )
        without_text[benchmark.name] = empty
    return without_text


def record_texts(record: dict, config: SplitParams) -> list[str | None]:
    return [record[name] for name in config.decontaminate.fields]


def decontaminated_row(record: dict, match: decontaminate.Match) -> dict:
    return {
        "id": record["id"],
        "reason": match.reason,
        "source": match.item.source,
        "matches": match.item.ref,
        "ngram": match.ngram,
        "overlap": match.overlap,
        "similarity": match.coverage,
        "prompt": record["prompt"],
        "response": record["response"],
    }


@dataclass
class CheckedTrain:
    """One batch's train records against the index: what a (possibly remote) task returns."""

    kept: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)  # decontaminated rows
    reasons: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)  # the evaluation source each removal matched
    train_sources: Counter = field(default_factory=Counter)  # train records per record source
    removed_sources: Counter = field(default_factory=Counter)  # removed ones per record source


def check_train_records(batch: pa.RecordBatch, index: Index, config: SplitParams) -> CheckedTrain:
    checked = CheckedTrain()
    for record in batch.to_pylist():
        if assign(record["id"], config) != "train":
            continue
        match = None
        if len(index):
            exact = decontaminate.record_exact_text(record)
            match = index.match(record_texts(record, config), exact)
        checked.train_sources[record["source"]] += 1
        if match is None:
            checked.kept.append(record)
        else:
            checked.removed.append(decontaminated_row(record, match))
            checked.reasons[match.reason] += 1
            checked.sources[match.item.source] += 1
            checked.removed_sources[record["source"]] += 1
    return checked


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.split
    checks = config.decontaminate
    enabled = checks.exact or checks.ngram
    source = paths.CLEAN_RECORDS.require(root)
    index = Index(checks)
    counts, reasons, sources = Counter(), Counter(), Counter()
    train_sources, removed_sources = Counter(), Counter()  # train records per record source
    with contextlib.ExitStack() as stack:
        writers = {
            name: ParquetChunkWriter(stack.enter_context(atomic_path(root / path)), RECORD_SCHEMA)
            for name, path in paths.SPLITS.items()
        }
        dropped = ParquetChunkWriter(
            stack.enter_context(atomic_path(root / paths.DECONTAMINATED)), DECONTAMINATED_SCHEMA
        )
        executor = stack.enter_context(open_executor(params.runtime))
        # Pass 1: eval and test are written and indexed; train waits until the index is complete.
        for batch in read_batches(source):
            for record in batch:
                name = assign(record["id"], config)
                if name == "train":
                    continue
                writers[name].add(record)
                counts[name] += 1
                if enabled and name in checks.against:
                    exact = [decontaminate.record_exact_text(record)]
                    index.add(Item(name, record["id"]), record_texts(record, config), exact)
        without_text = index_extra_items(index, params, root) if enabled else {}
        # Pass 2: train records, each checked against the index (on Ray, a task per batch).
        batches = read_arrow_batches(source, executor.batch_rows(10_000))
        for checked in executor.map(check_train_records, batches, index, config):
            for record in checked.kept:
                writers["train"].add(record)
            for row in checked.removed:
                dropped.add(row)
            counts["train"] += len(checked.kept)
            reasons.update(checked.reasons)
            sources.update(checked.sources)
            train_sources.update(checked.train_sources)
            removed_sources.update(checked.removed_sources)
        for writer in (*writers.values(), dropped):
            writer.close()

    removed = sum(reasons.values())
    metrics = {
        "in": sum(counts.values()) + removed,
        **{name: counts[name] for name in SPLITS},
        "decontaminated": removed,
        "decontaminated_by_reason": dict(sorted(reasons.items())),
        "decontaminated_by_source": dict(sorted(sources.items())),
        # Whose train records went: a task can lose all of its training data while the total stays small.
        "decontaminated_by_record_source": {
            name: {"removed": removed_sources[name], "of": train_sources[name]} for name in sorted(removed_sources)
        },
        "decontamination": {
            "n": checks.n,
            "min_ngrams": checks.min_ngrams,
            "items": dict(sorted(Counter(item.source for item in index.items).items())),
            "ngrams_indexed": index.ngrams,
            "benchmark_rows_without_text": without_text,
        },
        "fractions": dict(config.fractions),
        "warnings": [],
    }
    assigned_train = counts["train"] + removed
    if assigned_train and removed / assigned_train > checks.warn_share:
        metrics["warnings"].append(
            f"{removed:,} of {assigned_train:,} train records ({removed / assigned_train:.1%}) removed as "
            f"contaminated, above split.decontaminate.warn_share {checks.warn_share}: see {paths.DECONTAMINATED}"
        )
    for name, lost in sorted(removed_sources.items()):
        share = lost / train_sources[name]
        if share > checks.warn_share:
            metrics["warnings"].append(
                f"source {name}: {lost:,} of its {train_sources[name]:,} train records ({share:.0%}) "
                f"removed as contaminated, above split.decontaminate.warn_share {checks.warn_share}: its held-out "
                "records share long passages with its training ones (templated data?)"
            )
    return metrics


def report(metrics: dict) -> str:
    lines = [
        f"split: {metrics['in']:,} records -> train {metrics['train']:,}, eval {metrics['eval']:,}, "
        f"test {metrics['test']:,}; {metrics['decontaminated']:,} train records removed as "
        "contaminated"
    ]
    lines += [f"  {reason}: {count:,}" for reason, count in metrics["decontaminated_by_reason"].items()]
    lines += [f"  against {source}: {count:,}" for source, count in metrics["decontaminated_by_source"].items()]
    lines += [f"  warning: {warning}" for warning in metrics["warnings"]]
    lines.append(f"  wrote {', '.join(map(str, paths.SPLITS.values()))}, {paths.DECONTAMINATED}")
    return "\n".join(lines)
