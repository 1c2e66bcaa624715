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
# Real HTML only. Angle brackets also wrap prose and placeholders in instruction and dialogue
# data ("<long answer>", "<repeats himself …>", "<name>", "<title>"), and that is content. A tag
# counts as markup when its name is an HTML element and it is well formed: it carries
# attributes (`name="value"` or a boolean one), or is a line-break element, or an element whose
# end tag HTML lets you leave out, or its counterpart (<b> for </b> and back) is in the same text,
# or it stands right next to another such tag.
_HTML_ELEMENTS = frozenset(
    "a abbr address area article aside audio b bdi bdo big blockquote body br button canvas caption center "
    "cite code col colgroup dd del details dfn div dl dt em embed fieldset figcaption figure font footer form "
    "h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend li link main mark meta nav "
    "noscript object ol option p picture pre q s samp section select small source span strike strong sub "
    "summary sup svg table tbody td textarea tfoot th thead title tr tt u ul var video wbr".split()
)
_BARE_IS_MARKUP = frozenset("br hr wbr p li dt dd tr td th".split())
_BLOCK_ELEMENTS = frozenset("p div br li ul ol tr h1 h2 h3 h4 h5 h6 pre blockquote table hr".split())
_BOOLEAN_ATTRIBUTES = "checked|disabled|selected|hidden|required|readonly|multiple|controls|open|async|defer"
_ATTRIBUTE = (
    r"""\s+[A-Za-z_:][-\w:.]*\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+)"""
    rf"|\s+(?i:{_BOOLEAN_ATTRIBUTES})(?![-\w])"
)
_TAG = re.compile(rf"<(/?)([A-Za-z][A-Za-z0-9]*)((?:{_ATTRIBUTE})*)\s*/?>|<!--.*?-->", re.DOTALL)


def _markup_spans(text: str) -> set[int]:
    """Start offsets of the tag-shaped spans that are real HTML (see the rules above)."""
    tags = [
        match for match in _TAG.finditer(text) if match.group(2) is None or match.group(2).lower() in _HTML_ELEMENTS
    ]
    present = {(match.group(1), match.group(2).lower()) for match in tags if match.group(2)}
    markup = set()
    for position, match in enumerate(tags):
        if match.group(2) is None:  # a comment
            markup.add(match.start())
            continue
        closing, name = match.group(1), match.group(2).lower()
        # Tags in a row (<pre><h3>, </li>\n<li>) are markup even when a fragment leaves them unclosed.
        neighbours = [tags[i] for i in (position - 1, position + 1) if 0 <= i < len(tags)]
        in_a_row = any(
            not text[min(match.end(), other.end()) : max(match.start(), other.start())].strip() for other in neighbours
        )
        if match.group(3) or name in _BARE_IS_MARKUP or ("" if closing else "/", name) in present or in_a_row:
            markup.add(match.start())
    return markup


def strip_markup(text: str) -> tuple[str, int]:
    """Drop HTML tags (block tags become line breaks) and decode entities; return the text and
    how many tags, comments and script/style blocks went. Angle-bracketed prose stays."""
    if "<" not in text and "&" not in text:
        return text, 0
    text, stripped = _SCRIPT_OR_STYLE.subn(" ", text)
    markup = _markup_spans(text)

    def drop(match: re.Match) -> str:
        nonlocal stripped
        if match.start() not in markup:
            return match.group()
        stripped += 1
        return "\n" if (match.group(2) or "").lower() in _BLOCK_ELEMENTS else ""

    text = _TAG.sub(drop, text)
    return html.unescape(text), stripped


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
        text, _ = strip_markup(text)
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
    """Share of characters inside word n-grams that occur more than once (Gopher's duplicate
    n-gram fraction). A text of n words or fewer has no n-gram to repeat: 0."""
    if len(words) <= n:
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
