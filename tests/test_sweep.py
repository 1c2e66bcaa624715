"""`flywheel sweep`'s grid and its choice of the best run (the Airflow side is in
tests/test_airflow_celery.py, which triggers its runs with it)."""

import pytest

from flywheel.errors import FlywheelError
from flywheel.orchestration.sweep import best, grid

ALLOWED = ["finetune.training.learning_rate", "finetune.training.epochs"]


def test_a_grid_is_every_combination_with_values_typed():
    points = grid(["finetune.training.learning_rate=0.0005,1e-3", "finetune.training.epochs=3,6"], ALLOWED)
    assert points == [
        {"finetune.training.learning_rate": 0.0005, "finetune.training.epochs": 3},
        {"finetune.training.learning_rate": 0.0005, "finetune.training.epochs": 6},
        {"finetune.training.learning_rate": 0.001, "finetune.training.epochs": 3},
        {"finetune.training.learning_rate": 0.001, "finetune.training.epochs": 6},
    ]


def test_a_grid_may_only_sweep_the_trigger_forms_params():
    with pytest.raises(FlywheelError, match="may set only airflow.trigger_params"):
        grid(["evaluate.gate.minimum=0"], ALLOWED)
    with pytest.raises(FlywheelError, match="expected KEY=VALUE"):
        grid(["finetune.training.epochs"], ALLOWED)


def summary(task_score: float, gate: str) -> dict:
    return {"metrics": {"metrics/summary.json": {"data": {"gate": gate, "model": {"task_score": task_score}}}}}


def test_the_best_run_is_the_best_one_the_gate_passed():
    listed = {"a": summary(0.9, "rejected"), "b": summary(0.7, "staging"), "c": summary(0.8, "staging")}
    assert best(listed, ["a", "b", "c"], "model.task_score", maximize=True) == ("c", 0.8)
    assert best(listed, ["a", "b", "c"], "metrics/summary.json:model.task_score", maximize=False) == ("b", 0.7)
    assert best(listed, ["b", "missing"], "model.task_score", maximize=True) == ("b", 0.7)
    with pytest.raises(FlywheelError, match="no run of the sweep passed the gate"):
        best(listed, ["a"], "model.task_score", maximize=True)
