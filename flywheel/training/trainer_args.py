"""How every Flywheel trainer is configured: TrainerParams (params.yaml) to Hugging Face
TrainingArguments fields in one place, the precision, and the dvclive curves.

TRL's configs default to bf16 and gradient checkpointing, and a library default is easy to miss
when it changes: every field that matters here is set explicitly, from params.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.config import DistributedParams, TrainerParams


def precision_flags(requested: str) -> dict:
    """bf16/fp16 TrainingArguments flags; auto is bf16 on a GPU that has it, else fp32."""
    import torch

    if requested == "auto":
        requested = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": requested == "bf16", "fp16": requested == "fp16"}


def arguments(training: TrainerParams, distributed: DistributedParams, *, has_eval: bool) -> dict:
    """The TrainingArguments fields every trainer takes; a stage adds its own (saving, lengths)."""
    import torch

    return dict(
        num_train_epochs=training.epochs,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=training.weight_decay,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        gradient_checkpointing=training.gradient_checkpointing,
        seed=training.seed,
        logging_steps=training.logging_steps,
        eval_strategy="epoch" if has_eval else "no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=distributed.deepspeed_config,
        **precision_flags(training.precision),
    )


def live_callback(root: Path, directory: Path, *, resume: bool = False):
    """dvclive curves of a trainer's logs, in `directory` (a stage's declared plots). GRPO logs
    None for a reward function no prompt in the batch had (e.g. correctness without references),
    which dvclive refuses: those are left out."""
    from dvclive.huggingface import DVCLiveCallback

    from dvclive import Live

    class Callback(DVCLiveCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {key: value for key, value in (logs or {}).items() if value is not None}
            super().on_log(args, state, control, logs=logs, **kwargs)

    return Callback(live=Live(str(root / directory), resume=resume, dvcyaml=False, save_dvc_exp=False))
