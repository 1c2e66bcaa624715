import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import paths
from flywheel.config import parse_params
from flywheel.data import ingest
from flywheel.errors import FlywheelError


def make_params(*sources: dict, chunk_size: int = 2, **ingest_options):
    return parse_params({"ingest": {"sources": list(sources), "chunk_size": chunk_size, **ingest_options}})


def write(root: Path, relative: str, data: bytes | str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if relative.endswith(".gz") else raw)


def jsonl(*items) -> str:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def outputs(root: Path):
    records = pq.read_table(root / paths.INGESTED_RECORDS).to_pylist()
    preferences = pq.read_table(root / paths.INGESTED_PREFERENCES).to_pylist()
    quarantine = [json.loads(line) for line in (root / paths.QUARANTINE).read_text().splitlines()]
    return records, preferences, quarantine


def assert_counts_add_up(metrics: dict) -> None:
    assert metrics["read"] == metrics["records"] + metrics["preferences"] + metrics["quarantined"]
    assert metrics["quarantined"] == sum(metrics["quarantine_reasons"].values())
    for source in metrics["sources"].values():
        assert source["read"] == source["records"] + source["preferences"] + source["quarantined"]


QA = {
    "name": "qa",
    "path": "data/raw/qa.jsonl",
    "kind": "pair",
    "fields": {"prompt": "q", "response": "a"},
    "license": "MIT",
}


def test_jsonl_pairs_with_every_kind_of_bad_line(tmp_path):
    write(
        tmp_path,
        "data/raw/qa.jsonl",
        jsonl(
            {"q": "What is 2+2?", "a": "4", "topic": "maths"},
            {"q": "Capital of France?", "a": "Paris"},
            "",  # a blank line is not an item
            '{"q": "truncated", "a": ',
            {"q": "no answer"},
            {"q": "empty answer", "a": "   "},
            {"q": "number answer", "a": 4},
            ["not", "an", "object"],
        ).encode()
        + b'{"q": "\xff\xfe", "a": "bytes"}\n',
    )
    # Three quarters of this file is bad on purpose: above the default share that fails ingest.
    metrics = ingest.run(make_params(QA, max_quarantine_share=1.0), root=tmp_path)
    records, preferences, quarantine = outputs(tmp_path)

    assert [r["prompt"] for r in records] == ["What is 2+2?", "Capital of France?"]
    assert records[0]["license"] == "MIT" and records[0]["source"] == "qa"
    assert json.loads(records[0]["metadata"]) == {"file": "data/raw/qa.jsonl", "line": 1, "extra": {"topic": "maths"}}
    assert preferences == []
    assert [(q["line"], q["reason"]) for q in quarantine] == [
        (4, "malformed_json"),
        (5, "missing_field:response"),
        (6, "empty_field:response"),
        (7, "wrong_type:response"),
        (8, "not_an_object"),
        (9, "undecodable_bytes"),
    ]
    assert all(q["file"] == "data/raw/qa.jsonl" and q["detail"] for q in quarantine)
    assert metrics["read"] == 8 and metrics["records"] == 2 and metrics["quarantined"] == 6
    assert_counts_add_up(metrics)


def test_ids_are_content_derived_and_stable(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"q": "hi", "a": "hello"}, {"q": "hi", "a": "hey"}))
    write(tmp_path, "data/raw/b.jsonl", jsonl({"q": "hi", "a": "hello"}))
    source = {**QA, "path": "data/raw/*.jsonl"}
    ingest.run(make_params(source), root=tmp_path)
    first = [r["id"] for r in outputs(tmp_path)[0]]
    ingest.run(make_params(source), root=tmp_path)
    assert [r["id"] for r in outputs(tmp_path)[0]] == first
    assert first[0] == first[2] != first[1]  # same content in two files: same id


