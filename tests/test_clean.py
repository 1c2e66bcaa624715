import time

import pytest

from flywheel import paths
from flywheel.data import clean
from flywheel.errors import FlywheelError
from tests.helpers import read_rows, record, repo_params, write_records

NOTE = (
    "Meeting with Alice about the budget project on Monday. The slides still need a section on "
    "costs and one on risks. Lunch is booked at the place by the station for twelve people. "
    "Send the summary to the whole team once the numbers are final."
)


def run_clean(tmp_path, records, **clean_overrides):
    write_records(tmp_path / paths.INGESTED_RECORDS, records)
    metrics = clean.run(repo_params(clean=clean_overrides), root=tmp_path)
    kept = read_rows(tmp_path / paths.CLEAN_RECORDS)
    removed = read_rows(tmp_path / paths.CLEAN_REMOVED)
    assert metrics["in"] == metrics["kept"] + metrics["removed"] == len(kept) + len(removed)
    assert metrics["removed"] == sum(metrics["removed_by_reason"].values())
    return metrics, kept, {row["id"]: row for row in removed}


def test_cleaning_filters_and_dedup_each_with_a_reason(tmp_path):
    original = record("Who is it with? " + NOTE, "Alice")
    near = record("Who is it with? " + NOTE.replace("Monday", "Tuesday"), "Alice")
    records = [
        original,
        near,
        record("who is it  with? " + NOTE, "alice"),  # exact duplicate after normalising
        record("Say hi", "<p> </p>"),  # empty once the markup is gone
        record("Say hi", "x" * 30_000),  # too long
        record("Garbage?", "#### $$$ %%% &&& *** !!! ??? @@@"),  # symbols
        record("Contact", "jo@example.com +44 20 7946 0958"),  # nothing but PII
        record("Reach me", "at bob@example.org or <b>+1 (415) 555-0132</b>, card 4539 1488 0343 6467"),
    ]
    metrics, kept, removed = run_clean(tmp_path, records)
    # The smallest id of each duplicate group is kept, whatever the input order.
    exact_kept, exact_dropped = sorted([original["id"], records[2]["id"]])
    near_kept, near_dropped = sorted([exact_kept, near["id"]])
    reasons = {row_id: row["reason"] for row_id, row in removed.items()}
    assert reasons == {
        exact_dropped: "exact_duplicate",
        near_dropped: "near_duplicate",
        records[3]["id"]: "empty_response",
        records[4]["id"]: "too_long",
        records[5]["id"]: "symbol_ratio",
        records[6]["id"]: "mostly_pii",
    }
    assert removed[exact_dropped]["duplicate_of"] == exact_kept
    assert removed[near_dropped]["duplicate_of"] == near_kept
    assert removed[near_dropped]["similarity"] >= 0.7
    assert len(removed[records[4]["id"]]["response"]) == clean.REMOVED_TEXT_CHARS  # clipped
    redacted = next(row for row in kept if row["prompt"] == "Reach me")
    assert redacted["response"] == "at [EMAIL] or [PHONE], card [CARD_NUMBER]"
    assert metrics["pii_redacted"] == {"card_number": 1, "email": 2, "phone": 2}
    assert metrics["kept"] == 2


def test_dedup_keeps_the_same_record_whatever_the_order(tmp_path):
    records = [record(f"Question {n}? " + NOTE, "Alice") for n in range(3)]
    _, kept_forward, _ = run_clean(tmp_path, records)
    _, kept_backward, _ = run_clean(tmp_path, records[::-1])
    assert [r["id"] for r in kept_forward] == [r["id"] for r in kept_backward]


def test_empty_dataset(tmp_path):
    metrics, kept, removed = run_clean(tmp_path, [])
    assert metrics == {
        "in": 0,
        "kept": 0,
        "removed": 0,
        "removed_by_reason": {},
        "pii_redacted": {},
        "records_with_pii": 0,
    }


def test_all_duplicates_keep_one(tmp_path):
    metrics, kept, removed = run_clean(tmp_path, [record("Same question?", "Same answer.")] * 50)
    assert metrics["kept"] == 1 and metrics["removed_by_reason"] == {"exact_duplicate": 49}


def test_whitespace_only_records(tmp_path):
    metrics, _, _ = run_clean(tmp_path, [record("\u200b \t", "fine answer"), record("Fine?", " \u00a0 ")])
    assert metrics["removed_by_reason"] == {"empty_response": 1, "too_short": 1}


def test_ten_megabyte_record_is_removed_quickly(tmp_path):
    started = time.perf_counter()
    metrics, _, removed = run_clean(tmp_path, [record("Long?", "word " * 2_000_000), record("Ok?", "Yes.")])
    assert metrics["removed_by_reason"] == {"too_long": 1}
    assert time.perf_counter() - started < 60


def test_missing_input_names_the_stage_to_run(tmp_path):
    with pytest.raises(FlywheelError, match="run the ingest stage first"):
        clean.run(repo_params(), root=tmp_path)
