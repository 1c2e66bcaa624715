"""The request log: every request the server answers, and the feedback people give on it, in a
SQL store through SQLAlchemy. A SQLite file by default; PostgreSQL (or any SQLAlchemy URL) from
the environment variable FLYWHEEL_REQUEST_LOG_URL, e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/flywheel.

Messages and responses are PII-redacted before they are stored (the clean stage's redaction), so
the log never holds what training data may not. Requests are written by one background thread
from a queue, so logging never blocks generation; `close()` (the server calls it on SIGTERM)
drains the queue first.

When the database fails, a write is retried; once it has failed for `spill_after_seconds`, each
batch goes to a JSON-lines file in `spill_dir` with the error instead (and so does everything
still unwritten when the log closes), so a crash during an outage loses only what arrived since
the last batch. Tables are re-created when a write fails (the database may come back empty), and
spilled rows are written back when it is reachable again: by the server itself, or by
`flywheel request-log replay`. Statement and lock timeouts keep a hung database from holding a
write, or a SIGTERM drain, for long. Nothing is dropped silently.

`export_feedback` writes feedback joined with its request in the format the preferences stage
reads from data/raw/feedback/*.jsonl: messages + response + rating | preferred_response |
alternative + preferred, with request_id, created_at and model_version.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from flywheel import pii
from flywheel.errors import FlywheelError
from flywheel.io import atomic_path

URL_VARIABLE = "FLYWHEEL_REQUEST_LOG_URL"
DEFAULT_URL = "sqlite:///data/serving/requests.sqlite"
DEFAULT_SPILL_DIR = Path("data/serving")
SPILL_FILES = "unwritten-requests-*.jsonl"
# Seconds a database may take to connect, run a statement or wait for a lock before the write
# counts as failed (PostgreSQL; SQLite waits this long for a lock).
TIMEOUT_SECONDS = 5
RATINGS = ("up", "down")
PREFERRED = ("response", "alternative")

metadata = MetaData()
requests_table = Table(
    "flywheel_requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("model_version", String(128)),
    Column("endpoint", String(64), nullable=False),
    Column("messages", JSON, nullable=False),  # redacted
    Column("response", Text),  # redacted; None when the request failed
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Float),
    Column("status", Integer, nullable=False),
    Column("api_key", String(16)),  # a hash prefix naming the key, never the key
    Column("error", Text),
)
feedback_table = Table(
    "flywheel_feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), ForeignKey("flywheel_requests.id"), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rating", String(8)),
    Column("preferred_response", Text),  # redacted
    Column("alternative", Text),  # redacted
    Column("preferred", String(16)),
)


def database_url(url: str | None = None) -> str:
    return url or os.environ.get(URL_VARIABLE) or DEFAULT_URL


def _redact(text: str | None) -> str | None:
    return None if text is None else pii.redact(text)[0]


def _now() -> datetime:
    return datetime.now(UTC)


def _create_engine(url: str):
    if url.startswith("postgresql"):
        milliseconds = TIMEOUT_SECONDS * 1000
        options = f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}"
        connect_args = {"connect_timeout": TIMEOUT_SECONDS, "options": options}
    elif url.startswith("sqlite"):
        connect_args = {"timeout": TIMEOUT_SECONDS}
    else:
        connect_args = {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _spilled_row(line: dict) -> dict:
    row = {key: value for key, value in line.items() if key != "unwritten_because"}
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class FeedbackError(ValueError):
    """Feedback the log cannot take: unknown request, or no rating / rewrite / choice."""


class RequestLog:
    def __init__(
        self,
        url: str | None = None,
        *,
        retry_seconds: float = 0.5,
        spill_after_seconds: float = 1.0,
        batch_size: int = 256,
        spill_dir: Path = DEFAULT_SPILL_DIR,
    ):
        self.url = database_url(url)
        self.spill_dir = spill_dir
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._engine = _create_engine(self.url)
            metadata.create_all(self._engine)
        except (SQLAlchemyError, ImportError) as error:
            raise FlywheelError(
                f"request log {self._safe_url()}: cannot open it ({error}); set "
                f"{URL_VARIABLE} to a reachable SQLAlchemy URL"
            ) from None
        self._queue: queue.Queue = queue.Queue()
        self._retry_seconds = retry_seconds
        self._spill_after = spill_after_seconds
        self._batch_size = batch_size
        self._closing = threading.Event()
        self._failing_since: float | None = None  # when the current outage began
        self._last_attempt = 0.0
        self._last_error: Exception | None = None
        self._spilled: list[Path] = []  # this log's spill files not yet written back
        self.written = 0
        self.failed_writes = 0
        self.spilled_rows = 0
        self._writer = threading.Thread(target=self._write_loop, name="request-log", daemon=True)
        self._writer.start()

    def _safe_url(self) -> str:
        """The URL without its password, for messages."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # an unparsable URL: say so rather than echo it
            return "(unparsable URL)"

    # -- writing requests (never blocks the caller) ----------------------------------------------

    def log_request(
        self,
        *,
        endpoint: str,
        messages: list[dict],
        response: str | None,
        status: int,
        model_version: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        latency_ms: float | None = None,
        api_key: str | None = None,
        error: str | None = None,
        request_id: str | None = None,
    ) -> str:
        row = {
            "id": request_id or f"req-{uuid.uuid4().hex}",
            "created_at": _now(),
            "model_version": model_version,
            "endpoint": endpoint,
            "messages": [{**m, "content": _redact(m.get("content", ""))} for m in messages],
            "response": _redact(response),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": latency_ms,
            "status": status,
            "api_key": api_key,
            "error": error,
        }
        self._queue.put(row)
        return row["id"]

    def _write_loop(self) -> None:
        """Take what is queued, up to a batch; write it; then wake anyone waiting on a flush
        marker that was queued with it. None stops the loop."""
        stopping = False
        while not stopping:
            rows, markers = [], []
            item = self._queue.get()
            while True:
                if item is None:
                    stopping = True
                    break
                (markers if isinstance(item, threading.Event) else rows).append(item)
                if len(rows) >= self._batch_size:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if rows:
                self._write(rows)
            for marker in markers:
                marker.set()

    def _write(self, rows: list[dict]) -> None:
        """Insert a batch; while the database fails, retry, and once it has failed longer than
        spill_after_seconds (or the log is closing), spill the batch to a file instead."""
        while True:
            if self._in_long_outage() and time.monotonic() - self._last_attempt < self._retry_seconds:
                self._spill(rows, self._last_error)  # tried moments ago: do not wait on it again
                return
            first_failure = self._failing_since is None
            error = self._try_insert(rows)
            if error is not None and first_failure:
                error = self._try_insert(rows)  # at once, with the tables re-created
            if error is None:
                return
            if self._closing.is_set() or self._in_long_outage():
                self._spill(rows, error)
                return
            time.sleep(self._retry_seconds)

    def _in_long_outage(self) -> bool:
        return self._failing_since is not None and time.monotonic() - self._failing_since >= self._spill_after

    def _try_insert(self, rows: list[dict]) -> SQLAlchemyError | None:
        self._last_attempt = time.monotonic()
        try:
            with self._engine.begin() as connection:
                if self._failing_since is not None:  # the database may have come back empty
                    metadata.create_all(connection)
                connection.execute(insert(requests_table), rows)
        except SQLAlchemyError as error:
            self.failed_writes += 1
            self._failing_since = self._failing_since or time.monotonic()
            self._last_error = error
            return error
        self.written += len(rows)
        if self._failing_since is not None:
            self._failing_since = None
            self._replay_own_spills()
        return None

    def _spill(self, rows: list[dict], error: Exception) -> None:
        target = self.spill_dir / f"unwritten-requests-{time.time_ns()}.jsonl"
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                for row in rows:
                    handle.write(json.dumps({**row, "unwritten_because": str(error)}, default=str) + "\n")
        self._spilled.append(target)
        self.spilled_rows += len(rows)
        print(
            f"request log: {len(rows)} requests could not be written to {self._safe_url()} ({error}); kept in {target}",
            flush=True,
        )

    def _replay_own_spills(self) -> None:
        """The database is back: write back what this log spilled during the outage."""
        try:
            counts = self.replay(self._spilled)
        except (SQLAlchemyError, OSError, ValueError) as error:  # kept for `flywheel request-log replay`
            print(f"request log: spilled requests stay in {self.spill_dir} ({error})", flush=True)
            return
        self._spilled = []
        if counts["rows"]:
            print(f"request log: the database is back; wrote {counts['rows']} spilled requests", flush=True)

    def replay(self, files: list[Path] | None = None) -> dict:
        """Write spilled requests into the database (by default every spill file in spill_dir),
        skipping those already there; each file is removed once its rows are in.
        Returns {files, rows (written), already_there}."""
        counts = {"files": 0, "rows": 0, "already_there": 0}
        for path in sorted(self.spill_dir.glob(SPILL_FILES)) if files is None else files:
            rows = [_spilled_row(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
            with self._engine.begin() as connection:
                metadata.create_all(connection)
                ids = requests_table.c.id.in_([row["id"] for row in rows])
                present = set(connection.execute(select(requests_table.c.id).where(ids)).scalars())
                missing = [row for row in rows if row["id"] not in present]
                if missing:
                    connection.execute(insert(requests_table), missing)
            path.unlink()
            counts["files"] += 1
            counts["rows"] += len(missing)
            counts["already_there"] += len(present)
        return counts

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every request logged so far is written (or spilled); False on timeout."""
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def close(self) -> None:
        """Write everything still queued, then stop the writer (graceful shutdown)."""
        self._closing.set()
        self._queue.put(None)
        self._writer.join()
        self._engine.dispose()

    # -- feedback (a separate endpoint: may wait for the request to be written) -----------------

    def log_feedback(
        self,
        request_id: str,
        *,
        rating: str | None = None,
        preferred_response: str | None = None,
        alternative: str | None = None,
        preferred: str | None = None,
    ) -> int:
        if rating is None and preferred_response is None and alternative is None:
            raise FeedbackError(
                "feedback needs a rating ('up' or 'down'), a preferred_response, "
                "or an alternative and which one is preferred"
            )
        if rating is not None and rating not in RATINGS:
            raise FeedbackError(f"rating must be 'up' or 'down', got {rating!r}")
        if (alternative is None) != (preferred is None) or (preferred is not None and preferred not in PREFERRED):
            raise FeedbackError("a choice needs `alternative` text and `preferred`: 'response' or 'alternative'")
        self.flush()  # the request may still be in the writer's queue
        if self.get_request(request_id) is None:
            raise FeedbackError(f"no logged request {request_id!r}")
        with self._engine.begin() as connection:
            result = connection.execute(
                insert(feedback_table).values(
                    request_id=request_id,
                    created_at=_now(),
                    rating=rating,
                    preferred_response=_redact(preferred_response),
                    alternative=_redact(alternative),
                    preferred=preferred,
                )
            )
            return result.inserted_primary_key[0]

    # -- reading ----------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> dict | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(requests_table).where(requests_table.c.id == request_id)).mappings().first()
        return dict(row) if row is not None else None

    def count_requests(self) -> int:
        with self._engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(requests_table)).scalar_one()

    def requests_between(self, start: datetime, end: datetime) -> list[dict]:
        """Logged requests with start <= created_at < end, oldest first (canaries included: their
        endpoint starts with flywheel.serving.auth.CANARY_PREFIX)."""
        query = (
            select(requests_table)
            .where(requests_table.c.created_at >= start, requests_table.c.created_at < end)
            .order_by(requests_table.c.created_at)
        )
        with self._engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def feedback_between(self, start: datetime, end: datetime) -> list[dict]:
        query = select(feedback_table).where(feedback_table.c.created_at >= start, feedback_table.c.created_at < end)
        with self._engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def export_feedback(self, target: Path, since: datetime | None = None) -> int:
        """Feedback joined with its request, one JSON line each, in the preferences stage's format
        (only feedback given at or after `since`, when set)."""
        query = (
            select(feedback_table, requests_table.c.messages, requests_table.c.response, requests_table.c.model_version)
            .join(requests_table, feedback_table.c.request_id == requests_table.c.id)
            .order_by(feedback_table.c.id)
        )
        if since is not None:
            query = query.where(feedback_table.c.created_at >= since)
        with self._engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                for row in rows:
                    handle.write(json.dumps(_export_line(row), ensure_ascii=False) + "\n")
        return len(rows)


def _export_line(row) -> dict:
    line = {
        "request_id": row["request_id"],
        "created_at": row["created_at"].isoformat(),
        "model_version": row["model_version"],
        "messages": row["messages"],
        "response": row["response"],
    }
    if row["preferred_response"] is not None:
        line["preferred_response"] = row["preferred_response"]
    elif row["alternative"] is not None:
        line.update(alternative=row["alternative"], preferred=row["preferred"])
    else:
        line["rating"] = row["rating"]
    return line
