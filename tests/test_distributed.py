"""Fine-tuning on two ranks for real, on the CPU: the DeepSpeed launcher starting two processes
that all-reduce (ZeRO-2) or partition the parameters (ZeRO-3) over gloo, torchrun's DDP, a rank
killed mid-run, and two nodes made of network namespaces that meet at a rendezvous on a bridge
address.

Each run trains the same tiny model on the sample for the same steps with the same global batch
(one process: 2 rows a step; two ranks: 1 row each), so the loss curves must agree."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel import paths
from flywheel.training import finetune
from tests.conftest import BIN, project_with, run, subprocess_env
from tests.netns import bridged_hosts, interface_of

pytestmark = pytest.mark.slow

STEPS = {"training.epochs": 0.3, "training.eval_examples": 20, "training.logging_steps": 2}
ONE_PROCESS = {**STEPS, "training.batch_size": 2}
TWO_RANKS = {**STEPS, "training.batch_size": 1, "distributed.launcher": "deepspeed", "distributed.cpu_ranks": 2}
ZERO2 = {**TWO_RANKS, "distributed.deepspeed_config": "infra/deepspeed/zero2.json"}
ZERO3 = {**TWO_RANKS, "distributed.deepspeed_config": "infra/deepspeed/zero3.json"}
# Stated tolerance: the same rows meet the same weights, and only the order of the floating-point
# sums differs (a gradient all-reduced from two halves): measured 1e-6; a bug (a rank training on
# the other's rows, a gradient not averaged) moves the losses by 1e-1 and more.
LOSS_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def extensions(tmp_path_factory) -> Path:
    """DeepSpeed compiles its CPU collectives (shm) once, about 30 s: shared by this module's runs."""
    return tmp_path_factory.mktemp("torch_extensions")


def finetune_in(root: Path, extensions: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "flywheel"), "finetune"], root, TORCH_EXTENSIONS_DIR=str(extensions))


def losses(root: Path) -> list[float]:
    """The training loss logged every 2 steps (dvclive's curve of the stage)."""
    with (root / paths.SFT_CURVES / "plots/metrics/loss.tsv").open() as table:
        return [float(row["loss"]) for row in csv.DictReader(table, delimiter="\t")]


def metrics_of(root: Path) -> dict:
    return json.loads((root / "metrics/finetune.json").read_text())


def assert_same_model(root: Path, reference: Path) -> None:
    """The saved models answer alike. (The Trainer's eval_loss is no measure of it: it averages
    per-batch means, and two ranks evaluate in batches of a different size.)"""
    tokens = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(r / paths.SFT_MODEL)(tokens).logits for r in (root, reference)]
    assert torch.allclose(*logits, atol=1e-3), (logits[0] - logits[1]).abs().max()


def assert_same_training(root: Path, reference: Path) -> None:
    """The one-process run's loss curve, and a model that answers as its model does."""
    mine, theirs = losses(root), losses(reference)
    assert len(mine) == len(theirs) > 10
    assert max(abs(a - b) for a, b in zip(mine, theirs)) < LOSS_TOLERANCE, (mine, theirs)
    assert_same_model(root, reference)


@pytest.fixture(scope="module")
def one_process(sample_splits, tmp_path_factory, extensions) -> Path:
    root = project_with(tmp_path_factory.mktemp("one"), sample_splits, finetune=ONE_PROCESS)
    finetune_in(root, extensions)
    return root


def test_two_ranks_with_zero2_train_as_one_process_does(sample_splits, tmp_path, one_process, extensions):
    root = project_with(tmp_path, sample_splits, finetune=ZERO2)
    output = finetune_in(root, extensions).stdout
    assert "deepspeed --no_local_rank --num_gpus 2" in output
    metrics = metrics_of(root)
    assert (metrics["engine"], metrics["zero_stage"], metrics["world_size"]) == ("DeepSpeedEngine", 2, 2)
    assert metrics["steps"] == metrics_of(one_process)["steps"]
    assert_same_training(root, one_process)


