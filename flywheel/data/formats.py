"""Raw file readers: JSONL, JSON arrays, CSV and Parquet, each optionally gzipped.

Every reader streams and yields one RawRow per input item. A row that cannot be decoded is not
raised: it is yielded with a `problem` (the quarantine reason), so the caller can count it and
carry on. Only a file that cannot be read at all raises FlywheelError.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from flywheel.errors import FlywheelError

FORMATS_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SNIPPET_CHARS = 300
JSON_ARRAY_READ_CHARS = 1 << 20  # read JSON arrays 1M characters at a time
JSON_ARRAY_MAX_ELEMENT_CHARS = 64 << 20  # an element larger than this is treated as malformed
_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns undecodable bytes into

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # records may be megabytes long


@dataclass(frozen=True, slots=True)
class RawRow:
    line: int  # 1-based line of the item (row number for Parquet)
    value: Any = None  # the decoded item when problem is None
    problem: str | None = None  # quarantine reason
    detail: str = ""
    snippet: str = ""


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    fmt = FORMATS_BY_SUFFIX.get(Path(name).suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise FlywheelError(
            f"{path}: cannot tell the format from the file name (known: {known}, optionally .gz); "
            "set `format` for this source in params.yaml"
        )
    return fmt


def read_rows(path: Path, fmt: str) -> Iterator[RawRow]:
    """Yield every item of `path`. Raises FlywheelError if the file itself cannot be read."""
    try:
        if fmt == "parquet":
            yield from _read_parquet(path)
            return
        with _open_binary(path) as stream:
            if fmt == "jsonl":
                yield from _read_jsonl(stream)
            elif fmt == "json":
                yield from _read_json_array(stream)
            elif fmt == "csv":
                yield from _read_csv(stream)
            else:
                raise FlywheelError(f"{path}: unknown format {fmt!r}")
    except (OSError, EOFError, zlib.error) as error:
        raise FlywheelError(f"{path}: cannot read the file: {error}") from None


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _snippet(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text[:SNIPPET_CHARS]


def _read_jsonl(stream: BinaryIO) -> Iterator[RawRow]:
    for line_no, raw in enumerate(stream, start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark
        if not raw.strip():
            continue  # blank lines separate nothing and hold no record
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield RawRow(line_no, problem="undecodable_bytes", detail=str(error), snippet=_snippet(raw))
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            yield RawRow(line_no, problem="malformed_json", detail=str(error), snippet=_snippet(text))
            continue
        yield RawRow(line_no, value)


TOO_DEEP = "nested deeper than the JSON parser allows"


class _TextBuffer:
    """A sliding window over a decoded text stream, for incremental JSON decoding."""

    def __init__(self, stream: BinaryIO):
        self._text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape")
        self.buffer = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk; drops what has been consumed. False at end of file."""
        if self.eof:
            return False
        chunk = self._text.read(JSON_ARRAY_READ_CHARS)
        self.buffer = self.buffer[self.pos :] + chunk
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def read_rest(self) -> str:
        """Everything not yet consumed, to the end of the file (read once, joined once: growing
        one string chunk by chunk copies it again for every chunk)."""
        pieces = [self.buffer[self.pos :]]
        while chunk := self._text.read(JSON_ARRAY_READ_CHARS):
            pieces.append(chunk)
        self.eof = True
        return "".join(pieces)

    def skip_space(self) -> str:
        """Skip white space; return the next character ('' at end of file)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
                if self.buffer[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.more():
                return ""

    def consume(self, end: int) -> str:
        taken = self.buffer[self.pos : end]
        self.line += taken.count("\n")
        self.pos = end
        return taken


def _read_json_array(stream: BinaryIO) -> Iterator[RawRow]:
    decoder = json.JSONDecoder()
    text = _TextBuffer(stream)
    first = text.skip_space()
    if first != "[":
        # A single object is a one-record file; anything else is not a dataset.
        rest = text.read_rest()
        try:
            value = json.loads(rest)
        except json.JSONDecodeError as error:
            yield RawRow(1, problem="malformed_json", detail=error.msg, snippet=_snippet(rest))
            return
        except RecursionError:
            yield RawRow(1, problem="malformed_json", detail=TOO_DEEP, snippet=_snippet(rest))
            return
        yield (
            RawRow(1, value)
            if isinstance(value, dict)
            else RawRow(
                1, problem="not_a_json_array", detail=f"top level is {type(value).__name__}", snippet=_snippet(rest)
            )
        )
        return
    text.consume(text.pos + 1)
    expect_element = True
    while True:
        char = text.skip_space()
        if char == "]":  # also accepts a trailing comma, as many writers emit one
            return
        if char == "":
            yield RawRow(text.line, problem="malformed_json", detail="array is not closed with ']'")
            return
        if not expect_element:
            if char != ",":
                yield _unreadable_tail(text, f"expected ',' or ']', found {char!r}")
                return
            text.consume(text.pos + 1)
            expect_element = True
            continue
        line = text.line
        while True:
            try:
                value, end = decoder.raw_decode(text.buffer, text.pos)
                break
            except RecursionError:
                yield _unreadable_tail(text, TOO_DEEP)
                return
            except json.JSONDecodeError as error:
                too_big = len(text.buffer) - text.pos > JSON_ARRAY_MAX_ELEMENT_CHARS
                if too_big or not text.more():
                    yield _unreadable_tail(text, error.msg)
                    return
        raw = text.consume(end)
        if _SURROGATE.search(raw):
            yield RawRow(
                line,
                problem="undecodable_bytes",
                detail="invalid UTF-8 in element",
                snippet=_snippet(raw.encode("utf-8", "surrogateescape")),
            )
        else:
            yield RawRow(line, value)
        expect_element = False


def _unreadable_tail(text: _TextBuffer, reason: str) -> RawRow:
    # Incremental JSON decoding cannot resynchronise inside an array: the rest of the file is one
    # quarantined item, and the detail says that its elements were not counted one by one.
    return RawRow(
        text.line,
        problem="malformed_json",
        detail=f"{reason}; the rest of the array from this line on is unreadable",
        snippet=_snippet(text.buffer[text.pos : text.pos + SNIPPET_CHARS]),
    )


def _read_csv(stream: BinaryIO) -> Iterator[RawRow]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        raise FlywheelError(f"cannot read the CSV header: {error}") from None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield RawRow(reader.line_num, problem="malformed_csv", detail=str(error))
            continue
        if not row:
            continue
        joined = ",".join(row)
        if _SURROGATE.search(joined):
            yield RawRow(
                reader.line_num,
                problem="undecodable_bytes",
                detail="invalid UTF-8",
                snippet=_snippet(joined.encode("utf-8", "surrogateescape")),
            )
        elif len(row) != len(header):
            yield RawRow(
                reader.line_num,
                problem="csv_wrong_field_count",
                detail=f"{len(row)} fields, header has {len(header)}",
                snippet=_snippet(joined),
            )
        else:
            yield RawRow(reader.line_num, dict(zip(header, row)))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as scratch:
        if path.name.endswith(".gz"):
            # Parquet needs random access; a gzipped file is unpacked to scratch space first.
            plain = Path(scratch) / path.name[:-3]
            with gzip.open(path, "rb") as source, open(plain, "wb") as target:
                shutil.copyfileobj(source, target)
            path = plain
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid and friends
            raise FlywheelError(f"{path}: not a readable Parquet file: {error}") from None
        row_no = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                row_no += 1
                yield RawRow(row_no, value)
