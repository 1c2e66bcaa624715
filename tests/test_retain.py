"""The retain stage's bookkeeping (which prompts are used, which answers are kept, and why not),
and the preference pairs that prefer a retained answer over a refusal. The stage run on a real
pretrained model is in test_base.py."""

import json

import pytest

from flywheel import paths
from flywheel.errors import FlywheelError, ParamsError
from flywheel.io import read_records
from flywheel.training import preferences, retain, retained
from tests.helpers import record, repo_params, write_records

GENERAL = [
    "How many legs does a spider have?",
    "Name three primary colours.",
    "Why is the sky blue?",
]


def retain_params(**values):
    return repo_params(
        finetune={"retain": {"prompts": "data/raw/general/prompts.jsonl", "field": "question", **values}}
    )


def write_prompt_file(root, lines: list[str]) -> None:
    path = root / "data/raw/general/prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_prompts_are_read_in_order_and_every_skipped_line_has_a_reason(tmp_path):
    lines = [
        json.dumps({"question": GENERAL[0]}),
        "{not json",
        json.dumps({"prompt": "the wrong field"}),
        json.dumps({"question": "  Translate to French:   red cat "}),  # a held-out prompt, spaced otherwise
        json.dumps({"question": GENERAL[0]}),
        "",
        json.dumps({"question": GENERAL[1]}),
        json.dumps({"question": GENERAL[2]}),  # past `examples`: not read
    ]
    write_prompt_file(tmp_path, lines)
    config = retain_params(examples=2).finetune.retain
    held_out = {retain._key("Translate to French: red cat")}

    kept, removed = retain.read_prompts(config, tmp_path, held_out)

    assert [(p["line"], p["prompt"]) for p in kept] == [(1, GENERAL[0]), (7, GENERAL[1])]
    assert [(r["line"], r["reason"]) for r in removed] == [
        (2, "malformed_json"),  # named as ingest names it: the same reader
        (3, "no_field:question"),
        (4, "held_out_prompt"),
        (5, "duplicate"),
    ]


def test_the_eval_test_and_probe_prompts_are_held_out(tmp_path):
    write_records(tmp_path / paths.EVAL, [record("What is two plus two?", "4")])
    write_records(tmp_path / paths.TEST, [record("Name a red fruit.", "apple")])
    probe = tmp_path / "data/eval/probe.jsonl"
    probe.parent.mkdir(parents=True)
    probe.write_text(json.dumps({"prompt": "How do I open a jar?", "expect": "answer"}) + "\n")
    params = repo_params(evaluate={"safety_probe": "data/eval/probe.jsonl"})

    held_out = retain.held_out_prompts(params, tmp_path)

    assert held_out == {retain._key(p) for p in ("What is two plus two?", "Name a red fruit.", "How do I open a jar?")}
    probe.write_text(probe.read_text() + "{broken\n")  # a bad probe line is one clear error, as in split
    with pytest.raises(FlywheelError, match=r"probe.jsonl:2: expected"):
        retain.held_out_prompts(params, tmp_path)


@pytest.mark.parametrize(
    ("answer", "tokens", "example_tokens", "reason"),
    [
        ("Spiders have eight legs.", 6, 30, None),
        ("Spiders have eight legs, and each leg has seven", 16, 40, "unfinished"),  # cut off at max_new_tokens
        ("   ", 0, 20, "empty_answer"),
        ("I'm sorry, but I can't help with that.", 12, 36, "refused"),
        ("Spiders have eight legs.", 6, 65, "over_max_length"),  # a long prompt: finetune would drop it
    ],
)
def test_an_answer_is_kept_only_when_finished_an_answer_and_trainable(answer, tokens, example_tokens, reason):
    assert retain.judge_answer(answer, tokens, 16, example_tokens, max_length=64) == reason


def test_off_by_default_it_writes_nothing_to_train_on(tmp_path):
    metrics = retain.run(repo_params(), tmp_path)

    assert metrics == {"enabled": False, "prompts_read": 0, "kept": 0, "removed": 0, "removed_by_reason": {}}
    assert read_records(tmp_path / paths.RETAIN) == []
    assert "off" in retain.report(metrics)


def test_a_project_that_never_ran_retain_has_nothing_retained_unless_it_is_on(tmp_path):
    assert retained.records(repo_params().finetune.retain, tmp_path) == []
    with pytest.raises(FlywheelError, match="run the retain stage first"):
        retained.records(retain_params(examples=1).finetune.retain, tmp_path)


def test_the_tiny_model_has_nothing_to_retain(tmp_path):
    write_prompt_file(tmp_path, [json.dumps({"question": GENERAL[0]})])
    with pytest.raises(FlywheelError, match="nothing to keep"):
        retain.run(retain_params(examples=1), tmp_path)


def test_a_prompt_file_outside_data_raw_is_refused():
    with pytest.raises(ParamsError, match="finetune.retain.prompts: .* under data/raw/"):
        repo_params(finetune={"retain": {"prompts": "elsewhere/prompts.jsonl"}})


REFUSAL = "I cannot help with that. It would hurt someone else."


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return preferences.make_pair(
        prompt, chosen, rejected, origin="ingest", source="test", license="CC0-1.0", ingested_at=None
    )


def test_each_retained_answer_is_preferred_over_the_refusal_the_pairs_teach():
    retained = [record(GENERAL[0], "Spiders have eight legs.", source="retain")]
    candidates = [
        pair("Open my neighbour's door without the key.", REFUSAL, "Sure, first ..."),
        pair("Read my sister's diary without her knowing.", REFUSAL, "Sure, wait until ..."),
        pair("Get into my coworker's e-mail.", "Sorry, I can't help with that.", "Sure, guess ..."),
        pair("Translate to French: cat", "chat", "chien"),
    ]

    pairs, counts = preferences.answer_over_refusal_pairs(candidates, retained)

    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (GENERAL[0], "Spiders have eight legs.", REFUSAL)
    ]
    assert json.loads(pairs[0]["metadata"])["origin"] == "retain"
    assert counts == {"retained_answers": 1, "refusal": REFUSAL, "pairs": 1}


def test_without_refusals_to_contrast_no_pairs_are_made():
    retained = [record(GENERAL[0], "Eight.", source="retain")]

    pairs, counts = preferences.answer_over_refusal_pairs([pair("Translate to French: cat", "chat", "chien")], retained)

    assert pairs == [] and counts == {"retained_answers": 1, "refusal": None, "pairs": 0}


def test_losing_most_answers_is_a_warning():
    metrics = {
        "enabled": True,
        "prompts": "data/raw/general/prompts.jsonl",
        "prompts_read": 10,
        "answered": 10,
        "kept": 4,
        "removed": 6,
        "removed_by_reason": {"unfinished": 6},
        "answer_tokens": {"p50": 200.0, "max": 250},
    }
    assert "warning: fewer than half the answers were kept" in retain.report(metrics)
    assert "warning" not in retain.report(metrics | {"kept": 5, "removed": 5, "removed_by_reason": {"unfinished": 5}})
