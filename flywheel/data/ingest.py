"""ingest: read every configured raw source and write canonical Parquet.

Outputs (declared in dvc.yaml):
  data/interim/ingest/records.parquet      prompt/response records
  data/interim/ingest/preferences.parquet  prompt/chosen/rejected pairs
  data/interim/ingest/quarantine.jsonl     every item that could not be ingested, with file, line, reason
Every item read ends up in exactly one of them: read = records + preferences + quarantined.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from tqdm import tqdm

from flywheel import paths, pii
from flywheel.config import RAW_DIR, IngestParams, Params, SourceParams
from flywheel.data.executor import open_executor
from flywheel.data.formats import RawRow, detect_format, read_rows
from flywheel.data.records import PREFERENCE_SCHEMA, RECORD_SCHEMA, Rejected, map_item
from flywheel.errors import FlywheelError
from flywheel.io import ParquetChunkWriter, atomic_path

OUTPUTS = (paths.INGESTED_RECORDS, paths.INGESTED_PREFERENCES, paths.QUARANTINE)


def _require_inside_raw_dir(path: Path, root: Path, source: str) -> None:
    # A symlink under data/raw could point at /etc/passwd or /proc/self/environ: its lines would
    # land in the quarantine, a DVC output that runs push.
    raw_dir = (root / RAW_DIR).resolve()
    if not path.resolve().is_relative_to(raw_dir):
        raise FlywheelError(
            f"ingest source {source!r}: {path.relative_to(root)} resolves to {path.resolve()}, outside "
            f"{RAW_DIR}/; copy the data into {RAW_DIR}/ instead of linking to it"
        )


def resolve_sources(sources: list[SourceParams], root: Path) -> list[tuple[SourceParams, list[Path]]]:
    resolved = []
    for source in sources:
        files = sorted(path for path in root.glob(source.path) if path.is_file())
        for path in files:
            _require_inside_raw_dir(path, root, source.name)
        if not files:
            raise FlywheelError(
                f"ingest source {source.name!r}: no files match {source.path!r} under {root.resolve()}; "
                "fix `path` in params.yaml or add the data"
            )
        resolved.append((source, files))
    return resolved


def _metadata(path: str, row: RawRow, fields: dict) -> str:
    metadata = {"file": path, "line": row.line}
    if fields["history"]:
        metadata["history"] = fields["history"]
    if fields["extra"]:
        metadata["extra"] = fields["extra"]
    return orjson.dumps(metadata, default=str).decode("utf-8")


FIELDS_SAMPLED = 1_000  # items whose field names are collected per source, for the error message


class _SourceCounts:
    def __init__(self) -> None:
        self.files = 0
        self.read = 0
        self.records = 0
        self.preferences = 0
        self.reasons: Counter[str] = Counter()
        self.first_detail: dict[str, str] = {}  # reason -> "file:line: detail" of its first item
        self.fields_seen: Counter[str] = Counter()  # field names of the first FIELDS_SAMPLED items

    def add(self, other: _SourceCounts) -> None:
        self.files += other.files
        self.read += other.read
        self.records += other.records
        self.preferences += other.preferences
        self.reasons.update(other.reasons)
        for reason, detail in other.first_detail.items():
            self.first_detail.setdefault(reason, detail)
        if sum(self.fields_seen.values()) < FIELDS_SAMPLED:
            self.fields_seen.update(other.fields_seen)

    def note_fields(self, value: object) -> None:
        if isinstance(value, dict) and self.read <= FIELDS_SAMPLED:
            self.fields_seen.update(str(key) for key in value)

    def quarantined_share(self) -> float:
        return sum(self.reasons.values()) / self.read if self.read else 0.0

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "read": self.read,
            "records": self.records,
            "preferences": self.preferences,
            "quarantined": sum(self.reasons.values()),
            "quarantined_share": round(self.quarantined_share(), 4),
            "quarantine_reasons": dict(sorted(self.reasons.items())),
        }


def describe_quarantine(source: SourceParams, tally: _SourceCounts) -> str:
    """What went wrong with a source, with what a user needs to fix its mapping."""
    share = tally.quarantined_share()
    top = ", ".join(
        f"{reason} x{count:,} (first: {tally.first_detail[reason]})" for reason, count in tally.reasons.most_common(3)
    )
    mapping = ", ".join(f"{role}: {field}" for role, field in source.role_fields.items())
    fields = sorted(tally.fields_seen) or ["(no object items)"]
    return (
        f"source {source.name!r} ({source.path}): {sum(tally.reasons.values()):,} of {tally.read:,} items "
        f"({share:.0%}) quarantined: {top}; the mapping for kind {source.kind!r} is {{{mapping}}} and the "
        f"items have fields {fields}"
    )


def check_quarantine_shares(
    plan: list[tuple[SourceParams, list[Path]]], counts: dict[str, _SourceCounts], config: IngestParams
) -> list[str]:
    """Fail on a source that is (almost) all quarantine; return warnings for notable shares."""
    failures, warnings = [], []
    for source, _ in plan:
        tally = counts[source.name]
        share = tally.quarantined_share()
        if share > config.max_quarantine_share:
            failures.append(describe_quarantine(source, tally))
        elif share > config.warn_quarantine_share:
            warnings.append(describe_quarantine(source, tally))
    if failures:
        raise FlywheelError(
            f"ingest: {len(failures)} source(s) quarantined more than ingest.max_quarantine_share "
            f"({config.max_quarantine_share:.0%}) of their items; the previous outputs are left as they were. "
            "Fix the source's `fields` (or `kind`/`format`) in params.yaml, or the data, or raise "
            "max_quarantine_share:\n  " + "\n  ".join(failures)
        )
    return warnings


@dataclass
class FileChunk:
    """Up to chunk_size items of one file, mapped: what a (possibly remote) task returns."""

    source: str
    records: list[dict] = field(default_factory=list)
    preferences: list[dict] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # JSON lines
    tally: _SourceCounts = field(default_factory=_SourceCounts)  # counts the file in its first chunk


@dataclass(frozen=True)
class RawFile:
    source: SourceParams
    relative: str  # the path under the project root, as records and the quarantine name it
    ingested_at: datetime
    content: bytes | None = None  # the file's bytes where it travels to a Ray worker


def read_file(raw: RawFile, root: Path, chunk_size: int) -> Iterator[FileChunk]:
    """The file's items mapped to records, preferences or quarantine lines, a chunk at a time."""
    with contextlib.ExitStack() as stack:
        path = root / raw.relative
        if raw.content is not None:  # a worker that may not see the project: a private copy
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            path = scratch / Path(raw.relative).name
            path.write_bytes(raw.content)
        chunk = FileChunk(raw.source.name)
        chunk.tally.files = 1
        for row in read_rows(path, detect_format(path, raw.source.format)):
            _ingest_row(row, raw, chunk)
            if chunk.tally.read == chunk_size:
                yield chunk
                chunk = FileChunk(raw.source.name)
        yield chunk


