"""Files: atomic writes (beside the target, then renamed, so a killed stage never leaves a
half-written output that DVC would cache) and Parquet read and written a batch at a time.

pyarrow is imported where Parquet is used: the light modules that write JSON or YAML through
here (config, the Airflow DAG files' imports) stay light."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _mode_for(target: Path) -> int:
    """The file's current permissions, or what a plain open() would give a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it over `target`.

    On any exception the temporary file is removed and `target` is left as it was. The result
    keeps the target's permissions (mkstemp's 0600 would make e.g. params.yaml private).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            tmp.chmod(_mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success swap it in for `target` (a model
    directory is never half-written). On any exception it is removed and `target` left as it was."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def write_json(target: str | os.PathLike, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


class ParquetChunkWriter:
    """Buffers rows column-wise and writes a row group every `chunk_size` rows: memory stays bounded."""

    def __init__(self, path: Path, schema: pa.Schema, chunk_size: int = 10_000):
        import pyarrow.parquet as pq

        self._schema = schema
        self._chunk_size = chunk_size
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.rows = 0
        self._buffered = 0

    def add(self, row: dict) -> None:
        for name, column in self._columns.items():
            column.append(row[name])
        self.rows += 1
        self._buffered += 1
        if self._buffered >= self._chunk_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        self._writer.write_table(pa.table(self._columns, schema=self._schema))
        for column in self._columns.values():
            column.clear()
        self._buffered = 0

    def close(self) -> None:
        if self._buffered or self.rows == 0:
            self._flush()  # an empty output still carries the schema
        self._writer.close()


def read_batches(path: str | os.PathLike, batch_size: int = 10_000) -> Iterator[list[dict]]:
    """Rows of a Parquet file as dicts, a batch at a time (memory stays bounded)."""
    for batch in read_arrow_batches(path, batch_size):
        yield batch.to_pylist()


def read_arrow_batches(path: str | os.PathLike, batch_size: int = 10_000) -> Iterator[pa.RecordBatch]:
    """A Parquet file a batch at a time, as Arrow: what a Ray task is sent (it serialises without
    a Python object per value, and the task, not the driver, makes the dicts)."""
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every row of a Parquet file, as dicts (for the splits and pairs a stage holds in memory)."""
    return [row for batch in read_batches(path) for row in batch]


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, holder: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs, or fail at
    once if another process holds it. The kernel releases it when the holder dies, however it
    dies, so a killed run never leaves a stale lock."""
    import fcntl

    from flywheel.errors import FlywheelError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FlywheelError(
                f"{holder} is already running here ({handle.read().strip() or 'pid unknown'}; lock {path}): "
                "wait for it to finish, or stop it first"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `path` among this host's processes (the lock file stays, empty). Not
    re-entrant: a process that holds it and asks again waits for ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
