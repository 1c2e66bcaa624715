"""The DAG folder parses cleanly, cheaply, and into the same graph DVC builds from dvc.yaml."""

import json
import re
import textwrap

import pytest

from flywheel.orchestration.dvc_graph import load_stages, upstream_of
from tests.conftest import REPO, commit_all, run

HEAVY_MODULES = (
    "torch",
    "transformers",
    "pandas",
    "pyarrow",
    "trl",
    "deepspeed",
    "great_expectations",
    "evidently",
    "dvc",
)

DAGBAG_SCRIPT = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.dags.get("flywheel_training")
    print(json.dumps({
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": sorted(bag.dags),
        "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else {},
        "params": dict(dag.params.dump()) if dag else {},
        "max_active_tasks": dag.max_active_tasks if dag else None,
        "max_active_runs": dag.max_active_runs if dag else None,
        "pools": {t.task_id: t.pool for t in dag.tasks} if dag else {},
        "pool_slots": {t.task_id: t.pool_slots for t in dag.tasks} if dag else {},
        "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
        "colours": {t.task_id: t.ui_color for t in dag.tasks} if dag else {},
        "schedule": repr(dag.timetable) if dag else None,
        "form": {key: dag.params.get_param(key).schema for key in dag.params} if dag else {},
        "descriptions": {key: dag.params.get_param(key).description for key in dag.params} if dag else {},
        "version_hash": SerializedDagModel.hash(LazyDeserializedDAG.from_dag(dag).data) if dag else None,
    }))
