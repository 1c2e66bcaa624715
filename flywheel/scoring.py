"""Judging an answer against its reference answer, the way the task asks: exact match for short
answers, the final number for worked solutions (`... #### 18`), token F1 or ROUGE-L for free text.
The evaluate stage scores test answers with it and the preferences stage judges the SFT model's
own samples with it, so "correct" means the same thing in both (and training may not import
evaluation: this is the core).

`auto` chooses a scorer per source from its references, and says why (see `choose_scorer`).
Token F1 and ROUGE-L follow the SQuAD and ROUGE definitions on lower-cased word tokens without
punctuation. Refusals and empty answers are found here too: evaluation, monitoring and the
hallucination detector leave them unjudged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SCORERS = ("exact_match", "final_answer", "token_f1", "rouge_l")
# Scorers whose score is 0 or 1 (right or wrong); the others give partial credit.
ACCURACY_SCORERS = ("exact_match", "final_answer")

_WORD = re.compile(r"\w+", re.UNICODE)
# A number as people write it: -3, 18, 18.0, 1,800 (thousands separators), .5; currency and
# percent signs around it are ignored.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?![\w])")
# Where a worked answer states its final answer, most explicit first. GSM8K ends with "#### 18";
# MATH-style answers box it; chat models say "The answer is 18."
_FINAL_MARKERS = (
    re.compile(r"####\s*(.+)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE),
)
# A reference that is nothing but an amount: "18", "$1,800", "-2.5", "40%".
_BARE_AMOUNT = re.compile(r"^\s*[$€£]?\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?\s*%?\s*\.?\s*$")
# First-person refusals and apologies at the start of a sentence: "I cannot help with that.",
# "I'm sorry, but I can't ...", "As an AI, I won't ...".
_REFUSAL = re.compile(
    r"(^|[.!?]\s+)(i\s+(cannot|can't|can not|won't|will not|am not able to|am unable to|must decline)"
    r"|i'm\s+(sorry|not able|unable)|sorry,\s+(but\s+)?i\b|as an ai\b)",
    re.IGNORECASE,
)


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer.strip()))


def is_empty(answer: str) -> bool:
    return not answer.strip()


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# The scorers: each takes (prediction, reference) and returns a score in [0, 1]


def exact_match(prediction: str, reference: str) -> float:
    """The same words in the same order, ignoring case, punctuation and spacing."""
    return float(tokens(prediction) == tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common token subsequence, as precision and recall."""
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float ("$1,800" -> 1800.0, "18.0" -> 18.0), or None."""
    for match in _NUMBER.finditer(text):
        if any(ch.isdigit() for ch in match.group()):
            return float(match.group().replace(",", ""))
    return None


def final_answer(text: str) -> float | None:
    """The final numeric answer of a worked solution: after the last `####`, in the last
    `\\boxed{}`, after the last "answer is", else the last number in the text."""
    for marker in _FINAL_MARKERS:
        found = marker.findall(text)
        if found:
            number = parse_number(found[-1])
            if number is not None:
                return number
    numbers = [m.group() for m in _NUMBER.finditer(text) if any(ch.isdigit() for ch in m.group())]
    return float(numbers[-1].replace(",", "")) if numbers else None


def has_marked_final_answer(text: str) -> bool:
    """Whether a reference states its final answer explicitly (a marker, or only an amount)."""
    if _BARE_AMOUNT.match(text) and any(ch.isdigit() for ch in text):
        return True
    return any(parse_number(found[-1]) is not None for m in _FINAL_MARKERS if (found := m.findall(text)))


def final_answer_match(prediction: str, reference: str) -> float:
    """1 when the prediction's final number equals the reference's (as numbers: 18 == 18.0 ==
    "$18"); a reference with no number at all falls back to exact match."""
    expected = final_answer(reference)
    if expected is None:
        return exact_match(prediction, reference)
    predicted = final_answer(prediction)
    return float(predicted is not None and math.isclose(predicted, expected, rel_tol=1e-6, abs_tol=1e-9))


SCORE: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "final_answer": final_answer_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def score(scorer: str, prediction: str, reference: str) -> float:
    return SCORE[scorer](prediction, reference)


def pass_mark(scorer: str, pass_score: float) -> float:
    """The score that makes an answer correct: 1 for the accuracy scorers, else `pass_score`."""
    return 1.0 if scorer in ACCURACY_SCORERS else pass_score


def is_correct(scorer: str, prediction: str, reference: str, pass_score: float) -> bool:
    return score(scorer, prediction, reference) >= pass_mark(scorer, pass_score)


# ---------------------------------------------------------------------------------------------
# Choosing a scorer for a task

# `auto` takes the final-answer scorer when at least this share of a source's references state a
# final number: GSM8K has 100%; free text that happens to end in a number does not reach it.
FINAL_ANSWER_SHARE = 0.9
# `auto` looks at this percentile of the references' word counts to call a task short-answer.
SHORT_ANSWER_PERCENTILE = 90


@dataclass(frozen=True)
class Choice:
    scorer: str
    reason: str


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def choose_scorer(references: list[str], short_answer_words: int) -> Choice:
    """The scorer for a task, from its references: a stated final number -> final_answer; short
    references -> exact_match; longer free text -> rouge_l (word order matters, unlike F1)."""
    if not references:
        return Choice("exact_match", "no references to look at")
    marked = sum(map(has_marked_final_answer, references)) / len(references)
    if marked >= FINAL_ANSWER_SHARE:
        return Choice("final_answer", f"{marked:.0%} of {len(references)} references state a final number")
    words = percentile([len(tokens(r)) for r in references], SHORT_ANSWER_PERCENTILE)
    if words <= short_answer_words:
        return Choice(
            "exact_match",
            f"short answers: {SHORT_ANSWER_PERCENTILE}% of {len(references)} references have "
            f"<= {words:.0f} words (short_answer_words {short_answer_words})",
        )
    return Choice(
        "rouge_l",
        f"free text: the {SHORT_ANSWER_PERCENTILE}th percentile of {len(references)} references is "
        f"{words:.0f} words (> short_answer_words {short_answer_words})",
    )


def scorers_by_source(
    records: list[dict], default: str, by_source: dict[str, str], short_answer_words: int
) -> dict[str, Choice]:
    """{source: Choice} for every source among `records` (dicts with source and response)."""
    references: dict[str, list[str]] = {}
    for record in records:
        references.setdefault(record.get("source") or "unknown", []).append(record["response"])
    choices = {}
    for source, texts in sorted(references.items()):
        named = by_source.get(source, default)
        if named == "auto":
            choices[source] = choose_scorer(texts, short_answer_words)
        else:
            where = "by_source" if source in by_source else "scorer"
            choices[source] = Choice(named, f"set in params ({where})")
    return choices


def scorers_for(records: list[dict], judging) -> dict[str, str]:
    """{source: scorer} for the records, as the evaluate.scoring params (`judging`) choose."""
    choices = scorers_by_source(records, judging.scorer, judging.by_source, judging.short_answer_words)
    return {source: choice.scorer for source, choice in choices.items()}


def task_score(answers: list[str], records: list[dict], scorers: dict[str, str]) -> float | None:
    """A training stage's held-out probe, judged as evaluate judges: the mean score of the answers,
    each by its source's scorer (`scorers_for` the records)."""
    return mean(
        score(scorers[record.get("source") or "unknown"], answer, record["response"])
        for answer, record in zip(answers, records)
    )


