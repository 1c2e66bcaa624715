"""reward: a reward model trained on the preference pairs (TRL RewardTrainer).

Input:  data/processed/preferences/{train,eval}.parquet, models/sft (its weights start the model)
Output: models/reward/           a sequence-classification model with one output, the reward, in
                                 Hugging Face format with a model card (lineage, params, metrics)
        dvclive/reward/          training curves
        metrics/reward.json      pairwise accuracy on the held-out pairs, before and after
The rlhf stage optimises against it with `method: reward+grpo`, and with either method scores the
answers of the SFT and the aligned model with it.
A pair longer than `max_length` is truncated from the left, dropped or fails the stage, as
`training.length_policy` says, before TRL sees it (TRL's RewardTrainer would drop it silently);
metrics/reward.json `lengths` counts every pair of both splits.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import Params, RlhfParams
from flywheel.io import atomic_dir
from flywheel.training import alignment, distributed, lengths, trainer_args

CHECKPOINTS = Path("models/.checkpoints/reward")  # the Trainer's output_dir; gone when the stage ends


def ranks_chosen_first(model, tokenizer, pairs: list[dict]) -> list[bool]:
    """Per pair, whether the reward model scores the chosen response higher."""
    return alignment.chosen_wins(
        pairs, lambda prompts, answers: alignment.score_answers(model, tokenizer, prompts, answers)
    )


def length_limits(config: RlhfParams) -> lengths.Limits:
    return lengths.Limits.of("reward", "rlhf.reward_model.training", config.reward_model.training)


def fitted_pairs(tokenizer, pairs: list[dict], limits: lengths.Limits, split: str) -> tuple[list[dict], dict]:
    """The pairs tokenised as RewardTrainer would, each fitted to max_length: (what TRL trains
    or evaluates on, the split's counts)."""
    examples = lengths.reward_tokens(tokenizer, [alignment.as_conversational(pair) for pair in pairs])
    return lengths.fit_split(examples, lambda c, r: lengths.fit_pair(c, r, limits), limits, split, "pairs")


def _skip(root: Path, reason: str) -> dict:
    with atomic_dir(root / paths.REWARD_MODEL) as staging:
        (staging / "README.md").write_text(f"# No reward model\n\nNot trained: {reason}.\n")
    return {"trained": False, "reason": reason}


def train(params: Params, root: Path) -> dict | None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    config = params.rlhf
    train_pairs, eval_pairs = alignment.load_pairs(root)
    if not train_pairs:
        return _skip(root, alignment.no_pairs(config, "reward"))
    _, tokenizer = alignment.load_sft(root)
    torch.manual_seed(config.reward_model.training.seed)  # the new reward head starts from this seed
    model = AutoModelForSequenceClassification.from_pretrained(paths.SFT_MODEL.require(root), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    limits = length_limits(config)
    train_examples, train_counts = fitted_pairs(tokenizer, train_pairs, limits, "train")
    eval_examples, eval_counts = fitted_pairs(tokenizer, eval_pairs, limits, "eval")

    training = config.reward_model.training
    args = RewardConfig(
        output_dir=str(root / CHECKPOINTS),
        max_length=training.max_length,
        center_rewards_coefficient=config.reward_model.center_rewards_coefficient,
        **trainer_args.arguments(training, config.distributed, has_eval=bool(eval_examples)),
    )
    callback = trainer_args.live_callback(root, paths.REWARD_CURVES)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # Rank 0 measures, on the model as loaded and on the model whole after training.
    accuracy_before = (
        alignment.share(ranks_chosen_first(model, tokenizer, eval_pairs)) if distributed.is_rank_zero() else None
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    engine = distributed.training_engine(trainer)
    model = distributed.trained_model(trainer)
    if model is None:
        return None  # not rank 0: it writes the outputs
    ranked_first = ranks_chosen_first(model, tokenizer, eval_pairs)
    callback.live.end()

    metrics = {
        "trained": True,
        "train_pairs": len(train_pairs),
        "trained_pairs": len(train_examples),
        "eval_pairs": len(eval_pairs),
        "lengths": lengths.summary(limits, {"train": train_counts, "eval": eval_counts}),
        "pairwise_accuracy_before": accuracy_before,
        "pairwise_accuracy": alignment.share(ranked_first),
        "pairwise_accuracy_by_source": alignment.share_by_source(eval_pairs, ranked_first),
        "steps": result.global_step,
        "engine": engine,
        "world_size": trainer.args.world_size,
        "train_seconds": round(seconds, 1),
    }

    with atomic_dir(root / paths.REWARD_MODEL) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        modeling.write_model_card(
            staging,
            title="Flywheel reward model",
            base_model=str(paths.SFT_MODEL),
            lineage=alignment.lineage(root),
            params=config.reward_model.model_dump(),
            metrics=metrics,
            pipeline_tag="text-classification",
        )
    shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)
    return metrics


def run(params: Params, root: Path = Path(".")) -> dict | None:
    return distributed.run_stage("reward", "rlhf", params.rlhf.distributed, params, root, train)


def report(metrics: dict) -> str:
    if not metrics["trained"]:
        return f"reward: no reward model trained: {metrics['reason']}"
    accuracy = metrics["pairwise_accuracy"]
    before = metrics["pairwise_accuracy_before"]
    shown = "n/a (no held-out pairs)" if accuracy is None else f"{before:.3f} -> {accuracy:.3f}"
    return "\n".join(
        [
            f"reward: {metrics['train_pairs']:,} pairs, {metrics['steps']:,} steps in {metrics['train_seconds']:.0f} s",
            lengths.report_line(metrics["lengths"], "train", "pairs"),
            *(f"  warning: {warning}" for warning in metrics["lengths"]["warnings"]),
            f"  pairwise accuracy on {metrics['eval_pairs']:,} held-out pairs: {shown}",
            f"  wrote {paths.REWARD_MODEL}/ (model card: {paths.REWARD_MODEL}/README.md), "
            f"curves in {paths.REWARD_CURVES}/",
        ]
    )
