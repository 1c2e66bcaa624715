"""The hallucination detector on the mistakes it missed on real data (polarity, numbers,
comparatives, answers judged against a passage alone), its NLI plug-in and `flywheel judge`.

The passages are short real snippets (GSM8K test and HH-RLHF harmless test, both MIT), copied
here so the tests need nothing outside the repository."""

import json
import subprocess

import pytest

from flywheel.errors import FlywheelError
from flywheel.evaluation import hallucination
from tests.conftest import BIN, REPO, subprocess_env

THRESHOLD = 0.8  # evaluate.hallucination.threshold in params.yaml
WEIGHT = 0.7  # evaluate.hallucination.overlap_weight

GSM8K_QUESTION = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
    "per fresh duck egg. How much in dollars does she make every day at the farmers' market?"
)
GSM8K_SOLUTION = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s market."
HH_REPLY = (
    "I’m sorry, I don’t know what you mean by that. Can you explain what you’re trying to do? "
    "It sounds like you want to get back at your neighbor for the noise. Have you tried talking to "
    "them about it first? Many people don’t realize how loud they are until someone tells them."
)


@pytest.fixture(scope="module")
def embedder():
    return hallucination.load_embedder(hallucination.BUNDLED_EMBEDDER)


def support(embedder, answer: str, reference: str = "", context: str = "", question: str = "") -> float:
    return hallucination.judge_answer(answer, reference, context, embedder, WEIGHT, question).support


# ---------------------------------------------------------------------------------------------
# Polarity, numbers, comparatives


def test_yes_x_can_is_not_supported_by_no_x_cannot(embedder):
    reference = "No, ostriches cannot fly; their wings are too small for their weight."
    assert support(embedder, "No, ostriches cannot fly.", reference) >= THRESHOLD
    assert support(embedder, "Yes, ostriches can fly.", reference) < THRESHOLD / 2
    assert support(embedder, "Ostriches can't fly.", reference) >= THRESHOLD
    assert support(embedder, "Ostriches can fly.", reference) < THRESHOLD / 2


def test_a_bare_yes_or_no_is_judged_by_its_polarity(embedder):
    reference = "No, ostriches cannot fly."
    assert support(embedder, "No.", reference) >= THRESHOLD
    assert support(embedder, "Yes", reference) < THRESHOLD / 2
    # Against a passage, a yes/no answers the question: the passage sentence closest to it.
    passage = "Ostriches are the largest birds. They cannot fly, but they run fast."
    assert support(embedder, "no", context=passage, question="Can ostriches fly?") >= THRESHOLD
    assert support(embedder, "yes", context=passage, question="Can ostriches fly?") < THRESHOLD / 2


def test_a_flipped_comparative_is_a_contradiction(embedder):
    reference = "Prices were lower before the war than after it."
    assert support(embedder, "Prices were lower before the war.", reference) >= THRESHOLD
    assert support(embedder, "Prices were higher before the war.", reference) < THRESHOLD / 2
    # Word order is not read: "lower after the war" would pass against this reference.
    reference = "The city has more parks than schools."
    assert support(embedder, "The city has fewer parks than schools.", reference) < THRESHOLD / 2


def test_a_different_number_is_flagged_and_the_same_number_written_otherwise_is_not(embedder):
    reference = "The house sold for $1,000 in 1990."
    assert support(embedder, "The house sold for $1000 in 1990.", reference) >= THRESHOLD
    assert support(embedder, "The house sold for $1,500 in 1990.", reference) < THRESHOLD / 2
    # A near-copy that changes a figure the evidence holds elsewhere is still a changed figure.
    assert support(embedder, "The house sold for $1,000 in 1000.", reference) < THRESHOLD / 2
    assert support(embedder, "Janet's ducks lay three eggs per day.", context=GSM8K_QUESTION) < THRESHOLD


def test_a_worked_answer_is_supported_by_its_own_arithmetic_not_by_wrong_arithmetic(embedder):
    reference = "She makes 9 * 2 = $18 every day at the farmer’s market.\nThe answer is 18."
    right = f"{GSM8K_SOLUTION}\nThe answer is 18."
    assert support(embedder, right, reference, GSM8K_QUESTION) >= THRESHOLD
    stopped_early = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nThe answer is 9."
    assert support(embedder, stopped_early, reference, GSM8K_QUESTION) < THRESHOLD / 2
    miscalculated = "Janet sells 16 - 3 - 4 = 11 duck eggs a day.\nShe makes 11 * 2 = $22 every day.\nThe answer is 22."
    assert support(embedder, miscalculated, reference, GSM8K_QUESTION) < THRESHOLD / 2
    assert hallucination.computed_numbers("16 - 3 - 4 = 9 and 2 x $9 = $18, 5*5=24") == {"9", "18"}


