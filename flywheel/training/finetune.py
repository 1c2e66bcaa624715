"""finetune: supervised fine-tuning (TRL SFTTrainer) of the base model on the train split.

Input:  data/processed/train.parquet, data/processed/eval.parquet
        data/processed/retain.parquet  the base model's own answers to general prompts, trained on
                                       beside the task against forgetting (flywheel/training/retain.py)
Output: models/sft/              the model in Hugging Face format (safetensors, tokenizer with
                                 its chat template, config) and a model card with lineage
        dvclive/finetune/        training curves (`dvc plots show`)
        metrics/finetune.json    eval loss and exact match before and after, throughput
Checkpoints go to models/.checkpoints/sft/ every `save_steps`; a killed run started again with
the same params and data resumes from the last one.

Loss is on the assistant's tokens only; short examples are packed into rows of `max_length`.
An example longer than `max_length` is dropped, truncated or fails the stage, as
`training.length_policy` says, before TRL sees it (flywheel/training/lengths.py); every example
is counted in metrics/finetune.json `lengths`, with each split's token-length percentiles.
One process on the CPU or one GPU; with `distributed.launcher` deepspeed, accelerate or torchrun,
the stage launches its ranks through that launcher (GPUs or CPU ranks, one node or several:
flywheel/training/distributed.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from flywheel import modeling, paths, scoring
from flywheel.config import FinetuneParams, Params
from flywheel.errors import FlywheelError
from flywheel.io import atomic_dir, read_records
from flywheel.training import distributed, lengths, retained, trainer_args

INPUTS = {"train": paths.TRAIN, "eval": paths.EVAL}
CHECKPOINTS = Path("models/.checkpoints/sft")  # local resumable state, not an artifact


# ---------------------------------------------------------------------------------------------
# Data


def inputs(root: Path) -> dict[str, paths.Artifact]:
    """The data finetune reads: the splits, and the retained examples where retain has run."""
    return INPUTS | ({"retain": paths.RETAIN} if (root / paths.RETAIN).is_file() else {})


def fingerprint(config: FinetuneParams, root: Path) -> str:
    """What a checkpoint must match to be resumed: the training params, the ranks' layout (a ZeRO
    checkpoint holds a shard per rank and loads into the same layout only) and the input data."""
    data = {name: modeling.file_md5(root / artifact) for name, artifact in inputs(root).items()}
    settings = config.model_dump(exclude={"distributed": {"main_address", "main_port", "collective_timeout_s"}})
    return hashlib.sha256(json.dumps([settings, data], sort_keys=True).encode()).hexdigest()


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint-N the Trainer finished writing (its trainer_state.json, written last,
    after every rank's shards, is there). A run killed while it wrote one leaves it half-written:
    rank 0 removes that one (every rank skips it)."""
    numbered = [path for path in directory.glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()]
    for checkpoint in sorted(numbered, key=lambda path: int(path.name[11:]), reverse=True):
        if (checkpoint / "trainer_state.json").is_file():
            return str(checkpoint)
        if distributed.is_rank_zero():
            print(f"finetune: {checkpoint} was not finished (killed while saving): removed")
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def resumable_checkpoint(directory: Path, expected: str) -> str | None:
    """The last checkpoint of an interrupted run with the same fingerprint; stale ones go. Every
    rank decides alike from what it reads; rank 0 alone deletes and writes."""
    marker = directory / "fingerprint.txt"
    if directory.is_dir() and marker.is_file() and marker.read_text().strip() == expected:
        return last_complete_checkpoint(directory)
    if not distributed.is_rank_zero():
        return None
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    marker.write_text(expected + "\n")
    return None


# ---------------------------------------------------------------------------------------------
# Training


def length_limits(config: FinetuneParams) -> lengths.Limits:
    return lengths.Limits.of("finetune", "finetune.training", config.training)


def fitted_examples(tokenizer, rows: list[dict], limits: lengths.Limits, split: str) -> tuple[list[dict], dict]:
    """The split tokenised as SFTTrainer would, each example fitted to max_length: (what TRL
    trains on, the split's counts)."""
    conversations = [modeling.record_messages(row) for row in rows]
    examples = lengths.sft_tokens(tokenizer, conversations)
    return lengths.fit_split(
        examples, lambda ids, labels: lengths.fit_sequence(ids, labels, limits), limits, split, "examples"
    )


