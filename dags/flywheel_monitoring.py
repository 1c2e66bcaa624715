"""flywheel_monitoring: judge the deployed model's recent traffic; when it fails, retrain.

  monitor           `flywheel monitor`: drift, output quality and operations over the request
                    log's window; writes metrics/monitor.json and an Evidently report (a failed
                    verdict is a result, not a task failure)
  needs_retraining  goes on only when the run asked for retraining (a check failed, no cooldown)
  new_feedback      publishes the Asset of the exported feedback (asset-scheduled DAGs run on it)
  retrain           triggers flywheel_training with the reason and the report in its conf

Schedule: monitor.schedule in params.yaml. Cheap to parse: Airflow, PyYAML and json only.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Asset

PROJECT = Path(os.environ.get("FLYWHEEL_PROJECT_DIR", Path(__file__).resolve().parents[1]))
PYTHON = sys.executable
RESULT = PROJECT / "metrics" / "monitor.json"
# Exported feedback lands here; a DAG scheduled on this Asset runs when monitoring exports.
FEEDBACK_ASSET = Asset(name="flywheel_feedback", uri=f"file://{PROJECT / 'data/raw/feedback'}")

params_yaml = yaml.safe_load((PROJECT / "params.yaml").read_text()) or {}


def retraining_asked() -> dict | bool:
    """The run's retraining request (pushed to XCom for the trigger's conf), or False to stop."""
    retrain = json.loads(RESULT.read_text()).get("retrain") or {}
    return retrain if retrain.get("triggered") else False


with DAG(
    dag_id="flywheel_monitoring",
    description="Evidently drift, hallucination and operations checks on the deployed model",
    schedule=(params_yaml.get("monitor") or {}).get("schedule"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0, "execution_timeout": timedelta(hours=1)},
    tags=["flywheel", "monitoring"],
    doc_md=__doc__,
) as dag:
    monitor = BashOperator(
        task_id="monitor",
        bash_command=f'"{PYTHON}" -m pipelines monitor',
        env={"PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
             "HF_HUB_OFFLINE": "1"},
        append_env=True,
        cwd=str(PROJECT),
    )
    needs_retraining = ShortCircuitOperator(task_id="needs_retraining", python_callable=retraining_asked)
    new_feedback = EmptyOperator(task_id="new_feedback", outlets=[FEEDBACK_ASSET])
    retrain = TriggerDagRunOperator(
        task_id="retrain",
        trigger_dag_id="flywheel_training",
        conf={"reason": "{{ ti.xcom_pull(task_ids='needs_retraining')['reason'] }}",
              "report": "{{ ti.xcom_pull(task_ids='needs_retraining')['report'] }}",
              "exported_feedback": "{{ ti.xcom_pull(task_ids='needs_retraining')['feedback'] }}"},
    )
    monitor >> needs_retraining >> [new_feedback, retrain]