def read_whole_file(raw: RawFile, chunk_size: int) -> list[FileChunk]:
    """read_file as one Ray task: the file arrived with it, so the project root does not matter."""
    return list(read_file(raw, Path("."), chunk_size))


def _ingest_row(row: RawRow, raw: RawFile, chunk: FileChunk) -> None:
    source, tally = raw.source, chunk.tally
    tally.read += 1
    tally.note_fields(row.value)
    problem, detail = row.problem, row.detail
    if problem is None:
        try:
            kind, fields = map_item(row.value, source)
        except Rejected as rejected:
            problem, detail = rejected.reason, rejected.detail
    if problem is not None:
        tally.reasons[problem] += 1
        tally.first_detail.setdefault(problem, f"{raw.relative}:{row.line}: {detail}")
        snippet = row.snippet or json.dumps(row.value, ensure_ascii=False, default=str)[:300]
        snippet = pii.redact(snippet)[0]  # the quarantine is pushed with the run
        entry = {
            "source": source.name,
            "file": raw.relative,
            "line": row.line,
            "reason": problem,
            "detail": detail,
            "snippet": snippet,
        }
        chunk.quarantined.append(json.dumps(entry, ensure_ascii=False))
        return
    fields.update(
        source=source.name,
        license=source.license,
        ingested_at=raw.ingested_at,
        metadata=_metadata(raw.relative, row, fields),
    )
    if kind == "record":
        chunk.records.append(fields)
        tally.records += 1
    else:
        chunk.preferences.append(fields)
        tally.preferences += 1


