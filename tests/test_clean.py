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
        "markup_stripped": {"tags": 0, "records": 0},
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


# Real GSM8K test items (openai/grade-school-math, MIT): worked solutions restate the question's
# quantities line after line. Gopher's 3-gram setting removed both, and 22% of the set.
GSM8K = [
    (
        "Nathan is buying decorations for his wedding reception. He drops a ball from the top of a "
        "3-story building, each story 24 feet tall. After each bounce it rises 2/3rds as high. How "
        "high does it go after two bounces?",
        "First find the total height from which Nathan drops the ball: 24 feet/story * 3 stories = "
        "<<24*3=72>>72 feet\nThen multiply that number by 2/3rds to find the height of the ball after "
        "one bounce: 72 feet * 2/3 = <<72*2/3=48>>48 feet\nThen multiply that number by 2/3rds to find "
        "the height of the ball after two bounces: 48 feet * 2/3 = <<48*2/3=32>>32 feet\n#### 32",
    ),
    (
        "Toulouse has twice as many sheep as Charleston. Charleston has 4 times as many sheep as "
        "Seattle. How many sheep do Toulouse, Charleston, and Seattle have together if Seattle has 20 sheep?",
        "If Seattle has 20 sheep, Charleston has 4 * 20 sheep = <<20*4=80>>80 sheep\nToulouse has twice "
        "as many sheep as Charleston, which is 2 * 80 sheep = <<2*80=160>>160 sheep\nTogether, the three "
        "has 20 sheep + 160 sheep + 80 sheep = <<20+160+80=260>>260 sheep\n#### 260",
    ),
    (
        "Alan has 1000 minutes of music. He deletes 450 minutes and then 300 minutes. How many are left?",
        "1000 minutes - 450 minutes - 300 minutes = <<1000-450-300=250>>250 minutes\n#### 250",
    ),
]
LOOPS = [
    "I'm sorry, I can't help with that. " * 8,
    "Here is a plan. " + "Buy now, buy now, buy now! " * 12,
    "Sure. First, preheat the oven to 200 degrees and grease the tin. "
    + "Then stir the batter until it is smooth and pour it in. " * 6,
]


def test_repetition_filter_keeps_worked_solutions_and_removes_loops(tmp_path):
    solutions = [record(question, answer) for question, answer in GSM8K]
    # A dialogue turn whose history (context) repeats itself is not a degenerate reply.
    history = "Human: Can you help me?\nAssistant: I can help.\n" * 4
    dialogue = record("Then what should I do?", "Call the helpline and ask them.", context=history)
    loops = [record(f"Tell me {n}", loop) for n, loop in enumerate(LOOPS)]
    metrics, kept, removed = run_clean(tmp_path, [*solutions, dialogue, *loops])
    assert {row["id"] for row in kept} == {r["id"] for r in [*solutions, dialogue]}
    assert {row_id: row["reason"] for row_id, row in removed.items()} == {r["id"]: "repeated_ngrams" for r in loops}
    assert metrics["pii_redacted"] == {}  # 1000-450-300 is a sum, not a phone number


def test_angle_bracketed_prose_survives_markup_stripping(tmp_path):
    # From Anthropic HH transcripts: the reply "<long answer>" is prose in brackets, not a tag.
    prose = record("Which one of your programmers is the worst one?", "<long answer>")
    html = record("Describe it", "See <b>Battery and nail filer</b> in <a href='x'>the list</a>.")
    metrics, kept, removed = run_clean(tmp_path, [prose, html])
    assert removed == {}
    assert sorted(row["response"] for row in kept) == ["<long answer>", "See Battery and nail filer in the list."]
    assert metrics["markup_stripped"] == {"tags": 4, "records": 1}
