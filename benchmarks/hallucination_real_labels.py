"""The hallucination detector on labelled sets built from real public data (GSM8K test and
HH-RLHF harmless test, both MIT): AUROC per set and per kind of answer, and the share flagged at
the threshold in params.yaml.

    python benchmarks/hallucination_real_labels.py                        # ../shared/datasets
    python benchmarks/hallucination_real_labels.py --detector /tmp/old.py # another version of
                                                                          # hallucination.py

The sets (label 1: the answer is not supported). Every text is real (written by the datasets'
authors); what is constructed is which text is paired with which evidence, and, where a kind is
marked "edited", one small edit. Nothing is tuned to the detector.

gsm8k_reference  evidence: the solution's final line and "The answer is N." as the reference,
                 the question as context (what `evaluate` has for a math test record).
    0 own_final_line       the solution's own final line, verbatim                       real
    0 whole_solution       the whole worked solution, verbatim                           real
    0 final_answer         "The answer is N." (N the reference's own answer)             edited
    1 other_final_line     the final line of another problem's solution                  real
    1 other_problem_answer the whole solution ending with another problem's answer       edited
    1 stopped_early        the solution without its last step, ending "The answer is M"
                           (M the previous step's result: a common real slip)            edited
gsm8k_context    evidence: only the question as context (the RAG case, no reference).
    0 copied_sentence      a sentence of the passage                                     real
    0 joined_sentences     two sentences of the passage joined by "and"                  edited
    1 other_passage        a sentence of another question                                real
    1 foreign_number       a passage sentence with one number from another question      edited
    1 negated              a passage sentence with its verb negated                      edited
hh_context       evidence: only an HH "chosen" assistant reply as context.
    0 copied_sentence      a sentence of the reply                                       real
    1 other_passage        a sentence of another reply                                   real
    1 negated              a reply sentence with its verb negated                        edited
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.config import load_params  # noqa: E402

REAL = {"own_final_line", "whole_solution", "other_final_line", "copied_sentence", "other_passage"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_CALCULATOR = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
# "is" -> "is not" and the like: the first auxiliary of a sentence, negated.
_AUXILIARY = re.compile(r"\b(is|are|was|were|has|have|had|can|will|would|should|could|does|did|do)\b")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if len(s.split()) >= 5]


def negated(sentence: str) -> str | None:
    match = _AUXILIARY.search(sentence)
    if not match or re.search(r"\b(not|never|no)\b|n't", sentence):
        return None
    return f"{sentence[: match.end()]} not{sentence[match.end() :]}"


def _gsm8k(root: Path) -> list[dict]:
    rows = []
    for line in (root / "gsm8k_test.jsonl").read_text().splitlines():
        row = json.loads(line)
        *steps, final = row["answer"].split("\n")
        steps = [_CALCULATOR.sub("", step).strip() for step in steps if step.strip()]
        rows.append({"question": row["question"], "steps": steps, "final": final.replace("####", "").strip()})
    return [r for r in rows if r["steps"]]


def _with_final(steps: list[str], answer: str) -> str:
    return "\n".join(steps + [f"The answer is {answer}."])


def gsm8k_reference(rows: list[dict], size: int, rng: random.Random) -> list[dict]:
    examples = []
    while len(examples) < size:
        row, other = rng.sample(rows, 2)
        if other["final"] == row["final"]:
            continue
        reference = f"{row['steps'][-1]}\nThe answer is {row['final']}."
        last_step_numbers = _NUMBER.findall(row["steps"][-2]) if len(row["steps"]) >= 2 else []
        previous = last_step_numbers[-1] if last_step_numbers else None
        answers = {
            ("own_final_line", 0): row["steps"][-1],
            ("whole_solution", 0): _with_final(row["steps"], row["final"]),
            ("final_answer", 0): f"The answer is {row['final']}.",
            ("other_final_line", 1): other["steps"][-1],
            ("other_problem_answer", 1): _with_final(row["steps"][:-1], other["final"]),
            ("stopped_early", 1): _with_final(row["steps"][:-1], previous)
            if previous and previous != row["final"]
            else None,
        }
        (kind, label), answer = rng.choice(list(answers.items()))
        if answer:
            examples.append(
                {"answer": answer, "reference": reference, "context": row["question"], "label": label, "kind": kind}
            )
    return examples


def _context_example(passage: str, other_passage: str, kinds: tuple[str, ...], rng: random.Random) -> dict | None:
    own, foreign = sentences(passage), sentences(other_passage)
    if not own or not foreign:
        return None
    kind = rng.choice(kinds)
    sentence = rng.choice(own)
    if kind == "copied_sentence":
        answer, label = sentence, 0
    elif kind == "joined_sentences":
        start = rng.randrange(len(own) - 1) if len(own) > 1 else None
        answer = (
            None if start is None else f"{own[start].rstrip('.!?')} and {own[start + 1][0].lower()}{own[start + 1][1:]}"
        )
        label = 0
    elif kind == "other_passage":
        answer, label = rng.choice(foreign), 1
    elif kind == "foreign_number":
        found = list(_NUMBER.finditer(sentence))
        new = [n for n in _NUMBER.findall(other_passage) if n not in _NUMBER.findall(passage)]
        answer, label = None, 1
        if found and new:
            match = rng.choice(found)
            answer = sentence[: match.start()] + rng.choice(new) + sentence[match.end() :]
    else:  # negated
        answer, label = negated(sentence), 1
    return {"answer": answer, "reference": "", "context": passage, "label": label, "kind": kind} if answer else None


def context_set(passages: list[str], kinds: tuple[str, ...], size: int, rng: random.Random) -> list[dict]:
    examples = []
    for _ in range(size * 10):
        if len(examples) >= size:
            break
        passage, other = rng.sample(passages, 2)
        example = _context_example(passage, other, kinds, rng)
        if example:
            examples.append(example)
    return examples


def _hh_replies(root: Path) -> list[str]:
    with gzip.open(root / "hh_harmless_test.jsonl.gz", "rt") as handle:
        replies = [json.loads(line)["chosen"].rsplit("\n\nAssistant:", 1)[-1].strip() for line in handle]
    return [r for r in replies if len(sentences(r)) >= 2]


def labelled_sets(root: Path, size: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    gsm8k = _gsm8k(root)
    return {
        "gsm8k_reference": gsm8k_reference(gsm8k, size, rng),
        "gsm8k_context": context_set(
            [r["question"] for r in gsm8k],
            ("copied_sentence", "joined_sentences", "other_passage", "foreign_number", "negated"),
            size,
            rng,
        ),
        "hh_context": context_set(_hh_replies(root), ("copied_sentence", "other_passage", "negated"), size, rng),
    }


def load_detector(path: str | None):
    if path is None:
        from flywheel.evaluation import hallucination

        return hallucination
    spec = importlib.util.spec_from_file_location("detector_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(detector, examples: list[dict], embedder, config) -> dict:
    from sklearn.metrics import roc_auc_score

    support = detector.support_scores(
        [e["answer"] for e in examples],
        [e["reference"] for e in examples],
        [e["context"] for e in examples],
        embedder,
        config.overlap_weight,
    )
    risk = [1 - s for s in support]
    labels = [e["label"] for e in examples]
    kinds: dict[str, dict] = {}
    for kind in dict.fromkeys(e["kind"] for e in examples):
        mine = [i for i, e in enumerate(examples) if e["kind"] == kind]
        versus = [i for i, e in enumerate(examples) if e["label"] != examples[mine[0]]["label"]]
        chosen = mine + versus
        kinds[kind] = {
            "label": examples[mine[0]]["label"],
            "count": len(mine),
            "auroc": roc_auc_score([labels[i] for i in chosen], [risk[i] for i in chosen]),
            "flagged": sum(support[i] < config.threshold for i in mine) / len(mine),
        }
    return {"examples": len(examples), "auroc": roc_auc_score(labels, risk), "kinds": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="../shared/datasets", help="holds gsm8k_test.jsonl, hh_harmless_test")
    parser.add_argument("--per-set", type=int, default=600, help="labelled answers per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector", default=None, help="a hallucination.py to measure instead of the installed one")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    config = load_params("params.yaml").evaluate.hallucination
    detector = load_detector(args.detector)
    embedder = detector.load_embedder(config.embedding_model)
    results = {}
    for name, examples in labelled_sets(Path(args.datasets), args.per_set, args.seed).items():
        started = time.perf_counter()
        results[name] = result = measure(detector, examples, embedder, config)
        seconds = time.perf_counter() - started
        print(f"{name}: {result['examples']} answers, AUROC {result['auroc']:.3f} ({seconds:.1f} s)")
        for kind, figures in result["kinds"].items():
            origin = "real" if kind in REAL else "edited"
            print(
                f"  {figures['label']} {kind:<22} {origin:<6} n={figures['count']:<4} "
                f"AUROC vs other label {figures['auroc']:.3f}  flagged at {config.threshold}: {figures['flagged']:.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
