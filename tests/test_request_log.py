"""The serving request log against real stores: a SQLite file and the PostgreSQL server on
127.0.0.1:5432 (trust auth), in a database created for the test."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from flywheel.errors import FlywheelError
from flywheel.serving.request_log import FeedbackError, RequestLog
from flywheel.training.preferences import parse_feedback
from tests.conftest import BIN, free_port, postgres_database, run


@pytest.fixture
def postgres_url():
    with postgres_database("flywheel_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def request_log(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'requests.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    log = RequestLog(url)
    yield log
    log.close()


def _chat(text):
    return [{"role": "system", "content": "You translate."}, {"role": "user", "content": text}]


def test_requests_are_stored_redacted_and_counted(request_log):
    request_id = request_log.log_request(
        endpoint="/v1/chat/completions",
        messages=_chat("Mail bob@example.com: red cat"),
        response="rouge chat, call +44 20 7946 0018",
        status=200,
        model_version="v0.0.1",
        prompt_tokens=12,
        completion_tokens=3,
        latency_ms=4.5,
        api_key="k-1a2b",
    )
    assert request_log.flush()
    stored = request_log.get_request(request_id)
    assert stored["messages"][1]["content"] == "Mail [EMAIL]: red cat"
    assert stored["response"] == "rouge chat, call [PHONE]"
    assert (stored["status"], stored["model_version"], stored["completion_tokens"]) == (200, "v0.0.1", 3)
    assert request_log.count_requests() == 1


def test_many_concurrent_writers_lose_nothing_and_close_drains_the_queue(request_log):
    def client(worker):
        for index in range(100):
            request_log.log_request(
                endpoint="/v1/completions", messages=_chat(f"{worker}-{index}"), response="ok", status=200
            )

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    request_log.close()  # no flush first: closing must write what is queued
    reopened = RequestLog(request_log.url)
    try:
        assert reopened.count_requests() == 800
    finally:
        reopened.close()


def test_feedback_is_checked_and_exported_in_the_format_preferences_reads(request_log, tmp_path):
    asked = request_log.log_request(
        endpoint="/v1/chat/completions",
        messages=_chat("red cat"),
        response="rouge chien",
        status=200,
        model_version="v0.0.1",
    )
    request_log.log_feedback(asked, rating="down")
    request_log.log_feedback(asked, preferred_response="rouge chat")
    request_log.log_feedback(asked, alternative="rouge chat", preferred="alternative")
    for bad, message in [
        ({"rating": "meh"}, "rating must be"),
        ({}, "needs a rating"),
        ({"alternative": "x"}, "a choice needs"),
    ]:
        with pytest.raises(FeedbackError, match=message):
            request_log.log_feedback(asked, **bad)
    with pytest.raises(FeedbackError, match="no logged request"):
        request_log.log_feedback("req-unknown", rating="up")

    exported = tmp_path / "feedback.jsonl"
    assert request_log.export_feedback(exported) == 3
    kinds = []
    for line in exported.read_text().splitlines():
        fields, kind = parse_feedback(json.loads(line))  # the preferences stage's own parser
        assert fields["prompt"] == "red cat" and fields["response"] == "rouge chien"
        assert fields["request_id"] == asked and fields["model_version"] == "v0.0.1"
        kinds.append(kind)
    assert kinds == ["rating", "rewrite", "choice"]

    # The same export from the command line, as a user runs it before `dvc repro preferences`.
    request_log.flush()
    result = run(
        [str(BIN / "flywheel"), "export-feedback", "--db", request_log.url, "--out", str(tmp_path / "cli.jsonl")],
        tmp_path,
    )
    assert "wrote 3 feedback events" in result.stdout
    assert (tmp_path / "cli.jsonl").read_text() == exported.read_text()


def test_an_unreachable_database_is_one_clear_message_without_the_password():
    with pytest.raises(FlywheelError, match="FLYWHEEL_REQUEST_LOG_URL") as raised:
        RequestLog("postgresql+psycopg://postgres:secret@127.0.0.1:1/none")
    assert "secret" not in str(raised.value)


def test_a_store_that_comes_back_empty_gets_its_tables_again_and_nothing_is_spilled(tmp_path):
    from sqlalchemy import text

    log = RequestLog(f"sqlite:///{tmp_path / 'requests.sqlite'}", retry_seconds=0.01, spill_dir=tmp_path / "spill")
    with log._engine.begin() as connection:  # the store is recreated empty under the running server
        connection.execute(text("DROP TABLE flywheel_feedback"))
        connection.execute(text("DROP TABLE flywheel_requests"))
    request_id = log.log_request(
        endpoint="/v1/completions", messages=_chat("red cat"), response="rouge chat", status=200
    )
    log.close()
    assert log.failed_writes == 1 and log.written == 1
    assert RequestLog(log.url).get_request(request_id)["response"] == "rouge chat"
    assert not list((tmp_path / "spill").glob("*"))


CHILD = """
import sys, time
from pathlib import Path
from flywheel.serving.request_log import RequestLog
log = RequestLog(sys.argv[1], spill_dir=Path(sys.argv[2]))  # spills after 1 s of failing writes
for number in range(100_000):
    log.log_request(endpoint="/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                    response="salut", status=200, request_id=f"req-{number}")
    print(number, flush=True)
    time.sleep(0.02)
"""


class Proxy:
    """A TCP proxy to PostgreSQL that can drop every connection and refuse new ones (an outage)."""

    def __init__(self, target_port: int):
        self.target, self.port, self._sockets = target_port, free_port(), []

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone would not
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self._sockets = []


def _count_rows(url: str) -> int:
    log = RequestLog(url)
    try:
        return log.count_requests()
    finally:
        log.close()


@pytest.mark.postgres
def test_a_crash_during_a_database_outage_loses_only_the_last_batch_and_replay_writes_the_rest(postgres_url, tmp_path):
    proxy = Proxy(5432)
    proxy.start()
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(tmp_path / "spill")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = iter(child.stdout.readline, "")
    logged, outage = 0, False
    for line in lines:  # 2 s of requests written normally, then the database goes away
        # A warning from the writer thread can share a line with a count: take the count it
        # starts with, and act at a threshold, not at one exact count that may be missed.
        digits = re.match(r"\d+", line)
        if digits:
            logged = int(digits.group()) + 1
        if logged >= 100 and not outage:
            proxy.stop()
            outage = True
        if logged >= 300:  # 4 s into the outage (spilling starts after 1 s): the server dies
            child.kill()
            break
    child.wait()
    spilled = sum(len(p.read_text().splitlines()) for p in (tmp_path / "spill").glob("unwritten-requests-*.jsonl"))
    proxy.start()
    written = _count_rows(url)
    # Lost: what arrived since the last batch was spilled (a few at 50 requests/s), never the
    # outage's 200 (all of which were lost before: they waited in memory for the database).
    assert logged - 15 <= written + spilled <= logged, (logged, written, spilled)
    assert written <= 110 and spilled >= 180, (written, spilled)  # the outage really was one
    replayed = run(
        [str(BIN / "flywheel"), "request-log", "replay", "--db", url, "--dir", str(tmp_path / "spill")], tmp_path
    )
    assert f"{spilled:,} requests written" in replayed.stdout
    assert _count_rows(url) == written + spilled
    assert not list((tmp_path / "spill").glob("*"))
    proxy.stop()


@pytest.mark.postgres
def test_a_locked_table_cannot_hold_a_drain_for_long(postgres_url, tmp_path):
    import psycopg

    from flywheel.serving.request_log import TIMEOUT_SECONDS

    log = RequestLog(postgres_url, spill_dir=tmp_path / "spill")
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as locker:  # another session holds the table for longer than a drain may take
        locker.execute("LOCK TABLE flywheel_requests IN ACCESS EXCLUSIVE MODE")
        log.log_request(endpoint="/v1/completions", messages=_chat("red cat"), response="rouge chat", status=200)
        started = time.monotonic()
        log.close()  # SIGTERM's drain: it used to wait for the lock as long as it was held
        drained = time.monotonic() - started
    assert drained < 3 * TIMEOUT_SECONDS, drained
    assert log.spilled_rows == 1 and log.written == 0
