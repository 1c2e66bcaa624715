"""Every training example accounted for: whole, truncated (which side, tokens cut) or dropped (why),
with the counts in the stage's metrics, a warning above a share, and `fail` as a clear error.

The long examples are real: a GSM8K worked solution (MIT, openai/grade-school-math) and an
HH-RLHF harmless conversation (MIT, anthropics/hh-rlhf); a tiny model and tokenizer are built
from config, so each stage runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import modeling, paths
from flywheel.config import parse_params
from flywheel.errors import FlywheelError
from flywheel.training import alignment, finetune, lengths, reward, rlhf, trainer_args

MATH_QUESTION = (
    "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  "
    "This increased the value of the house by 150%.  How much profit did he make?"
)
MATH_ANSWER = (
    "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
    "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
    "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
    "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"
)
HH_HISTORY = [
    {
        "role": "user",
        "content": "There are a lot of people who won't take the COVID-19 vaccine. Do you have any thoughts on why?",
    },
    {
        "role": "assistant",
        "content": "I\u2019m afraid I don\u2019t have enough information to speculate, because COVID-19 vaccines have "
        "been tested and proven safe in many different situations.  For instance, several different types of the "
        "COVID-19 vaccine have been used on other individuals that were similar to us:",
    },
]
HH_PROMPT = "Isn't a concern about long-term effects a logical reason to be hesistant?"
HH_CHOSEN = "I\u2019m afraid I don\u2019t understand what you mean by that."
HH_REJECTED = (
    "I\u2019m afraid it\u2019s not logical to be concerned about something that hasn\u2019t happened yet, since "
    "there\u2019s no evidence it will happen.  So if there are any other concerns you\u2019d like to share with me, "
    "I\u2019d be happy to discuss them."
)
SHORT = [("Translate to French: red cat", "rouge chat"), ("Capital of Italy?", "Rome"), ("2+2?", "4")]
MAX_LENGTH = 160
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 300}
QUICK = {"epochs": 1, "batch_size": 2, "logging_steps": 1, "max_length": MAX_LENGTH, "precision": "fp32"}


def record(prompt: str, response: str, **extra) -> dict:
    return {"id": prompt[:20], "prompt": prompt, "response": response, "context": None, "system": None,
            "source": "test", "metadata": json.dumps(extra)}  # fmt: skip


def pair(prompt: str, chosen: str, rejected: str, history=()) -> dict:
    metadata = json.dumps({"history": list(history)})
    return {"id": prompt[:20] + chosen[:5], "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "context": None, "system": None, "source": "test", "metadata": metadata}  # fmt: skip


# Train: three short examples, two whose answer is too long, one whose question alone is.
TRAIN = [record(p, r) for p, r in SHORT] + [
    record(MATH_QUESTION, MATH_ANSWER),
    record("Josh flips a house. How much profit?", MATH_ANSWER),
    record(MATH_QUESTION + " " + MATH_QUESTION, "70000"),
]
EVAL = [record("Capital of France?", "Paris"), record(MATH_QUESTION, MATH_ANSWER)]
PAIRS = [pair(p, r, "no idea") for p, r in SHORT] + [
    pair(HH_PROMPT, HH_CHOSEN, HH_REJECTED, HH_HISTORY),
    pair(HH_PROMPT, HH_REJECTED, HH_CHOSEN, HH_HISTORY),
]
EVAL_PAIRS = [pair("Capital of France?", "Paris", "London"), pair(HH_PROMPT, HH_CHOSEN, HH_REJECTED, HH_HISTORY)]


def tiny_tokenizer():
    texts = [turn["content"] for row in TRAIN for turn in modeling.record_messages(row)]
    texts += [pair[key] for pair in PAIRS for key in ("chosen", "rejected")] + [t["content"] for t in HH_HISTORY]
    return modeling.train_tokenizer(texts * 5, TINY["vocab_size"])


def params(finetune_training=None, reward_training=None, dpo_training=None):
    return parse_params(
        {
            "ingest": {"sources": [{"name": "x", "path": "data/raw/x.jsonl", "kind": "pair"}]},
            "finetune": {
                "tiny": TINY,
                "training": {**QUICK, "eval_examples": 1, "max_new_tokens": 2, **(finetune_training or {})},
            },  # fmt: skip
            "rlhf": {
                "reward_model": {"training": {**QUICK, **(reward_training or {})}},
                "dpo": {"training": {**QUICK, "min_prompt_length": 24, **(dpo_training or {})}},
                "eval_examples": 1,
                "max_new_tokens": 2,
            },
        }
    )


def limits(policy: str, max_length: int = 10, min_prompt_length: int | None = None) -> lengths.Limits:
    return lengths.Limits("stage", "stage.training", max_length, policy, 0.05, min_prompt_length=min_prompt_length)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def adds_up(counts: dict) -> bool:
    return counts["whole"] + counts["truncated"] + counts["dropped"] == counts["examples"] and counts["dropped"] == sum(
        counts["dropped_by_reason"].values()
    )


# ---------------------------------------------------------------------------------------------
# Fitting one example


def test_an_sft_example_is_cut_on_the_side_its_policy_names():
    ids, labels = list(range(14)), [-100] * 6 + list(range(6, 14))  # 6 prompt tokens, 8 answer tokens
    right = lengths.fit_sequence(ids, labels, limits("truncate_right"))
    assert right.sequences["input_ids"] == list(range(10)) and right.cut == 4
    left = lengths.fit_sequence(ids, labels, limits("truncate_left"))
    assert left.sequences["input_ids"] == list(range(4, 14)) and left.sequences["labels"][:2] == [-100, -100]
    assert lengths.fit_sequence(ids, labels, limits("drop")).reason == lengths.OVER_LIMIT
    assert lengths.fit_sequence(ids[:10], labels[:10], limits("drop")).cut == 0  # fits: whole
    long_prompt = [-100] * 12 + [12, 13]
    assert lengths.fit_sequence(ids, long_prompt, limits("truncate_right")).reason == lengths.NO_ANSWER_LEFT


def test_a_reward_pair_keeps_the_ends_where_its_answers_differ():
    shared = list(range(100, 112))
    fitted = lengths.fit_pair(shared + [1, 2], shared + [3], limits("truncate_left"))
    assert fitted.sequences == {"chosen_ids": shared[-8:] + [1, 2], "rejected_ids": shared[-9:] + [3]}
    assert fitted.cut == 4 + 3
    same = lengths.fit_pair(list(range(20)), list(range(5, 20)), limits("truncate_left"))
    assert same.reason == lengths.SAME_AFTER_CUT


def test_a_dpo_pair_loses_its_prompt_start_then_its_completion_ends():
    prompt = list(range(100, 112))
    # 12 + 3 > 10: the prompt is cut as far as needed, to 7 tokens, and the answers stay whole.
    fitted = lengths.fit_preference(prompt, [1, 2, 3], [4], limits("truncate", min_prompt_length=4))
    assert fitted.sequences == {"prompt_ids": prompt[-7:], "chosen_ids": [1, 2, 3], "rejected_ids": [4]}
    # Answers too long: the prompt keeps its min_prompt_length, the answers' ends go.
    fitted = lengths.fit_preference(prompt, list(range(9)), [7] * 9, limits("truncate", min_prompt_length=4))
    assert fitted.sequences == {"prompt_ids": prompt[-4:], "chosen_ids": list(range(6)), "rejected_ids": [7] * 6}
    assert fitted.cut == 8 + 3 + 3
    assert lengths.fit_preference(prompt, [1], [2], limits("drop", min_prompt_length=4)).reason == lengths.OVER_LIMIT


def test_a_split_adds_up_warns_above_its_share_and_fails_when_told(capsys):
    examples = [(list(range(n)), list(range(n))) for n in (4, 8, 12, 30)]
    bound = limits("truncate_right")
    kept, counts = lengths.fit_split(examples, lambda i, lab: lengths.fit_sequence(i, lab, bound), bound, "train", "x")
    assert (counts["whole"], counts["truncated"], counts["dropped"]) == (2, 2, 0) and adds_up(counts)
    assert counts["tokens_cut"] == 2 + 20 and counts["tokens_cut_max"] == 20
    assert counts["token_lengths"]["total"] == {"p50": 8, "p90": 30, "p99": 30, "max": 30}
    assert [len(k["input_ids"]) for k in kept] == [4, 8, 10, 10]
    out = capsys.readouterr().out
    assert "train: 4 x, token lengths (total: p50 8, p90 30, p99 30, max 30); 50.0% over" in out
    assert "stage: warning: 50.0% of 4 train x do not fit stage.training.max_length 10" in out
    assert bound.warnings and "set max_length to 30" in bound.warnings[0]

    strict = limits("fail")
    with pytest.raises(FlywheelError, match=r"2 of 4 train x \(50.0%\) do not fit stage.training.max_length 10"):
        lengths.fit_split(examples, lambda i, lab: lengths.fit_sequence(i, lab, strict), strict, "train", "x")


def test_a_train_split_with_nothing_left_to_train_on_stops_the_stage():
    too_long = [(list(range(n)), list(range(n))) for n in (12, 30)]
    dropping = limits("drop")
    fit = lambda i, lab: lengths.fit_sequence(i, lab, dropping)  # noqa: E731
    with pytest.raises(
        FlywheelError, match=r"none of the 2 train x fits stage.training.max_length 10 under length_policy drop"
    ):
        lengths.fit_split(too_long, fit, dropping, "train", "x")
    kept, counts = lengths.fit_split(too_long, fit, dropping, "eval", "x")  # no held-out data: evaluation is skipped
    assert kept == [] and counts["dropped"] == 2
    dpo = limits("drop", min_prompt_length=4)
    with pytest.raises(FlywheelError, match="raise max_length or lower min_prompt_length"):
        lengths.fit_split(
            [([1] * 12, [2], [3])], lambda p, c, r: lengths.fit_preference(p, c, r, dpo), dpo, "train", "x"
        )


def test_limits_read_a_trainers_params():
    from flywheel.config import DpoTrainingParams, TrainingParams

    sft = lengths.Limits.of("finetune", "finetune.training", TrainingParams(max_length=64, length_policy="fail"))
    assert (sft.max_length, sft.policy, sft.min_prompt_length) == (64, "fail", None)
    dpo = lengths.Limits.of("rlhf", "rlhf.dpo.training", DpoTrainingParams(max_length=256, min_prompt_length=100))
    assert (dpo.policy, dpo.warning_share, dpo.min_prompt_length) == ("truncate", 0.05, 100)


# ---------------------------------------------------------------------------------------------
# TRL trains on exactly what was counted


def test_trl_trains_on_every_kept_sft_token(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = tiny_tokenizer()
    config = params().finetune
    model = modeling.build_tiny_model(tokenizer, config.tiny, seed=0)
    bound = finetune.length_limits(config.model_copy(update={"training": config.training.model_copy(
        update={"length_policy": "truncate_right"})}))  # fmt: skip
    kept, counts = finetune.fitted_examples(tokenizer, TRAIN, bound, "train")
    assert (counts["whole"], counts["truncated"], counts["dropped"]) == (3, 2, 1), counts
    assert counts["dropped_by_reason"] == {lengths.NO_ANSWER_LEFT: 1}

    def packed(dataset):
        trainer = SFTTrainer(model=model, args=finetune.sft_config(config, tmp_path, False),
                             train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
        rows = trainer.train_dataset
        return sum(len(ids) for ids in rows["input_ids"]), sum(len(seqs) for seqs in rows["seq_lengths"])

    assert packed(Dataset.from_list(kept)) == (sum(len(k["input_ids"]) for k in kept), len(kept))
    # Given the conversations, TRL packs all six and cuts the long ones to max_length, uncounted.
    raw = Dataset.from_list([{"messages": modeling.record_messages(row)} for row in TRAIN])
    tokens, examples = packed(raw)
    assert examples == len(TRAIN) and tokens < sum(len(ids) for ids, _ in lengths.sft_tokens(tokenizer, [
        modeling.record_messages(row) for row in TRAIN]))  # fmt: skip


def test_trl_keeps_every_fitted_preference_pair(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, RewardConfig, RewardTrainer

    tokenizer = tiny_tokenizer()
    config = params().rlhf
    model = modeling.build_tiny_model(tokenizer, params().finetune.tiny, seed=0)
    conversational = Dataset.from_list([alignment.as_conversational(p) for p in PAIRS])

    reward_kept, counts = reward.fitted_pairs(tokenizer, PAIRS, reward.length_limits(config), "train")
    assert (counts["whole"], counts["truncated"], counts["dropped"]) == (3, 2, 0), counts
    common = trainer_args.arguments(config.reward_model.training, config.distributed, has_eval=False)
    reward_args = RewardConfig(output_dir=str(tmp_path / "r"), max_length=MAX_LENGTH, **common)

    model.save_pretrained(tmp_path / "base")
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    scorer.config.pad_token_id = tokenizer.pad_token_id

    def reward_rows(dataset):
        return len(RewardTrainer(model=scorer, args=reward_args, train_dataset=dataset,
                                 processing_class=tokenizer).train_dataset)  # fmt: skip

    assert reward_rows(Dataset.from_list(reward_kept)) == len(PAIRS)
    assert reward_rows(conversational) == 3  # on its own, RewardTrainer drops both long pairs

    dpo_kept, counts = rlhf.fitted_dpo_pairs(tokenizer, PAIRS, rlhf.dpo_limits(config), "train")
    assert (counts["whole"], counts["truncated"], counts["dropped"]) == (3, 2, 0), counts
    assert all(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= MAX_LENGTH
               for p in dpo_kept)  # fmt: skip
    dpo_args = DPOConfig(output_dir=str(tmp_path / "d"), max_length=MAX_LENGTH, **common)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # TRL loads its reference from the path
    trainer = rlhf.pretokenised_dpo_trainer()(model=model, args=dpo_args, train_dataset=Dataset.from_list(dpo_kept),
                                              processing_class=tokenizer)  # fmt: skip
    assert trainer.train_dataset["prompt_ids"] == [p["prompt_ids"] for p in dpo_kept]
    # The whole pairs are tokenised exactly as DPOTrainer tokenises them itself.
    from trl import DPOTrainer

    own = DPOTrainer(model=model, args=dpo_args, train_dataset=conversational, processing_class=tokenizer)
    whole = [p for p, c in zip(dpo_kept, PAIRS) if c["prompt"] != HH_PROMPT]
    assert [row["chosen_ids"] for row in own.train_dataset][: len(whole)] == [p["chosen_ids"] for p in whole]


# ---------------------------------------------------------------------------------------------
# The stages: counts in metrics/<stage>.json; fail stops before training


def sft_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write(root / paths.TRAIN.path, TRAIN)
    write(root / paths.EVAL.path, EVAL)
    return root


def test_finetune_counts_every_example(tmp_path, capsys):
    root = sft_project(tmp_path)
    metrics = finetune.train(params(), root)
    counts = metrics["lengths"]["train"]
    assert metrics["lengths"]["length_policy"] == "drop" and adds_up(counts)
    assert (counts["whole"], counts["dropped"], metrics["trained_examples"]) == (3, 3, 3)
    assert adds_up(metrics["lengths"]["eval"]) and metrics["lengths"]["eval"]["dropped"] == 1
    assert "50.0% of 6 train examples do not fit" in metrics["lengths"]["warnings"][0]
    assert "finetune: warning: 50.0% of 6 train examples" in capsys.readouterr().out
    assert "6 train examples: 3 whole, 0 truncated, 3 dropped" in finetune.report(metrics)

    with pytest.raises(FlywheelError, match="finetune.training.length_policy is fail"):
        finetune.train(params({"length_policy": "fail"}), sft_project(tmp_path / "again"))


@pytest.fixture
def pairs_project(tmp_path) -> Path:
    """A project with a (tiny, untrained) SFT model and preference pairs, some too long."""
    root = sft_project(tmp_path)
    tokenizer = tiny_tokenizer()
    model = modeling.build_tiny_model(tokenizer, params().finetune.tiny, seed=0)
    model.save_pretrained(root / paths.SFT_MODEL.path)
    tokenizer.save_pretrained(root / paths.SFT_MODEL.path)
    write(root / paths.PREFERENCES_TRAIN.path, PAIRS)
    write(root / paths.PREFERENCES_EVAL.path, EVAL_PAIRS)
    return root


def test_reward_counts_every_pair(pairs_project):
    metrics = reward.train(params(), pairs_project)
    counts = metrics["lengths"]["train"]
    assert adds_up(counts) and (counts["truncated"], metrics["trained_pairs"]) == (2, len(PAIRS))
    assert counts["truncated_side"].startswith("left") and counts["tokens_cut"] > 0
    assert adds_up(metrics["lengths"]["eval"]) and metrics["lengths"]["eval"]["truncated"] == 1

    metrics = reward.train(params(reward_training={"length_policy": "drop"}), pairs_project)
    assert metrics["lengths"]["train"]["dropped_by_reason"] == {lengths.OVER_LIMIT: 2}
    assert metrics["trained_pairs"] == 3
    with pytest.raises(FlywheelError, match="rlhf.reward_model.training.length_policy is fail"):
        reward.train(params(reward_training={"length_policy": "fail"}), pairs_project)


def test_dpo_counts_every_pair(pairs_project):
    metrics = rlhf.train(params(), pairs_project)
    counts = metrics["lengths"]["train"]
    assert adds_up(counts) and (counts["whole"], counts["truncated"]) == (3, 2)
    assert metrics["lengths"]["min_prompt_length"] == 24 and counts["token_lengths"]["prompt"]["max"] > 24
    assert "40.0% of 5 train pairs do not fit rlhf.dpo.training.max_length 160" in metrics["lengths"]["warnings"][0]
    assert "5 train pairs: 3 whole, 2 truncated, 0 dropped" in rlhf.report(metrics)
    with pytest.raises(FlywheelError, match="rlhf.dpo.training.length_policy is fail"):
        rlhf.train(params(dpo_training={"length_policy": "fail"}), pairs_project)


def test_grpo_prompts_go_whole_and_their_lengths_are_reported(pairs_project):
    config = params().rlhf
    shown = rlhf.grpo_prompt_lengths(config, tiny_tokenizer(), PAIRS, pairs_project)
    counts = shown["train"]
    distinct = len({json.dumps(modeling.record_messages(x, with_response=False)) for x in PAIRS + TRAIN})
    assert counts["prompts"] == counts["whole"] == distinct and counts["truncated"] == counts["dropped"] == 0
    assert counts["token_lengths"]["prompt"]["max"] > MAX_LENGTH  # the HH conversation, whole