def sft_config(config: FinetuneParams, output_dir: Path, has_eval: bool):
    from trl import SFTConfig

    training = config.training
    return SFTConfig(
        output_dir=str(output_dir),
        max_length=training.max_length,
        packing=training.packing,
        # The data come tokenised, with labels that are -100 outside the assistant's turns: the
        # assistant-only loss is already in them (TRL refuses assistant_only_loss on token ids).
        assistant_only_loss=False,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,
        **trainer_args.arguments(training, config.distributed, has_eval=has_eval),
    )


def _peft_config(config: FinetuneParams):
    if config.method != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
    )


def _task_score(model, tokenizer, rows: list[dict], scorers: dict[str, str], config: FinetuneParams) -> float | None:
    """The held-out probe's answers judged by each source's task scorer, as evaluate judges."""
    conversations = [modeling.record_messages(row, with_response=False) for row in rows]
    answers = modeling.generate(model, tokenizer, conversations, max_new_tokens=config.training.max_new_tokens)
    return scoring.task_score(answers, rows, scorers)


def _point_at_base(adapter: Path, final: Path, base: Path) -> None:
    """The adapter names the base model relative to where it will live (PEFT records the path the
    base was loaded from, which holds only in the directory the stage ran in)."""
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = os.path.relpath(base, final)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _save(model, tokenizer, config: FinetuneParams, root: Path) -> None:
    """Write the final model beside models/sft, then swap it in: never a half-written model."""
    target = root / paths.SFT_MODEL
    with atomic_dir(target) as staging:
        if config.method == "lora" and config.lora.merge:
            # The adapter itself is kept (adapter/, loadable on models/base as it is), and the
            # weights with it folded in are the model: serving and the next stages need no PEFT.
            model.save_pretrained(staging / "adapter")
            tokenizer.save_pretrained(staging / "adapter")
            _point_at_base(staging / "adapter", target / "adapter", root / paths.BASE_MODEL)
            model.merge_and_unload().save_pretrained(staging)
        else:
            model.save_pretrained(staging)  # a LoRA adapter when unmerged
            if config.method == "lora":
                _point_at_base(staging, target, root / paths.BASE_MODEL)
        tokenizer.save_pretrained(staging)


def _tokens_seen(trainer, since_step: int) -> int:
    """Tokens trained on in this run (TRL logs a running count, restored on resume)."""
    counts = [
        (entry["step"], entry["num_tokens"])
        for entry in trainer.state.log_history
        if "num_tokens" in entry and "loss" in entry
    ]
    before = max((tokens for step, tokens in counts if step <= since_step), default=0)
    return int(max((tokens for _, tokens in counts), default=0) - before)


