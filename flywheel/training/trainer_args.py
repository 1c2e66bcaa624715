"""How every Flywheel trainer is configured: TrainerParams (params.yaml) to Hugging Face
TrainingArguments fields in one place, the precision, and the dvclive curves.

TRL's configs default to bf16 and gradient checkpointing, and a library default is easy to miss
when it changes: every field that matters here is set explicitly, from params.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.config import DistributedParams, TrainerParams

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16 = {"amx_bf16", "avx512_bf16"}  # /proc/cpuinfo flags of CPUs that compute bf16 in hardware


def precision_flags(requested: str, cpuinfo: Path = CPUINFO) -> dict:
    """bf16/fp16 TrainingArguments flags; auto is bf16 on a GPU that has it, else fp32. bf16 asked
    of a CPU without AMX-BF16 or AVX512-BF16 trains in fp32, and says so: there bf16 is emulated,
    and LoRA on SmolLM2 ran 2 steps in 14 minutes (an AMD EPYC with AVX2 only) instead of 90."""
    import torch

    on_gpu = torch.cuda.is_available()
    if requested == "auto":
        requested = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    elif requested == "bf16" and not on_gpu and not cpu_flags(cpuinfo) & NATIVE_BF16:
        print("precision: bf16 asked, but this CPU has no AMX-BF16 or AVX512-BF16 (bf16 would be emulated): fp32")
        requested = "fp32"
    return {"bf16": requested == "bf16", "fp16": requested == "fp16"}


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first CPU's feature flags; empty where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


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
        ddp_timeout=distributed.collective_timeout_s,  # GPUs; CPU ranks: distributed.prepare_process
        **precision_flags(training.precision),
    )


def live_callback(root: Path, directory: Path, *, resume: bool = False):
    """dvclive curves of a trainer's logs, in `directory` (a stage's declared plots), written by
    rank 0 alone (another rank's Live would empty the directory as it starts). GRPO logs None for a
    reward function no prompt in the batch had (e.g. correctness without references), which
    dvclive refuses: those are left out."""
    from dvclive.huggingface import DVCLiveCallback
    from transformers import TrainerCallback

    from dvclive import Live
    from flywheel.training import distributed

    if not distributed.is_rank_zero():
        return TrainerCallback()

    class Callback(DVCLiveCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {key: value for key, value in (logs or {}).items() if value is not None}
            super().on_log(args, state, control, logs=logs, **kwargs)

    return Callback(live=Live(str(root / directory), resume=resume, dvcyaml=False, save_dvc_exp=False))
