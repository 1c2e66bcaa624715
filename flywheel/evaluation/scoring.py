"""Scoring one answer: refusals, empty answers and the numbers it states, with the task
scorers of the core (token F1, ROUGE-L, exact match, final answer: flywheel/scoring.py, which the
preferences stage uses too). Evaluation and monitoring score answers the same way."""

from __future__ import annotations

import re

# Re-exported: evaluation and monitoring call them as scoring.token_f1, scoring.mean, ...
from flywheel.scoring import mean as mean
from flywheel.scoring import rouge_l as rouge_l
from flywheel.scoring import token_f1 as token_f1
from flywheel.scoring import tokens as tokens

# First-person refusals and apologies at the start of a sentence: "I cannot help with that.",
# "I'm sorry, but I can't ...", "As an AI, I won't ...".
_REFUSAL = re.compile(
    r"(^|[.!?]\s+)(i\s+(cannot|can't|can not|won't|will not|am not able to|am unable to|must decline)"
    r"|i'm\s+(sorry|not able|unable)|sorry,\s+(but\s+)?i\b|as an ai\b)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer.strip()))


def is_empty(answer: str) -> bool:
    return not answer.strip()


def numbers(text: str) -> set[str]:
    return {n.replace(",", ".") for n in _NUMBER.findall(text)}
