"""CeleryExecutor for real: two training runs with different params triggered at once by `flywheel
sweep` through the REST API (as the UI's trigger button does), on two Celery workers that are hosts of their own
(network namespaces with their own hostnames, reaching PostgreSQL, Redis, the api-server and the
project's git over a bridge) and share no working directory. One worker dies mid-stage (every
process of its host killed); its task is retried on the other worker, and both runs complete as
DVC experiments in the project with their own params."""

import json
import re
import time

import pytest

from flywheel.orchestration.runs import experiment_name
from tests.airflow_stack import celery_cluster
from tests.conftest import commit_all, git_copy, postgres_database, run
from tests.helpers import QUICK_TRAINING, STAGES, experiments
from tests.netns import kill_namespace, require_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNS = [{"evaluate.test_examples": 40}, {"evaluate.test_examples": 60}]
TRIGGERED = re.compile(r"^triggered (\S+): (.*)$", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_namespaces()
    root = tmp_path_factory.mktemp("celery")
    project = git_copy(root / "project")
    settings = {
        **QUICK_TRAINING,
        "airflow.trigger_params": ["evaluate.test_examples"],
        "airflow.max_active_runs": 2,
        "airflow.retry_delay_s": 1,
        "monitor.schedule": None,
    }
    run(["flywheel", "params", "apply", "--json", json.dumps(settings)], project)
    commit_all(project, "quick training, two runs at once")
    with postgres_database("flywheel_celery") as database, celery_cluster(project, root, database) as (stack, workers):
        yield stack, workers


def wait_for_a_stage_on(stack, run_ids, worker, timeout=600):
    """The first stage a worker is running, once it has run for a few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for run_id in run_ids:
            for task, ti in stack.task_instances("flywheel_training", run_id).items():
                if task in STAGES and ti["state"] == "running" and ti["hostname"] == worker:
                    time.sleep(3)  # well into the stage
                    return run_id, task
        assert time.monotonic() < deadline, f"{worker} ran no stage"
        time.sleep(1)


def test_two_runs_at_once_on_two_celery_workers_survive_a_dead_worker(cluster):
    stack, workers = cluster
    stack.wait_for_dag("flywheel_training")
    # `flywheel sweep` triggers one run per value through the REST API, as the UI's button does.
    login = {"AIRFLOW_URL": stack.base, "AIRFLOW_USERNAME": "admin", "AIRFLOW_PASSWORD": stack.password}
    swept = run(["flywheel", "sweep", "-p", "evaluate.test_examples=40,60"], stack.project, **login).stdout
    triggered = {run_id: json.loads(conf) for run_id, conf in TRIGGERED.findall(swept)}
    assert list(triggered.values()) == RUNS, swept
    run_ids = list(triggered)
    killed_run, killed_task = wait_for_a_stage_on(stack, run_ids, workers[0].name)
    kill_namespace(workers[0].namespace, delete=False)  # the host is gone: worker, task and stage

    finished = {run_id: stack.wait_for_run("flywheel_training", run_id, timeout=1800) for run_id in run_ids}
    tasks = {run_id: stack.task_instances("flywheel_training", run_id) for run_id in run_ids}
    for run_id, dag_run in finished.items():
        assert dag_run["state"] == "success", {task: ti["state"] for task, ti in tasks[run_id].items()}
    retried = tasks[killed_run][killed_task]
    assert retried["try_number"] == 2 and retried["hostname"] == workers[1].name
    hosts = {ti["hostname"] for run_tis in tasks.values() for ti in run_tis.values() if ti["hostname"]}
    assert hosts == {worker.name for worker in workers}  # the work was spread, then taken over

    recorded = experiments(stack.project)
    for run_id, conf in zip(run_ids, RUNS, strict=True):
        params = recorded[experiment_name(run_id)]["params"]["params.yaml"]["data"]
        assert params["evaluate"]["test_examples"] == conf["evaluate.test_examples"]
        assert "metrics/gate.json" in recorded[experiment_name(run_id)]["metrics"]
    by_worker = {}
    for run_id in run_ids:
        for task, ti in tasks[run_id].items():
            by_worker.setdefault(ti["hostname"], []).append(f"{run_id[-8:]}:{task}")
    print(f"\nkilled {workers[0].name} during {killed_task} of {killed_run}; tasks by worker: {by_worker}")
