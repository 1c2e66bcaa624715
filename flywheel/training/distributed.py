"""How the training stages (finetune, reward, rlhf) run: in this process on the CPU or one GPU, or
as ranks started by a launcher (DeepSpeed, accelerate or torchrun): one per GPU, or `cpu_ranks`
CPU workers talking over gloo, on one node or several.

A stage started by `dvc repro` (or `flywheel <stage>`) is the launching process: it runs the
launcher, which starts the same stage again as ranks (they see LOCAL_RANK). Every rank takes part
in the collectives (training, evaluation, gathering sharded weights); rank 0 writes the outputs and
the metrics. With several nodes each node runs the stage with FLYWHEEL_NODE_RANK set (0 on the node
at `main_address`); DeepSpeed can instead start every node from node 0 over ssh (its hostfile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from flywheel import paths
from flywheel.config import DistributedParams, Params, source_file
from flywheel.errors import FlywheelError
from flywheel.net import free_port

NODE_RANK_VARIABLE = "FLYWHEEL_NODE_RANK"  # which node this is, set on each node: not a param, as params are shared


def check_hardware(distributed: DistributedParams, section: str) -> None:
    """Refuse, before anything starts, what this machine or the hostfile cannot give."""
    import torch

    available = torch.cuda.device_count()
    if distributed.num_gpus > available:
        raise FlywheelError(
            f"params ask for {distributed.num_gpus} GPU(s) per node but this machine has "
            f"{available}; set {section}.distributed.num_gpus to at most {available} "
            "(0 trains on the CPU: cpu_ranks ranks per node with a launcher)"
        )
    for name in ("deepspeed_config", "accelerate_config", "hostfile"):
        path = getattr(distributed, name)
        if path and not Path(path).is_file():
            raise FlywheelError(f"{section}.distributed.{name}: {path!r} not found (see infra/)")
    if distributed.num_gpus == 0 and uses_fsdp(distributed):
        raise FlywheelError(
            f"{section}.distributed.accelerate_config asks for FSDP, which needs GPUs: on CPU ranks the "
            "Trainer runs plain DDP instead, without a word (transformers 5, accelerate 1.15). To shard "
            "the parameters across CPU ranks use launcher deepspeed with infra/deepspeed/zero3.json"
        )
    if distributed.hostfile:
        hosts = hostfile_slots(Path(distributed.hostfile))
        if len(hosts) < distributed.num_nodes:
            raise FlywheelError(
                f"{section}.distributed.num_nodes is {distributed.num_nodes} but the hostfile "
                f"{distributed.hostfile} names {len(hosts)} host(s)"
            )
        short = [host for host, slots in hosts[: distributed.num_nodes] if slots < distributed.ranks_per_node]
        if short:
            raise FlywheelError(
                f"{section}.distributed asks for {distributed.ranks_per_node} rank(s) per node but the hostfile "
                f"gives {', '.join(short)} fewer slots"
            )
    node = node_rank(distributed)
    if node >= distributed.num_nodes:
        raise FlywheelError(
            f"{NODE_RANK_VARIABLE}={node} but {section}.distributed.num_nodes is "
            f"{distributed.num_nodes} (nodes count from 0)"
        )


def uses_fsdp(distributed: DistributedParams) -> bool:
    if not distributed.accelerate_config:
        return False
    settings = yaml.safe_load(Path(distributed.accelerate_config).read_text()) or {}
    return settings.get("distributed_type") == "FSDP"


def hostfile_slots(hostfile: Path) -> list[tuple[str, int]]:
    """(host, slots) of each line of a DeepSpeed hostfile (`host slots=N`; # comments)."""
    hosts = []
    for line in hostfile.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            slots = next((int(field[6:]) for field in fields[1:] if field.startswith("slots=")), 1)
            hosts.append((fields[0], slots))
    return hosts


def is_worker() -> bool:
    """True inside a process started by a launcher (they all set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def is_rank_zero() -> bool:
    """True in the one process that writes: rank 0 of a launch, or a process no launcher started."""
    return os.environ.get("RANK", "0") == "0"


def node_rank(distributed: DistributedParams) -> int:
    """This node's rank: FLYWHEEL_NODE_RANK; unset with deepspeed, this is node 0 starting the
    others over ssh."""
    if distributed.num_nodes == 1:
        return 0
    value = os.environ.get(NODE_RANK_VARIABLE)
    if value is None and distributed.launcher == "deepspeed":
        return 0
    if value is None or not value.isdigit():
        raise FlywheelError(
            f"{distributed.num_nodes} nodes: set {NODE_RANK_VARIABLE} on each node (0 on the node at "
            f"{distributed.main_address}, then 1, 2, ...) and start the stage on every node"
        )
    return int(value)


def rendezvous(distributed: DistributedParams) -> tuple[str, int]:
    """Node 0's address and port: the params' for several nodes; a free local port for one (two
    stages launched at once on one machine must not meet)."""
    if distributed.num_nodes > 1:
        return distributed.main_address, distributed.main_port
    return "127.0.0.1", free_port()


def launch_command(distributed: DistributedParams, params_file: Path, stage: str) -> list[str]:
    """The launcher command that starts this node's ranks of the stage."""
    scripts = Path(sys.executable).parent
    stage_module = ["flywheel", "--params", str(params_file), stage]
    per_node, nodes = distributed.ranks_per_node, distributed.num_nodes
    address, port = rendezvous(distributed)
    if distributed.launcher == "deepspeed":
        # --no_local_rank: ranks read LOCAL_RANK from the environment, not from an argument.
        command = [str(scripts / "deepspeed"), "--no_local_rank", "--num_gpus", str(per_node)]
        command += ["--master_addr", address, "--master_port", str(port)]
        if nodes > 1:
            command += ["--num_nodes", str(nodes), "--hostfile", distributed.hostfile]
            if NODE_RANK_VARIABLE in os.environ:  # started on each node, not over ssh from node 0
                command += ["--no_ssh", "--node_rank", str(node_rank(distributed))]
        return command + ["--module", *stage_module]
    if distributed.launcher == "torchrun":
        return [
            str(scripts / "torchrun"),
            f"--nnodes={nodes}",
            f"--nproc-per-node={per_node}",
            f"--node-rank={node_rank(distributed)}",
            f"--master-addr={address}",
            f"--master-port={port}",
            "-m",
            *stage_module,
        ]
    command = [str(scripts / "accelerate"), "launch"]
    if distributed.accelerate_config:
        command += ["--config_file", distributed.accelerate_config]
    command += ["--num_processes", str(per_node * nodes), "--num_machines", str(nodes)]
    command += ["--machine_rank", str(node_rank(distributed)), "--main_process_ip", address]
    command += ["--main_process_port", str(port)]
    # accelerate's --cpu means one process (its simple launcher): several CPU ranks go through the
    # same launchers as GPUs, and find no GPU.
    if distributed.deepspeed_config:
        command += ["--use_deepspeed", "--deepspeed_config_file", distributed.deepspeed_config]
    elif per_node * nodes == 1 and distributed.num_gpus == 0:
        command.append("--cpu")
    elif not distributed.accelerate_config:
        command.append("--multi_gpu")  # plain DDP
    return command + ["-m", *stage_module]


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
    if is_worker() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and distributed.num_gpus == 0:
        _join_cpu_process_group(distributed.collective_timeout_s)


def _join_cpu_process_group(timeout_s: int) -> None:
    """Join the ranks over gloo with the params' collective timeout, before the Trainer does: on the
    CPU it starts the group with torch's default (30 minutes), so a lost rank's peers hung that long."""
    from datetime import timedelta

    import torch.distributed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def zero_stage(distributed: DistributedParams) -> int | None:
    if not distributed.deepspeed_config:
        return None
    settings = json.loads(Path(distributed.deepspeed_config).read_text())
    return settings.get("zero_optimization", {}).get("stage", 0)


def is_sharded(trainer) -> bool:
    """Whether each rank holds only a shard of every weight (ZeRO-3, FSDP): then the model whole
    exists only as a gather that every rank takes part in."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    return bool(trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3))


def training_engine(trainer) -> str:
    """What wrapped the model in training (DeepSpeedEngine, DistributedDataParallel, FSDP...), asked
    right after train(). Several ranks with the bare model trained apart, each on its share of the
    batches and never exchanging a gradient: that run is refused, not saved."""
    engine = type(trainer.model_wrapped).__name__
    if trainer.args.world_size > 1 and trainer.model_wrapped is trainer.model and not trainer.is_fsdp_enabled:
        raise FlywheelError(
            f"{trainer.args.world_size} ranks trained without a distributed wrapper (no gradient was "
            "exchanged: each rank trained its own model); the model is not saved"
        )
    return engine


def trained_model(trainer):
    """The trained model, whole and unwrapped, on rank 0 (None on the others, which must still call
    this: they take part in the gather). Sharded weights are gathered by the Trainer's own saving
    (ZeRO-3's 16-bit gather, FSDP's full state dict) into final/ of its output_dir (the stage's
    checkpoints, removed when it ends) and loaded back from there."""
    if not is_sharded(trainer):
        return trainer.model if trainer.is_world_process_zero() else None
    scratch = Path(trainer.args.output_dir) / "final"
    trainer.save_model(str(scratch))
    if not trainer.is_world_process_zero():
        return None
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: a plain model, not one ZeRO-3 partitions as it is built
    return type(trainer.model).from_pretrained(scratch)


def run_stage(
    stage: str,
    section: str,
    distributed: DistributedParams,
    params: Params,
    root: Path,
    train: Callable[[Params, Path], dict | None],
) -> dict | None:
    """Train here, or start this node's ranks through the launcher and return the metrics rank 0
    wrote (None on a node other than node 0: its ranks write nothing)."""
    check_hardware(distributed, section)
    if distributed.launcher == "none" or is_worker():
        prepare_process(distributed, root)
        return train(params, root)
    command = launch_command(distributed, source_file(params), stage)
    print("launching:", " ".join(command), flush=True)
    returncode = subprocess.call(command, cwd=root)
    if returncode != 0:
        raise FlywheelError(
            f"{stage}: the {distributed.launcher} launcher's ranks failed (exit {returncode}): a rank that "
            "failed or was killed takes the job down with it (see the first error above); started again, "
            "the stage resumes from its last complete checkpoint where it keeps them"
        )
    if node_rank(distributed) != 0:
        return None
    return json.loads((root / paths.metrics_file(stage)).read_text())
