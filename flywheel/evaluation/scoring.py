"""Scoring one answer against its reference: token F1 and ROUGE-L (the SQuAD and ROUGE
definitions, on lower-cased word tokens without punctuation), refusals and empty answers.
Evaluation and monitoring score answers the same way."""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+", re.UNICODE)
# First-person refusals and apologies at the start of a sentence: "I cannot help with that.",
# "I'm sorry, but I can't ...", "As an AI, I won't ...".
_REFUSAL = re.compile(
    r"(^|[.!?]\s+)(i\s+(cannot|can't|can not|won't|will not|am not able to|am unable to|must decline)"
    r"|i'm\s+(sorry|not able|unable)|sorry,\s+(but\s+)?i\b|as an ai\b)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer.strip()))


def is_empty(answer: str) -> bool:
    return not answer.strip()


def numbers(text: str) -> set[str]:
    return {n.replace(",", ".") for n in _NUMBER.findall(text)}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
