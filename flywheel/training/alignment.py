"""What the reward and rlhf stages share: the preference pairs as chat messages, the trainer
arguments, loading the SFT model, and what to do when there is no preference data."""

from __future__ import annotations

from pathlib import Path

from flywheel.training import distributed
from flywheel import modeling
from flywheel.config import AlignTrainingParams, DistributedParams, RlhfParams
from flywheel.errors import FlywheelError
from flywheel.training.finetune import OUT_DIR as SFT_MODEL, load_split
from flywheel.training.preferences import OUTPUTS as PREFERENCE_SPLITS


def load_pairs(root: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference pairs."""
    for path in PREFERENCE_SPLITS.values():
        if not (root / path).is_file():
            raise FlywheelError(f"{root / path} not found: run the preferences stage first "
                                "(dvc repro preferences)")
    return load_split(root / PREFERENCE_SPLITS["train"]), load_split(root / PREFERENCE_SPLITS["eval"])


def prompt_messages(pair: dict) -> list[dict]:
    """The conversation a pair's responses answer (system, earlier turns, the prompt)."""
    return modeling.record_messages(pair, with_response=False)


def as_conversational(pair: dict) -> dict:
    """A pair in TRL's conversational preference format."""
    return {"prompt": prompt_messages(pair),
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def chosen_wins(pairs: list[dict], score) -> list[bool]:
    """For each pair, whether its chosen response scores above its rejected one;
    score(prompts, responses) gives one number per (conversation, response)."""
    prompts = [prompt_messages(pair) for pair in pairs]
    chosen = score(prompts, [pair["chosen"] for pair in pairs])
    rejected = score(prompts, [pair["rejected"] for pair in pairs])
    return [c > r for c, r in zip(chosen, rejected)]


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def share_by_source(pairs: list[dict], flags: list[bool]) -> dict[str, float | None]:
    return {source: share([flag for pair, flag in zip(pairs, flags) if pair["source"] == source])
            for source in sorted({pair["source"] for pair in pairs})}


def load_sft(root: Path):
    model_dir = root / SFT_MODEL
    if not (model_dir / "config.json").is_file():
        raise FlywheelError(f"{model_dir} is not a model: run the finetune stage first (dvc repro finetune)")
    return modeling.load_pretrained(str(model_dir))


def no_pairs(config: RlhfParams, stage: str) -> str:
    """The reason to skip when there are no pairs to train on; raises when params say fail."""
    reason = "no preference pairs to train on (see metrics/preferences.json)"
    if config.on_missing_preferences == "fail":
        raise FlywheelError(f"{stage}: {reason}; add preference data or feedback, or set "
                            "rlhf.on_missing_preferences: skip")
    print(f"{stage}: {reason}; skipping, as rlhf.on_missing_preferences says", flush=True)
    return reason


def training_args(training: AlignTrainingParams, dist: DistributedParams, *, has_eval: bool) -> dict:
    """TrainingArguments fields every alignment trainer takes (TRL configs default to bf16 and
    gradient checkpointing; both are set here explicitly)."""
    import torch

    return dict(
        num_train_epochs=training.epochs, learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler, warmup_steps=training.warmup_ratio,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        seed=training.seed, logging_steps=training.logging_steps, save_strategy="no",
        eval_strategy="epoch" if has_eval else "no", report_to=[], dataloader_num_workers=0,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        deepspeed=dist.deepspeed_config, **distributed.precision_flags(training.precision))


def lineage(root: Path) -> dict:
    """Where a reward or aligned model came from: the SFT model and preference files (md5s, as
    in dvc.lock) and the code revision."""
    return {"started_from": {"path": str(SFT_MODEL),
                             "md5": modeling.file_md5(root / SFT_MODEL / "model.safetensors")},
            "data": {f"preferences_{name}": {"path": str(path), "md5": modeling.file_md5(root / path)}
                     for name, path in PREFERENCE_SPLITS.items()},
            "code_revision": modeling.code_revision(root)}


def live_callback(root: Path, directory: Path):
    """dvclive curves for a trainer's logs. GRPO logs None for a reward function no prompt in the
    batch had (e.g. correctness without references), which dvclive refuses: those are left out."""
    from dvclive import Live
    from dvclive.huggingface import DVCLiveCallback

    class Callback(DVCLiveCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {key: value for key, value in (logs or {}).items() if value is not None}
            super().on_log(args, state, control, logs=logs, **kwargs)

    return Callback(live=Live(str(root / directory), dvcyaml=False, save_dvc_exp=False))
