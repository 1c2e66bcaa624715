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


def test_dvc_repro_builds_the_outputs_and_a_second_run_is_a_no_op(project_copy):
    first = run(["dvc", "repro"], project_copy)
    assert "Running stage 'ingest'" in first.stdout
    metrics = json.loads((project_copy / "metrics/ingest.json").read_text())
    assert metrics["read"] == metrics["records"] + metrics["preferences"] + metrics["quarantined"]
    records = pq.read_table(project_copy / "data/interim/ingest/records.parquet")
    assert records.num_rows == metrics["records"] > 1000

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
    outcome = dag_test(project_copy, airflow_home, {"ingest.chunk_size": 500, "reason": "manual"})
    assert outcome == {"state": "success", "tasks": {"apply_params": "success", "ingest": "success"}}
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
    assert outcome["tasks"] == {"apply_params": "failed", "ingest": "upstream_failed"}
    assert not (project_copy / "data/interim/ingest/records.parquet").exists()