def test_csv_instruction_input_output_and_gzip(tmp_path):
    lines = [
        "instruction,input,output",
        "Translate,cat,chat",
        "Translate,,chien",
        "Translate,dog",
        '"unterminated,quote',
    ]
    write(tmp_path, "data/raw/i.csv.gz", "\n".join(lines) + "\n")
    source = {
        "name": "inst",
        "path": "data/raw/i.csv.gz",
        "kind": "pair",
        "fields": {"prompt": "instruction", "context": "input", "response": "output"},
    }
    metrics = ingest.run(make_params(source), root=tmp_path)
    records, _, quarantine = outputs(tmp_path)
    assert [(r["prompt"], r["context"], r["response"]) for r in records] == [
        ("Translate", "cat", "chat"),
        ("Translate", None, "chien"),
    ]
    assert [q["reason"] for q in quarantine] == ["csv_wrong_field_count", "csv_wrong_field_count"]
    assert_counts_add_up(metrics)


def test_json_array_of_messages_with_history(tmp_path):
    chats = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"conversations": "ignored", "messages": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
    ]
    text = json.dumps(chats, indent=2)
    element_lines = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    write(tmp_path, "data/raw/c.json", text)
    source = {"name": "chats", "path": "data/raw/c.json", "kind": "messages"}
    metrics = ingest.run(make_params(source), root=tmp_path)
    records, _, quarantine = outputs(tmp_path)
    first = records[0]
    assert (first["system"], first["prompt"], first["response"]) == ("Be brief.", "2+2?", "4")
    assert json.loads(first["metadata"])["history"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert (records[1]["prompt"], records[1]["response"]) == ("Yo", "Hey")
    assert [q["reason"] for q in quarantine] == ["bad_conversation", "bad_messages"]
    assert [q["line"] for q in quarantine] == element_lines[2:]  # where each element starts
    assert_counts_add_up(metrics)


def test_truncated_json_array_is_quarantined_not_crashed(tmp_path):
    write(tmp_path, "data/raw/c.json", '[{"q": "a", "a": "b"}, {"q": "c", "a": ')
    metrics = ingest.run(make_params({**QA, "path": "data/raw/c.json"}), root=tmp_path)
    records, _, quarantine = outputs(tmp_path)
    assert len(records) == 1 and quarantine[0]["reason"] == "malformed_json"
    assert_counts_add_up(metrics)


def test_transcripts_and_preference_transcripts(tmp_path):
    write(
        tmp_path,
        "data/raw/t.jsonl",
        jsonl(
            {"text": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a colour\n\nAssistant: Red"},
            {"text": "no turns here"},
        ),
    )
    write(
        tmp_path,
        "data/raw/p.jsonl.gz",
        jsonl(
            {
                "chosen": "\n\nHuman: Help me\n\nAssistant: Sure, here is how.",
                "rejected": "\n\nHuman: Help me\n\nAssistant: No.",
            },
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        ),
    )
    sources = (
        {"name": "t", "path": "data/raw/t.jsonl", "kind": "transcript"},
        {"name": "p", "path": "data/raw/p.jsonl.gz", "kind": "preference"},
    )
    metrics = ingest.run(make_params(*sources), root=tmp_path)
    records, preferences, quarantine = outputs(tmp_path)
    assert (records[0]["prompt"], records[0]["response"]) == ("Name a colour", "Red")
    assert len(json.loads(records[0]["metadata"])["history"]) == 2
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in preferences] == [
        ("Help me", "Sure, here is how.", "No.")
    ]
    assert sorted(q["reason"] for q in quarantine) == ["bad_transcript", "preference_prefix_mismatch"]
    assert metrics["sources"]["p"]["preferences"] == 1
    assert_counts_add_up(metrics)


def test_parquet_and_explicit_preference_fields(tmp_path):
    (tmp_path / "data/raw").mkdir(parents=True)
    pq.write_table(
        pa.table({"question": ["q1", "q2"], "good": ["yes", "same"], "bad": ["no", "same"]}),
        tmp_path / "data/raw/p.parquet",
    )
    source = {
        "name": "prefs",
        "path": "data/raw/p.parquet",
        "kind": "preference",
        "fields": {"prompt": "question", "chosen": "good", "rejected": "bad"},
    }
    metrics = ingest.run(make_params(source), root=tmp_path)
    _, preferences, _ = outputs(tmp_path)
    # chosen == rejected is not ingest's call: the preferences stage drops such pairs, counted.
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in preferences] == [
        ("q1", "yes", "no"),
        ("q2", "same", "same"),
    ]
    assert_counts_add_up(metrics)


