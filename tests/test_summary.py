import json

from flywheel.evaluation import summary


def test_the_summary_holds_the_compared_numbers_and_null_for_what_a_run_did_not_make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    written = {
        "gate": {"decision": "rejected", "reasons": ["..."]},
        "ingest": {"records": 6019, "quarantined": 15, "sources": {"chats": {"read": 803}}},
        "clean": {"kept": 5699, "removed_by_reason": {"exact_duplicate": 230, "near_duplicate": 86}},
        "evaluate": {"models": {"candidate": {"task_score": 0.93728, "hallucination_rate": 0.0265}}},
    }  # no split, finetune, reward or rlhf file: those stages did not run
    for stage, metrics in written.items():
        (tmp_path / f"metrics/{stage}.json").write_text(json.dumps(metrics))
    result = summary.run()
    assert result["gate"] == "rejected"
    assert result["data"] == {
        "records": 6019,
        "quarantined": 15,
        "exact_duplicates": 230,
        "near_duplicates": 86,
        "kept": 5699,
        "train": None,
    }
    assert result["model"]["task_score"] == 0.9373 and result["model"]["safety_pass_rate"] is None
    assert result["dpo"] == {"preference_accuracy": None, "kl_from_sft": None}
    assert "gate rejected" in summary.report(result)
