"""clean: normalise, redact PII, filter by quality, remove exact and near duplicates.

Input:  data/interim/ingest/records.parquet
Output: data/interim/clean/records.parquet  the records kept (same schema, cleaned text)
        data/interim/clean/removed.parquet  every record removed, with its reason, and for
                                            duplicates the id of the record kept in its place
Every input record is kept or removed with a reason: in = kept + removed.

Two passes keep memory bounded: the first cleans and filters batch by batch, writing survivors
to a scratch file and keeping only an exact-match key and a MinHash signature per record; the
duplicate decisions are then made on those; the second pass streams the scratch file out.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from flywheel import paths, text
from flywheel.config import CleanParams, Params, QualityFilterParams
from flywheel.data import dedup, minhash
from flywheel.data.executor import open_executor
from flywheel.data.records import RECORD_SCHEMA
from flywheel.io import ParquetChunkWriter, atomic_path, read_arrow_batches, read_batches
from flywheel.pii import PLACEHOLDER_PATTERN, redact

REMOVED_TEXT_CHARS = 2_000  # removed records keep this much of each text field, for review
TEXT_FIELDS = ("prompt", "response", "context", "system")

REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float64()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("metadata", pa.string()),
    ]
)


def exact_key(record: dict) -> bytes:
    parts = (text.dedup_key(record[name] or "") for name in ("prompt", "context", "response"))
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).digest()


def clean_record(record: dict, params: CleanParams) -> tuple[dict, Counter, int]:
    """The record with normalised, redacted text; the PII placeholders put in, by type; and
    how many HTML tags were stripped from it."""
    cleaned = dict(record)
    pii: Counter[str] = Counter()
    markup_tags = 0
    for name in TEXT_FIELDS:
        value = record[name]
        if value is not None and params.strip_markup:
            value, stripped = text.strip_markup(value)
            markup_tags += stripped
        value = text.normalize(value)
        if value is not None and params.redact_pii:
            value, found = redact(value)
            pii.update(found)
        cleaned[name] = value or None if name in ("context", "system") else value
    return cleaned, pii, markup_tags


def quality_signals(record: dict, limits: QualityFilterParams) -> list[tuple[str, float, float]]:
    """(reason, value, limit) for each ratio filter; a value above its limit removes the record.

    Repetition is measured on the response alone: it is what the model learns to write, and a
    worked answer restates its question's quantities ("4 * 20 sheep = 80 sheep") and a dialogue
    turn its history without either being degenerate. Repeated n-grams are long ones (Gopher's
    5-10 word duplicate n-grams, not its short top n-grams, which templated step-by-step answers
    trip): a loop repeats whole phrases, worked solutions repeat 3-4 word fragments.
    """
    response = record["response"] or ""
    combined = minhash.dedup_text(record)
    words = combined.split()
    return [
        ("duplicate_lines", text.duplicate_line_fraction(response), limits.max_duplicate_line_fraction),
        (
            "repeated_ngrams",
            text.duplicate_ngram_char_fraction(response.split(), limits.repeated_ngram_size),
            limits.max_repeated_ngram_char_fraction,
        ),
        ("symbol_ratio", text.symbol_word_ratio(words), limits.max_symbol_word_ratio),
        ("non_alpha_ratio", text.non_alpha_ratio(combined), limits.max_non_alpha_ratio),
        ("mostly_pii", len(PLACEHOLDER_PATTERN.findall(combined)) / max(len(words), 1), limits.max_pii_token_fraction),
    ]


def quality_problem(record: dict, limits: QualityFilterParams) -> tuple[str, str] | None:
    """The first quality filter the record fails, as (reason, detail); None if it passes all."""
    prompt, response = record["prompt"] or "", record["response"] or ""
    if not response:
        return "empty_response", "the response is empty after normalisation"
    if len(prompt) < limits.min_prompt_chars:
        return "too_short", f"prompt has {len(prompt)} chars < {limits.min_prompt_chars}"
    if len(response) < limits.min_response_chars:
        return "too_short", f"response has {len(response)} chars < {limits.min_response_chars}"
    total = len(prompt) + len(response) + len(record["context"] or "")
    if total > limits.max_chars:
        return "too_long", f"{total:,} chars > {limits.max_chars:,}"
    for reason, value, limit in quality_signals(record, limits):
        if value > limit:
            return reason, f"{value:.2f} > {limit}"
    return None


def removed_row(
    record: dict, reason: str, detail: str = "", duplicate_of: str | None = None, similarity: float | None = None
) -> dict:
    def clip(value: str | None) -> str | None:
        return value[:REMOVED_TEXT_CHARS] if value else value

    return {
        "id": record["id"],
        "reason": reason,
        "detail": detail,
        "duplicate_of": duplicate_of,
        "similarity": similarity,
        "source": record["source"],
        "prompt": clip(record["prompt"]),
        "response": clip(record["response"]),
        "metadata": record["metadata"],
    }


@dataclass
class CleanedBatch:
    """One batch through cleaning and the quality filters: what a (possibly remote) task returns."""

    kept: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)
    removed_by: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    records_with_pii: int = 0
    markup_tags: int = 0
    records_with_markup: int = 0
    keys: list[bytes] = field(default_factory=list)  # the exact-match key of each kept record
    signatures: np.ndarray | None = None  # their MinHash signatures, where near dedup is on


def clean_batch(batch: pa.RecordBatch, config: CleanParams) -> CleanedBatch:
    result = CleanedBatch()
    for record in batch.to_pylist():
        cleaned, pii, tags = clean_record(record, config)
        result.pii.update(pii)
        result.records_with_pii += bool(pii)
        result.markup_tags += tags
        result.records_with_markup += bool(tags)
        problem = quality_problem(cleaned, config.filters)
        if problem:
            result.removed.append(removed_row(cleaned, *problem))
            result.removed_by[problem[0]] += 1
            continue
        result.kept.append(cleaned)
        result.keys.append(exact_key(cleaned))
    if config.dedup.near and result.kept:
        hasher = minhash.MinHasher(minhash.settings_from(config.dedup.minhash))
        result.signatures = hasher.signatures(map(minhash.dedup_text, result.kept))
    return result


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.clean
    source = paths.INGESTED_RECORDS.require(root)
    settings = minhash.settings_from(config.dedup.minhash)
    totals = CleanedBatch()
    total = 0
    survivors = dedup.Survivors()

    with contextlib.ExitStack() as stack:
        kept_tmp, removed_tmp = (
            stack.enter_context(atomic_path(root / out)) for out in (paths.CLEAN_RECORDS, paths.CLEAN_REMOVED)
        )
        scratch_dir = stack.enter_context(tempfile.TemporaryDirectory(dir=kept_tmp.parent))
        scratch = Path(scratch_dir) / "pass1.parquet"
        removed = ParquetChunkWriter(removed_tmp, REMOVED_SCHEMA)
        first_pass = ParquetChunkWriter(scratch, RECORD_SCHEMA)
        progress = stack.enter_context(tqdm(desc="clean", unit=" records", disable=None))
        executor = stack.enter_context(open_executor(params.runtime))

        # Pass 1, batch by batch (on Ray, a task per batch): clean, filter, sign.
        batches = read_arrow_batches(source, executor.batch_rows(config.batch_size))
        for batch in executor.map(clean_batch, batches, config):
            for row in batch.removed:
                removed.add(row)
            for record in batch.kept:
                first_pass.add(record)
                survivors.ids.append(record["id"])
            survivors.keys += batch.keys
            if batch.signatures is not None:
                survivors.signatures.append(batch.signatures)
            total += len(batch.kept) + len(batch.removed)
            _add_counts(totals, batch)
            progress.update(len(batch.kept) + len(batch.removed))
        first_pass.close()

        duplicates = dedup.decide(survivors, config.dedup.exact, config.dedup.near, settings, executor)
        # Pass 2: the survivors streamed out, duplicates to the removed file.
        kept = ParquetChunkWriter(kept_tmp, RECORD_SCHEMA)
        position = 0
        for batch in read_batches(scratch, config.batch_size):
            for record in batch:
                decision = duplicates.get(position)
                if decision is None:
                    kept.add(record)
                else:
                    reason, kept_position, similarity = decision
                    removed.add(
                        removed_row(record, reason, duplicate_of=survivors.ids[kept_position], similarity=similarity)
                    )
                    totals.removed_by[reason] += 1
                position += 1
        kept.close()
        removed.close()

    return {
        "in": total,
        "kept": kept.rows,
        "removed": removed.rows,
        "removed_by_reason": dict(sorted(totals.removed_by.items())),
        "pii_redacted": dict(sorted(totals.pii.items())),
        "records_with_pii": totals.records_with_pii,
        "markup_stripped": {"tags": totals.markup_tags, "records": totals.records_with_markup},
    }


def _add_counts(totals: CleanedBatch, batch: CleanedBatch) -> None:
    totals.removed_by.update(batch.removed_by)
    totals.pii.update(batch.pii)
    totals.records_with_pii += batch.records_with_pii
    totals.markup_tags += batch.markup_tags
    totals.records_with_markup += batch.records_with_markup


def report(metrics: dict) -> str:
    lines = [f"clean: {metrics['in']:,} records in -> {metrics['kept']:,} kept, {metrics['removed']:,} removed"]
    lines += [f"  removed {reason}: {count:,}" for reason, count in metrics["removed_by_reason"].items()]
    pii = ", ".join(f"{kind} {count:,}" for kind, count in metrics["pii_redacted"].items()) or "none"
    lines.append(f"  PII redacted in {metrics['records_with_pii']:,} records: {pii}")
    markup = metrics["markup_stripped"]
    lines.append(f"  HTML stripped from {markup['records']:,} records: {markup['tags']:,} tags")
    lines.append(f"  wrote {paths.CLEAN_RECORDS}, {paths.CLEAN_REMOVED}")
    return "\n".join(lines)