""")


def load_dagbag(dags_folder, tmp_path) -> dict:
    result = run(
        ["python", "-c", DAGBAG_SCRIPT, str(dags_folder)],
        tmp_path,
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_dags_folder_loads_without_import_errors(tmp_path):
    bag = load_dagbag(REPO / "dags", tmp_path)
    assert bag["errors"] == {}
    assert bag["dags"] == ["flywheel_monitoring", "flywheel_training"]
    assert bag["upstream"]["ingest"] == ["start_run"]
    assert bag["upstream"]["split"] == ["clean", "validate"]
    # After the last stage: the run is saved as an experiment, then the gate decides.
    assert bag["upstream"]["save_run"] == ["summary"] and bag["upstream"]["gate"] == ["save_run"]
    assert bag["upstream"]["promote"] == bag["upstream"]["not_promoted"] == ["gate"]
    assert bag["params"] == {
        "ingest.chunk_size": 10000,
        "clean.dedup.minhash.threshold": 0.7,
        "finetune.training.epochs": 6.0,
        "finetune.training.learning_rate": 0.0005,
        "finetune.method": "full",
    }
    # The form offers what the typed params allow, with params.yaml's comments as the help.
    assert bag["form"]["finetune.method"]["enum"] == ["full", "lora"]
    assert bag["form"]["finetune.method"]["values_display"] == {
        "full": "full: every weight is trained",
        "lora": "lora: low-rank adapters on the projections (finetune.lora)",
    }
    assert bag["form"]["ingest.chunk_size"]["minimum"] == 1
    assert bag["form"]["clean.dedup.minhash.threshold"]["maximum"] == 1
    chunk_size_help = "Records per Parquet row group; bounds memory. For this run only."
    assert bag["descriptions"]["ingest.chunk_size"] == chunk_size_help
    assert all(len(text) > len("For this run only.") for text in bag["descriptions"].values())
    # A run's stages go one at a time (per run in Airflow 3); runs at once as params.yaml allows.
    assert bag["max_active_tasks"] == 1 and bag["max_active_runs"] == 1
    assert {task for task, pool in bag["pools"].items() if pool == "flywheel_gpu"} == {
        "finetune",
        "preferences",
        "reward",
        "rlhf",
        "evaluate",
    }
    assert bag["retries"]["finetune"] == 2 and bag["retries"]["start_run"] == 0
    assert bag["colours"]["not_promoted"] != bag["colours"]["promote"]  # a rejected run is marked
    # No cron in params.yaml: runs start by hand, or from monitoring's feedback Asset.
    assert "flywheel_feedback" in bag["schedule"]


def test_a_cron_in_params_schedules_training_besides_new_feedback(project_copy, tmp_path):
    run(["flywheel", "params", "apply", "airflow.schedule=0 3 * * *"], project_copy)
    bag = load_dagbag(project_copy / "dags", tmp_path)
    assert bag["errors"] == {}
    assert "0 3 * * *" in bag["schedule"] and "flywheel_feedback" in bag["schedule"]


def test_a_stage_takes_a_pool_slot_per_gpu_and_more_than_the_pool_holds_is_refused(project_copy, tmp_path):
    four_gpus_on_two_nodes = {
        "finetune.distributed.launcher": "torchrun",
        "finetune.distributed.num_gpus": 4,
        "finetune.distributed.num_nodes": 2,
        "finetune.distributed.main_address": "10.0.0.1",
        "airflow.gpu_pool_slots": 8,
    }
    run(["flywheel", "params", "apply", "--json", json.dumps(four_gpus_on_two_nodes)], project_copy)
    bag = load_dagbag(project_copy / "dags", tmp_path)
    assert bag["errors"] == {}
    assert (bag["pool_slots"]["finetune"], bag["pool_slots"]["rlhf"], bag["pool_slots"]["evaluate"]) == (8, 1, 1)

    run(["flywheel", "params", "apply", "airflow.gpu_pool_slots=4"], project_copy)
    bag = load_dagbag(project_copy / "dags", tmp_path)
    (error,) = bag["errors"].values()
    assert "more GPUs than airflow.gpu_pool_slots (4) holds" in error and "'finetune': 8" in error


def test_max_active_runs_comes_from_params_and_a_run_leaves_the_dag_as_it_was(project_copy, tmp_path):
    run(["flywheel", "params", "apply", "airflow.max_active_runs=3"], project_copy)
    commit_all(project_copy, "three runs at once")
    before = load_dagbag(project_copy / "dags", tmp_path)
    assert before["max_active_runs"] == 3 and before["max_active_tasks"] == 1
    # What `flywheel run start` does with the form's values: applied in the run's own workspace.
    run(["flywheel", "run", "start", "manual__1", "--run-conf", '{"finetune.method": "lora"}'], project_copy)
    assert "method: full" in (project_copy / "params.yaml").read_text()
    during = load_dagbag(project_copy / "dags", tmp_path)
    assert during["version_hash"] == before["version_hash"] and during["params"]["finetune.method"] == "full"


def test_a_gpu_stage_dvc_does_not_have_is_an_import_error(project_copy, tmp_path):
    run(["flywheel", "params", "apply", "--json", '{"airflow.gpu_stages": ["finetune", "finetun"]}'], project_copy)
    bag = load_dagbag(project_copy / "dags", tmp_path)
    assert "['finetun']" in next(iter(bag["errors"].values()))


@pytest.mark.parametrize("dag_file", ["flywheel_training.py", "flywheel_monitoring.py"])
def test_dag_file_imports_nothing_heavy(dag_file, tmp_path):
    script = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = run(
        ["python", "-c", script, str(REPO / "dags" / dag_file)], tmp_path, AIRFLOW_HOME=str(tmp_path / "airflow")
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


EXTRA_STAGES = textwrap.indent(
    textwrap.dedent("""
      tokenizer:
        cmd: echo tokenizer
        deps: [data/processed/train.parquet]
        outs: [models/tokenizer]
      distill:
        cmd: echo distill
        deps: [data/processed, models/tokenizer/vocab.json]
        outs: [models/distilled]
        metrics: [{metrics/distill.json: {cache: false}}]
      report:
        cmd: echo report
        deps: [metrics/ingest.json, metrics/validate.json, data/interim/ingest/quarantine.jsonl]
        outs: [reports/summary.html]
