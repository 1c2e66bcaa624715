"""The clean stage's record-level steps (markup, PII, quality filters) on real instruction data.

    python benchmarks/clean_real_data.py [--datasets ../shared/datasets] [--show 5]

GSM8K test (question -> prompt, answer -> response) and Anthropic HH harmless-base test (the
chosen transcript: last human turn -> prompt, last assistant reply -> response, earlier turns
-> context, as a transcript source would carry them) go through clean.clean_record and
clean.quality_problem with the params.yaml settings. Prints, per set: records, removals per
filter, PII placeholders per type, records whose markup was stripped, and with --show N the
first N removed records / redactions of each kind, so every removal can be explained.
Deduplication is left out: it is about the collection, not the record.
Goals (issue #17): on GSM8K quality filters remove < 2% and no PII placeholder lands in
arithmetic; on HH no angle-bracketed prose is stripped as markup.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

from flywheel.config import load_params
from flywheel.data import clean
from flywheel.data.records import Rejected, parse_transcript, split_conversation
from flywheel.pii import PLACEHOLDER_PATTERN

REPO = Path(__file__).resolve().parents[1]


def gsm8k(path: Path):
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            item = json.loads(line)
            yield _record(f"gsm8k-{number}", item["question"], item["answer"], None)


def hh_chosen(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                _, history, prompt, response = split_conversation(parse_transcript(json.loads(line)["chosen"]))
            except Rejected:
                continue  # ingest would quarantine it; not what this measures
            context = "\n\n".join(turn["content"] for turn in history) or None
            yield _record(f"hh-{number}", prompt, response, context)


def _record(record_id: str, prompt: str, response: str, context: str | None) -> dict:
    return {
        "id": record_id,
        "prompt": prompt,
        "response": response,
        "context": context,
        "system": None,
        "source": "real",
        "metadata": "{}",
    }


def measure(name: str, records, params, show: int) -> None:
    limits = params.clean.filters
    removed: Counter[str] = Counter()  # by the first filter failed, as the stage counts them
    flagged: Counter[str] = Counter()  # by each ratio filter on its own
    pii: Counter[str] = Counter()
    markup_tags = markup_records = total = 0
    examples: dict[str, list[str]] = {}
    for record in records:
        total += 1
        cleaned, found, tags = clean.clean_record(record, params.clean)
        pii.update(found)
        markup_tags += tags
        markup_records += bool(tags)
        if tags:
            examples.setdefault("markup", []).append(f"{record['id']}: {tags} tags")
        for kind in found:
            for field in ("prompt", "response", "context"):
                for hit in PLACEHOLDER_PATTERN.finditer(cleaned[field] or ""):
                    if hit.group() == f"[{kind.upper()}]":
                        snippet = (cleaned[field] or "")[max(0, hit.start() - 40) : hit.end() + 40]
                        examples.setdefault(f"pii {kind}", []).append(f"{record['id']}: …{snippet}…")
        for reason, value, limit in clean.quality_signals(cleaned, limits) if cleaned["response"] else []:
            flagged[reason] += value > limit
        problem = clean.quality_problem(cleaned, limits)
        if problem:
            removed[problem[0]] += 1
            examples.setdefault(f"removed {problem[0]}", []).append(
                f"{record['id']} ({problem[1]}): {cleaned['response'][:200]!r}"
            )
    gone = sum(removed.values())
    print(f"{name}: {total:,} records")
    print(f"  quality filters removed {gone:,} ({gone / total:.1%}): {dict(sorted(removed.items()))}")
    print(f"  each ratio filter on its own would remove: {dict(sorted(flagged.items()))}")
    print(f"  PII placeholders: {dict(sorted(pii.items()))}")
    print(f"  HTML stripped: {markup_tags:,} tags from {markup_records:,} records")
    for label, lines in sorted(examples.items()):
        for line in lines[:show]:
            print(f"    [{label}] {line}".replace("\n", " / "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--show", type=int, default=0, help="examples printed per removal reason / PII kind")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    measure("gsm8k_test", gsm8k(args.datasets / "gsm8k_test.jsonl"), params, args.show)
    measure("hh_harmless_test (chosen)", hh_chosen(args.datasets / "hh_harmless_test.jsonl.gz"), params, args.show)


if __name__ == "__main__":
    main()