GSM8K_CSV = (  # two real GSM8K test items, with the column names capitalised
    "Question,Answer\n"
    '"Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins '
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
    "fresh duck egg. How much in dollars does she make every day at the farmers' market?\","
    '"Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at '
    'the farmer\u2019s market.\n#### 18"\n'
    '"A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",'
    '"It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of '
    'fabric\n#### 3"\n'
)
MATHS = {"name": "maths", "path": "data/raw/maths.csv", "kind": "pair"}


def test_a_wrong_field_mapping_fails_ingest_naming_the_fields_the_file_has(tmp_path):
    write(tmp_path, "data/raw/maths.csv", GSM8K_CSV)
    wrong = {**MATHS, "fields": {"prompt": "question", "response": "answer"}}
    right = {**MATHS, "fields": {"prompt": "Question", "response": "Answer"}}
    ingest.run(make_params(right), root=tmp_path)
    before = (tmp_path / paths.INGESTED_RECORDS).read_bytes()
    with pytest.raises(FlywheelError) as failure:
        ingest.run(make_params(wrong), root=tmp_path)
    message = str(failure.value)
    assert "max_quarantine_share" in message and "source 'maths'" in message
    assert "2 of 2 items (100%)" in message and "missing_field:prompt" in message
    assert "{prompt: question, response: answer" in message  # the mapping used
    assert "['Answer', 'Question']" in message  # what the file has
    assert (tmp_path / paths.INGESTED_RECORDS).read_bytes() == before  # outputs left as they were
    assert ingest.run(make_params(wrong, max_quarantine_share=1.0), root=tmp_path)["quarantined"] == 2


def test_a_notable_quarantine_share_is_a_warning(tmp_path):
    good = [{"q": f"q{n}", "a": f"a{n}"} for n in range(9)]
    write(tmp_path, "data/raw/qa.jsonl", jsonl(*good, {"q": "no answer"}))
    metrics = ingest.run(make_params(QA), root=tmp_path)
    assert metrics["sources"]["qa"]["quarantined_share"] == 0.1
    [warning] = metrics["warnings"]
    assert "source 'qa'" in warning and "missing_field:response x1" in warning
    assert "warning: source 'qa'" in ingest.report(metrics)
    assert ingest.run(make_params(QA, warn_quarantine_share=0.2), root=tmp_path)["warnings"] == []


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FlywheelError, match=r"source 'qa': no files match 'data/raw/qa.jsonl'"):
        ingest.run(make_params(QA), root=tmp_path)


def test_a_symlink_out_of_the_raw_dir_is_refused(tmp_path):
    secret = tmp_path / "outside" / "environ"
    write(tmp_path, "outside/environ", "TOKEN=s3cr3t-value\n")
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/qa.jsonl").symlink_to(secret)
    with pytest.raises(FlywheelError, match=r"data/raw/qa.jsonl resolves to .*outside data/raw/"):
        ingest.run(make_params(QA), root=tmp_path)
    assert not (tmp_path / paths.QUARANTINE).exists()


def test_quarantined_snippets_are_redacted(tmp_path):
    good = [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}]
    write(tmp_path, "data/raw/qa.jsonl", jsonl(*good, "mail jane.roe@example.org, api_key=abcd1234efgh5678 {"))
    ingest.run(make_params(QA), root=tmp_path)
    [quarantined] = outputs(tmp_path)[2]
    assert "jane.roe" not in quarantined["snippet"] and "abcd1234efgh5678" not in quarantined["snippet"]
    assert "[EMAIL]" in quarantined["snippet"] and "[SECRET]" in quarantined["snippet"]


