import json
import re

import pytest

from flywheel import paths
from flywheel.data import validate
from flywheel.errors import StageFailed
from tests.helpers import record, repo_params, write_records


def good_records(count: int = 150) -> list[dict]:
    return [record(f"Translate number {n} to words", f"the answer is {n}") for n in range(count)]


def test_clean_data_passes_and_writes_data_docs(tmp_path):
    write_records(tmp_path / paths.CLEAN_RECORDS, good_records())
    metrics = validate.run(repo_params(), root=tmp_path)
    assert metrics["success"] and metrics["failed_critical"] == 0
    assert metrics["expectations"] == len(metrics["results"]) == 11
    index = tmp_path / paths.VALIDATION_REPORT / "index.html"
    assert index.is_file() and "cleaned_records" in index.read_text()


def test_data_docs_list_each_run_by_name_and_draw_offline(tmp_path, monkeypatch):
    write_records(tmp_path / paths.CLEAN_RECORDS, good_records())
    for name in ("manual__2026-12-01T10:00:00", "scheduled__2026-12-02T03:00:00"):
        monkeypatch.setenv("FLYWHEEL_RUN_NAME", name)
        validate.run(repo_params(), root=tmp_path)
    docs = tmp_path / paths.VALIDATION_REPORT
    index = (docs / "index.html").read_text()
    assert "manual__2026-12-01T10:00:00" in index and "scheduled__2026-12-02T03:00:00" in index  # not __none__
    assert len(list(docs.glob("validations/cleaned_records/*/*/*.html"))) == 2
    for page in docs.rglob("*.html"):  # scripts, styles and images from the docs' own folder
        text = page.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(https?://[^"]+)"', text)
        assert not remote, (page, remote)
        for local in re.findall(r'(?:src|href)="(\.[^"#]+)"', text):
            assert (page.parent / local).is_file(), (page, local)


def test_corrupted_data_fails_naming_each_expectation_and_rows(tmp_path):
    records = good_records()
    records[3]["prompt"] = None  # null
    records[5]["id"] = records[6]["id"]  # duplicate id
    records[7]["response"] = "write to leak@example.com"  # residual PII
    write_records(tmp_path / paths.CLEAN_RECORDS, records)
    with pytest.raises(StageFailed) as failure:
        validate.run(repo_params(), root=tmp_path)
    message = str(failure.value)
    assert "3 critical expectation(s) failed" in message
    assert "expect_column_values_to_not_be_null on prompt: 1 offending rows" in message
    assert "expect_column_values_to_be_unique on id: 2 offending rows" in message
    assert "expect_column_values_to_be_null on pii_found" in message and "'email'" in message
    assert records[3]["id"] in message and records[7]["id"] in message
    assert failure.value.metrics["success"] is False
    assert (tmp_path / paths.VALIDATION_REPORT / "index.html").is_file()  # docs show the failure too


def test_warnings_are_reported_not_fatal(tmp_path):
    records = [record("Same prompt", f"answer {n}") for n in range(150)]  # 1 unique prompt
    write_records(tmp_path / paths.CLEAN_RECORDS, records)
    metrics = validate.run(repo_params(), root=tmp_path)
    assert metrics["success"] and metrics["failed_warning"] == 1
    (warning,) = [r for r in metrics["results"] if not r["success"]]
    assert warning["check"] == "unique_prompt_share" and warning["severity"] == "warning"
    json.dumps(metrics)  # serialisable as a DVC metric


def test_severity_is_configurable(tmp_path):
    write_records(tmp_path / paths.CLEAN_RECORDS, good_records(10))  # below the row-count minimum
    with pytest.raises(StageFailed, match="expect_table_row_count_to_be_between"):
        validate.run(repo_params(), root=tmp_path)
    metrics = validate.run(repo_params(validate={"severity": {"row_count": "warning"}}), root=tmp_path)
    assert metrics["success"] and metrics["failed_warning"] == 1