def raw_files(plan: list[tuple[SourceParams, list[Path]]], root: Path, with_content: bool) -> Iterator[RawFile]:
    for source, files in plan:
        for path in files:
            # The file's modification time, not the clock: ingest re-run on unchanged files
            # (say, because data/raw/feedback changed) writes the same bytes, so DVC skips
            # every stage downstream of it.
            yield RawFile(
                source,
                path.relative_to(root).as_posix(),
                datetime.fromtimestamp(int(path.stat().st_mtime), UTC),
                path.read_bytes() if with_content else None,
            )


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.ingest
    plan = resolve_sources(config.sources, root)
    counts = {source.name: _SourceCounts() for source, _ in plan}

    with contextlib.ExitStack() as stack:
        records_tmp, preferences_tmp, quarantine_tmp = (stack.enter_context(atomic_path(root / out)) for out in OUTPUTS)
        records = ParquetChunkWriter(records_tmp, RECORD_SCHEMA, config.chunk_size)
        preferences = ParquetChunkWriter(preferences_tmp, PREFERENCE_SCHEMA, config.chunk_size)
        quarantine = stack.enter_context(open(quarantine_tmp, "w", encoding="utf-8"))
        progress = stack.enter_context(tqdm(desc="ingest", unit=" items", disable=None))
        executor = stack.enter_context(open_executor(params.runtime))

        # One task per file on Ray (the file travels with it: workers need no shared filesystem);
        # locally, each file streamed a chunk at a time. Either way, in the order of the plan.
        files = raw_files(plan, root, with_content=executor.name == "ray")
        if executor.name == "ray":
            chunks = (c for whole in executor.map(read_whole_file, files, config.chunk_size) for c in whole)
        else:
            chunks = (c for raw in files for c in read_file(raw, root, config.chunk_size))
        for chunk in chunks:
            counts[chunk.source].add(chunk.tally)
            for row in chunk.records:
                records.add(row)
            for row in chunk.preferences:
                preferences.add(row)
            quarantine.writelines(line + "\n" for line in chunk.quarantined)
            progress.update(chunk.tally.read)
        records.close()
        preferences.close()
        quarantine.close()
        # Inside the atomic writes: a failed check leaves the previous outputs as they were.
        warnings = check_quarantine_shares(plan, counts, config)

    return {**summarize(counts), "warnings": warnings}


def summarize(counts: dict[str, _SourceCounts]) -> dict:
    by_source = {name: tally.as_dict() for name, tally in counts.items()}
    by_reason: Counter[str] = Counter()
    for tally in counts.values():
        by_reason.update(tally.reasons)
    totals = {
        key: sum(s[key] for s in by_source.values())
        for key in ("files", "read", "records", "preferences", "quarantined")
    }
    return {**totals, "quarantine_reasons": dict(sorted(by_reason.items())), "sources": by_source}


def report(metrics: dict) -> str:
    lines = [
        f"ingest: read {metrics['read']:,} items from {metrics['files']} files in {len(metrics['sources'])} sources"
    ]
    for name, source in metrics["sources"].items():
        lines.append(
            f"  {name:<24} read {source['read']:>7,}  records {source['records']:>7,}  "
            f"preferences {source['preferences']:>6,}  quarantined {source['quarantined']:>5,}"
        )
    lines.append(
        f"  -> {metrics['records']:,} records, {metrics['preferences']:,} preference pairs, "
        f"{metrics['quarantined']:,} quarantined"
    )
    for reason, count in metrics["quarantine_reasons"].items():
        lines.append(f"     quarantined {reason}: {count:,}")
    lines += [f"  warning: {warning}" for warning in metrics.get("warnings", [])]
    lines.append(f"  wrote {', '.join(map(str, OUTPUTS))}")
    return "\n".join(lines)
