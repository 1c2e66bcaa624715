"""Table-driven: every positive must be redacted as its type (recall), every negative must
survive untouched (precision); redaction stays linear-time on adversarial text."""

import time

import pytest

from flywheel.pii import find_pii, luhn_valid, redact

POSITIVES = [
    ("email", "write to jane.doe+news@mail.example.co.uk today"),
    ("email", "Contact: ops@example.com."),
    ("phone", "call +44 20 7946 0958 now"),
    ("phone", "call +1 (415) 555-0132"),
    ("phone", "ring (555) 123-4567 after six"),
    ("phone", "or 555.123.4567"),
    ("phone", "mobile +49 151 23456789"),
    ("phone", "tel: +33 1 42 68 53 00"),
    ("phone", "+91 98765 43210"),
    ("phone", "+1 917-444-6321"),  # shapes seen in Anthropic HH transcripts
    ("phone", "his number is (512) 555-0202."),
    ("phone", "home 555 123 4567"),
    ("phone", "UK 020 7946 0958"),  # national numbers keep their trunk prefix 0
    ("phone", "portable 06 12 34 56 78"),
    ("ip_address", "server at 192.168.10.254 is down"),
    ("ip_address", "host 8.8.8.8"),
    ("ip_address", "v6 address 2001:db8:85a3::8a2e:370:7334 here"),
    ("ip_address", "link-local fe80::1ff:fe23:4567:890a"),
    ("card_number", "card 4539 1488 0343 6467 expires"),
    ("card_number", "paid with 5555-5555-5555-4444"),
    ("card_number", "amex 378282246310005"),
    ("card_number", "amex 3782 822463 10005 on file"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32 please"),
    ("iban", "to DE89370400440532013000"),
    ("secret", "key AKIAIOSFODNN7EXAMPLE in the config"),
    ("secret", "token ghp_0123456789abcdefghijABCDEFGHIJ012345"),
    ("secret", "OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx123"),
    ("secret", 'password: "correct-horse-battery"'),
    ("secret", "slack xoxb-1234567890-abcdefghij"),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"),
    ("secret", "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
]

NEGATIVES = [
    "order number 1234567890123 ships Monday",  # fails Luhn: an order, not a card
    "order 4539148803436468",  # 16 digits, Luhn-invalid
    "the meeting is on 2026-11-22 at 10:30:00",  # a date and a time
    "version 1.2.3 of the library",  # not four octets
    "pi is 3.14159265358979",
    "invoice 20261122",  # 8 digits
    "call 1234567890",  # a bare run of digits: account or order number
    "build 10.0.19045.2965",  # a version, not an address or phone
    "the ratio is 3:2:1",
    "GB82 is a code but not an IBAN",
    "email me at the office",
    "sk-short",
    "Translate to French: red cat",
    "user@localhost is not an address with a domain",
    # Arithmetic, as worked maths solutions write it (GSM8K): sums are not phones or cards, even
    # when their digits happen to pass the Luhn check (2000000400000 does).
    "100 - 50 - 30 - 15",
    "2000000-400000",
    "so 2,000,000 - 400,000 = 1,600,000 dollars",
    "She has 1000 minutes - 450 minutes - 300 minutes = <<1000-450-300=250>>250 minutes",
    "He paid 2400-1100-700=<<2400-1100-700=600>>600 dollars for the monitors.",
    "Gary's truck can carry 11,600-4000-4800=<<11600-4000-4800=2800>>2800 pounds",
    "(100 - 50) - 30 - 15 = 5",
    # Dates, versions and identifiers
    "due 22.11.2026 or 11/22/2026",
    "release v2.14.3-rc1",
    "ISBN 978-3-16-148410-0",
    "UUID 123e4567-e89b-12d3-a456-426614174000",
    "order 2024-000123-77",
    "ticket 20261122-0042",
    "the log line 12:30:45:10:22:33",
]


@pytest.mark.parametrize("kind,text", POSITIVES)
def test_positives_are_redacted_as_their_type(kind, text):
    redacted, counts = redact(text)
    assert counts == {kind: 1}, (redacted, counts)
    assert f"[{kind.upper()}]" in redacted
    assert find_pii(redacted) == []  # nothing left for validation to find


@pytest.mark.parametrize("text", NEGATIVES)
def test_negatives_survive(text):
    assert redact(text) == (text, {})


def test_recall_and_precision_over_the_table():
    hits = sum(redact(text)[1] == {kind: 1} for kind, text in POSITIVES)
    false_alarms = sum(bool(redact(text)[1]) for text in NEGATIVES)
    recall = hits / len(POSITIVES)
    precision = hits / (hits + false_alarms)
    assert recall == 1.0 and precision == 1.0


def test_secret_assignment_keeps_the_name():
    assert redact("api_key = abcd1234efgh5678")[0] == "api_key = [SECRET]"


def test_luhn():
    assert luhn_valid("4539148803436467") and not luhn_valid("4539148803436468")


ADVERSARIAL = {
    "e-mail local part without an @": lambda n: "a." * n,
    "digit runs with dashes": lambda n: "1-" * n,
    "dotted digits": lambda n: "1." * n,
    "private key BEGIN lines without an END": lambda n: "-----BEGIN RSA PRIVATE KEY-----" * (n // 16),
    "a long domain": lambda n: "x@" + "a-" * n,
}


def _seconds(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        redact(text)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_redaction_time_grows_linearly_on_adversarial_text(kind):
    # Serving redacts what clients send: "a." * 100_000 in one feedback request used to hold the
    # server 19 s (quadratic backtracking). Four times the text may take four times as long, not 16.
    make = ADVERSARIAL[kind]
    small, large = _seconds(make(10_000)), _seconds(make(40_000))
    assert large < 8 * small + 0.01, f"{kind}: {small * 1000:.1f} ms -> {large * 1000:.1f} ms for 4x the text"
    assert large < 1.0
