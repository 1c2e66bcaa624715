"""flywheel monitor on real request logs (SQLite) against the sample's training prompts: traffic
from the held-out split passes, traffic on another topic fails the drift check, exports the
window for training and asks for retraining once (then cools down); too little traffic gets no
verdict; the flywheel_monitoring DAG turns a failed run into a flywheel_training run."""

import json
import random
import shutil
import subprocess
import textwrap
import time

import httpx
import pyarrow.parquet as pq
import pytest

from pipelines.request_log import RequestLog
from tests.conftest import BIN, REPO, free_port, run

FLYWHEEL = str(BIN / "flywheel")
TOOLS = ["kubernetes", "postgres", "nginx", "terraform", "kafka", "redis", "spark", "elasticsearch"]
ACTIONS = ["rotate the TLS certificates of", "tune the connection pool of", "back up", "upgrade",
           "debug a memory leak in", "set up replication for", "migrate", "monitor disk usage of"]


def drifted_prompts(count: int, seed: int = 0) -> list[str]:
    """Operations questions: a topic the sample never shows."""
    rng = random.Random(seed)
    return [f"How do I {rng.choice(ACTIONS)} {rng.choice(TOOLS)} {rng.randint(2, 9)}.{rng.randint(0, 20)} "
            f"on a cluster of {rng.randint(3, 40)} nodes without downtime?" for _ in range(count)]


def log_traffic(url: str, prompts: list[str], responses: list[str], downs: int = 0) -> list[str]:
    log = RequestLog(url)
    ids = [log.log_request(endpoint="/v1/chat/completions", status=200, response=response, latency_ms=40.0,
                           messages=[{"role": "user", "content": prompt}], model_version="v0.0.1")
           for prompt, response in zip(prompts, responses)]
    log.flush()
    for request_id in ids[:downs]:
        log.log_feedback(request_id, rating="down")
    log.close()
    return ids


@pytest.fixture
def project(sample_splits, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(sample_splits, root / "data/processed")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run([FLYWHEEL, "params", "apply", "monitor.min_requests=50", "monitor.max_requests=400",
         "monitor.reference_size=600", "monitor.canaries=0", "monitor.consistency_prompts=0"], root)
    return root, f"sqlite:///{root / 'requests.sqlite'}"


def monitor(root, url) -> dict:
    run([FLYWHEEL, "monitor", "--db", url], root)
    return json.loads((root / "metrics/monitor.json").read_text())


def checks(result) -> dict:
    return {check["name"]: check for check in result["checks"]}


def test_traffic_like_the_training_data_passes_and_asks_for_nothing(project):
    root, url = project
    # A random sample: the split is ordered by source, and its first 200 rows (all translations)
    # are a task-mix shift the monitor rightly flags.
    held_out = random.Random(0).sample(pq.read_table(root / "data/processed/test.parquet").to_pylist(), 200)
    log_traffic(url, [r["prompt"] for r in held_out], [r["response"] for r in held_out])
    result = monitor(root, url)
    assert result["verdict"] == "passed", result
    assert result["requests"] == 200 and result["retrain"] is None
    found = checks(result)
    assert found["input_drift"]["passed"] and found["text_drift_auc"]["value"] < 0.6
    assert found["hallucination_rate"]["passed"] is None  # no live endpoint: not measured
    assert (root / result["report"]).is_file()
    assert not (root / "data/raw/feedback").exists()


def test_drifted_traffic_fails_exports_the_window_and_asks_for_retraining_once(project):
    root, url = project
    log_traffic(url, drifted_prompts(200), ["Restart it."] * 200, downs=30)
    result = monitor(root, url)
    assert result["verdict"] == "failed"
    found = checks(result)
    assert not found["input_drift"]["passed"] and "3 of 3" in found["input_drift"]["detail"]
    assert found["text_drift_auc"]["value"] > 0.9 and found["embedding_drift_auc"]["value"] > 0.9
    assert found["negative_feedback_rate"]["value"] == 1.0 and not found["negative_feedback_rate"]["passed"]
    assert set(result["failed"]) == {"text_drift_auc", "embedding_drift_auc", "descriptor_drift_min_p",
                                     "input_drift", "negative_feedback_rate"}

    retrain = result["retrain"]
    assert retrain["triggered"] and "input_drift" in retrain["reason"]
    traffic = [json.loads(line) for line in (root / retrain["traffic"]).read_text().splitlines()]
    assert len(traffic) == 200 and traffic[0]["messages"][0]["content"].startswith("How do I")
    feedback = (root / retrain["feedback"]).read_text().splitlines()
    assert len(feedback) == retrain["feedback_events"] == 30
    assert retrain["feedback"].startswith("data/raw/feedback/monitor-")  # what the preferences stage reads
    assert (root / "data/monitoring/workspace").is_dir()

    again = monitor(root, url)
    assert again["verdict"] == "failed" and not again["retrain"]["triggered"]
    assert "cooldown" in again["retrain"]["reason"]
    assert len(evidently_ui_snapshots(root / "data/monitoring/workspace")) == 2


def evidently_ui_snapshots(workspace) -> list[dict]:
    """What `make monitoring-ui` shows: the Evidently UI's runs of the flywheel project."""
    port = free_port()
    ui = subprocess.Popen([str(BIN / "evidently"), "ui", "--workspace", str(workspace), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                projects = httpx.get(f"{base}/projects").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and ui.poll() is None, "the Evidently UI did not start"
                time.sleep(0.5)
        project = next(p for p in projects if p["name"] == "flywheel")
        return httpx.get(f"{base}/projects/{project['id']}/snapshots").json()
    finally:
        ui.terminate()
        ui.wait()


def test_too_little_traffic_gets_no_verdict(project):
    root, url = project
    log_traffic(url, drifted_prompts(10), ["Restart it."] * 10)
    result = monitor(root, url)
    assert result["verdict"] == "insufficient data" and result["retrain"] is None
    assert "10 requests" in result["detail"]


DAG_TEST_SCRIPT = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import DagRun
    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    # dag.test() writes the whole folder to the metadata DB, so the triggered DAG exists there.
    dag_run = bag.dags["flywheel_monitoring"].test()
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    triggered = [run.conf for run in DagRun.find(dag_id="flywheel_training")]
    print(json.dumps({"state": str(dag_run.state), "tasks": states, "triggered": triggered}))
""")


@pytest.mark.slow
def test_the_monitoring_dag_triggers_training_when_the_traffic_drifted(project, tmp_path):
    root, url = project
    shutil.copytree(REPO / "dags", root / "dags")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    log_traffic(url, drifted_prompts(200), ["Restart it."] * 200)
    env = {"AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"), "FLYWHEEL_REQUEST_LOG_URL": url}
    run(["airflow", "db", "migrate"], tmp_path, **env)
    outcome = json.loads(run(["python", "-c", DAG_TEST_SCRIPT, str(root / "dags")], root,
                             **env).stdout.strip().splitlines()[-1])
    assert outcome["state"] == "success"
    assert outcome["tasks"] == {"monitor": "success", "needs_retraining": "success",
                                "new_feedback": "success", "retrain": "success"}
    assert len(outcome["triggered"]) == 1
    assert outcome["triggered"][0]["reason"].startswith("monitoring failed: ")
    assert outcome["triggered"][0]["report"].startswith("reports/monitoring/")
