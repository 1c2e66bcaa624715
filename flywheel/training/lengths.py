"""Token lengths of training examples, and what becomes of the ones over a trainer's limit.

TRL 1.16 treats an example longer than `max_length` differently in each trainer, and says
nothing: SFTTrainer's packing ("bfd") cuts its end off, RewardTrainer drops the pair, DPOTrainer
drops a pair whose prompt alone fills `max_length` and cuts the end off the others. Flywheel
decides instead, before TRL sees the data: every example is tokenised as TRL would tokenise it,
fitted to the limit by the stage's `length_policy`, and counted (whole; truncated, with the side
and the tokens cut; or dropped, with the reason). TRL then gets token ids that already fit, so it
has nothing left to drop or cut. The counts, each split's token-length percentiles and the share
over the limit go to the stage's metrics and log, with a warning above `length_warning_share`.

Policies (each trainer offers the ones that make sense for it):
  truncate_right  keep the start, cut the end (the end of the answer)
  truncate_left   keep the end, cut the start (the start of the conversation)
  truncate        DPO: cut the prompt's start as far as needed (it keeps min_prompt_length
                  tokens at least), then the completions' ends
  drop            leave the example out
  fail            stop before training, naming the key to change
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flywheel.errors import FlywheelError

OVER_LIMIT = "over_max_length"
NO_ANSWER_LEFT = "no_answer_tokens_left"  # truncation would leave nothing to learn from
SAME_AFTER_CUT = "chosen_equals_rejected_after_truncation"  # no preference left to learn
QUANTILES = {"p50": 50, "p90": 90, "p99": 99}
SIDES = {
    "truncate_right": "right (the end cut)",
    "truncate_left": "left (the start cut)",
    "truncate": "prompt's start, then completions' ends",
}


@dataclass
class Fitted:
    """One example after its length policy: the sequences handed to TRL, or None when dropped."""

    sequences: dict[str, list[int]] | None
    lengths: dict[str, int]  # tokens before fitting: "total" (the longest sequence), and "prompt"
    cut: int = 0  # tokens cut, all its sequences together
    reason: str | None = None  # why it was dropped

    @property
    def truncated(self) -> bool:
        return self.sequences is not None and self.cut > 0


@dataclass
class Limits:
    """What a stage's params say about lengths, with the keys to name in messages."""

    stage: str
    key: str  # e.g. finetune.training (its max_length, length_policy, length_warning_share)
    max_length: int
    policy: str
    warning_share: float
    min_prompt_length: int | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, stage: str, key: str, training) -> Limits:
        """From a trainer's params at `key` (max_length, length_policy, length_warning_share and,
        for DPO, min_prompt_length)."""
        return cls(
            stage=stage,
            key=key,
            max_length=training.max_length,
            policy=training.length_policy,
            warning_share=training.length_warning_share,
            min_prompt_length=getattr(training, "min_prompt_length", None),
        )

    @property
    def side(self) -> str | None:
        """Where truncation cuts, as the metrics say it."""
        return SIDES.get(self.policy)


# ---------------------------------------------------------------------------------------------
# Fitting one example to its limit (pure: token ids in, token ids out)


def fit_sequence(input_ids: list[int], labels: list[int], limits: Limits) -> Fitted:
    """An SFT example (labels are -100 outside the assistant's tokens)."""
    lengths = {"total": len(input_ids)}
    excess = len(input_ids) - limits.max_length
    if excess <= 0:
        return Fitted({"input_ids": input_ids, "labels": labels}, lengths)
    if limits.policy in ("drop", "fail"):
        return Fitted(None, lengths, reason=OVER_LIMIT)
    kept = slice(None, limits.max_length) if limits.policy == "truncate_right" else slice(excess, None)
    ids, kept_labels = input_ids[kept], labels[kept]
    if all(label == -100 for label in kept_labels):
        return Fitted(None, lengths, reason=NO_ANSWER_LEFT)
    return Fitted({"input_ids": ids, "labels": kept_labels}, lengths, cut=excess)


def fit_pair(chosen: list[int], rejected: list[int], limits: Limits) -> Fitted:
    """A reward-model pair: two whole conversations, scored at their last token."""
    lengths = {"total": max(len(chosen), len(rejected))}
    if lengths["total"] <= limits.max_length:
        return Fitted({"chosen_ids": chosen, "rejected_ids": rejected}, lengths)
    if limits.policy in ("drop", "fail"):
        return Fitted(None, lengths, reason=OVER_LIMIT)
    # truncate_left: the ends, where the two answers differ, are what the reward head reads
    chosen_kept, rejected_kept = chosen[-limits.max_length :], rejected[-limits.max_length :]
    if chosen_kept == rejected_kept:
        return Fitted(None, lengths, reason=SAME_AFTER_CUT)
    cut = len(chosen) - len(chosen_kept) + len(rejected) - len(rejected_kept)
    return Fitted({"chosen_ids": chosen_kept, "rejected_ids": rejected_kept}, lengths, cut=cut)


