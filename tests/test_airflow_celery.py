"""CeleryExecutor for real: two training runs with different params triggered at once by `flywheel
sweep` through the REST API (as the UI's trigger button does), on two Celery workers that are hosts
of their own (network namespaces with their own hostnames, reaching PostgreSQL, Redis, the
api-server and the project's git over a bridge) and share no working directory. One worker dies
mid-stage (every process of its host killed); its task is retried on the other worker, both runs
complete as DVC experiments in the project with their own params, and both are promoted (two
registry versions, numbered apart although the runs promoted at once from different hosts).

The DAG is flywheel_training built from a three-stage stand-in dvc.yaml, so that the test is about
orchestration and takes minutes; the same scenario on the real pipeline, with a sweep of three
runs timed against one, is benchmarks/airflow_sweep.py."""

import json
import re
import time

import pytest

from flywheel.orchestration.runs import experiment_name
from tests.airflow_stack import celery_cluster, stand_in_project
from tests.conftest import commit_all, postgres_database, run
from tests.helpers import experiments
from tests.netns import kill_namespace, require_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNS = [{"evaluate.test_examples": 100}, {"evaluate.test_examples": 200}]  # the stand-in's gate passes both
TRIGGERED = re.compile(r"^triggered (\S+): (.*)$", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_namespaces()
    root = tmp_path_factory.mktemp("celery")
    project = stand_in_project(root / "project")
    settings = {
        "airflow.trigger_params": ["evaluate.test_examples"],
        "airflow.gpu_stages": ["train"],
        "airflow.max_active_runs": 2,
        "airflow.retry_delay_s": 1,
        "monitor.schedule": None,
    }
    run(["flywheel", "params", "apply", "--json", json.dumps(settings)], project)
    commit_all(project, "a stand-in pipeline, two runs at once")
    with postgres_database("flywheel_celery") as database, celery_cluster(project, root, database) as (stack, workers):
        yield stack, workers


def wait_for_a_running(stack, run_ids, stage, timeout=300):
    """(run, worker's hostname) of the first `stage` running, once it has run a few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for run_id in run_ids:
            ti = stack.task_instances("flywheel_training", run_id).get(stage, {})
            if ti.get("state") == "running" and ti.get("hostname"):
                time.sleep(5)  # well into the stage
                return run_id, ti["hostname"]
        assert time.monotonic() < deadline, f"no {stage} ran"
        time.sleep(1)


def test_two_runs_at_once_on_two_celery_workers_survive_a_dead_worker(cluster):
    stack, workers = cluster
    stack.wait_for_dag("flywheel_training")
    # `flywheel sweep` triggers one run per value through the REST API, as the UI's button does.
    login = {"AIRFLOW_URL": stack.base, "AIRFLOW_USERNAME": "admin", "AIRFLOW_PASSWORD": stack.password}
    swept = run(["flywheel", "sweep", "-p", "evaluate.test_examples=100,200"], stack.project, **login).stdout
    triggered = {run_id: json.loads(conf) for run_id, conf in TRIGGERED.findall(swept)}
    assert list(triggered.values()) == RUNS, swept
    run_ids = list(triggered)

    killed_run, host = wait_for_a_running(stack, run_ids, "train")
    victim, survivor = sorted(workers, key=lambda worker: worker.name != host)
    kill_namespace(victim.namespace, delete=False)  # the host is gone: worker, task and stage

    finished = {run_id: stack.wait_for_run("flywheel_training", run_id, timeout=900) for run_id in run_ids}
    tasks = {run_id: stack.task_instances("flywheel_training", run_id) for run_id in run_ids}
    for run_id, dag_run in finished.items():
        assert dag_run["state"] == "success", {task: ti["state"] for task, ti in tasks[run_id].items()}
        assert tasks[run_id]["promote"]["state"] == "success"
    retried = tasks[killed_run]["train"]
    assert retried["try_number"] == 2 and retried["hostname"] == survivor.name
    hosts = {ti["hostname"] for run_tis in tasks.values() for ti in run_tis.values() if ti["hostname"]}
    assert hosts == {worker.name for worker in workers}  # the work was spread, then taken over

    recorded = experiments(stack.project)
    for run_id, conf in triggered.items():
        params = recorded[experiment_name(run_id)]["params"]["params.yaml"]["data"]
        assert params["evaluate"]["test_examples"] == conf["evaluate.test_examples"]
    versions = json.loads(run(["flywheel", "models", "--json"], stack.project).stdout)
    assert sorted(version["version"] for version in versions) == ["v0.0.1", "v0.0.2"]
    by_worker: dict[str, list[str]] = {}
    for number, run_id in enumerate(run_ids, 1):
        for task, ti in tasks[run_id].items():
            by_worker.setdefault(ti["hostname"] or "(skipped)", []).append(f"run {number} {task}")
    print(f"\nkilled {victim.name} during train of {killed_run}; tasks by worker: {by_worker}")
