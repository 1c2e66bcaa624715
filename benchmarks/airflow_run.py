"""A full scheduled flywheel_training run on the bundled sample, under a real Airflow deployment on
this machine (tests/airflow_stack.py: metadata database on the PostgreSQL server at
127.0.0.1:5432, LocalExecutor, api-server, scheduler and dag-processor processes).

A fresh git copy of this checkout, with the shipped params (full training) and a cron of every
minute: the scheduler itself starts the run at the next minute. Prints the run's wall time, the
time spent inside the tasks, and the scheduler's overhead per task (the wall time no task was
running, divided by the tasks that ran: queueing, process start-up, DAG parsing in the worker).

    python benchmarks/airflow_run.py [--timeout 3600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.airflow_stack import AirflowStack  # noqa: E402
from tests.conftest import commit_all, free_port, git_copy, postgres_database, run  # noqa: E402


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, postgres_database("flywheel_airflow_bench") as database:
        project = git_copy(Path(scratch) / "project")
        run(
            [
                "flywheel",
                "params",
                "apply",
                "--json",
                json.dumps({"airflow.schedule": "* * * * *", "monitor.schedule": None}),
            ],
            project,
        )
        commit_all(project, "schedule every minute")
        stack = AirflowStack(project, Path(scratch) / "home", database, free_port(), free_port()).start()
        try:
            stack.wait_for_dag("flywheel_training")
            deadline = time.monotonic() + 180
            while not (runs := stack.runs("flywheel_training")):
                assert time.monotonic() < deadline, "the scheduler started no run"
                time.sleep(2)
            first = runs[0]
            print(f"scheduled run {first['dag_run_id']} ({first['run_type']}) started; waiting...", flush=True)
            finished = stack.wait_for_run("flywheel_training", first["dag_run_id"], args.timeout)
            tasks = stack.task_instances("flywheel_training", first["dag_run_id"])
        finally:
            stack.stop()
    ran = [ti for ti in tasks.values() if ti["start_date"] and ti["end_date"]]
    wall = seconds(finished["start_date"], finished["end_date"])
    inside = sum(seconds(ti["start_date"], ti["end_date"]) for ti in ran)
    print(
        f"run {finished['state']}: {wall:.0f} s wall, {inside:.0f} s inside {len(ran)} tasks; "
        f"scheduler overhead {(wall - inside) / len(ran):.1f} s per task"
    )
    for ti in sorted(ran, key=lambda ti: ti["start_date"]):
        print(f"  {ti['task_id']:<14} {ti['state']:<8} {seconds(ti['start_date'], ti['end_date']):7.1f} s")


if __name__ == "__main__":
    main()