# ---------------------------------------------------------------------------------------------
# How long an answer may be


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text under a Hugging Face tokenizer, without special tokens."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def generation_budget(lengths: list[int], q: float, margin: int, cap: int) -> dict:
    """max_new_tokens for answers like these references: their q-th percentile length plus a
    margin (the end token, rewording), at most `cap`; and how many references fit in it."""
    if not lengths:
        return {"max_new_tokens": cap, "rule": f"no references: the cap {cap}", "references": 0}
    at_percentile = percentile(lengths, q)
    budget = min(cap, max(1, math.ceil(at_percentile) + margin))
    return {
        "max_new_tokens": budget,
        "rule": f"p{q:g} of reference lengths {at_percentile:.0f} + margin {margin}, cap {cap}",
        "references": len(lengths),
        "reference_tokens_p50": percentile(lengths, 50),
        "reference_tokens_p95": percentile(lengths, 95),
        "reference_tokens_max": max(lengths),
        "references_fitting": sum(length < budget for length in lengths),
    }


def budget_or_setting(lengths: list[int], length, setting: int | str, key: str) -> dict:
    """generation_budget under `length` (percentile, margin, cap), unless the param `key` sets
    max_new_tokens to a number, which then wins; either way, how many references fit."""
    budget = generation_budget(lengths, length.percentile, length.margin, length.cap)
    if setting == "auto":
        return budget
    fitting = sum(n < setting for n in lengths)
    return {**budget, "max_new_tokens": setting, "rule": f"set in params ({key})", "references_fitting": fitting}
