"""End to end with real parts: `dvc repro` and an Airflow `dag.test()` run in a fresh copy."""

import json
import textwrap

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow

DAG_TEST_SCRIPT = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["flywheel_training"]
    dag_run = dag.test(run_conf=json.loads(sys.argv[2]))
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    print(json.dumps({"state": str(dag_run.state), "tasks": states}))
""")


STAGES = ("ingest", "clean", "validate", "split", "finetune", "preferences", "reward", "rlhf", "evaluate")
# Training to the learning thresholds is test_finetune's and test_rlhf's job; here a fraction of
# an epoch shows each training stage runs in the pipeline.
QUICK_TRAINING = {"finetune.training.epochs": 0.2, "finetune.training.eval_examples": 10,
                  "preferences.on_policy.prompts": 40, "rlhf.reward_model.training.epochs": 0.2,
                  "rlhf.dpo.training.epochs": 0.2, "rlhf.eval_examples": 10,
                  "evaluate.test_examples": 100, "evaluate.consistency.prompts": 10}


def metrics(project, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


def test_dvc_repro_builds_the_outputs_and_a_second_run_is_a_no_op(project_copy):
    run(["flywheel", "params", "apply", "--json", json.dumps(QUICK_TRAINING)], project_copy)
    first = run(["dvc", "repro"], project_copy)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    ingest = metrics(project_copy, "ingest")
    assert ingest["read"] == ingest["records"] + ingest["preferences"] + ingest["quarantined"]

    # The sample's planted problems are caught, and every count adds up stage to stage.
    clean = metrics(project_copy, "clean")
    assert clean["in"] == ingest["records"] == clean["kept"] + clean["removed"]
    assert clean["removed_by_reason"]["exact_duplicate"] >= 20  # 12 + 8 planted, some chance ones
    assert clean["removed_by_reason"]["near_duplicate"] >= 15   # 15 planted note variants
    for reason in ("empty_response", "too_long", "symbol_ratio"):
        assert clean["removed_by_reason"][reason] >= 1
    assert clean["pii_redacted"]["email"] >= 75 and clean["pii_redacted"]["card_number"] >= 75
    kept = pq.read_table(project_copy / "data/interim/clean/records.parquet").to_pylist()
    assert not any("@example.com" in (r["prompt"] + r["response"]) for r in kept)
    assert metrics(project_copy, "validate")["success"] is True
    split = metrics(project_copy, "split")
    assert split["in"] == clean["kept"] == (split["train"] + split["eval"] + split["test"]
                                             + split["decontaminated"])
    assert (project_copy / "reports/validate/index.html").is_file()
    assert (project_copy / "models/sft/model.safetensors").is_file()
    assert metrics(project_copy, "finetune")["steps"] > 0
    assert metrics(project_copy, "rlhf")["aligned"] is True
    assert (project_copy / "models/aligned/model.safetensors").is_file()
    # A fraction of an epoch makes a poor model: the gate says so, and the stage still succeeds.
    gate = metrics(project_copy, "gate")
    assert gate["decision"] in ("staging", "rejected") and gate["passed"] == (not gate["reasons"])
    assert (project_copy / "reports/evaluate/index.html").is_file()

    second = run(["dvc", "repro"], project_copy)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout


@pytest.fixture
def airflow_home(tmp_path):
    home = tmp_path / "airflow"
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    run(["airflow", "db", "migrate"], tmp_path, **env)
    return env


def dag_test(project, env, conf: dict) -> dict:
    result = run(["python", "-c", DAG_TEST_SCRIPT, str(project / "dags"), json.dumps(conf)],
                 project, AIRFLOW__CORE__DAGS_FOLDER=str(project / "dags"), **env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_airflow_dag_run_applies_trigger_params_and_runs_the_stages(project_copy, airflow_home):
    outcome = dag_test(project_copy, airflow_home,
                       {"ingest.chunk_size": 500, "reason": "manual", **QUICK_TRAINING})
    assert outcome == {"state": "success",
                       "tasks": {name: "success" for name in ("apply_params", *STAGES)}}
    # The form's value reached params.yaml (and so DVC's record of the run) ...
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    assert params["ingest"]["chunk_size"] == 500
    assert "chunk_size: 500" in (project_copy / "dvc.lock").read_text()
    # ... and the stage wrote its outputs with it: row groups of at most 500 records.
    parquet = pq.ParquetFile(project_copy / "data/interim/ingest/records.parquet")
    assert parquet.metadata.num_rows > 1000
    assert parquet.metadata.row_group(0).num_rows == 500

    rerun = dag_test(project_copy, airflow_home, {})  # a scheduled run: nothing to apply
    assert rerun["state"] == "success"
    assert yaml.safe_load((project_copy / "params.yaml").read_text())["ingest"]["chunk_size"] == 500


def test_airflow_run_with_a_bad_param_fails_before_any_stage(project_copy, airflow_home):
    outcome = dag_test(project_copy, airflow_home, {"ingest.chunk_size": -5})
    assert outcome["state"] == "failed"
    assert outcome["tasks"] == {"apply_params": "failed",
                                **{name: "upstream_failed" for name in STAGES}}
    assert not (project_copy / "data/interim/ingest/records.parquet").exists()
