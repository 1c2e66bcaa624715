"""flywheel_training: the training pipeline, one task per DVC stage, built from dvc.yaml.

  start_run     `flywheel run start`: new feedback exports put under DVC; the trigger form's
                params validated and applied in the run's own workspace (a bad value fails here,
                before any stage); the run's state recorded in git
  <stages>      one task per dvc.yaml stage, edges from its deps and outs: `flywheel run stage`,
                i.e. `dvc repro --pull --single-item <stage>` in a workspace made from the run's
                state (git) and data (the DVC remote) on whichever worker runs it, so DVC skips a
                stage whose inputs have not changed and a retry redoes only what did not finish.
                GPU stages run in the pool airflow.gpu_pool, on the queue airflow.gpu_queue,
                each taking a slot per GPU its launcher asks for (num_gpus x num_nodes)
  save_run      `flywheel run save`: the run becomes the DVC experiment named after it (params,
                metrics, dvc.lock) in the project; its data and models are in the DVC remote
  gate          the evaluate stage's decision (metrics/gate.json, in save_run's XCom)
  promote       `flywheel run promote`: the run's experiment commit becomes a registry version
                in staging
  not_promoted  the gate rejected the run: the run succeeds, this task (red) logs the reasons and
                the evaluation report's path

Scheduled by airflow.schedule (cron, in params.yaml) and by the flywheel_feedback Asset that
flywheel_monitoring publishes when it exports feedback for retraining. Up to airflow.max_active_runs
runs at once, each in its own workspaces (flywheel.orchestration.workspace); a run's own stages go
one at a time (they share its state). Transient failures are retried with backoff; Flywheel's expected
failures (exit 2: bad params, bad data, failed validation) fail at once; every final failure
calls flywheel.orchestration.airflow_tasks.alert.

Cheap to parse: besides Airflow it imports PyYAML, flywheel.config (pydantic), flywheel.params_file
and flywheel.orchestration's dvc_graph and airflow_tasks (standard library only); no stage code,
torch, pyarrow or pandas. Runs apply their form values in their own workspaces, never to the
project's params.yaml: a run does not change the DAG's version.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import yaml
from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param

from flywheel.config import get_dotted, param_schema
from flywheel.orchestration.airflow_tasks import (
    FlywheelCommand,
    alert,
    explain_rejection,
    feedback_asset,
    flywheel,
    gate_branch,
    project_dir,
)
from flywheel.orchestration.dvc_graph import load_stages, upstream_of
from flywheel.params_file import choices_in, comment_of

PROJECT = project_dir(__file__)
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
RUN_CONF = "{{ (dag_run.conf or {}) | tojson }}"


def trigger_form(params_text: str, params_yaml: dict) -> dict[str, Param]:
    """One form field per param listed in airflow.trigger_params: params.yaml's value as the
    default, the typed params' allowed values and bounds, params.yaml's comment as the help."""
    form = {}
    for key in (params_yaml.get("airflow") or {}).get("trigger_params") or []:
        value = get_dotted(params_yaml, key)
        schema = param_schema(key)
        if "type" not in schema:  # a union (X | None): the value's own type
            json_type = JSON_TYPES.get(type(value), "string")
            schema["type"] = [json_type, "null"] if value is None else json_type
        schema.pop("anyOf", None)
        said = comment_of(params_text, key)
        if "enum" in schema and (choices := choices_in(said, schema["enum"])):
            schema["values_display"] = choices  # the drop-down shows each choice with what it does
        form[key] = Param(
            value,
            title=key,
            description=f"{said[0].upper()}{said[1:]}. For this run only." if said else "For this run only.",
            section=key.split(".")[0],
            **schema,
        )
    return form


def schedule(cron: str | None):
    """The cron schedule (if any) or new feedback from monitoring, whichever comes first."""
    feedback = feedback_asset(PROJECT)
    if not cron:
        return [feedback]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[feedback])


params_text = (PROJECT / "params.yaml").read_text()
params_yaml = yaml.safe_load(params_text) or {}
settings = params_yaml.get("airflow") or {}
stages = load_stages(PROJECT / "dvc.yaml")
upstream = upstream_of(stages)
gpu_stages = set(settings.get("gpu_stages", []))
if gpu_stages - set(stages):
    raise ValueError(
        f"airflow.gpu_stages in params.yaml names stages dvc.yaml does not have: {sorted(gpu_stages - set(stages))}"
    )

# The training stages' launchers read their GPUs and nodes from these params sections.
DISTRIBUTED_SECTIONS = {"finetune": "finetune", "reward": "rlhf", "rlhf": "rlhf"}


def gpu_slots(stage: str) -> int:
    """Pool slots a stage takes: its GPUs on every node (a multi-node stage's task is node 0,
    which launches the others); 1 for a stage on the CPU or one GPU."""
    section = (params_yaml.get(DISTRIBUTED_SECTIONS.get(stage, "")) or {}).get("distributed") or {}
    return max(1, section.get("num_gpus") or 0) * (section.get("num_nodes") or 1)


slots = {name: gpu_slots(name) for name in gpu_stages}
pool_size = settings.get("gpu_pool_slots", 1)
too_big = {name: count for name, count in slots.items() if count > pool_size}
if too_big:
    raise ValueError(
        f"stages ask for more GPUs than airflow.gpu_pool_slots ({pool_size}) holds, and would wait "
        f"forever: {too_big} (GPUs per node x nodes, from <section>.distributed); raise gpu_pool_slots "
        "to the GPUs your workers have, or ask for fewer"
    )

with DAG(
    dag_id="flywheel_training",
    description="DVC stages from dvc.yaml: raw data to an evaluated model; every run a DVC experiment",
    schedule=schedule(settings.get("schedule")),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=settings.get("max_active_runs", 1),
    # Per run (Airflow 3): a run's stages go one at a time, as each moves the run's state on.
    max_active_tasks=1,
    params=trigger_form(params_text, params_yaml),
    default_args={
        "retries": settings.get("retries", 2),
        "retry_delay": timedelta(seconds=settings.get("retry_delay_s", 60)),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(hours=1),
        "execution_timeout": timedelta(hours=12),
        "on_failure_callback": alert,
    },
    tags=["flywheel", "training"],
    doc_md=__doc__,
) as dag:
    start_run = FlywheelCommand(
        task_id="start_run",
        project=PROJECT,
        retries=0,
        command=flywheel("run", "start", "{{ run_id }}", "--run-conf", RUN_CONF),
        doc_md="Track new feedback exports; validate this run's trigger-form values and apply them in its workspace.",
    )
    gpu = {"pool": settings.get("gpu_pool", "flywheel_gpu"), "queue": settings.get("gpu_queue", "default")}
    tasks = {
        name: FlywheelCommand(
            task_id=name,
            project=PROJECT,
            command=flywheel("run", "stage", "{{ run_id }}", name),
            **({**gpu, "pool_slots": slots[name]} if name in gpu_stages else {}),
            doc_md=f"`{stage.cmd}` through `dvc repro --pull --single-item {name}` in the run's workspace",
        )
        for name, stage in stages.items()
    }
    save_run = FlywheelCommand(
        task_id="save_run",
        project=PROJECT,
        command=flywheel("run", "save", "{{ run_id }}"),
        result_xcom=True,
        doc_md="Save the run as a DVC experiment in the project (its data and models are in the DVC remote).",
    )
    gate = BranchPythonOperator(
        task_id="gate",
        python_callable=gate_branch,
        retries=0,
        doc_md="The evaluate stage's decision in metrics/gate.json.",
    )
    promote = FlywheelCommand(
        task_id="promote",
        project=PROJECT,
        command=flywheel("run", "promote", "{{ run_id }}"),
        doc_md="Register the run's experiment commit as a version in staging.",
    )
    not_promoted = PythonOperator(
        task_id="not_promoted",
        python_callable=explain_rejection,
        retries=0,
        doc_md="The gate rejected this run: its log and XCom give the reasons and the evaluation report.",
    )
    not_promoted.ui_color = "#f4cccc"  # red in the graph: the run succeeded, its model did not

    for name, parents in upstream.items():
        for parent in sorted(parents) or [None]:
            (tasks[parent] if parent else start_run) >> tasks[name]
    downstream = {parent for parents in upstream.values() for parent in parents}
    [tasks[name] for name in stages if name not in downstream] >> save_run >> gate >> [promote, not_promoted]
