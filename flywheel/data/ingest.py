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
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
from tqdm import tqdm

from flywheel import paths
from flywheel.config import Params, SourceParams
from flywheel.data.formats import RawRow, detect_format, read_rows
from flywheel.data.records import PREFERENCE_SCHEMA, RECORD_SCHEMA, Rejected, map_item
from flywheel.errors import FlywheelError
from flywheel.io import ParquetChunkWriter, atomic_path

OUTPUTS = (paths.INGESTED_RECORDS, paths.INGESTED_PREFERENCES, paths.QUARANTINE)


def resolve_sources(sources: list[SourceParams], root: Path) -> list[tuple[SourceParams, list[Path]]]:
    resolved = []
    for source in sources:
        files = sorted(path for path in root.glob(source.path) if path.is_file())
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


class _SourceCounts:
    def __init__(self) -> None:
        self.files = 0
        self.read = 0
        self.records = 0
        self.preferences = 0
        self.reasons: Counter[str] = Counter()

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "read": self.read,
            "records": self.records,
            "preferences": self.preferences,
            "quarantined": sum(self.reasons.values()),
            "quarantine_reasons": dict(sorted(self.reasons.items())),
        }


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

        for source, files in plan:
            tally = counts[source.name]
            for path in files:
                tally.files += 1
                relative = path.relative_to(root).as_posix()
                # The file's modification time, not the clock: ingest re-run on unchanged files
                # (say, because data/raw/feedback changed) writes the same bytes, so DVC skips
                # every stage downstream of it.
                ingested_at = datetime.fromtimestamp(int(path.stat().st_mtime), UTC)
                for row in read_rows(path, detect_format(path, source.format)):
                    tally.read += 1
                    if tally.read % 1000 == 0:
                        progress.update(1000)
                    problem, detail = row.problem, row.detail
                    if problem is None:
                        try:
                            kind, fields = map_item(row.value, source)
                        except Rejected as rejected:
                            problem, detail = rejected.reason, rejected.detail
                    if problem is not None:
                        tally.reasons[problem] += 1
                        snippet = row.snippet or json.dumps(row.value, ensure_ascii=False, default=str)[:300]
                        quarantine.write(
                            json.dumps(
                                {
                                    "source": source.name,
                                    "file": relative,
                                    "line": row.line,
                                    "reason": problem,
                                    "detail": detail,
                                    "snippet": snippet,
                                },
                                ensure_ascii=False,
                            )
                            + "\n"
                        )
                        continue
                    fields.update(
                        source=source.name,
                        license=source.license,
                        ingested_at=ingested_at,
                        metadata=_metadata(relative, row, fields),
                    )
                    if kind == "record":
                        records.add(fields)
                        tally.records += 1
                    else:
                        preferences.add(fields)
                        tally.preferences += 1
        records.close()
        preferences.close()
        quarantine.close()

    return summarize(counts)


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
    lines.append(f"  wrote {', '.join(map(str, OUTPUTS))}")
    return "\n".join(lines)