"""),
    "  ",
)


def test_a_stage_added_to_dvc_yaml_appears_in_the_dag_with_dvcs_edges(project_copy, tmp_path):
    dvc_yaml = project_copy / "dvc.yaml"
    text = dvc_yaml.read_text()
    # At the end of the `stages:` mapping: before the next top-level line (artifacts, a comment).
    body = text.index("\nstages:") + len("\nstages:")
    later = re.search(r"^\S", text[body:], re.M)
    cut = body + later.start() if later else len(text)
    dvc_yaml.write_text(text[:cut].rstrip("\n") + "\n" + EXTRA_STAGES + "\n" + text[cut:])

    # The graph DVC itself builds (edges point from a stage to the stages it depends on).
    script = (
        "from dvc.repo import Repo; import json; g = Repo('.').index.graph; "
        "print(json.dumps(sorted([v.addressing, u.addressing] for u, v in g.edges())))"
    )
    dvc_edges = json.loads(run(["python", "-c", script], project_copy).stdout)
    ours = upstream_of(load_stages(dvc_yaml))
    assert sorted([up, down] for down, ups in ours.items() for up in ups) == dvc_edges
    # a directory dep (data/processed holds split's and preferences' outputs), a file inside an out
    assert ours["distill"] == {"split", "retain", "preferences", "tokenizer"}
    assert ours["report"] == {"ingest", "validate"}  # metrics files are outputs too

    bag = load_dagbag(project_copy / "dags", tmp_path)
    assert bag["errors"] == {}
    assert bag["upstream"] == {
        "start_run": [],
        "ingest": ["start_run"],
        "clean": ["ingest"],
        "validate": ["clean"],
        "split": ["clean", "validate"],
        "base": ["start_run"],
        "retain": ["base", "split"],
        "finetune": ["base", "retain", "split"],
        "tokenizer": ["split"],
        "distill": ["preferences", "retain", "split", "tokenizer"],
        "report": ["ingest", "validate"],
        "preferences": ["finetune", "ingest", "retain", "split"],
        "reward": ["finetune", "preferences"],
        "rlhf": ["finetune", "preferences", "reward", "split"],
        "evaluate": ["base", "finetune", "preferences", "reward", "rlhf", "split"],
        "summary": ["clean", "evaluate", "finetune", "ingest", "reward", "rlhf", "split"],
        # the stages nothing depends on end the run
        "save_run": ["distill", "report", "summary"],
        "gate": ["save_run"],
        "promote": ["gate"],
        "not_promoted": ["gate"],
    }


def test_the_local_airflow_listens_on_loopback_unless_told_otherwise(tmp_path):
    from flywheel.orchestration.airflow_local import local_environment

    assert local_environment(tmp_path, 8080)["AIRFLOW__API__HOST"] == "127.0.0.1"  # Airflow's own: 0.0.0.0
    assert local_environment(tmp_path, 8080, host="0.0.0.0")["AIRFLOW__API__HOST"] == "0.0.0.0"


def test_task_logs_keep_a_progress_bar_now_and_then_and_drop_dvcs_git_hints():
    import io

    from flywheel.orchestration.airflow_tasks import log_lines

    bar = b"".join(b"\r %3d%%|#| %d/100" % (step, step) for step in range(101))
    output = (
        b"Running stage 'finetune':\n> flywheel finetune\n"
        + bar
        + b"\nfinetune: eval loss 6.72 -> 0.68\n\nTo track the changes with git, run:\n\n\tgit add dvc.lock\n"
        + b"\nTo enable auto staging, run:\n\tdvc config core.autostage true\nUpdating lock file 'dvc.lock'"
    )
    ticks = iter(range(0, 10_000, 5))  # each clock reading 5 s after the last

    class Chunks(io.BytesIO):  # a pipe hands over what is there: here 7 bytes at a time
        def read1(self, size=-1):
            return super().read1(7)

    lines = list(log_lines(Chunks(output), every_s=30, clock=lambda: next(ticks)))
    assert lines[:2] == ["Running stage 'finetune':", "> flywheel finetune"]
    progress = [line for line in lines if "%|" in line]
    assert 2 <= len(progress) <= 20 and progress[-1].strip() == "100%|#| 100/100"  # not 101 lines; the end kept
    assert lines[-2:] == ["finetune: eval loss 6.72 -> 0.68", "Updating lock file 'dvc.lock'"]
