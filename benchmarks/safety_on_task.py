"""The safety probe's on-task judge on real public data (HH-RLHF harmless test and GSM8K test,
both MIT): how well the relevance of an answer to its prompt (cosine of their sentence
embeddings, the judge of a benign probe item that has no reference answer) tells a real reply
from one that answers something else or is word salad, and the share of each kind passing at the
threshold in params.yaml (evaluate.safety.on_task_threshold).

    python benchmarks/safety_on_task.py            # ../shared/datasets
    python benchmarks/safety_on_task.py --pairs 500

The sets. Every text is real; what is constructed is which reply goes with which prompt, and the
word salad (the words of real replies drawn at random, as a tiny model's babble is).
    on_task      1  the first human turn and the assistant's first reply of one HH conversation
                    (the chosen transcript; declines and clarifying questions included), or a
                    GSM8K question and its worked solution
    other_reply  0  the same prompt with the reply of another conversation / problem
    word_salad   0  the same prompt with as many words drawn at random from all replies
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.config import load_params  # noqa: E402

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh(root: Path) -> list[tuple[str, str]]:
    pairs = []
    with gzip.open(root / "hh_harmless_test.jsonl.gz", "rt") as lines:
        for line in lines:
            parts = _TURN.split(json.loads(line)["chosen"])
            turns = list(zip(parts[1::2], (p.strip() for p in parts[2::2])))
            if len(turns) >= 2 and turns[0][0] == "Human" and turns[1][0] == "Assistant" and turns[1][1]:
                pairs.append((turns[0][1], turns[1][1]))
    return pairs


def _gsm8k(root: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (root / "gsm8k_test.jsonl").read_text().splitlines()]
    return [(row["question"], re.sub(r"<<[^>]*>>", "", row["answer"])) for row in rows]


def labelled(pairs: list[tuple[str, str]], size: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) triples: each sampled prompt with its own reply, another one, salad."""
    chosen = rng.sample(pairs, min(size, len(pairs)))
    vocabulary = [word for _, reply in pairs for word in reply.split()]
    rows = []
    for index, (prompt, reply) in enumerate(chosen):
        other = chosen[(index + 1 + rng.randrange(len(chosen) - 1)) % len(chosen)][1]
        salad = " ".join(rng.choice(vocabulary) for _ in reply.split())
        rows += [("on_task", prompt, reply), ("other_reply", prompt, other), ("word_salad", prompt, salad)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets")
    parser.add_argument("--pairs", type=int, default=1000, help="prompts sampled from each set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from flywheel.evaluation import hallucination, safety

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    threshold = params.evaluate.safety.on_task_threshold
    embedder = hallucination.load_embedder(params.evaluate.hallucination.embedding_model)
    print(f"on-task threshold (params.yaml): {threshold}")
    print(f"{'set':8} {'kind':12} {'n':>5} {'passes':>7} {'p5 rel':>7} {'median':>7}   AUROC on_task vs kind")
    for name, pairs in (("hh", _hh(args.datasets)), ("gsm8k", _gsm8k(args.datasets))):
        rows = labelled(pairs, args.pairs, random.Random(args.seed))
        started = time.perf_counter()
        relevance = safety.relevance([p for _, p, _ in rows], [a for _, _, a in rows], embedder)
        seconds = time.perf_counter() - started
        by_kind: dict[str, list[float]] = {}
        for (kind, _, _), value in zip(rows, relevance):
            by_kind.setdefault(kind, []).append(float(value))
        for kind, values in by_kind.items():
            ordered = sorted(values)
            passes = sum(v >= threshold for v in values) / len(values)
            labels = [1] * len(values) + [0] * len(values)
            auroc = "" if kind == "on_task" else f"{roc_auc_score(labels, by_kind['on_task'] + values):.3f}"
            print(
                f"{name:8} {kind:12} {len(values):5d} {passes:7.1%} {ordered[len(ordered) // 20]:7.3f} "
                f"{ordered[len(ordered) // 2]:7.3f}   {auroc}"
            )
        print(f"{name:8} {len(rows)} answers judged in {seconds:.1f} s")


if __name__ == "__main__":
    main()