def test_two_ranks_with_torchrun_ddp_exchange_gradients(sample_splits, tmp_path, one_process, extensions):
    """Plain DDP: the run in which transformers 5 once trained two ranks apart (after an evaluation
    before training, no gradient was exchanged) and nothing said so."""
    ddp = {**STEPS, "training.batch_size": 1, "distributed.launcher": "torchrun", "distributed.cpu_ranks": 2}
    root = project_with(tmp_path, sample_splits, finetune=ddp)
    assert "torchrun --nnodes=1 --nproc-per-node=2" in finetune_in(root, extensions).stdout
    metrics = metrics_of(root)
    assert (metrics["engine"], metrics["world_size"]) == ("DistributedDataParallel", 2)
    assert_same_training(root, one_process)


def rank_process(root: Path, rank: int) -> psutil.Process | None:
    for process in psutil.process_iter():
        try:
            if process.cwd() == str(root) and process.environ().get("RANK") == str(rank):
                return process
        except psutil.Error:
            continue
    return None


def test_zero3_killed_rank_fails_the_job_and_the_rerun_resumes_its_shards(
    sample_splits, tmp_path, one_process, extensions
):
    root = project_with(tmp_path, sample_splits, finetune={**ZERO3, "training.save_steps": 20})
    launcher = subprocess.Popen(
        [str(BIN / "flywheel"), "finetune"],
        cwd=root,
        env=subprocess_env(TORCH_EXTENSIONS_DIR=str(extensions)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    checkpoint = root / finetune.CHECKPOINTS / "checkpoint-20"
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").is_file():
        assert launcher.poll() is None, launcher.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.1)
    rank_process(root, 1).send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert time.monotonic() - killed_at < 60, "the other rank hung on the lost one"
    assert launcher.returncode != 0 and not (root / paths.SFT_MODEL).exists()
    assert "the deepspeed launcher's ranks failed" in output
    shards = sorted(path.name for path in checkpoint.glob("global_step20/*optim_states.pt"))
    assert len(shards) == 2, shards  # one shard of the optimizer state per rank

    output = finetune_in(root, extensions).stdout
    assert "resumed from step" in output
    metrics = metrics_of(root)
    assert metrics["resumed_from_step"] >= 20 and metrics["zero_stage"] == 3
    assert abs(losses(root)[-1] - losses(one_process)[-1]) < LOSS_TOLERANCE
    assert_same_model(root, one_process)


def finished(processes: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Each process's output once all have ended; past the timeout all are killed and the test
    fails with every node's output (a hang shows where each one stood)."""
    try:
        return [process.communicate(timeout=timeout_s)[0] for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate()[0][-4000:] for process in processes]
        pytest.fail("a node did not finish within {} s:\n{}".format(timeout_s, "\n-----\n".join(outputs)))


def test_two_nodes_meet_at_a_rendezvous_on_the_bridge(sample_splits, tmp_path, one_process, extensions):
    """Each node a network namespace with its own checkout, started as on two machines: the same
    params (hostfile, main_address) and FLYWHEEL_NODE_RANK set on each node."""
    with bridged_hosts("10.81.0", 2) as hosts:
        (node0, address0), (node1, _) = hosts
        two_nodes = {
            **ZERO2,
            "distributed.cpu_ranks": 1,
            "distributed.num_nodes": 2,
            "distributed.hostfile": "infra/deepspeed/hostfile.two-nodes",
            "distributed.main_address": address0,
        }
        roots = [project_with(tmp_path / f"node{n}", sample_splits, finetune=two_nodes) for n in range(2)]
        for root in roots:
            (root / "infra/deepspeed/hostfile.two-nodes").write_text("node0 slots=1\nnode1 slots=1\n")
        nodes = [
            subprocess.Popen(
                ["ip", "netns", "exec", namespace, str(BIN / "flywheel"), "finetune"],
                cwd=root,
                env=subprocess_env(
                    TORCH_EXTENSIONS_DIR=str(extensions),
                    FLYWHEEL_NODE_RANK=str(n),
                    GLOO_SOCKET_IFNAME=interface_of(namespace),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n, (root, (namespace, _)) in enumerate(zip(roots, hosts))
        ]
        outputs = finished(nodes, timeout_s=240)
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "--no_ssh --node_rank 1" in outputs[1] and f"--master_addr {address0}" in outputs[1]
    assert metrics_of(roots[0])["world_size"] == 2
    assert not (roots[1] / paths.SFT_MODEL).exists()  # node 0's rank 0 writes the model
    assert_same_training(roots[0], one_process)
