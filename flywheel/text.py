"""Text normalisation and the quality signals the clean stage filters on."""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter

_KEEP_CONTROLS = {"\n", "\t"}
_CONTROL_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}  # control, format (zero-width), surrogate, …
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:p|div|br|li|ul|ol|tr|h[1-6]|pre|blockquote|table)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|<!--.*?-->", re.DOTALL)


def strip_markup(text: str) -> str:
    """Drop HTML tags (block tags become line breaks) and decode entities."""
    if "<" not in text and "&" not in text:
        return text
    text = _SCRIPT_OR_STYLE.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    return html.unescape(text)


def _drop_controls(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        char for char in text if char in _KEEP_CONTROLS or unicodedata.category(char) not in _CONTROL_CATEGORIES
    )


def normalize(text: str | None, *, markup: bool = False) -> str | None:
    """NFKC, no control or zero-width characters, one space between words, at most one blank line."""
    if text is None:
        return None
    if markup:
        text = strip_markup(text)
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _drop_controls(text)
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def dedup_key(text: str) -> str:
    """Exact-duplicate key: normalised text, case-folded, all white space as single spaces."""
    return " ".join(text.casefold().split())


def prompt_key(record: dict) -> str:
    """What makes two records ask the same thing: the prompt and its context, as dedup_key sees them."""
    return dedup_key(f"{record['prompt']}\n{record['context'] or ''}")


def duplicate_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (Gopher's dup_line_frac)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Share of characters inside word n-grams that occur more than once (Gopher-style)."""
    if len(words) < n * 2:
        return 0.0
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(ngrams)
    repeated = [False] * len(words)
    for start, gram in enumerate(ngrams):
        if counts[gram] > 1:
            repeated[start : start + n] = [True] * n
    total = sum(len(word) for word in words)
    return sum(len(word) for word, flag in zip(words, repeated) if flag) / total if total else 0.0


def symbol_word_ratio(words: list[str]) -> float:
    """Share of words with no letter or digit at all ('###', '...', '@@!')."""
    if not words:
        return 0.0
    return sum(1 for word in words if not any(char.isalnum() for char in word)) / len(words)


def non_alpha_ratio(text: str) -> float:
    """Share of non-space characters that are not letters."""
    visible = [char for char in text if not char.isspace()]
    if not visible:
        return 0.0
    return sum(1 for char in visible if not char.isalpha()) / len(visible)