def fit_preference(prompt: list[int], chosen: list[int], rejected: list[int], limits: Limits) -> Fitted:
    """A DPO pair. One that does not fit max_length first loses its prompt's start, as far as
    needed but never below min_prompt_length tokens (the prompt's end, the turn being answered,
    stays), then its completions' ends, to what max_length leaves them."""
    longest = max(len(chosen), len(rejected))
    lengths = {"total": len(prompt) + longest, "prompt": len(prompt)}
    if lengths["total"] <= limits.max_length:
        return Fitted({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, lengths)
    if limits.policy in ("drop", "fail"):
        return Fitted(None, lengths, reason=OVER_LIMIT)
    prompt_floor = min(limits.min_prompt_length or limits.max_length // 2, len(prompt))
    prompt_kept = prompt[len(prompt) - max(prompt_floor, limits.max_length - longest) :]
    budget = limits.max_length - len(prompt_kept)
    chosen_kept, rejected_kept = chosen[:budget], rejected[:budget]
    if chosen_kept == rejected_kept:
        return Fitted(None, lengths, reason=SAME_AFTER_CUT)
    cut = len(prompt) - len(prompt_kept) + len(chosen) - len(chosen_kept) + len(rejected) - len(rejected_kept)
    sequences = {"prompt_ids": prompt_kept, "chosen_ids": chosen_kept, "rejected_ids": rejected_kept}
    return Fitted(sequences, lengths, cut=cut)


# ---------------------------------------------------------------------------------------------
# Counting a split, warning, failing


def percentiles(lengths: list[int]) -> dict[str, int | None]:
    """p50/p90/p99/max by nearest rank: a length some example really has."""
    import numpy

    if not lengths:
        return {name: None for name in [*QUANTILES, "max"]}
    values = numpy.asarray(lengths)
    shown = {name: int(numpy.percentile(values, q, method="inverted_cdf")) for name, q in QUANTILES.items()}
    return {**shown, "max": int(values.max())}


def account(fitted: list[Fitted], limits: Limits) -> dict:
    """A split's counts (whole + truncated + dropped = examples) and its token lengths."""
    truncated = [item for item in fitted if item.truncated]
    dropped = Counter(item.reason for item in fitted if item.sequences is None)
    whole = len(fitted) - len(truncated) - sum(dropped.values())
    over = len(truncated) + sum(dropped.values())
    return {
        "examples": len(fitted),
        "whole": whole,
        "truncated": len(truncated),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "truncated_side": limits.side if truncated else None,
        "tokens_cut": sum(item.cut for item in truncated),
        "tokens_cut_max": max((item.cut for item in truncated), default=0),
        "over_limit_share": round(over / len(fitted), 4) if fitted else 0.0,
        "token_lengths": {
            name: percentiles([item.lengths[name] for item in fitted])
            for name in (fitted[0].lengths if fitted else {"total": 0})
        },
    }


def fit_split(examples: Iterable, fit: Callable[..., Fitted], limits: Limits, split: str, noun: str):
    """(the sequences TRL trains on, the split's counts); logs the lengths and warns or fails."""
    fitted = [fit(*example) for example in examples]
    counts = account(fitted, limits)
    if counts["over_limit_share"] > 0 and limits.policy == "fail":
        raise FlywheelError(_fail_message(counts, limits, split, noun))
    _log_lengths(counts, limits, split, noun)
    if counts["over_limit_share"] > limits.warning_share:
        limits.warnings.append(_warning(counts, limits, split, noun))
        print(f"{limits.stage}: warning: {limits.warnings[-1]}", flush=True)
    kept = [item.sequences for item in fitted if item.sequences is not None]
    if split == "train" and fitted and not kept:
        raise FlywheelError(_nothing_fits_message(len(fitted), limits, noun))
    return kept, counts


def _nothing_fits_message(total: int, limits: Limits, noun: str) -> str:
    room = "raise max_length" if limits.min_prompt_length is None else "raise max_length or lower min_prompt_length"
    return (
        f"{limits.stage}: none of the {total:,} train {noun} fits {limits.key}.max_length {limits.max_length} "
        f"under length_policy {limits.policy}; {room} (see the token lengths above), or choose a "
        "length_policy that truncates"
    )


def summary(limits: Limits, splits: dict[str, dict]) -> dict:
    """What metrics/<stage>.json says about lengths."""
    shown = {
        "max_length": limits.max_length,
        "length_policy": limits.policy,
        "length_warning_share": limits.warning_share,
    }
    if limits.min_prompt_length is not None:
        shown["min_prompt_length"] = limits.min_prompt_length
    return {**shown, **splits, "warnings": list(limits.warnings)}


def report_line(lengths: dict, split: str, noun: str) -> str:
    """One line of a stage's report: what became of a split's examples."""
    counts = lengths[split]
    total = counts["token_lengths"]["total"]
    return (
        f"  lengths      {counts['examples']:,} {split} {noun}: {counts['whole']:,} whole, "
        f"{counts['truncated']:,} truncated, {counts['dropped']:,} dropped (max_length {lengths['max_length']}, "
        f"length_policy {lengths['length_policy']}; tokens p50 {total['p50']}, p99 {total['p99']}, max {total['max']})"
    )


def _shown(lengths: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in lengths.items())


def _log_lengths(counts: dict, limits: Limits, split: str, noun: str) -> None:
    """Printed before training, so a user sets max_length knowingly."""
    lengths = "; ".join(f"{name}: {_shown(values)}" for name, values in counts["token_lengths"].items())
    print(
        f"{limits.stage}: {split}: {counts['examples']:,} {noun}, token lengths ({lengths}); "
        f"{counts['over_limit_share']:.1%} over the limit: {counts['whole']:,} whole, "
        f"{counts['truncated']:,} truncated, {counts['dropped']:,} dropped",
        flush=True,
    )


def _limit_text(limits: Limits) -> str:
    return f"{limits.key}.max_length {limits.max_length}"


def _warning(counts: dict, limits: Limits, split: str, noun: str) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in counts["dropped_by_reason"].items())
    truncated = (
        f"{counts['truncated']:,} truncated ({counts['truncated_side']}, {counts['tokens_cut']:,} tokens cut)"
        if counts["truncated"]
        else "0 truncated"
    )
    dropped = f"{counts['dropped']:,} dropped" + (f" ({reasons})" if reasons else "")
    p99 = counts["token_lengths"]["total"]["p99"]
    return (
        f"{counts['over_limit_share']:.1%} of {counts['examples']:,} {split} {noun} do not fit "
        f"{_limit_text(limits)} tokens: {truncated}, {dropped} (length_policy: {limits.policy}); "
        f"above {limits.key}.length_warning_share {limits.warning_share}: set max_length to {p99} "
        "(the p99) to keep 99% whole"
    )


def _fail_message(counts: dict, limits: Limits, split: str, noun: str) -> str:
    over = counts["truncated"] + counts["dropped"]
    lengths = counts["token_lengths"]["total"]
    return (
        f"{limits.stage}: {over:,} of {counts['examples']:,} {split} {noun} ({counts['over_limit_share']:.1%}) "
        f"do not fit {_limit_text(limits)} tokens (p50 {lengths['p50']}, p90 {lengths['p90']}, "
        f"p99 {lengths['p99']}, max {lengths['max']}) and {limits.key}.length_policy is fail; raise "
        f"max_length to {lengths['max']}, or choose another length_policy"
    )


# ---------------------------------------------------------------------------------------------
# Tokenising as TRL 1.16 does (trl/trainer/{sft,reward,dpo}_trainer.py, `_prepare_dataset`)


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> dict:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


def sft_tokens(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation; labels are -100 outside the assistant's turns
    (TRL's assistant_only_loss). A template without generation markers gets TRL's training
    template, as SFTTrainer does."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)
    examples = []
    for messages in conversations:
        encoded = _chat_ids(tokenizer, messages, return_assistant_tokens_mask=True, chat_template=template)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        if 1 not in mask:
            raise FlywheelError(
                "the chat template marks no assistant tokens, so there is nothing to train on; it needs "
                "{% generation %} markers around the assistant's turn (see flywheel/modeling.py CHAT_TEMPLATE)"
            )
        examples.append((ids, [token if bit else -100 for token, bit in zip(ids, mask)]))
    return examples


def reward_tokens(tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(chosen_ids, rejected_ids) per pair in TRL's conversational format: the prompt followed by
    each answer, tokenised whole."""
    return [
        (
            list(_chat_ids(tokenizer, pair["prompt"] + pair["chosen"])["input_ids"]),
            list(_chat_ids(tokenizer, pair["prompt"] + pair["rejected"])["input_ids"]),
        )
        for pair in pairs
    ]


def dpo_tokens(tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) per pair: the completions start where the prompt
    (with the generation prompt) and prompt + completion stop agreeing."""
    from trl.data_utils import common_prefix_length

    examples = []
    for pair in pairs:
        prompt = list(_chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)["input_ids"])
        chosen = list(_chat_ids(tokenizer, pair["prompt"] + pair["chosen"])["input_ids"])
        rejected = list(_chat_ids(tokenizer, pair["prompt"] + pair["rejected"])["input_ids"])
        shared = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        examples.append((prompt[:shared], chosen[shared:], rejected[shared:]))
    return examples
