"""Task-aware scoring (flywheel/scoring.py): final answers of worked solutions, exact match on
short answers, F1 / ROUGE-L on free text, the `auto` choice, generation length from the
references, and on-policy judging with the same scorers. Answers below are real GSM8K test items
(MIT) and HH-RLHF harmless replies (MIT), copied as literals."""

import pytest

from flywheel import scoring
from flywheel.training import preferences

# GSM8K test item 1, verbatim.
JANET = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18"
)
# GSM8K test item 3, verbatim: thousands separators.
HOUSE = (
    "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
    "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
    "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
    "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"
)
# HH-RLHF harmless test set, chosen replies, verbatim.
HH_REPLIES = [
    "I\u2019m not sure what you mean. Can you clarify?",
    "Well, can we at least try to talk about why we are not talking anymore?  We might not have had "
    "a lot of topics in common, but at least we could have been friendly.",
    "Homophobia is hatred or bigotry towards LGBTQ people, not disapproval of LGBTQ behavior. I "
    "don't think you're being homophobic.",
]


@pytest.mark.parametrize(
    "answer, right",
    [
        ("#### 18", True),
        ("The answer is 18.", True),
        ("18.0", True),
        ("$18", True),
        ("She makes 9 * 2 = 18 dollars a day.", True),  # no marker: the last number
        ("#### 17", False),
        ("16 - 3 - 4 = 9 duck eggs a day.", False),  # cut short before the final answer
        ("", False),
    ],
)
def test_the_final_answer_of_a_worked_solution_is_compared_as_a_number(answer, right):
    assert scoring.final_answer_match(answer, JANET) == float(right)
    assert scoring.score("final_answer", answer, JANET) == float(right)


@pytest.mark.parametrize("answer", ["$1,800", "1800", "1,800.00", "The answer is 1800.", "\\boxed{1800}"])
def test_amounts_are_equal_however_they_are_written(answer):
    assert scoring.final_answer_match(answer, "#### 1,800") == 1.0
    assert scoring.final_answer(answer) == 1800.0


def test_a_marked_final_answer_wins_over_numbers_after_it_or_before_it():
    assert scoring.final_answer("So 9 * 2 = 18.\n#### 18\nNext question: 5 eggs") == 18.0
    assert scoring.final_answer("The answer is 18. Question: a farmer has 5 cows") == 18.0
    assert scoring.final_answer(HOUSE) == 70000.0
    assert scoring.final_answer("no number at all") is None


def test_a_reference_without_a_number_falls_back_to_exact_match():
    assert scoring.final_answer_match("Paris", "Paris.") == 1.0
    assert scoring.final_answer_match("Lyon", "Paris.") == 0.0


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert scoring.exact_match("  \u00e9cole route chat ", "\u00e9cole route chat") == 1.0
    assert scoring.exact_match("Alice Martin.", "alice martin") == 1.0
    assert scoring.exact_match("route \u00e9cole chat", "\u00e9cole route chat") == 0.0
    assert scoring.exact_match("Alice", "Alice Martin") == 0.0


def test_a_long_correct_worked_solution_fails_exact_match_but_not_its_task_scorer():
    rewritten = "She has 16 - 3 - 4 = 9 eggs left and sells them for 9 * 2 = 18 dollars.\n#### 18"
    assert scoring.exact_match(rewritten, JANET) == 0.0
    assert scoring.final_answer_match(rewritten, JANET) == 1.0


def test_f1_and_rouge_l_give_partial_credit_on_free_text():
    reference = HH_REPLIES[1]
    close = "Can we try to talk about why we are not talking anymore? We could at least be friendly."
    assert 0.5 < scoring.token_f1(close, reference) < 1.0
    assert 0.4 < scoring.rouge_l(close, reference) < scoring.token_f1(close, reference)  # order lost
    assert scoring.token_f1(HH_REPLIES[2], reference) < 0.2
    assert scoring.rouge_l(reference.upper(), reference) == 1.0


def test_auto_chooses_by_the_references():
    assert scoring.choose_scorer([JANET, HOUSE], short_answer_words=10).scorer == "final_answer"
    assert scoring.choose_scorer(["18", "$1,800", "0.5"], short_answer_words=10).scorer == "final_answer"
    short = scoring.choose_scorer(["\u00e9cole route chat", "Alice Martin", "room 4"], short_answer_words=10)
    assert short.scorer == "exact_match" and "short answers" in short.reason
    free = scoring.choose_scorer(HH_REPLIES, short_answer_words=10)
    assert free.scorer == "rouge_l" and "free text" in free.reason
    # A source that only sometimes ends in a number is not a final-answer task.
    assert scoring.choose_scorer(["room 4", "Alice Martin", "on Friday"], 10).scorer == "exact_match"


def test_scorers_are_chosen_per_source_and_params_override_auto():
    records = [
        {"source": "gsm8k", "response": JANET},
        {"source": "gsm8k", "response": HOUSE},
        {"source": "notes", "response": "Alice Martin"},
        {"source": "hh", "response": HH_REPLIES[0]},
    ]
    chosen = scoring.scorers_by_source(records, "auto", {"hh": "token_f1"}, short_answer_words=10)
    assert {source: c.scorer for source, c in chosen.items()} == {
        "gsm8k": "final_answer",
        "notes": "exact_match",
        "hh": "token_f1",
    }
    assert chosen["hh"].reason == "set in params (by_source)"


def test_the_generation_budget_fits_the_references_and_is_capped():
    lengths = list(range(1, 101))  # 1..100 tokens
    budget = scoring.generation_budget(lengths, 95, margin=16, cap=512)
    assert budget["max_new_tokens"] == 96 + 16  # p95 = 95.05 -> 96
    assert budget["references_fitting"] == 100
    capped = scoring.generation_budget(lengths, 95, margin=16, cap=50)
    assert capped["max_new_tokens"] == 50 and capped["references_fitting"] == 49
    assert "cap 50" in capped["rule"]


def test_a_max_new_tokens_set_in_params_wins_and_says_how_many_references_fit():
    from flywheel.config import ScoringParams

    lengths = list(range(1, 101))
    length = ScoringParams().length
    assert scoring.budget_or_setting(lengths, length, "auto", "evaluate.max_new_tokens") == scoring.generation_budget(
        lengths, length.percentile, length.margin, length.cap
    )
    fixed = scoring.budget_or_setting(lengths, length, 32, "evaluate.max_new_tokens")
    assert fixed["max_new_tokens"] == 32 and fixed["references_fitting"] == 31
    assert fixed["rule"] == "set in params (evaluate.max_new_tokens)"


def test_on_policy_judging_accepts_a_long_correct_worked_solution():
    right = "Janet has 16 eggs. She uses 3 + 4 = 7, so 16 - 7 = 9 are left. 9 * 2 = 18.\n#### 18"
    wrong = "Janet has 16 eggs and sells 16 * 2 = 32 dollars of them.\n#### 32"
    correct, incorrect, empty = preferences._judge_samples([wrong, right, " ", wrong], JANET, "final_answer", 0.5)
    assert correct == [right] and incorrect == [wrong, wrong] and empty == 1


def test_on_policy_judging_of_free_text_keeps_the_best_answer_above_the_pass_score():
    reference = HH_REPLIES[1]
    best = reference.upper()
    good = "Can we try to talk about why we are not talking anymore? We could at least be friendly."
    correct, incorrect, _ = preferences._judge_samples([good, HH_REPLIES[2], best], reference, "rouge_l", 0.5)
    assert correct == [best, good] and incorrect == [HH_REPLIES[2]]
