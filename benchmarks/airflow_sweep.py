"""One flywheel_training run, then a sweep of three, on the bundled sample under CeleryExecutor with
two workers on hosts of their own (tests/airflow_stack.py's celery_cluster: network namespaces on a
bridge, PostgreSQL and Redis forwarded, the project's git served by a git daemon, the DVC remote a
path). The runs are triggered by `flywheel sweep` through Airflow's REST API.

Prints, side by side, the wall time of one run alone and of three at once (airflow.max_active_runs
3), each run's time inside its tasks, the scheduler's overhead per task (how long a task waited
from queued to started: Celery, a free worker slot, the worker's start-up and DAG parse) and what
each worker executed. Needs root (network namespaces).

    python benchmarks/airflow_sweep.py [--quick] [--timeout 7200]

--quick trains as the tests do (a fraction of an epoch): the figures are the orchestration's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.airflow_stack import celery_cluster  # noqa: E402
from tests.conftest import commit_all, git_copy, postgres_database, run  # noqa: E402
from tests.helpers import QUICK_TRAINING, experiments  # noqa: E402

RATES = ("0.0005", "0.001", "0.002")


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def sweep(stack, values: tuple[str, ...], timeout: float) -> list[str]:
    login = {"AIRFLOW_URL": stack.base, "AIRFLOW_USERNAME": "admin", "AIRFLOW_PASSWORD": stack.password}
    axis = f"finetune.training.learning_rate={','.join(values)}"
    output = run(["flywheel", "sweep", "-p", axis], stack.project, **login).stdout
    run_ids = re.findall(r"^triggered (\S+):", output, re.M)
    for run_id in run_ids:
        stack.wait_for_run("flywheel_training", run_id, timeout)
    return run_ids


def describe(stack, label: str, run_ids: list[str]) -> dict[str, list[str]]:
    runs = [stack.api("GET", f"/dags/flywheel_training/dagRuns/{run_id}") for run_id in run_ids]
    wall = seconds(min(r["start_date"] for r in runs), max(r["end_date"] for r in runs))
    by_worker: dict[str, list[str]] = {}
    waits = []
    for dag_run in runs:
        tasks = stack.task_instances("flywheel_training", dag_run["dag_run_id"])
        ran = [ti for ti in tasks.values() if ti["start_date"] and ti["end_date"]]
        inside = sum(seconds(ti["start_date"], ti["end_date"]) for ti in ran)
        print(f"  {dag_run['dag_run_id']}: {dag_run['state']}, {inside:.0f} s inside {len(ran)} tasks")
        for ti in ran:
            by_worker.setdefault(ti["hostname"], []).append(ti["task_id"])
            if ti["queued_when"]:
                waits.append(seconds(ti["queued_when"], ti["start_date"]))
    print(
        f"{label}: {len(run_ids)} run(s) in {wall:.0f} s wall; a task waited {sum(waits) / len(waits):.1f} s "
        f"on average from queued to started (max {max(waits):.1f} s)"
    )
    return by_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train as the tests do (a fraction of an epoch)")
    parser.add_argument("--timeout", type=float, default=7200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, postgres_database("flywheel_sweep_bench") as database:
        root = Path(scratch)
        project = git_copy(root / "project")
        settings = {**(QUICK_TRAINING if args.quick else {}), "airflow.max_active_runs": 3, "monitor.schedule": None}
        run(["flywheel", "params", "apply", "--json", json.dumps(settings)], project)
        commit_all(project, "three runs at once")
        with celery_cluster(project, root, database) as (stack, workers):
            stack.wait_for_dag("flywheel_training")
            started = time.monotonic()
            alone = sweep(stack, RATES[:1], args.timeout)
            one = describe(stack, "one run alone", alone)
            three = describe(stack, "a sweep of three at once", sweep(stack, RATES, args.timeout))
            print(f"(all of it: {time.monotonic() - started:.0f} s)")
            for label, by_worker in (("one run", one), ("the sweep", three)):
                for worker, tasks in sorted(by_worker.items()):
                    print(f"  {label}, {worker or '(skipped)'}: {len(tasks)} tasks: {', '.join(sorted(tasks))}")
            print("dvc exp show, in short (experiment, learning rate, gate, task score):")
            for name, data in sorted(experiments(project).items()):
                params = data["params"]["params.yaml"]["data"]
                summary = data["metrics"]["metrics/summary.json"]["data"]
                rate = params["finetune"]["training"]["learning_rate"]
                print(f"  {name}  {rate:<8} {summary['gate']:<9} {summary['model']['task_score']}")


if __name__ == "__main__":
    main()