def train(params: Params, root: Path) -> dict | None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    config = params.finetune
    train_rows, eval_rows = (read_records(artifact.require(root)) for artifact in INPUTS.values())
    retain_rows = retained.records(config.retain, root)
    if not train_rows:
        raise FlywheelError(
            "the train split is empty: nothing to fine-tune on; check the clean "
            "and split metrics (metrics/clean.json, metrics/split.json)"
        )
    resume_from = resumable_checkpoint(root / CHECKPOINTS, fingerprint(config, root))
    texts = (turn["content"] for row in train_rows for turn in modeling.record_messages(row))
    imported = paths.BASE_MODEL.require(root) if config.base_model != "tiny" else None
    model, tokenizer = modeling.load_base(config, texts, imported)
    if resume_from:
        tokenizer = AutoTokenizer.from_pretrained(resume_from)  # the vocabulary the weights know

    limits = length_limits(config)
    train_examples, train_counts = fitted_examples(tokenizer, train_rows + retain_rows, limits, "train")
    eval_examples, eval_counts = fitted_examples(tokenizer, eval_rows, limits, "eval")

    curves = trainer_args.live_callback(root, paths.SFT_CURVES, resume=bool(resume_from))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, root / CHECKPOINTS, bool(eval_examples)),
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=_peft_config(config),
        callbacks=[curves],
    )
    if config.method == "lora" and distributed.is_sharded(trainer):
        raise FlywheelError(
            "LoRA with ZeRO-3 or FSDP is not supported: the adapter is small, so shard its optimizer "
            "state with ZeRO-2 (finetune.distributed.deepspeed_config: infra/deepspeed/zero2.json)"
        )
    probe = eval_rows[: config.training.eval_examples]
    scorers = scoring.scorers_for(probe, params.evaluate.scoring)
    # The probe is answered by rank 0 on the model as loaded, before DeepSpeed wraps (ZeRO-3:
    # partitions) it. The loss before training is evaluated in one process only (transformers 5):
    # after an evaluation, train() left the model out of DDP and two ranks trained apart, without
    # a gradient exchanged; ZeRO-2 cannot evaluate first, and after ZeRO-3's evaluation-only
    # engine the training step found no engine.
    task_before = _task_score(model, tokenizer, probe, scorers, config) if distributed.is_rank_zero() else None
    can_evaluate_first = eval_examples and trainer.args.world_size == 1 and not config.distributed.deepspeed_config
    before = {"eval_loss": trainer.evaluate()["eval_loss"] if can_evaluate_first else None, "task_score": task_before}
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    engine = distributed.training_engine(trainer)
    eval_loss_after = trainer.evaluate()["eval_loss"] if eval_examples else None
    model = distributed.trained_model(trainer)
    if model is None:
        return None  # not rank 0: it writes the outputs
    resumed_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
    after = {"eval_loss": eval_loss_after, "task_score": _task_score(model, tokenizer, probe, scorers, config)}
    curves.live.log_metric("task_score", after["task_score"], plot=False)
    curves.live.end()

    _save(model, tokenizer, config, root)
    metrics = {
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "task_score_before": before["task_score"],
        "task_score_after": after["task_score"],
        "task_examples": len(probe),
        "task_scorers": scorers,
        "train_examples": len(train_rows),
        "retain_examples": len(retain_rows),
        "trained_examples": len(train_examples),
        "lengths": lengths.summary(limits, {"train": train_counts, "eval": eval_counts}),
        "steps": result.global_step,
        "epochs": config.training.epochs,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(_tokens_seen(trainer, resumed_step) / seconds, 1),
        "resumed_from_step": resumed_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "method": config.method,
        "base_model": config.base_model,
        "engine": engine,
        "world_size": trainer.args.world_size,
        "zero_stage": distributed.zero_stage(config.distributed),
    }
    lineage = {
        "data": {
            name: {"path": str(artifact), "md5": modeling.file_md5(root / artifact)}
            for name, artifact in inputs(root).items()
        },
        "code_revision": modeling.code_revision(root),
    }
    modeling.write_model_card(
        root / paths.SFT_MODEL,
        title="Flywheel SFT model",
        base_model=config.base_model,
        lineage=lineage,
        params=config.model_dump(),
        metrics=metrics,
    )
    shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)  # finished: nothing left to resume
    return metrics


def run(params: Params, root: Path = Path(".")) -> dict | None:
    return distributed.run_stage("finetune", "finetune", params.finetune.distributed, params, root, train)


def _scorers(by_source: dict[str, str]) -> str:
    return ", ".join(f"{source}: {scorer}" for source, scorer in by_source.items())


def report(metrics: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    retained_note = (
        f" + {metrics['retain_examples']:,} retained (the base model's own)" if metrics.get("retain_examples") else ""
    )
    resumed = f", resumed from step {metrics['resumed_from_step']}" if metrics["resumed_from_step"] else ""
    return "\n".join(
        [
            f"finetune: {metrics['train_examples']:,} examples{retained_note}, {metrics['steps']:,} steps in "
            f"{metrics['train_seconds']:.0f} s ({metrics['train_tokens_per_second'] or 0:,.0f} tokens/s){resumed}",
            lengths.report_line(metrics["lengths"], "train", "examples"),
            *(f"  warning: {warning}" for warning in metrics["lengths"]["warnings"]),
            f"  eval loss    {fmt(metrics['eval_loss_before'])} -> {fmt(metrics['eval_loss_after'])}",
            f"  task score   {fmt(metrics['task_score_before'])} -> {fmt(metrics['task_score_after'])} "
            f"on {metrics['task_examples']} held-out prompts ({_scorers(metrics['task_scorers'])})",
            f"  wrote {paths.SFT_MODEL}/ (model card: {paths.SFT_MODEL}/README.md), curves in {paths.SFT_CURVES}/",
        ]
    )
