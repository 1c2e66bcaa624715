"""rlhf: align the SFT model with the preference pairs.

Input:  models/sft, data/processed/preferences/{train,eval}.parquet, models/reward,
        data/processed/{train,eval}.parquet (reference answers; the task probe)
Output: models/aligned/          the aligned model in Hugging Face format, with a model card
                                 (lineage: the SFT model, the preference data, params, metrics)
        dvclive/rlhf/            training curves (reward margins and accuracies, KL, rewards)
        metrics/rlhf.json        the SFT and the aligned model side by side on held-out data
Methods (rlhf.method):
  dpo          TRL DPOTrainer on the pairs, against a frozen reference model (the SFT model).
  reward+grpo  TRL GRPOTrainer (or RLOOTrainer) samples answers online and optimises the reward
               model's score, plus rule rewards (a train reference matched, a length penalty),
               with a KL penalty to the SFT model.
With dpo, a pair longer than `dpo.training.max_length` is truncated, dropped or fails the stage,
as `dpo.training.length_policy` says, before TRL sees it (TRL's DPOTrainer would drop pairs whose
prompt fills max_length and cut the rest, uncounted); metrics/rlhf.json `lengths`
counts every pair. GRPO/RLOO prompts go whole (TRL 1.16 cuts none); their lengths are reported.
Measured either way, on held-out pairs and prompts: preference accuracy (the chosen response's
log-probability above the rejected one's), task exact match, the reward model's score of the
greedy answers, and the KL divergence from the SFT model.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from flywheel import modeling, paths, scoring, text
from flywheel.config import GrpoParams, Params, RlhfParams
from flywheel.data.records import origin_of
from flywheel.errors import FlywheelError
from flywheel.io import atomic_dir, read_records
from flywheel.training import alignment, distributed, lengths, trainer_args

CHECKPOINTS = Path("models/.checkpoints/rlhf")


# ---------------------------------------------------------------------------------------------
# Measuring a policy


def prefers_chosen(model, tokenizer, pairs: list[dict]) -> list[bool]:
    """Per pair, whether the model finds the chosen response more likely than the rejected one."""
    return alignment.chosen_wins(
        pairs, lambda prompts, responses: modeling.response_logprobs(model, tokenizer, prompts, responses)
    )


def measure(
    model, tokenizer, pairs: list[dict], probe: list[dict], scorers: dict[str, str], reward_model, config: RlhfParams
) -> dict:
    """What metrics/rlhf.json compares between the SFT and the aligned model. Preference accuracy
    is also given on the collected pairs alone (ingest and feedback: people's preferences), without
    the on-policy pairs, whose chosen answers are the SFT model's own likeliest ones. The task
    probe's answers are judged by each source's scorer, as evaluate judges them."""
    task_answers = modeling.generate(
        model,
        tokenizer,
        [modeling.record_messages(r, with_response=False) for r in probe],
        max_new_tokens=config.max_new_tokens,
    )
    preferred = prefers_chosen(model, tokenizer, pairs)
    collected = [flag for pair, flag in zip(pairs, preferred) if origin_of(pair) != "on_policy"]
    measured = {
        "preference_accuracy": alignment.share(preferred),
        "preference_accuracy_collected": alignment.share(collected),
        "preference_accuracy_by_source": alignment.share_by_source(pairs, preferred),
        "task_score": scoring.task_score(task_answers, probe, scorers),
    }
    if reward_model is not None and pairs:
        prompts = [alignment.prompt_messages(pair) for pair in pairs]
        answers = modeling.generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens)
        scores = alignment.score_answers(*reward_model, prompts, answers)
        measured["reward_of_answers"] = sum(scores) / len(scores)
    return measured


def kl_from_reference(policy, reference, tokenizer, pairs: list[dict], config: RlhfParams) -> float | None:
    """Monte-Carlo KL(policy || reference) per answer: answers sampled from the policy on the
    held-out prompts, mean of log p_policy - log p_reference."""
    if not pairs:
        return None
    prompts = [alignment.prompt_messages(pair) for pair in pairs]
    answers = [
        group[0]
        for group in modeling.sample(
            policy, tokenizer, prompts, samples=1, temperature=1.0, max_new_tokens=config.max_new_tokens, seed=0
        )
    ]
    policy_lp = modeling.response_logprobs(policy, tokenizer, prompts, answers)
    reference_lp = modeling.response_logprobs(reference, tokenizer, prompts, answers)
    return sum(p - r for p, r in zip(policy_lp, reference_lp)) / len(prompts)


# ---------------------------------------------------------------------------------------------
# Trainers


def dpo_limits(config: RlhfParams) -> lengths.Limits:
    return lengths.Limits.of("rlhf", "rlhf.dpo.training", config.dpo.training)


def fitted_dpo_pairs(tokenizer, pairs: list[dict], limits: lengths.Limits, split: str) -> tuple[list[dict], dict]:
    """The pairs tokenised as DPOTrainer would, each fitted to the limits: (what TRL trains or
    evaluates on, the split's counts)."""
    examples = lengths.dpo_tokens(tokenizer, [alignment.as_conversational(pair) for pair in pairs])
    return lengths.fit_split(examples, lambda p, c, r: lengths.fit_preference(p, c, r, limits), limits, split, "pairs")


def pretokenised_dpo_trainer():
    """DPOTrainer fed pairs that are already tokenised as it would tokenise them and fitted to
    the limits: its own preparation would drop the pairs whose prompt fills max_length, uncounted,
    and there is no other way to hand it token ids in TRL 1.16."""
    from trl import DPOTrainer

    class PretokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenisedDPOTrainer


def dpo_trainer(config: RlhfParams, model, tokenizer, datasets: dict[str, list[dict]], root: Path, callbacks):
    from datasets import Dataset
    from trl import DPOConfig

    dpo = config.dpo
    reference = None  # TRL keeps a frozen copy of the model being trained
    if dpo.reference_model != "sft":
        reference, _ = modeling.load_pretrained(dpo.reference_model)
    args = DPOConfig(
        output_dir=str(root / CHECKPOINTS),
        beta=dpo.beta,
        loss_type=dpo.loss_type,
        loss_weights=dpo.loss_weights,
        label_smoothing=dpo.label_smoothing,
        max_length=dpo.training.max_length,
        **trainer_args.arguments(dpo.training, config.distributed, has_eval=bool(datasets["eval"])),
    )
    return pretokenised_dpo_trainer()(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(datasets["train"]),
        eval_dataset=Dataset.from_list(datasets["eval"]) if datasets["eval"] else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def dpo_datasets(config: RlhfParams, tokenizer, train_pairs, eval_pairs) -> tuple[dict[str, list[dict]], dict]:
    """What DPO trains and evaluates on, and the `lengths` metrics that count every pair."""
    limits = dpo_limits(config)
    train, train_counts = fitted_dpo_pairs(tokenizer, train_pairs, limits, "train")
    held_out, eval_counts = fitted_dpo_pairs(tokenizer, eval_pairs, limits, "eval")
    return {"train": train, "eval": held_out}, lengths.summary(limits, {"train": train_counts, "eval": eval_counts})


def grpo_prompt_lengths(config: RlhfParams, tokenizer, train_pairs: list[dict], root: Path) -> dict:
    """GRPO/RLOO prompts go to TRL whole (TRL 1.16 cuts none; the answers it samples stop at
    max_completion_length): their token lengths, so a long prompt's cost is visible."""
    prompts = [row["prompt"] for row in grpo_prompts(config.grpo, train_pairs, root)]
    counts = [
        len(tokenizer.apply_chat_template(p, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])
        for p in prompts
    ]
    shown = {"prompts": len(prompts), "whole": len(prompts), "truncated": 0, "dropped": 0}
    return {"train": {**shown, "token_lengths": {"prompt": lengths.percentiles(counts)}}, "warnings": []}


def correctness(completions, reference, **_) -> list[float | None]:
    """1 when the answer matches the train reference, 0 when not; None for prompts without one."""
    return [
        None if ref is None else float(text.dedup_key(c[0]["content"]) == text.dedup_key(ref))
        for c, ref in zip(completions, reference)
    ]


def length_penalty(max_tokens: int):
    def length(completion_ids, **_) -> list[float]:
        """Minus the share of the token budget the answer used."""
        return [-len(ids) / max_tokens for ids in completion_ids]

    return length


def grpo_prompts(grpo: GrpoParams, train_pairs: list[dict], root: Path) -> list[dict]:
    """The preference prompts (scored by the reward model) and, for the correctness reward,
    train prompts with their reference answers; each conversation once."""
    prompts: dict[str, dict] = {}
    for pair in train_pairs:
        messages = alignment.prompt_messages(pair)
        prompts[json.dumps(messages)] = {"prompt": messages, "reference": None}
    records = read_records(paths.TRAIN.require(root))
    for row in random.Random(0).sample(records, min(grpo.reference_prompts, len(records))):
        messages = modeling.record_messages(row, with_response=False)
        prompts[json.dumps(messages)] = {"prompt": messages, "reference": row["response"]}
    return list(prompts.values())


def grpo_trainer(config: RlhfParams, model, tokenizer, train_pairs, reward_model, root: Path, callbacks):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    grpo = config.grpo
    weights = grpo.reward_weights
    functions = [
        (reward_model[0], weights.reward_model, reward_model[1]),
        (correctness, weights.correctness, None),
        (length_penalty(grpo.max_completion_length), weights.length, None),
    ]
    functions = [entry for entry in functions if entry[1] != 0]
    Config, Trainer = (GRPOConfig, GRPOTrainer) if grpo.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
    args = Config(
        output_dir=str(root / CHECKPOINTS),
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        reward_weights=[weight for _, weight, _ in functions],
        **trainer_args.arguments(grpo.training, config.distributed, has_eval=False),
    )
    return Trainer(
        model=model,
        reward_funcs=[function for function, _, _ in functions],
        args=args,
        train_dataset=Dataset.from_list(grpo_prompts(grpo, train_pairs, root)),
        processing_class=tokenizer,
        reward_processing_classes=[processor for _, _, processor in functions],
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------
# The stage


def _lineage(root: Path) -> dict:
    lineage = alignment.lineage(root)
    weights = root / paths.REWARD_MODEL / "model.safetensors"
    if weights.is_file():
        lineage["reward_model"] = {"path": str(paths.REWARD_MODEL), "md5": modeling.file_md5(weights)}
    return lineage


def _pass_sft_through(root: Path, config: RlhfParams, reason: str) -> dict:
    metrics = {"aligned": False, "method": config.method, "reason": reason}

    with atomic_dir(root / paths.ALIGNED_MODEL) as staging:
        shutil.copytree(paths.SFT_MODEL.require(root), staging, dirs_exist_ok=True)
        modeling.write_model_card(
            staging,
            title="Flywheel model (SFT, not aligned)",
            base_model=str(paths.SFT_MODEL),
            lineage=_lineage(root),
            params=config.model_dump(),
            metrics=metrics,
            notes=f"**Alignment was skipped: {reason}.** These are the SFT model's weights, unchanged.",
        )
    return metrics


def train(params: Params, root: Path) -> dict | None:
    config = params.rlhf
    train_pairs, eval_pairs = alignment.load_pairs(root)
    if not train_pairs:
        return _pass_sft_through(root, config, alignment.no_pairs(config, "rlhf"))
    reward_model = alignment.load_reward_model(root)
    if config.method == "reward+grpo" and reward_model is None:
        raise FlywheelError(
            f"{paths.REWARD_MODEL} holds no trained reward model (see its README.md): {paths.REWARD_MODEL.run_first}"
        )
    model, tokenizer = alignment.load_sft(root)
    probe = read_records(paths.EVAL.require(root))[: config.eval_examples]
    scorers = scoring.scorers_for(probe, params.evaluate.scoring)
    # Rank 0 measures, on the model as loaded and on the model whole after training.
    before = None
    if distributed.is_rank_zero():
        before = measure(model, tokenizer, eval_pairs, probe, scorers, reward_model, config)

    if config.method == "dpo":
        datasets, length_metrics = dpo_datasets(config, tokenizer, train_pairs, eval_pairs)
    else:
        length_metrics = grpo_prompt_lengths(config, tokenizer, train_pairs, root)

    callback = trainer_args.live_callback(root, paths.RLHF_CURVES)
    callbacks = [callback]
    trainer = (
        dpo_trainer(config, model, tokenizer, datasets, root, callbacks)
        if config.method == "dpo"
        else grpo_trainer(config, model, tokenizer, train_pairs, reward_model, root, callbacks)
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    engine = distributed.training_engine(trainer)
    aligned = distributed.trained_model(trainer)
    if aligned is None:
        return None  # not rank 0: it writes the outputs
    after = measure(aligned, tokenizer, eval_pairs, probe, scorers, reward_model, config)
    reference, _ = alignment.load_sft(root)
    kl = kl_from_reference(aligned, reference, tokenizer, eval_pairs, config)
    callback.live.end()

    metrics = {
        "aligned": True,
        "method": config.method,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "lengths": length_metrics,
        "task_examples": len(probe),
        "task_scorers": scorers,
        "steps": result.global_step,
        "engine": engine,
        "world_size": trainer.args.world_size,
        "train_seconds": round(seconds, 1),
        "kl_from_sft": kl,
        "sft": before,
        "aligned_model": after,
        "training_log": _last_logged(trainer),
    }

    with atomic_dir(root / paths.ALIGNED_MODEL) as staging:
        aligned.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        modeling.write_model_card(
            staging,
            title=f"Flywheel aligned model ({config.method})",
            base_model=str(paths.SFT_MODEL),
            lineage=_lineage(root),
            params=config.model_dump(),
            metrics=metrics,
        )
    shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)
    return metrics


def _last_logged(trainer) -> dict:
    """The trainer's own last logged values (DPO reward margins/accuracies, GRPO rewards and KL)."""
    last = {}
    for entry in trainer.state.log_history:
        last.update(
            {
                key: value
                for key, value in entry.items()
                if isinstance(value, (int, float)) and key not in ("epoch", "step")
            }
        )
    return {key: round(value, 4) for key, value in sorted(last.items())}


def run(params: Params, root: Path = Path(".")) -> dict | None:
    return distributed.run_stage("rlhf", "rlhf", params.rlhf.distributed, params, root, train)


def _length_lines(metrics: dict) -> list[str]:
    if metrics["method"] != "dpo":
        prompt = metrics["lengths"]["train"]["token_lengths"]["prompt"]
        count = metrics["lengths"]["train"]["prompts"]
        return [f"  prompts      {count:,}, all whole (tokens p50 {prompt['p50']}, max {prompt['max']})"]
    warnings = metrics["lengths"]["warnings"]
    return [lengths.report_line(metrics["lengths"], "train", "pairs"), *(f"  warning: {w}" for w in warnings)]


def report(metrics: dict) -> str:
    if not metrics["aligned"]:
        return f"rlhf: alignment skipped ({metrics['reason']}); {paths.ALIGNED_MODEL} is the SFT model"

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    before, after = metrics["sft"], metrics["aligned_model"]
    lines = [
        f"rlhf ({metrics['method']}): {metrics['train_pairs']:,} pairs, {metrics['steps']:,} steps "
        f"in {metrics['train_seconds']:.0f} s",
        *_length_lines(metrics),
        f"  preference accuracy  {fmt(before['preference_accuracy'])} -> "
        f"{fmt(after['preference_accuracy'])} on {metrics['eval_pairs']:,} held-out pairs "
        f"({fmt(before['preference_accuracy_collected'])} -> {fmt(after['preference_accuracy_collected'])} "
        "on those collected from people, without on-policy pairs)",
        f"  task score           {fmt(before['task_score'])} -> {fmt(after['task_score'])} "
        f"on {metrics['task_examples']:,} held-out prompts",
    ]
    if "reward_of_answers" in after:
        lines.append(
            f"  reward of answers    {fmt(before['reward_of_answers'])} -> "
            f"{fmt(after['reward_of_answers'])} (reward model)"
        )
    lines += [
        f"  KL from SFT          {fmt(metrics['kl_from_sft'])} nats per answer",
        f"  wrote {paths.ALIGNED_MODEL}/ (model card: {paths.ALIGNED_MODEL}/README.md), curves in {paths.RLHF_CURVES}/",
    ]
    return "\n".join(lines)
