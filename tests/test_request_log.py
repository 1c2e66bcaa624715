"""The serving request log against real stores: a SQLite file and the PostgreSQL server on
127.0.0.1:5432 (trust auth), in a database created for the test."""

import json
import threading

import pytest

from flywheel.errors import FlywheelError
from flywheel.serving.request_log import FeedbackError, RequestLog
from flywheel.training.preferences import parse_feedback
from tests.conftest import BIN, postgres_database, run


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


def test_requests_that_cannot_be_written_are_kept_in_a_file_not_dropped(tmp_path):
    from sqlalchemy import text

    log = RequestLog(f"sqlite:///{tmp_path / 'requests.sqlite'}", retry_seconds=0.01, spill_dir=tmp_path / "spill")
    with log._engine.begin() as connection:  # the store breaks under the running server
        connection.execute(text("DROP TABLE flywheel_feedback"))
        connection.execute(text("DROP TABLE flywheel_requests"))
    log.log_request(endpoint="/v1/completions", messages=_chat("red cat"), response="rouge chat", status=200)
    log.close()
    [spilled] = (tmp_path / "spill").glob("unwritten-requests-*.jsonl")
    row = json.loads(spilled.read_text())
    assert row["response"] == "rouge chat" and "no such table" in row["unwritten_because"]
    assert log.failed_writes >= 1
