"""Fine-tuning with real TRL and DeepSpeed on the CPU, on the bundled sample's splits."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel import modeling, paths
from flywheel.config import parse_params
from flywheel.errors import FlywheelError
from flywheel.training import distributed, finetune, trainer_args
from tests.conftest import BIN, REPO, project_with, run, subprocess_env

pytestmark = pytest.mark.slow

QUICK = {"training.epochs": 0.3, "training.eval_examples": 20, "training.logging_steps": 10}


def flywheel_finetune(root, check=True):
    return run([str(BIN / "flywheel"), "finetune"], root, check=check)


def metrics_of(root) -> dict:
    return json.loads((root / "metrics/finetune.json").read_text())


def test_sft_learns_the_sample_task_within_five_minutes(trained_sft):
    root = trained_sft
    metrics = metrics_of(root)
    assert metrics["train_seconds"] < 300
    assert metrics["task_score_before"] < 0.05
    assert metrics["eval_loss_after"] <= metrics["eval_loss_before"] / 2
    assert metrics["task_score_after"] >= 0.8, metrics
    # The held-out answers are judged as evaluate judges them, each source by its own scorer.
    assert metrics["task_scorers"]["translations"] == "exact_match", metrics["task_scorers"]

    # A standard Hugging Face model directory, reloadable on its own, with its lineage.
    model_dir = root / paths.SFT_MODEL
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert tokenizer.chat_template == modeling.CHAT_TEMPLATE
    answer = modeling.generate(
        model, tokenizer, [[{"role": "user", "content": "Translate to French: red cat"}]], max_new_tokens=8
    )
    assert answer == ["rouge chat"]
    card = (model_dir / "README.md").read_text()
    assert modeling.file_md5(root / "data/processed/train.parquet") in card
    assert "task_score_after" in card and "code_revision" in card
    assert (root / paths.SFT_CURVES / "plots/metrics/train/loss.tsv").is_file()
    assert not (root / finetune.CHECKPOINTS).exists()  # finished runs leave nothing to resume


def test_a_killed_run_resumes_from_its_last_checkpoint(sample_splits, tmp_path):
    root = project_with(tmp_path, sample_splits, finetune={**QUICK, "training.epochs": 2, "training.save_steps": 40})
    worker = subprocess.Popen(
        [str(BIN / "flywheel"), "finetune"],
        cwd=root,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = root / finetune.CHECKPOINTS
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert worker.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.5)
    time.sleep(1)  # let the checkpoint finish writing its last files
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not (root / paths.SFT_MODEL).exists()

    output = flywheel_finetune(root).stdout
    metrics = metrics_of(root)
    assert metrics["resumed_from_step"] >= 40 and "resumed from step" in output
    assert metrics["steps"] > metrics["resumed_from_step"]
    assert (root / paths.SFT_MODEL / "model.safetensors").is_file()


def test_lora_adapter_is_merged_into_plain_weights(sample_splits, tmp_path):
    root = project_with(tmp_path, sample_splits, finetune={**QUICK, "method": "lora"})
    flywheel_finetune(root)
    model_dir = root / paths.SFT_MODEL
    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    "case, sections, message",
    [
        (
            "no GPUs",
            {"finetune": {"distributed.num_gpus": 2, "distributed.launcher": "deepspeed"}},
            "ask for 2 GPU(s) per node but this machine has 0",
        ),
        (
            "base model not imported",  # the base stage imports it (tests/test_base.py)
            {"finetune": {"base_model": "./no/such/model"}},
            "models/base not found: run the base stage first (dvc repro base)",
        ),
    ],
)
def test_bad_configuration_is_one_clear_message(sample_splits, tmp_path, case, sections, message):
    root = project_with(tmp_path, sample_splits, **sections)
    result = flywheel_finetune(root, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_empty_train_split_is_a_clear_error(sample_splits, tmp_path):
    import pyarrow.parquet as pq

    root = project_with(tmp_path, sample_splits)
    train = root / "data/processed/train.parquet"
    pq.write_table(pq.read_table(train).slice(0, 0), train)
    result = flywheel_finetune(root, check=False)
    assert result.returncode == 2 and "the train split is empty" in result.stderr


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tokenizer = modeling.train_tokenizer(["hello world"] * 20, 300)
    tokenizer.chat_template = None
    model = modeling.build_tiny_model(
        tokenizer,
        parse_params(
            {"ingest": {"sources": [{"name": "x", "path": "data/raw/x.jsonl", "kind": "pair"}]}}
        ).finetune.tiny,
        seed=0,
    )
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(FlywheelError, match="has no chat template"):
        modeling.load_pretrained(str(tmp_path / "base"))


def distributed_params(**settings):
    """finetune.distributed as params.yaml would give it, checked."""
    sources = [{"name": "x", "path": "data/raw/x", "kind": "pair"}]
    return parse_params({"ingest": {"sources": sources}, "finetune": {"distributed": settings}}).finetune.distributed


def test_multi_node_launch_commands(monkeypatch):
    """What each node runs, for each launcher: the commands docs/training.md gives users."""
    eight_gpus_two_nodes = distributed_params(
        launcher="deepspeed",
        num_gpus=8,
        num_nodes=2,
        hostfile="infra/deepspeed/hostfile",
        main_address="10.0.0.1",
        deepspeed_config="infra/deepspeed/zero3.json",
    )
    stage = ["flywheel", "--params", "params.yaml", "finetune"]
    monkeypatch.delenv(distributed.NODE_RANK_VARIABLE, raising=False)
    over_ssh = distributed.launch_command(eight_gpus_two_nodes, "params.yaml", "finetune")
    assert over_ssh[1:] == [
        *"--no_local_rank --num_gpus 8 --master_addr 10.0.0.1 --master_port 29500".split(),
        *"--num_nodes 2 --hostfile infra/deepspeed/hostfile --module".split(),
        *stage,
    ]
    monkeypatch.setenv(distributed.NODE_RANK_VARIABLE, "1")
    on_each_node = distributed.launch_command(eight_gpus_two_nodes, "params.yaml", "finetune")
    assert on_each_node[-8:] == [*"--no_ssh --node_rank 1 --module".split(), *stage]

    accelerate = eight_gpus_two_nodes.model_copy(update={"launcher": "accelerate"})
    assert distributed.launch_command(accelerate, "params.yaml", "finetune")[1:] == [
        *"launch --num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1".split(),
        *"--main_process_port 29500 --use_deepspeed --deepspeed_config_file infra/deepspeed/zero3.json -m".split(),
        *stage,
    ]
    torchrun = eight_gpus_two_nodes.model_copy(update={"launcher": "torchrun", "deepspeed_config": None})
    assert distributed.launch_command(torchrun, "params.yaml", "finetune")[1:] == [
        *"--nnodes=2 --nproc-per-node=8 --node-rank=1 --master-addr=10.0.0.1 --master-port=29500 -m".split(),
        *stage,
    ]
    monkeypatch.delenv(distributed.NODE_RANK_VARIABLE)
    with pytest.raises(FlywheelError, match="set FLYWHEEL_NODE_RANK on each node"):
        distributed.launch_command(torchrun, "params.yaml", "finetune")


def test_requests_the_machine_cannot_meet_are_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("hostfile").write_text("node-a slots=2  # the first node\nnode-b slots=1\n")
    params = distributed_params(
        launcher="deepspeed", cpu_ranks=2, num_nodes=3, hostfile="hostfile", main_address="10.0.0.1"
    )
    with pytest.raises(FlywheelError, match="num_nodes is 3 but the hostfile hostfile names 2 host"):
        distributed.check_hardware(params, "finetune")
    with pytest.raises(FlywheelError, match="gives node-b fewer slots"):
        distributed.check_hardware(params.model_copy(update={"num_nodes": 2}), "finetune")
    with pytest.raises(FlywheelError, match="ask for 1 GPU"):
        distributed.check_hardware(params.model_copy(update={"num_gpus": 1}), "finetune")
    # On CPU ranks accelerate and the Trainer quietly run DDP where FSDP is asked for.
    Path("fsdp2.yaml").write_text((REPO / "infra/accelerate/fsdp2.yaml").read_text())
    fsdp_on_cpus = params.model_copy(
        update={"launcher": "accelerate", "num_nodes": 1, "hostfile": None, "accelerate_config": "fsdp2.yaml"}
    )
    with pytest.raises(FlywheelError, match="asks for FSDP, which needs GPUs"):
        distributed.check_hardware(fsdp_on_cpus, "finetune")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_tile amx_bf16", True), ("fpu sse4_2 avx2 fma", False)],
)
def test_bf16_on_a_cpu_that_emulates_it_trains_in_fp32(tmp_path, flags, expected, capsys):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n")
    assert trainer_args.precision_flags("bf16", cpuinfo) == {"bf16": expected, "fp16": False}
    assert ("bf16 would be emulated" in capsys.readouterr().out) is not expected
    assert trainer_args.precision_flags("fp32", cpuinfo) == {"bf16": False, "fp16": False}


def test_a_checkpoint_killed_while_it_was_written_is_not_resumed(tmp_path):
    for step in (40, 80, 120):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-40/trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-80/trainer_state.json").write_text("{}")
    assert finetune.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-80")
    assert not (tmp_path / "checkpoint-120").exists()  # half-written: the Trainer would fail on it
    assert finetune.last_complete_checkpoint(tmp_path / "nothing-yet") is None
