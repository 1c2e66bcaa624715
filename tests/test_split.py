import random
from collections import Counter

from flywheel import paths
from flywheel.data import split
from tests.helpers import read_rows, record, repo_params, write_records


def distinct_records(count: int) -> list[dict]:
    rng = random.Random(0)
    vocab = [f"word{n}" for n in range(5000)]
    return [record("Question: " + " ".join(rng.choices(vocab, k=30)), f"Answer number {n}") for n in range(count)]


def run_split(tmp_path, records, **overrides):
    write_records(tmp_path / paths.CLEAN_RECORDS, records)
    metrics = split.run(repo_params(split=overrides), root=tmp_path)
    rows = {name: read_rows(tmp_path / path) for name, path in paths.SPLITS.items()}
    dropped = read_rows(tmp_path / paths.DECONTAMINATED)
    assert metrics["in"] == sum(len(r) for r in rows.values()) + len(dropped)
    return metrics, rows, dropped


def test_split_is_deterministic_by_id_and_near_the_fractions(tmp_path):
    params = repo_params()
    ids = [f"id{n}" for n in range(20_000)]
    shares = Counter(split.assign(i, params.split) for i in ids)
    assert abs(shares["train"] / 20_000 - 0.8) < 0.02
    assert abs(shares["test"] / 20_000 - 0.1) < 0.02
    assert [split.assign(i, params.split) for i in ids[:100]] == [split.assign(i, params.split) for i in ids[:100]]
    other_salt = repo_params(split={"salt": "other"}).split
    assert [split.assign(i, params.split) for i in ids[:100]] != [split.assign(i, other_salt) for i in ids[:100]]


def test_decontamination_removes_train_copies_of_held_out_records(tmp_path):
    params = repo_params()
    base = distinct_records(400)
    held_out = [r for r in base if split.assign(r["id"], params.split) != "train"][:10]
    leaks = []
    for n, original in enumerate(held_out[:5]):  # same prompt, other answer: exact leak
        leaks.append(record(original["prompt"], f"A different answer {n}"))
    for original in held_out[5:]:  # a lightly edited copy: near leak
        leaks.append(record(original["prompt"] + " please", original["response"]))
    leaks = [r for r in leaks if split.assign(r["id"], params.split) == "train"]
    assert leaks, "the seeded leaks should include some that land in train"

    metrics, rows, dropped = run_split(tmp_path, base + leaks)
    assert {row["id"] for row in dropped} == {r["id"] for r in leaks}
    assert metrics["decontaminated"] == len(leaks)
    assert {row["reason"] for row in dropped} <= {"exact_contamination", "near_contamination"}
    train_ids = {row["id"] for row in rows["train"]}
    assert not train_ids & {r["id"] for r in leaks}
    held_ids = {row["id"] for name in ("eval", "test") for row in rows[name]}
    assert {row["matches"] for row in dropped} <= held_ids


def test_decontamination_can_be_switched_off(tmp_path):
    base = distinct_records(50)
    copy = record(base[0]["prompt"], "another answer")
    metrics, _, dropped = run_split(tmp_path, base + [copy], decontaminate_exact=False, decontaminate_near=False)
    assert metrics["decontaminated"] == 0 and dropped == []


def test_empty_input(tmp_path):
    metrics, rows, dropped = run_split(tmp_path, [])
    assert metrics["train"] == metrics["eval"] == metrics["test"] == 0
