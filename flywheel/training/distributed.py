"""How the training stages (finetune, reward, rlhf) run: in this process on the CPU or one GPU, or
through the DeepSpeed / accelerate launcher with one worker per GPU and several nodes.

A stage started by `dvc repro` is the launching process: it runs the launcher, which starts the
same stage again as workers (they see LOCAL_RANK); rank 0 writes the outputs and the metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flywheel import paths
from flywheel.config import DistributedParams, Params, source_file
from flywheel.errors import FlywheelError
from flywheel.net import free_port


def check_hardware(distributed: DistributedParams, section: str) -> None:
    import torch

    available = torch.cuda.device_count()
    if distributed.num_gpus > available:
        raise FlywheelError(
            f"params ask for {distributed.num_gpus} GPU(s) per node but this machine has "
            f"{available}; set {section}.distributed.num_gpus to at most {available} "
            "(0 with launcher none trains on the CPU, or on the one GPU torch sees)"
        )
    if distributed.deepspeed_config and not Path(distributed.deepspeed_config).is_file():
        raise FlywheelError(f"DeepSpeed config {distributed.deepspeed_config!r} not found (see infra/deepspeed/)")
    if distributed.hostfile and not Path(distributed.hostfile).is_file():
        raise FlywheelError(f"hostfile {distributed.hostfile!r} not found")


def is_worker() -> bool:
    """True inside a process started by a launcher (they all set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launch_command(distributed: DistributedParams, params_file: Path, stage: str) -> list[str]:
    """The launcher command that starts one worker per GPU (one CPU worker with num_gpus 0)."""
    scripts = Path(sys.executable).parent
    stage_args = ["--params", str(params_file), stage]
    processes_per_node = max(distributed.num_gpus, 1)
    if distributed.launcher == "deepspeed":
        # --no_local_rank: workers read LOCAL_RANK from the environment, not from an argument.
        command = [str(scripts / "deepspeed"), "--no_local_rank", "--num_gpus", str(processes_per_node)]
        if distributed.num_nodes > 1:
            command += ["--num_nodes", str(distributed.num_nodes), "--hostfile", distributed.hostfile]
        return command + ["--module", "flywheel", *stage_args]
    command = [
        str(scripts / "accelerate"),
        "launch",
        "--num_processes",
        str(processes_per_node * distributed.num_nodes),
        "--num_machines",
        str(distributed.num_nodes),
    ]
    if distributed.num_gpus == 0:
        command.append("--cpu")
    if distributed.deepspeed_config:
        command += ["--use_deepspeed", "--deepspeed_config_file", distributed.deepspeed_config]
    return command + ["-m", "flywheel", *stage_args]


def prepare_process(distributed: DistributedParams, root: Path) -> None:
    """Environment a training process needs before torch/DeepSpeed start."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str((root / ".cache/torch_extensions").resolve()))
    if distributed.deepspeed_config and not is_worker():
        # DeepSpeed wants a process group even for one process: give it rank 0 of 1.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def zero_stage(distributed: DistributedParams) -> int | None:
    if not distributed.deepspeed_config:
        return None
    settings = json.loads(Path(distributed.deepspeed_config).read_text())
    return settings.get("zero_optimization", {}).get("stage", 0)


def run_stage(
    stage: str,
    section: str,
    distributed: DistributedParams,
    params: Params,
    root: Path,
    train: Callable[[Params, Path], dict | None],
) -> dict | None:
    """Train here, or start the launcher's workers and return the metrics rank 0 wrote."""
    check_hardware(distributed, section)
    if distributed.launcher == "none" or is_worker():
        prepare_process(distributed, root)
        return train(params, root)
    command = launch_command(distributed, source_file(params), stage)
    print("launching:", " ".join(command), flush=True)
    if subprocess.call(command, cwd=root) != 0:
        raise FlywheelError(f"the {distributed.launcher} launcher's workers failed (see above)")
    return json.loads((root / paths.metrics_file(stage)).read_text())
