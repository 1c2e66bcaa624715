"""flywheel_training: the training pipeline, one task per DVC stage, built from dvc.yaml.

A stage added to dvc.yaml shows up here as a task, with edges from its deps and outs, without any
edit to this file. Each task runs `dvc repro --single-item <stage>` in the project directory, so DVC
skips a stage whose inputs have not changed. The first task applies the values of a manual
trigger's form to params.yaml (as `dvc exp run -S` would), after validating them.

Kept cheap to parse: besides Airflow it imports only PyYAML and pipelines.dvc_graph (which needs
nothing more); no stage code, pydantic models, torch or pandas.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

from pipelines.dvc_graph import load_stages, upstream_of

PROJECT = Path(os.environ.get("FLYWHEEL_PROJECT_DIR", Path(__file__).resolve().parents[1]))
PYTHON = sys.executable  # the interpreter Airflow runs in has Flywheel and DVC installed
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _get(data: dict, dotted: str):
    # pipelines.config.get_dotted does this too, but importing it would load the stage stack.
    for part in dotted.split("."):
        data = data[part]
    return data


def trigger_form(params_yaml: dict) -> dict[str, Param]:
    """One form field per param listed in airflow.trigger_params, defaulting to params.yaml."""
    form = {}
    for key in (params_yaml.get("airflow") or {}).get("trigger_params") or []:
        value = _get(params_yaml, key)
        json_type = JSON_TYPES.get(type(value), "string")
        form[key] = Param(value, type=[json_type, "null"] if value is None else json_type,
                          title=key, description=f"params.yaml {key} for this run",
                          section=key.split(".")[0])
    return form


params_yaml = yaml.safe_load((PROJECT / "params.yaml").read_text()) or {}
stages = load_stages(PROJECT / "dvc.yaml")
task_env = {
    # DVC runs each stage's `cmd` through a shell: put this environment's scripts first on PATH.
    "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
}

with DAG(
    dag_id="flywheel_training",
    description="DVC stages from dvc.yaml: raw data to a deployed model",
    schedule=(params_yaml.get("airflow") or {}).get("schedule"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    # One workspace: DVC holds a repository lock while a stage runs, so stages go one at a time.
    max_active_tasks=1,
    params=trigger_form(params_yaml),
    default_args={"retries": 0, "execution_timeout": timedelta(hours=12)},
    tags=["flywheel", "training"],
    doc_md=__doc__,
) as dag:
    apply_params = BashOperator(
        task_id="apply_params",
        doc_md="Validate this run's trigger-form values and write them to params.yaml.",
        bash_command=f'"{PYTHON}" -m pipelines params apply --run-conf "$FLYWHEEL_RUN_CONF"',
        env={**task_env, "FLYWHEEL_RUN_CONF": "{{ (dag_run.conf or {}) | tojson }}"},
        append_env=True,
        cwd=str(PROJECT),
    )
    tasks = {
        name: BashOperator(
            task_id=name,
            doc_md=f"`{stage.cmd}` through `dvc repro --single-item {name}`",
            bash_command=f'"{PYTHON}" -m dvc repro --single-item {name}',
            env=task_env,
            append_env=True,
            cwd=str(PROJECT),
        )
        for name, stage in stages.items()
    }
    for name, upstream in upstream_of(stages).items():
        if upstream:
            for parent in sorted(upstream):
                tasks[parent] >> tasks[name]
        else:
            apply_params >> tasks[name]
