"""PII and secret redaction with typed placeholders: [EMAIL], [PHONE], [IP_ADDRESS],
[CARD_NUMBER], [IBAN], [SECRET].

Shared by the clean stage and by serving (prompts are redacted before they are logged).
Candidates found by regular expressions are checked before they are replaced: card numbers must
pass the Luhn check (so order numbers survive), IBANs the ISO 7064 mod-97 check, IPv6 addresses
Python's parser, phone numbers must have 9–15 digits and look like a phone, not a date.
Arithmetic is not PII: a number run written next to `=`, `+`, `*` (worked solutions write
`1000-450-300 = 250` and `<<2000000-400000=1600000>>`), a minus with spaces around it, or digit
groups no card is printed in (`2000000-400000`) are left alone, even when Luhn-valid by chance.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

PLACEHOLDERS = {
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "card_number": "[CARD_NUMBER]",
    "ip_address": "[IP_ADDRESS]",
    "phone": "[PHONE]",
}
PLACEHOLDER_PATTERN = re.compile(r"\[(?:SECRET|EMAIL|IBAN|CARD_NUMBER|IP_ADDRESS|PHONE)\]")

# Every pattern below is bounded per starting position (no unbounded run before a required
# character), so redaction takes linear time on any text: serving redacts what clients send.
# A PEM private key is found by pairing BEGIN and END lines (_redact_private_keys), not by a
# lazy `.*?`, which scans to the end of the text from every BEGIN line without an END.
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z ]{0,40}PRIVATE KEY-----")
_SECRETS = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{40,}\b"
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style keys
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API key
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    # key = value assignments: the name stays (group `keep`), the value goes
    r"|(?P<keep>(?i:\b(?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key)\b\s*[:=]\s*))"
    r"['\"]?[A-Za-z0-9_\-/+=.]{8,}['\"]?",
)
# RFC 5321's limits: a local part of at most 64 characters, labels of at most 63, 127 labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"\b[A-Za-z0-9._%+-]{{1,64}}@{_LABEL}(?:\.{_LABEL}){{0,126}}\.[A-Za-z]{{2,63}}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+|\(\+?)?\d[\d ().-]{6,20}\d(?!\w)")
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
# Phone shapes without a country code: North American 555-123-4567 (one separator throughout,
# optionally after a leading 1), or a national number with its trunk prefix 0 (020 7946 0958,
# 06 12 34 56 78). Results of sums rarely start with 0; their digit groups rarely fall 3-3-4.
_NORTH_AMERICAN = re.compile(r"^(?:1[ .-]?)?\d{3}([ .-])\d{3}\1\d{4}$")
_TRUNK_PREFIXED = re.compile(r"^0\d{1,4}([ .-])\d{2,8}(?:\1\d{2,8}){0,3}$")
_AREA_CODE_FIRST = re.compile(r"^\(\+?\d{1,5}\)[ .-]?\d")
_SPACED_MINUS = re.compile(r"\s-|-\s")
_ARITHMETIC_NEIGHBOURS = set("=+*×÷^")
_NEIGHBOUR_WINDOW = 8  # characters looked at either side; bounded, so long texts stay linear


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char)
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _beside_arithmetic(match: re.Match) -> bool:
    """Whether the nearest character either side (past spaces) is an arithmetic operator."""
    text = match.string
    before = text[max(0, match.start() - _NEIGHBOUR_WINDOW) : match.start()].rstrip()[-1:]
    after = text[match.end() : match.end() + _NEIGHBOUR_WINDOW].lstrip()[:1]
    return bool({before, after} & _ARITHMETIC_NEIGHBOURS)


def _card_grouping(groups: list[str]) -> bool:
    """One run of digits, or the groups cards are printed in: 4-4-4-4(-1..3), 4-6-5, 4-6-4."""
    lengths = [len(group) for group in groups]
    if len(lengths) == 1 or lengths in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(length == 4 for length in lengths[:-1]) and 1 <= lengths[-1] <= 4


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    if not (13 <= len(digits) <= 19 and luhn_valid(digits)):
        return False
    return _card_grouping(re.findall(r"\d+", match.group())) and not _beside_arithmetic(match)


def _iban(match: re.Match) -> bool:
    compact = match.group().replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _ipv6(match: re.Match) -> bool:
    try:
        ipaddress.IPv6Address(match.group().split("%")[0])
    except ValueError:
        return False
    return True


def _phone(match: re.Match) -> bool:
    text = match.group().strip()
    digits = re.sub(r"\D", "", text)
    if not 9 <= len(digits) <= 15 or _DATE_LIKE.match(text):
        return False
    if _SPACED_MINUS.search(text) or _beside_arithmetic(match):
        return False  # 100 - 50 - 30 - 15, 1000-450-300 = 250
    if text.startswith("+"):
        return len(re.findall(r"\d+", text)) >= 2
    if text.startswith("("):
        return bool(_AREA_CODE_FIRST.match(text)) and len(re.findall(r"\d+", text)) >= 3
    # A bare run of digits is an order or account number, and 3.14159265 is a number.
    return bool(_NORTH_AMERICAN.match(text) or _TRUNK_PREFIXED.match(text))


# Order matters: a secret or e-mail may contain digit runs that look like phones.
_DETECTORS: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("secret", _SECRETS, None),
    ("email", _EMAIL, None),
    ("iban", _IBAN, _iban),
    ("card_number", _CARD, _card),
    ("ip_address", _IPV4, None),
    ("ip_address", _IPV6, _ipv6),
    ("phone", _PHONE, _phone),
]


def _redact_private_keys(text: str) -> tuple[str, int]:
    """PEM private key blocks, each from a BEGIN line to the first END line after it."""
    pieces, count, position = [], 0, 0
    while (begin := _PEM_BEGIN.search(text, position)) is not None:
        end = _PEM_END.search(text, begin.end())
        if end is None:  # no END after this BEGIN, so none after any later one either
            break
        pieces += [text[position : begin.start()], PLACEHOLDERS["secret"]]
        count, position = count + 1, end.end()
    return "".join(pieces) + text[position:], count


def redact(text: str) -> tuple[str, Counter]:
    """Return the text with PII replaced by typed placeholders, and the count per type."""
    counts: Counter[str] = Counter()
    text, private_keys = _redact_private_keys(text)
    if private_keys:
        counts["secret"] = private_keys
    for kind, pattern, is_valid in _DETECTORS:

        def replace(match: re.Match, kind=kind, is_valid=is_valid) -> str:
            if is_valid is not None and not is_valid(match):
                return match.group()
            counts[kind] += 1
            return (match.groupdict().get("keep") or "") + PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts


def find_pii(text: str) -> list[str]:
    """The kinds of PII still present in `text` (what validation checks for after cleaning)."""
    return sorted(kind for kind, count in redact(text)[1].items() if count)
