"""SFT tokens/s on one process against two ranks (DeepSpeed ZeRO-2 over gloo), on this machine's
CPUs, side by side in one run: the real `flywheel finetune` stage, the bundled sample's splits.

    python benchmarks/distributed_throughput.py                     # the tiny model
    python benchmarks/distributed_throughput.py --model smollm2     # SmolLM2-135M-Instruct, LoRA

Both runs see the same global batch (one process: 2 packed rows a step; two ranks: 1 each) for the
same steps; each rank sizes its threads to its share of the CPUs this process may use
(flywheel.threads: LOCAL_SIZE ranks on the node), so the two ranks do not fight over the cores.
Tokens/s is the stage's own figure (metrics/finetune.json: tokens trained on / seconds in
trainer.train()); wall seconds include start-up (imports, DeepSpeed's op build, the probes).
On a GPU machine the same stage runs with `num_gpus`; MFU: benchmarks/train_throughput.py --mfu.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODELS = {
    "tiny": {"finetune.training.epochs": 0.5},
    # The real-model profile's LoRA, few steps: SmolLM2 trains at seconds a step on a CPU.
    "smollm2": {
        "finetune.base_model": "smollm2",
        "finetune.method": "lora",
        "finetune.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "finetune.training.epochs": 0.04,
        "finetune.training.learning_rate": 0.0002,
    },
}
COMMON = {"finetune.training.eval_examples": 5, "finetune.training.logging_steps": 5}
LAYOUTS = {
    "1 process": {"finetune.training.batch_size": 2},
    "2 ranks, ZeRO-2": {
        "finetune.training.batch_size": 1,
        "finetune.distributed.launcher": "deepspeed",
        "finetune.distributed.cpu_ranks": 2,
        "finetune.distributed.deepspeed_config": "infra/deepspeed/zero2.json",
    },
}


def environment(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"),
    }


def sample_project(work: Path, model: str) -> Path:
    """The sample ingested, cleaned and split (and SmolLM2 imported as models/base)."""
    project = work / "sample"
    for folder in ("data/raw", "data/eval", "infra"):
        shutil.copytree(ROOT / folder, project / folder)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    set_params(project, {**MODELS[model], **COMMON})
    stages = ["ingest", "clean", "split"] + (["base"] if model != "tiny" else [])
    for stage in stages:
        command = [str(BIN / "flywheel"), stage]
        subprocess.run(command, cwd=project, env=environment(work), check=True, capture_output=True)
    return project


def set_params(project: Path, dotted: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def measure(sample: Path, work: Path, name: str, layout: dict) -> dict:
    project = work / name.replace(" ", "_").replace(",", "")
    shutil.copytree(sample, project, ignore=shutil.ignore_patterns("dvclive", "metrics"))
    set_params(project, layout)
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "flywheel"), "finetune"], cwd=project, env=environment(work), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads((project / "metrics/finetune.json").read_text())
    return {**metrics, "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flywheel-ranks-") as scratch:
        work = Path(scratch)
        sample = sample_project(work, args.model)
        # The DeepSpeed op build is a one-off per machine: done before the timed runs.
        measure(sample, work, "warm-up", {**LAYOUTS["2 ranks, ZeRO-2"], "finetune.training.epochs": 0.01})
        results = {name: measure(sample, work, name, layout) for name, layout in LAYOUTS.items()}
    print(f"{args.model}: {os.cpu_count()} CPUs; same global batch, same steps")
    print(f"{'layout':18} {'steps':>6} {'train s':>8} {'tokens/s':>9} {'wall s':>7} {'final eval loss':>16}")
    for name, metrics in results.items():
        loss = metrics["eval_loss_after"]
        print(
            f"{name:18} {metrics['steps']:>6} {metrics['train_seconds']:>8.1f} "
            f"{metrics['train_tokens_per_second']:>9,.0f} {metrics['wall_seconds']:>7.0f} "
            f"{'n/a' if loss is None else f'{loss:.4f}':>16}"
        )
    one, two = (results[name]["train_tokens_per_second"] for name in LAYOUTS)
    print(f"2 ranks / 1 process: {two / one:.2f}x tokens/s")


if __name__ == "__main__":
    main()
