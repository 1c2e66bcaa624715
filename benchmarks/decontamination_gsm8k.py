"""Decontamination on real math problems: are copies of benchmark items found, and are unrelated
problems that share the usual phrasing ("How many ... does she have left?") left alone?

    .venv/bin/python benchmarks/decontamination_gsm8k.py [../shared/datasets/gsm8k_test.jsonl]

GSM8K's test set is split in two halves by a seeded shuffle: one half plays the train split, the
other a benchmark file (question + answer fields). Every GSM8K problem is a different problem, so
any train-half problem flagged is a false positive (each is printed with the shared n-gram, to
judge). Then planted copies of benchmark items, of six kinds, are matched the same way; and the
Jaccard similarity of each copy (3-word shingles, what clean's MinHash estimates, threshold 0.7) shows
what the MinHash check the split used before would have caught. Last, the split stage itself runs on
the train half plus the copies, with the other half named as a benchmark, and prints its metrics.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from flywheel.config import DecontaminateParams
from flywheel.data.decontaminate import Index, Item, words

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "../shared/datasets/gsm8k_test.jsonl"
SEED = 0


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def index_of(items: list[dict], n: int) -> Index:
    index = Index(DecontaminateParams(n=n, min_words=min(8, n)))
    for number, item in enumerate(items):
        index.add(Item("benchmark", str(number)), [item["question"], item["answer"]])
    return index


def reword_every(text: str, k: int) -> str:
    """Change every k-th word (a synonym-like swap): no run of k or more original words survives."""
    tokens = text.split()
    return " ".join(f"{w}s" if i % k == k - 1 else w for i, w in enumerate(tokens))


def change_numbers(text: str, rng: random.Random) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), text)


def planted_copies(benchmark: list[dict], rng: random.Random) -> list[tuple[str, dict]]:
    """(kind, {question, answer}) pairs derived from benchmark items, 40 of each kind."""
    picks = rng.sample(range(len(benchmark)), 40)
    kinds = {
        "exact copy": lambda b: (b["question"], b["answer"]),
        "question, new answer": lambda b: (b["question"], "The answer is 7."),
        "question inside a longer prompt": lambda b: (f"My homework says: {b['question']} Explain.", "Sure."),
        "answer, reworded question": lambda b: ("Please solve the word problem.", b["answer"]),
        "numbers changed": lambda b: (change_numbers(b["question"], rng), change_numbers(b["answer"], rng)),
        "every 10th word changed": lambda b: (reword_every(b["question"], 10), "It is 4."),
    }
    return [
        (kind, dict(zip(("question", "answer"), make(benchmark[i])))) for kind, make in kinds.items() for i in picks
    ]


def jaccard(a: str, b: str, size: int = 3) -> float:
    def shingles(text: str) -> set:
        tokens = words(text)
        return {tuple(tokens[i : i + size]) for i in range(max(1, len(tokens) - size + 1))}

    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def false_positives(train: list[dict], benchmark: list[dict]) -> None:
    print(f"false positives: {len(train)} train-half problems against {len(benchmark)} benchmark problems")
    print("  (question + answer on both sides; every flag is an unrelated problem)")
    for n in (6, 8, 10, 13):
        index = index_of(benchmark, n)
        start = time.perf_counter()
        flagged = [(item, index.match([item["question"], item["answer"]])) for item in train]
        seconds = time.perf_counter() - start
        flagged = [(item, match) for item, match in flagged if match]
        pairs = len(train) * len(benchmark)
        print(
            f"  n={n:2}: {len(flagged):3} of {len(train)} flagged ({len(flagged) / len(train):.2%}); "
            f"per pair {len(flagged) / pairs:.5%}; {len(train) / seconds:,.0f} records/s"
        )
        for _, match in flagged[:10]:
            print(f"         shared: {match.ngram!r}")


def recall(benchmark: list[dict], copies: list[tuple[str, dict]]) -> None:
    print(f"\nplanted copies of benchmark items ({len(copies)}): found by n-gram / Jaccard >= 0.7")
    for n in (8, 10, 13):
        index = index_of(benchmark, n)
        found: dict[str, list[int]] = {}
        for kind, copy in copies:
            hit = index.match([copy["question"], copy["answer"]]) is not None
            found.setdefault(kind, []).append(hit)
        print(f"  n={n}: " + "; ".join(f"{kind} {sum(h)}/{len(h)}" for kind, h in found.items()))
    print("  MinHash-style check (3-word shingles, Jaccard >= 0.7, question + answer):")
    by_kind: dict[str, list[float]] = {}
    for kind, copy in copies:
        best = max(
            jaccard(f"{copy['question']}\n{copy['answer']}", f"{b['question']}\n{b['answer']}") for b in benchmark
        )
        by_kind.setdefault(kind, []).append(best)
    print("    " + "; ".join(f"{kind} {sum(v >= 0.7 for v in vs)}/{len(vs)}" for kind, vs in by_kind.items()))


def stage_run(train: list[dict], benchmark: list[dict], copies: list[tuple[str, dict]]) -> None:
    """The split stage on the train half plus the copies, the other half named as a benchmark."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.config import parse_params
    from flywheel.data import split
    from flywheel.data.records import RECORD_SCHEMA, content_id

    def record(prompt: str, response: str) -> dict:
        return {
            **dict.fromkeys(RECORD_SCHEMA.names),
            **{"id": content_id(prompt, response, None, None, []), "prompt": prompt, "response": response},
            **{"source": "gsm8k", "license": "MIT", "metadata": "{}"},
        }

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = [record(item["question"], item["answer"]) for item in train]
        records += [record(copy["question"], copy["answer"]) for _, copy in copies]
        (root / "data/interim/clean").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), root / "data/interim/clean/records.parquet")
        (root / "data/eval").mkdir(parents=True)
        (root / "data/eval/gsm8k_half.jsonl").write_text("".join(json.dumps(b) + "\n" for b in benchmark))
        probe = REPO / "data/eval/safety_probe.jsonl"
        (root / "data/eval/safety_probe.jsonl").write_text(probe.read_text())
        benchmark_param = {"name": "gsm8k_half", "path": "data/eval/gsm8k_half.jsonl", "fields": ["question", "answer"]}
        data = yaml.safe_load((REPO / "params.yaml").read_text())  # the shipped settings, plus the benchmark
        data["split"]["decontaminate"]["benchmarks"] = [benchmark_param]
        params = parse_params(data)
        metrics = split.run(params, root=root)
        print("\nsplit stage on the train half + the copies, the other half as benchmark 'gsm8k_half':")
        print(split.report(metrics))
        print(json.dumps({k: metrics[k] for k in ("decontaminated_by_source", "decontamination")}, indent=1))
        planted = {r["id"] for r in records[len(train) :]}
        removed = pq.read_table(root / "data/processed/decontaminated.parquet").to_pylist()
        kept = {r["id"] for r in pq.read_table(root / "data/processed/train.parquet").to_pylist()}
        removed_planted = [r for r in removed if r["id"] in planted]
        print(
            f"planted copies assigned to train: {len(removed_planted) + len(kept & planted)}, removed "
            f"{len(removed_planted)}, kept {len(kept & planted)}"
        )
        kinds = {r["id"]: kind for r, (kind, _) in zip(records[len(train) :], copies)}
        missed = Counter(kinds[i] for i in kept & planted)
        print("  kept (missed), by kind: " + ", ".join(f"{kind} {count}" for kind, count in sorted(missed.items())))
        originals = [r for r in removed if r["id"] not in planted]
        print(f"train-half problems removed: {len(originals)} of {len(originals) + len(kept - planted)}")
        for row in originals:
            print(f"  {row['reason']} against {row['source']} {row['matches']}: {row['ngram']!r}")


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    problems = load(path)
    rng = random.Random(SEED)
    rng.shuffle(problems)
    half = len(problems) // 2
    train, benchmark = problems[:half], problems[half:]
    copies = planted_copies(benchmark, rng)
    false_positives(train, benchmark)
    recall(benchmark, copies)
    stage_run(train, benchmark, copies)


if __name__ == "__main__":
    main()
