"""Airflow for production, with real parts: the metadata database on the PostgreSQL server at
127.0.0.1:5432, and a real scheduler, dag-processor and api-server (LocalExecutor) started by the
test. flywheel_training is triggered through the REST API exactly as the UI's trigger button does,
with a param changed in the form; its worker is killed mid-stage and the retry completes the run;
the run is recorded as a DVC experiment with the changed param. Then drifted traffic makes
flywheel_monitoring publish the feedback Asset, and the scheduler runs the training it starts.

flywheel_training is built from the stand-in dvc.yaml of tests/airflow_stack.py (three short
stages), so that these tests are about orchestration; the trigger form is the real params.yaml's,
and monitoring is the real `flywheel monitor` against the sample's training prompts."""

import json
import os
import shutil
import signal
import time

import psutil
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from flywheel.data.sample import off_topic_prompts
from flywheel.orchestration.runs import experiment_name
from tests.airflow_stack import STAND_IN_STAGES, AirflowStack, stand_in_project
from tests.browser import internet_requests, screenshot, wait_for
from tests.conftest import commit_all, free_port, postgres_database, run
from tests.helpers import experiments
from tests.test_monitor import log_traffic

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CHANGED = {"evaluate.test_examples": 50}  # the form field the test changes; the stand-in's gate rejects it


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_project):
    root = tmp_path_factory.mktemp("airflow")
    project = stand_in_project(root / "project")
    run(
        [
            "flywheel",
            "params",
            "apply",
            "--json",
            json.dumps(
                {
                    "evaluate.test_examples": 100,
                    "airflow.gpu_stages": ["train"],
                    "airflow.trigger_params": [
                        "ingest.chunk_size",
                        "finetune.training.epochs",
                        "evaluate.test_examples",
                        "finetune.method",
                    ],
                    "airflow.retry_delay_s": 1,
                    "monitor.schedule": None,  # the test starts every run itself
                    "monitor.min_prompts": 50,
                    "monitor.max_requests": 400,
                    "monitor.reference_size": 600,
                    "monitor.canaries": 0,
                    "monitor.consistency_prompts": 0,
                }
            ),
        ],
        project,
    )
    commit_all(project, "a stand-in pipeline for the test")
    # What monitoring compares traffic with: the sample's training prompts (a stage output, untracked).
    reference = project / "data/processed/train.parquet"
    shutil.copyfile(sample_project / "data/processed/train.parquet", reference)
    request_log = f"sqlite:///{project / 'data/serving/requests.sqlite'}"
    with postgres_database("flywheel_airflow") as database:
        airflow = AirflowStack(
            project, root / "home", database, free_port(), free_port(), FLYWHEEL_REQUEST_LOG_URL=request_log
        )
        try:
            yield airflow.start()
        finally:
            airflow.stop()


def form_defaults(details: dict) -> dict:
    """The trigger form's fields with the values it shows (params.yaml's)."""
    return {key: param["value"] for key, param in details["params"].items()}


def kill_the_worker_running(stack: AirflowStack, run_id: str, stage: str, timeout: float = 600) -> None:
    """SIGKILL the task process that runs `stage` (the `flywheel run stage` it started is orphaned)."""
    deadline = time.monotonic() + timeout
    while True:
        if stack.task_instances("flywheel_training", run_id).get(stage, {}).get("state") == "running":
            command = next(
                (
                    p
                    for p in psutil.process_iter(["cmdline", "cwd"])
                    if p.info["cmdline"]
                    and p.info["cmdline"][-3:] == ["stage", run_id, stage]
                    and p.info["cwd"] == str(stack.project)
                ),
                None,
            )
            if command is not None:
                time.sleep(3)  # well into the stage
                os.kill(command.ppid(), signal.SIGKILL)
                return
        assert time.monotonic() < deadline, f"{stage} never ran"
        time.sleep(1)


def params_of(experiment: dict) -> dict:
    return experiment["params"]["params.yaml"]["data"]


