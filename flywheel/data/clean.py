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
from flywheel.data import minhash
from flywheel.data.records import RECORD_SCHEMA
from flywheel.io import ParquetChunkWriter, atomic_path, read_batches
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
class Survivors:
    """What the first pass keeps per surviving record: enough to decide duplicates."""

    ids: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)


def exact_duplicates(survivors: Survivors) -> dict[int, int]:
    """position -> position of the record kept in its place. The kept one has the smallest id
    (then the earliest position), so the choice does not depend on file order."""
    best: dict[bytes, int] = {}
    for position, key in enumerate(survivors.keys):
        kept = best.get(key)
        if kept is None or survivors.ids[position] < survivors.ids[kept]:
            best[key] = position
    return {position: best[key] for position, key in enumerate(survivors.keys) if best[key] != position}


def near_duplicates(
    signatures: np.ndarray, ids: list[str], candidates: np.ndarray, settings: minhash.MinHashSettings
) -> dict[int, tuple[int, float]]:
    """position -> (position kept in its place, estimated similarity to it), over `candidates`.

    Within each LSH cluster, members are visited by id; one is removed only if it is at least
    `threshold` similar to a member already kept, so a chain a~b~c never removes c for being
    like a only through b.
    """
    subset = signatures[candidates]
    pairs, _ = minhash.near_duplicate_pairs(subset, settings)
    labels = minhash.cluster_labels(len(candidates), pairs)
    members: dict[int, list[int]] = {}
    for local in np.flatnonzero(np.bincount(labels)[labels] > 1):
        members.setdefault(int(labels[local]), []).append(int(local))
    removed = {}
    for group in members.values():
        kept: list[int] = []
        for local in sorted(group, key=lambda m: (ids[candidates[m]], m)):
            similarity = [(float((subset[local] == subset[k]).mean()), k) for k in kept]
            best = max(similarity, default=(0.0, -1))
            if best[0] >= settings.threshold:
                removed[int(candidates[local])] = (int(candidates[best[1]]), best[0])
            else:
                kept.append(local)
    return removed


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.clean
    source = paths.INGESTED_RECORDS.require(root)
    hasher = minhash.MinHasher(minhash.settings_from(config.dedup.minhash))
    removed_by: Counter[str] = Counter()
    pii_counts: Counter[str] = Counter()
    records_with_pii = 0
    markup_tags = records_with_markup = 0
    total = 0
    survivors = Survivors()

    with contextlib.ExitStack() as stack:
        kept_tmp, removed_tmp = (
            stack.enter_context(atomic_path(root / out)) for out in (paths.CLEAN_RECORDS, paths.CLEAN_REMOVED)
        )
        scratch_dir = stack.enter_context(tempfile.TemporaryDirectory(dir=kept_tmp.parent))
        scratch = Path(scratch_dir) / "pass1.parquet"
        removed = ParquetChunkWriter(removed_tmp, REMOVED_SCHEMA)
        first_pass = ParquetChunkWriter(scratch, RECORD_SCHEMA)
        progress = stack.enter_context(tqdm(desc="clean", unit=" records", disable=None))

        for batch in read_batches(source, config.batch_size):
            batch_survivors = []
            for record in batch:
                total += 1
                cleaned, pii, tags = clean_record(record, config)
                pii_counts.update(pii)
                records_with_pii += bool(pii)
                markup_tags += tags
                records_with_markup += bool(tags)
                problem = quality_problem(cleaned, config.filters)
                if problem:
                    removed.add(removed_row(cleaned, *problem))
                    removed_by[problem[0]] += 1
                    continue
                first_pass.add(cleaned)
                batch_survivors.append(cleaned)
                survivors.ids.append(cleaned["id"])
                survivors.keys.append(exact_key(cleaned))
            if config.dedup.near and batch_survivors:
                survivors.signatures.append(hasher.signatures(map(minhash.dedup_text, batch_survivors)))
            progress.update(len(batch))
        first_pass.close()

        duplicates = decide_duplicates(survivors, config, hasher.settings)
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
                    removed_by[reason] += 1
                position += 1
        kept.close()
        removed.close()

    return {
        "in": total,
        "kept": kept.rows,
        "removed": removed.rows,
        "removed_by_reason": dict(sorted(removed_by.items())),
        "pii_redacted": dict(sorted(pii_counts.items())),
        "records_with_pii": records_with_pii,
        "markup_stripped": {"tags": markup_tags, "records": records_with_markup},
    }


def decide_duplicates(
    survivors: Survivors, config: CleanParams, settings: minhash.MinHashSettings
) -> dict[int, tuple[str, int, float]]:
    """position -> (reason, position kept in its place, similarity)."""
    decisions: dict[int, tuple[str, int, float]] = {}
    if config.dedup.exact:
        for position, kept in exact_duplicates(survivors).items():
            decisions[position] = ("exact_duplicate", kept, 1.0)
    if config.dedup.near and survivors.ids:
        signatures = np.concatenate(survivors.signatures)
        candidates = np.array([p for p in range(len(survivors.ids)) if p not in decisions], dtype=np.int64)
        for position, (kept, similarity) in near_duplicates(signatures, survivors.ids, candidates, settings).items():
            decisions[position] = ("near_duplicate", kept, similarity)
    return decisions


def report(metrics: dict) -> str:
    lines = [f"clean: {metrics['in']:,} records in -> {metrics['kept']:,} kept, {metrics['removed']:,} removed"]
    lines += [f"  removed {reason}: {count:,}" for reason, count in metrics["removed_by_reason"].items()]
    pii = ", ".join(f"{kind} {count:,}" for kind, count in metrics["pii_redacted"].items()) or "none"
    lines.append(f"  PII redacted in {metrics['records_with_pii']:,} records: {pii}")
    markup = metrics["markup_stripped"]
    lines.append(f"  HTML stripped from {markup['records']:,} records: {markup['tags']:,} tags")
    lines.append(f"  wrote {paths.CLEAN_RECORDS}, {paths.CLEAN_REMOVED}")
    return "\n".join(lines)