# ---------------------------------------------------------------------------------------------
# Context only (the RAG case): support of the answer by the passage


@pytest.mark.parametrize("passage", [GSM8K_QUESTION, HH_REPLY])
def test_a_sentence_of_the_passage_is_supported_and_one_from_elsewhere_is_not(embedder, passage):
    own = hallucination.sentences(passage)[1]
    other = hallucination.sentences(HH_REPLY if passage == GSM8K_QUESTION else GSM8K_QUESTION)[1]
    assert support(embedder, own, context=passage) >= THRESHOLD
    assert support(embedder, other, context=passage) < THRESHOLD / 2


def test_a_correct_context_only_answer_in_other_words_is_supported(embedder):
    answer = "Every morning she eats three of the eggs for breakfast, and she sells the rest at the market for $2 each."
    assert support(embedder, answer, context=GSM8K_QUESTION) >= THRESHOLD
    assert support(embedder, answer.replace("$2", "$5"), context=GSM8K_QUESTION) < THRESHOLD
    assert support(embedder, "She does not sell the remainder at the market.", context=GSM8K_QUESTION) < THRESHOLD / 2


# ---------------------------------------------------------------------------------------------
# An NLI cross-encoder plugged in


def tiny_nli_model(directory, labels: dict[int, str], favoured: str):
    """A 1-layer BERT CrossEncoder built from a config whose classifier always favours one label."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "yes", "ostriches", "can", "fly"]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=labels,
        label2id={name: index for index, name in labels.items()},
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[{name: i for i, name in labels.items()}[favoured]] = 10.0
    model.save_pretrained(directory)
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return str(directory)


def test_an_nli_model_directory_replaces_embedding_similarity(embedder, tmp_path):
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}  # not the usual order: found by name
    entails = hallucination.load_cross_encoder(tiny_nli_model(tmp_path / "yes", labels, "entailment"))
    contradicts = hallucination.load_cross_encoder(tiny_nli_model(tmp_path / "no", labels, "contradiction"))
    answer, reference = ["Ostriches run fast."], ["Ostriches are fast runners."]
    # overlap_weight 0: support is the model's entailment probability alone.
    [high] = hallucination.support_scores(answer, reference, [""], embedder, 0.0, cross_encoder=entails)
    [low] = hallucination.support_scores(answer, reference, [""], embedder, 0.0, cross_encoder=contradicts)
    assert high > 0.99 and low < 0.01


def test_a_missing_or_unsuitable_nli_model_is_a_clear_error(embedder, tmp_path):
    with pytest.raises(FlywheelError, match="does not exist or holds no config.json"):
        hallucination.load_cross_encoder(str(tmp_path / "absent"))
    sentiment = hallucination.load_cross_encoder(
        tiny_nli_model(tmp_path / "sentiment", {0: "negative", 1: "positive"}, "positive")
    )
    with pytest.raises(FlywheelError, match="none is 'entailment'"):
        hallucination.support_scores(["a"], ["a"], [""], embedder, 0.5, cross_encoder=sentiment)


# ---------------------------------------------------------------------------------------------
# flywheel judge


def test_flywheel_judge_scores_each_row_and_names_what_is_wrong_with_a_bad_one(tmp_path):
    rows = [
        {"id": "right", "answer": "No, ostriches cannot fly.", "reference": "No, ostriches cannot fly.", "label": 0},
        {"id": "wrong", "answer": "Yes, ostriches can fly.", "reference": "No, ostriches cannot fly.", "label": 1},
        {"id": "rag", "answer": hallucination.sentences(GSM8K_QUESTION)[0], "context": GSM8K_QUESTION, "label": 0},
        {"id": "no evidence", "answer": "Paris"},
    ]
    source = tmp_path / "answers.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    result = subprocess.run(
        [str(BIN / "flywheel"), "judge", "--input", str(source), "--output", str(tmp_path / "scores.jsonl")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == [1, 2, 3, 4, 5]
    assert [r.get("hallucinated") for r in out[:3]] == [False, True, False]
    assert "opposite polarity" in out[1]["reasons"][0]
    assert out[3] == {"line": 4, "error": "needs a 'reference' or a 'context' to judge the answer against"}
    assert out[4]["error"].startswith("not valid JSON")
    assert "5 rows: 3 judged, 1 flagged" in result.stdout and "2 with errors" in result.stdout
    assert "AUROC against the rows' labels: 1.000 on 3 rows" in result.stdout
    assert "line 5: not valid JSON" in result.stdout


def test_flywheel_judge_without_an_input_file_says_so(tmp_path):
    result = subprocess.run(
        [str(BIN / "flywheel"), "judge", "--input", str(tmp_path / "absent.jsonl")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "absent.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr
