"""The reference-based hallucination detector on a labelled set built from any question/answer
file: AUROC overall and per kind of unsupported answer, precision and recall at the threshold in
params.yaml, and answers scored per second.

    python benchmarks/hallucination_detector.py                       # the sample's test split
    python benchmarks/hallucination_detector.py --jsonl ../shared/datasets/gsm8k_test.jsonl \\
        --answer-field answer                                        # real references (GSM8K)

The evaluate stage reports the same validation on the test split each run; this script shows how
the detector does on references it was not designed with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel import paths  # noqa: E402
from flywheel.config import load_params  # noqa: E402
from flywheel.evaluation import hallucination  # noqa: E402
from flywheel.io import read_records  # noqa: E402


def references(args) -> list[dict]:
    if args.jsonl is None:
        return read_records(paths.TEST)
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    return [{"response": row[args.answer_field], "context": "", "source": args.jsonl} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", help="a JSON-lines file of references (default: the sample's test split)")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()

    config = load_params("params.yaml").evaluate.hallucination
    examples = hallucination.labelled_set(references(args), args.examples, seed=config.seed)
    embedder = hallucination.load_embedder(config.embedding_model)
    started = time.perf_counter()
    result = hallucination.validate_detector(examples, embedder, config.overlap_weight, config.threshold)
    seconds = time.perf_counter() - started
    result.pop("roc")
    print(
        f"{len(examples)} labelled answers ({result['unsupported']} unsupported) from "
        f"{args.jsonl or 'data/processed/test.parquet'}; scored in {seconds:.1f} s "
        f"({len(examples) / seconds:,.0f} answers/s, embeddings included)"
    )
    print(
        f"AUROC {result['auroc']:.3f}; at threshold {result['threshold']}: precision "
        f"{result['precision']:.3f}, recall {result['recall']:.3f}"
    )
    for kind, auroc in result["auroc_by_kind"].items():
        print(f"  {kind:<20} AUROC {auroc:.3f}  flagged {result['flagged_share_by_kind'][kind]:.3f}")
    for kind in hallucination.SUPPORTED_KINDS:
        print(f"  {kind:<20} (supported) flagged {result['flagged_share_by_kind'][kind]:.3f}")


if __name__ == "__main__":
    main()