def test_json_nested_too_deep_is_quarantined_not_a_traceback(tmp_path):
    good = [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}]
    write(tmp_path, "data/raw/qa.json", json.dumps(good)[:-1] + ", " + "[" * 100_000 + "]" * 100_000 + "]")
    write(tmp_path, "data/raw/deep.json", '{"q": ' + "[" * 100_000 + "]" * 100_000 + "}")
    metrics = ingest.run(make_params({**QA, "path": "data/raw/qa.json"}), root=tmp_path)
    assert metrics["records"] == 2 and metrics["quarantine_reasons"] == {"malformed_json": 1}
    assert "nested deeper" in outputs(tmp_path)[2][0]["detail"]
    deep = {**QA, "name": "deep", "path": "data/raw/deep.json"}
    with pytest.raises(FlywheelError, match="nested deeper"):  # all of it quarantined: the source stops
        ingest.run(make_params(deep), root=tmp_path)


def test_unknown_extension_asks_for_format(tmp_path):
    write(tmp_path, "data/raw/qa.txt", "hello\n")
    with pytest.raises(FlywheelError, match="set `format`"):
        ingest.run(make_params({**QA, "path": "data/raw/qa.txt"}), root=tmp_path)


def test_corrupt_gzip_is_a_clear_error_and_leaves_old_outputs(tmp_path):
    write(tmp_path, "data/raw/qa.jsonl", jsonl({"q": "a", "a": "b"}))
    ingest.run(make_params(QA), root=tmp_path)
    before = (tmp_path / paths.INGESTED_RECORDS).read_bytes()
    (tmp_path / "data/raw/bad.jsonl.gz").write_bytes(gzip.compress(b'{"q": "x"}\n' * 100)[:40])
    with pytest.raises(FlywheelError, match="bad.jsonl.gz: cannot read the file"):
        ingest.run(make_params({**QA, "path": "data/raw/*.jsonl*"}), root=tmp_path)
    # Atomic writes: the failed run left the previous outputs whole and no temporary files.
    assert (tmp_path / paths.INGESTED_RECORDS).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / paths.INGESTED_RECORDS.path.parent).iterdir()) == [
        "preferences.parquet",
        "quarantine.jsonl",
        "records.parquet",
    ]


def test_chunked_writes_make_row_groups(tmp_path):
    write(tmp_path, "data/raw/qa.jsonl", jsonl(*({"q": f"q{i}", "a": f"a{i}"} for i in range(7))))
    ingest.run(make_params(QA, chunk_size=3), root=tmp_path)
    parquet = pq.ParquetFile(tmp_path / paths.INGESTED_RECORDS)
    assert parquet.metadata.num_rows == 7 and parquet.metadata.num_row_groups == 3


def test_empty_source_file_writes_empty_outputs_with_schema(tmp_path):
    write(tmp_path, "data/raw/qa.jsonl", "")
    metrics = ingest.run(make_params(QA), root=tmp_path)
    table = pq.read_table(tmp_path / paths.INGESTED_RECORDS)
    assert table.num_rows == 0 and "prompt" in table.schema.names
    assert metrics["read"] == 0


def test_bundled_sample_exercises_every_quarantine_path():
    """The committed sample: counts add up and the planted problems are all caught."""
    from flywheel.config import load_params
    from tests.conftest import REPO

    metrics = ingest.run(load_params(REPO / "params.yaml"), root=_copy_sample(REPO))
    assert_counts_add_up(metrics)
    assert metrics["warnings"] == []  # a few planted problems per source: no source's share is notable
    assert metrics["records"] > 1000 and metrics["preferences"] >= 400
    for reason in (
        "malformed_json",
        "undecodable_bytes",
        "empty_field:response",
        "missing_field:response",
        "wrong_type:response",
        "csv_wrong_field_count",
        "bad_messages",
        "bad_transcript",
        "preference_prefix_mismatch",
    ):
        assert metrics["quarantine_reasons"].get(reason, 0) >= 1, reason


def _copy_sample(repo: Path) -> Path:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp())
    shutil.copytree(repo / "data/raw/sample", root / "data/raw/sample")
    return root
