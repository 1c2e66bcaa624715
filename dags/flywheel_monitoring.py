"""flywheel_monitoring: judge the deployed model's recent traffic; when it fails, retrain.

  monitor           `flywheel monitor`: drift, output quality and operations over the request
                    log's window; writes metrics/monitor.json and an Evidently report (a failed
                    verdict is a result, not a task failure); a failed run exports the window's
                    traffic and feedback under data/raw/feedback/
  needs_retraining  goes on only when the run asked for retraining (a check failed, no cooldown)
  new_feedback      publishes the flywheel_feedback Asset, with the reason, the report and the
                    exported files in the event's extra: flywheel_training is scheduled on it, so
                    this starts exactly one retraining run (it shows "triggered by asset")

Schedule: monitor.schedule in params.yaml. Cheap to parse: Airflow, PyYAML and
flywheel.orchestration.airflow_tasks (standard library only).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import yaml
from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
from airflow.sdk import DAG

from flywheel.orchestration.airflow_tasks import (
    FlywheelCommand,
    alert,
    feedback_asset,
    flywheel,
    project_dir,
    publish_feedback,
    retraining_asked,
)

PROJECT = project_dir(__file__)
params_yaml = yaml.safe_load((PROJECT / "params.yaml").read_text()) or {}

with DAG(
    dag_id="flywheel_monitoring",
    description="Evidently drift, hallucination and operations checks on the deployed model",
    schedule=(params_yaml.get("monitor") or {}).get("schedule"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(minutes=2),
        "execution_timeout": timedelta(hours=1),
        "on_failure_callback": alert,
    },
    tags=["flywheel", "monitoring"],
    doc_md=__doc__,
) as dag:
    monitor = FlywheelCommand(task_id="monitor", command=flywheel("monitor", "--retrain"), project=PROJECT)
    needs_retraining = ShortCircuitOperator(
        task_id="needs_retraining", python_callable=retraining_asked, op_args=[str(PROJECT)]
    )
    new_feedback = PythonOperator(
        task_id="new_feedback",
        python_callable=publish_feedback,
        op_args=[str(PROJECT)],
        outlets=[feedback_asset(PROJECT)],
    )
    monitor >> needs_retraining >> new_feedback
