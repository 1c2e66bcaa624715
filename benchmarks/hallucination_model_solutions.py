"""The hallucination detector on real model mistakes: 824 GPT-3 solutions to 206 GSM8K test
questions, each labelled correct or not by its final answer (benchmarks/data/README.md).

    python benchmarks/hallucination_model_solutions.py [--detector /tmp/old_hallucination.py]

Two views of the same answers, judged against the reference solution (label 1: wrong answer):
  whole_solution  the model's whole worked solution against the reference's
  final_line      the model's last line ("A: 26") against the reference's ("A: 18")
It prints AUROC and the share of right and wrong answers flagged at the threshold in params.yaml.
--detector runs another version of flywheel/evaluation/hallucination.py (e.g. an older one from
git) with the same embedder, for a before/after in one run.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from sklearn.metrics import roc_auc_score  # noqa: E402

from flywheel.config import load_params  # noqa: E402
from flywheel.evaluation import hallucination  # noqa: E402

DATA = Path(__file__).parent / "data/gsm8k_model_solutions.jsonl"
MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def labelled_answers() -> dict[str, list[dict]]:
    views: dict[str, list[dict]] = {"whole_solution": [], "final_line": []}
    for line in DATA.read_text().splitlines():
        item = json.loads(line)
        for model in MODELS:
            solution, label = item[model]["solution"], 0 if item[model]["is_correct"] else 1
            views["whole_solution"].append({"answer": solution, "reference": item["ground_truth"], "label": label})
            views["final_line"].append(
                {
                    "answer": solution.strip().splitlines()[-1],
                    "reference": item["ground_truth"].strip().splitlines()[-1],
                    "label": label,
                }
            )
    return views


def load_detector(path: str | None):
    if path is None:
        return hallucination
    spec = importlib.util.spec_from_file_location("other_hallucination", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default=None, help="another hallucination.py to measure")
    args = parser.parse_args()
    config = load_params().evaluate.hallucination
    detector = load_detector(args.detector)
    embedder = hallucination.load_embedder(config.embedding_model)
    print(f"detector: {args.detector or 'flywheel/evaluation/hallucination.py'}; threshold {config.threshold}")
    for view, rows in labelled_answers().items():
        support = detector.support_scores(
            [r["answer"] for r in rows],
            [r["reference"] for r in rows],
            ["" for _ in rows],
            embedder,
            config.overlap_weight,
        )
        labels = [r["label"] for r in rows]
        flagged = [s < config.threshold for s in support]
        right = [f for f, label in zip(flagged, labels) if label == 0]
        wrong = [f for f, label in zip(flagged, labels) if label == 1]
        auroc = roc_auc_score(labels, [-s for s in support])
        print(
            f"{view:15s} {len(rows)} answers ({len(wrong)} wrong): AUROC {auroc:.3f}; "
            f"flags {sum(right) / len(right):.0%} of right answers, {sum(wrong) / len(wrong):.0%} of wrong ones"
        )


if __name__ == "__main__":
    main()