def test_the_trigger_form_offers_the_method_as_a_choice_with_descriptions(stack, browser):
    stack.wait_for_dag("flywheel_training")
    browser.get(f"{stack.base}/")  # the simple auth manager's login page first
    wait_for(browser, lambda b: b.find_elements(By.NAME, "username"), what="the login page")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(stack.password, Keys.ENTER)
    wait_for(browser, lambda b: "/auth/login" not in b.current_url, what="the logged-in home page")

    browser.get(f"{stack.base}/dags/flywheel_training")
    click_button(browser, "Trigger")
    click_button(browser, "finetune")  # the form's section of finetune's params
    field = wait_for(browser, lambda b: b.find_elements(By.ID, "element_finetune.method"), what="the field")[0]
    combobox = field.find_element(By.CSS_SELECTOR, "input[role=combobox]")
    combobox.click()
    options = wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "[id*='-option-']"), what="the choices")
    screenshot(browser, "airflow-trigger-form")
    assert [option.text for option in options] == [
        "full: every weight is trained",
        "lora: low-rank adapters on the projections (finetune.lora)",
    ]
    options[1].click()
    assert field.find_element(By.CSS_SELECTOR, "input[type=hidden]").get_attribute("value") == "lora"
    helper = browser.find_element(By.ID, f"field::{combobox.get_attribute('id')}::helper-text")
    assert helper.text.startswith("Full: every weight is trained") and helper.text.endswith("For this run only.")
    assert internet_requests(browser) == []


def click_button(browser, text: str) -> None:
    """Click the first button that says `text`, once it shows (again if the page re-rendered it)."""

    def clicked(b) -> bool:
        button = next(
            (button for button in b.find_elements(By.TAG_NAME, "button") if button.text.strip() == text), None
        )
        if button is None:
            return False
        button.click()
        return True

    wait_for(browser, clicked, what=f"the {text!r} button")


def test_a_ui_trigger_with_a_changed_param_survives_a_killed_worker_and_is_recorded(stack):
    details = stack.wait_for_dag("flywheel_training")
    conf = {**form_defaults(details), **CHANGED}
    run_id = stack.trigger("flywheel_training", conf)
    kill_the_worker_running(stack, run_id, "train")
    finished = stack.wait_for_run("flywheel_training", run_id, timeout=1200)

    tasks = stack.task_instances("flywheel_training", run_id)
    states = {task: ti["state"] for task, ti in tasks.items()}
    assert finished["state"] == "success", states
    # The gate says no, and the run says so, not a crash.
    assert states == {
        "start_run": "success",
        **{stage: "success" for stage in STAND_IN_STAGES},
        "save_run": "success",
        "gate": "success",
        "promote": "skipped",
        "not_promoted": "success",
    }
    assert tasks["train"]["try_number"] == 2  # killed, then retried in a new workspace of the run

    # The run is a DVC experiment with the form's values; the project's params never changed.
    recorded = experiments(stack.project)[experiment_name(run_id)]
    assert params_of(recorded)["evaluate"]["test_examples"] == 50
    workspace = run(["flywheel", "params", "show"], stack.project).stdout
    assert json.loads(workspace)["evaluate"]["test_examples"] == 100
    assert any((stack.project / ".dvc-storage").rglob("*"))  # data and models pushed
    duration = sum(ti["duration"] for ti in tasks.values() if ti["duration"])
    wall = time.mktime(time.strptime(finished["end_date"][:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(
        time.strptime(finished["start_date"][:19], "%Y-%m-%dT%H:%M:%S")
    )
    print(f"\ntraining run: {wall:.0f} s wall, {duration:.0f} s in {len(tasks)} tasks")


def test_drifted_traffic_makes_monitoring_start_a_training_run_that_the_scheduler_executes(stack):
    log_traffic(stack.env["FLYWHEEL_REQUEST_LOG_URL"], off_topic_prompts(200), ["Restart it."] * 200)
    before = {r["dag_run_id"] for r in stack.runs("flywheel_training")}
    stack.wait_for_dag("flywheel_monitoring")
    monitoring = stack.trigger("flywheel_monitoring", {})
    assert stack.wait_for_run("flywheel_monitoring", monitoring, timeout=600)["state"] == "success"
    assert stack.task_instances("flywheel_monitoring", monitoring)["new_feedback"]["state"] == "success"

    deadline = time.monotonic() + 120
    while not (started := [r for r in stack.runs("flywheel_training") if r["dag_run_id"] not in before]):
        assert time.monotonic() < deadline, "no training run started from the feedback Asset"
        time.sleep(2)
    [retraining] = started
    assert retraining["run_type"] == "asset_triggered"
    finished = stack.wait_for_run("flywheel_training", retraining["dag_run_id"], timeout=1200)
    states = {
        task: ti["state"] for task, ti in stack.task_instances("flywheel_training", retraining["dag_run_id"]).items()
    }
    assert finished["state"] == "success", states
    assert states["promote"] == "success"  # params.yaml's 100 examples: the stand-in's gate passes
    # The exported feedback is now DVC-tracked data, pinned by the new run's experiment.
    exported = list((stack.project / "data/raw/feedback").glob("monitor-*.jsonl.dvc"))
    assert len(exported) == 1
    assert experiment_name(retraining["dag_run_id"]) in experiments(stack.project)
