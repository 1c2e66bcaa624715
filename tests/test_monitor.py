"""flywheel monitor on real request logs (SQLite) against the sample's training prompts: traffic
from the held-out split passes, traffic on another topic fails the drift check, exports the
window for training and asks for retraining once (then cools down); canaries and self-consistency
are judged on a live `flywheel serve`; too little traffic gets no verdict; the
flywheel_monitoring DAG publishes the feedback Asset with the reason when a run fails."""

import contextlib
import json
import random
import shutil
import subprocess
import textwrap
from collections.abc import Iterator

import httpx
import pyarrow.parquet as pq
import pytest

from flywheel.data.sample import off_topic_prompts
from flywheel.modeling import record_messages
from flywheel.monitoring.checks import Check
from flywheel.monitoring.dashboard import add_to_workspace, checks_snapshot
from flywheel.serving.request_log import RequestLog
from tests.browser import internet_requests, screenshot, wait_for
from tests.conftest import BIN, REPO, free_port, run, subprocess_env, wait_until_ready

FLYWHEEL = str(BIN / "flywheel")


def held_out_conversations(root, count: int, seed: int = 0) -> tuple[list[list[dict]], list[str]]:
    """Conversations a client would send for a random sample of the test split (system prompt,
    history, an instruction's input after its prompt), and their reference answers. Random: the
    split is ordered by source, and its first rows (all translations) are a task-mix shift."""
    records = random.Random(seed).sample(pq.read_table(root / "data/processed/test.parquet").to_pylist(), count)
    return [record_messages(r, with_response=False) for r in records], [r["response"] for r in records]


def log_traffic(url: str, conversations: list, responses: list[str], downs: int = 0) -> list[str]:
    """Requests as `flywheel serve` logs them; a conversation may be a bare prompt."""
    log = RequestLog(url)
    ids = [
        log.log_request(
            endpoint="/v1/chat/completions",
            status=200,
            response=response,
            latency_ms=40.0,
            messages=[{"role": "user", "content": c}] if isinstance(c, str) else c,
            model_version="v0.0.1",
        )
        for c, response in zip(conversations, responses)
    ]
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
    run(
        [
            FLYWHEEL,
            "params",
            "apply",
            "monitor.min_prompts=50",
            "monitor.max_requests=400",
            "monitor.reference_size=600",
            "monitor.canaries=0",
            "monitor.consistency_prompts=0",
        ],
        root,
    )
    return root, f"sqlite:///{root / 'requests.sqlite'}"


def monitor(root, url, *flags) -> dict:
    run([FLYWHEEL, "monitor", "--db", url, *flags], root)
    return json.loads((root / "metrics/monitor.json").read_text())


def checks(result) -> dict:
    return {check["name"]: check for check in result["checks"]}


@pytest.mark.slow  # a whole monitoring run: Evidently's classifiers, embeddings
def test_traffic_like_the_training_data_passes_and_asks_for_nothing(project):
    root, url = project
    log_traffic(url, *held_out_conversations(root, 200))
    result = monitor(root, url)
    assert result["verdict"] == "passed", result
    assert result["requests"] == 200 and result["retrain"] is None
    found = checks(result)
    assert found["input_drift"]["passed"] and found["text_drift_auc"]["value"] < found["text_drift_auc"]["threshold"]
    assert found["hallucination_rate"]["passed"] is None  # no live endpoint: not measured
    assert (root / result["report"]).is_file()
    assert not (root / "data/raw/feedback").exists()


@pytest.mark.slow  # a whole monitoring run: Evidently's classifiers, embeddings
def test_drifted_traffic_fails_exports_the_window_and_asks_for_retraining_once(project):
    root, url = project
    log_traffic(url, off_topic_prompts(200), ["Restart it."] * 200, downs=30)
    by_hand = monitor(root, url)  # judges only: no export, no cooldown, and it says so
    assert by_hand["verdict"] == "failed" and not by_hand["retrain"]["triggered"]
    assert "only judges" in by_hand["retrain"]["reason"]
    assert not (root / "data/raw/feedback").exists() and not (root / "data/monitoring/last_retrain.json").exists()
    result = monitor(root, url, "--retrain")  # as the DAG runs it
    assert result["verdict"] == "failed"
    found = checks(result)
    assert not found["input_drift"]["passed"] and "3 of 3" in found["input_drift"]["detail"]
    assert found["text_drift_auc"]["value"] > 0.9 and found["embedding_drift_auc"]["value"] > 0.9
    assert found["text_drift_auc"]["threshold"] < 0.7  # chance AUC at p = 0.01 / 3 for 200 against 600
    assert found["negative_feedback_rate"]["value"] == 1.0 and not found["negative_feedback_rate"]["passed"]
    assert set(result["failed"]) == {
        "text_drift_auc",
        "embedding_drift_auc",
        "descriptor_drift_min_p",
        "input_drift",
        "negative_feedback_rate",
    }

    retrain = result["retrain"]
    assert retrain["triggered"] and "input_drift" in retrain["reason"]
    assert retrain["report"] == result["report"] and retrain["report"].startswith("reports/monitoring/")
    traffic = [json.loads(line) for line in (root / retrain["traffic"]).read_text().splitlines()]
    assert len(traffic) == 200 and traffic[0]["messages"][0]["content"].startswith("How do I")
    feedback = (root / retrain["feedback"]).read_text().splitlines()
    assert len(feedback) == retrain["feedback_events"] == 30
    assert retrain["feedback"].startswith("data/raw/feedback/monitor-")  # what the preferences stage reads
    assert (root / "data/monitoring/workspace").is_dir()

    again = monitor(root, url, "--retrain")
    assert again["verdict"] == "failed" and not again["retrain"]["triggered"]
    assert "cooldown" in again["retrain"]["reason"]
    # Every check is in Evidently: a checks snapshot (its tests fail as the run did) and the drift
    # detail per run, tagged; the dashboard has a panel per check.
    snapshots, dashboard = evidently_ui(root / "data/monitoring/workspace")
    assert len(snapshots) == 6
    assert sorted(snapshot["name"] for snapshot in snapshots) == ["checks"] * 3 + ["drift"] * 3
    assert all({"verdict:failed", "model:v0.0.1"} <= set(s["tags"]) for s in snapshots if s["name"] == "checks")
    assert {"hallucination_rate", "negative_feedback_rate", "input_drift", "latency_p95_ms"} <= {
        panel["title"] for panel in dashboard["panels"]
    }
    page = (root / again["report"]).read_text()
    assert "negative_feedback_rate" in page and "latency_p95_ms" in page


@contextlib.contextmanager
def evidently_ui_server(workspace) -> Iterator[str]:
    """What `make monitoring-ui` runs, on a free port: yields its address."""
    port = free_port()
    ui = subprocess.Popen(
        [str(BIN / "evidently"), "ui", "--workspace", str(workspace), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{address}/api/projects", ui, timeout=90)
        yield address
    finally:
        ui.terminate()
        ui.wait()


def flywheel_project(address: str) -> dict:
    return next(p for p in httpx.get(f"{address}/api/projects").json() if p["name"] == "flywheel")


def evidently_ui(workspace) -> tuple[list[dict], dict]:
    """What the Evidently UI holds: the flywheel project's runs and its dashboard."""
    with evidently_ui_server(workspace) as address:
        project = flywheel_project(address)
        snapshots = httpx.get(f"{address}/api/projects/{project['id']}/snapshots").json()
        return snapshots, httpx.get(f"{address}/api/v2/dashboards/{project['id']}").json()


def test_the_evidently_ui_draws_a_panel_per_check_over_the_runs_offline(tmp_path, browser):
    workspace = tmp_path / "workspace"
    for hallucination_rate in (0.1, 0.3, 0.2):  # three monitoring runs, the second failing
        checks = [
            Check("hallucination_rate", hallucination_rate, 0.25, hallucination_rate <= 0.25, "unsupported answers"),
            Check("latency_p95_ms", 120.0, 2000.0, True, "request latency"),
        ]
        snapshot = checks_snapshot(checks, tags=["model:v0.0.1"], metadata={})
        add_to_workspace(workspace, [snapshot], checks)
    with evidently_ui_server(workspace) as address:
        browser.get(f"{address}/projects/{flywheel_project(address)['id']}")
        # Each panel: its check's name, rule and detail over a line with a point per run.
        points = wait_for(browser, lambda b: len(points_per_panel(b)) == 2 and points_per_panel(b), what="panels")
        screenshot(browser, "evidently-dashboard")
        assert points == {"hallucination_rate": 3, "latency_p95_ms": 3}
        page = browser.execute_script("return document.body.innerText")
        assert "passes at <= 0.25; unsupported answers" in page
        assert internet_requests(browser) == []


def points_per_panel(browser) -> dict[str, int]:
    """The points drawn in each dashboard panel's chart, by the panel's title (a panel: the
    smallest element around the chart that shows one check's rule)."""
    return browser.execute_script("""
        const points = {};
        for (const chart of document.querySelectorAll("svg")) {
            const drawn = chart.querySelectorAll("circle").length;
            let panel = chart;
            while (panel && !(panel.innerText || "").includes("passes at")) panel = panel.parentElement;
            const panels = panel ? panel.innerText.split("passes at").length - 1 : 0;
            if (panels === 1 && drawn) points[panel.innerText.split("\\n")[0].trim()] = drawn;
        }
        return points;
    """)


def test_canaries_and_self_consistency_are_judged_on_the_live_endpoint(project, trained_sft):
    root, url = project
    port = free_port()
    server = subprocess.Popen(
        [FLYWHEEL, "serve", "--port", str(port), "--model", str(trained_sft / "models/sft")],
        cwd=root,
        env=subprocess_env(FLYWHEEL_REQUEST_LOG_URL=url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", server)
        log_traffic(url, *held_out_conversations(root, 100, seed=1))
        run(
            [
                FLYWHEEL,
                "params",
                "apply",
                f"monitor.endpoint=http://127.0.0.1:{port}",
                "monitor.canaries=30",
                "monitor.consistency_prompts=5",
                "monitor.consistency_samples=2",
            ],
            root,
        )
        result = monitor(root, url)
    finally:
        server.terminate()
        server.wait()
    found = checks(result)
    assert result["requests"] == 100  # the monitor's own queries are canaries, not traffic
    assert found["hallucination_rate"]["passed"] and found["hallucination_rate"]["value"] <= 0.2
    assert "30 canaries" in found["hallucination_rate"]["detail"]
    assert found["consistency_hallucination_rate"]["value"] is not None
    log = RequestLog(url)
    canaries = log.count_requests() - 100
    log.close()
    assert canaries == 30 + 5 * 3  # canaries, then each real prompt greedy + 2 samples, all logged


def test_too_little_traffic_gets_no_verdict(project):
    root, url = project
    log_traffic(url, off_topic_prompts(10) * 10, ["Restart it."] * 100)
    result = monitor(root, url)
    assert result["verdict"] == "insufficient data" and result["retrain"] is None
    assert "100 requests, 10 distinct prompts" in result["detail"]


DAG_TEST_SCRIPT = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.dags["flywheel_monitoring"].test()
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    with create_session() as session:
        events = [{"asset": event.asset.name, "extra": event.extra} for event in session.query(AssetEvent)]
    print(json.dumps({"state": str(dag_run.state), "tasks": states, "events": events}))
""")


@pytest.mark.slow
def test_the_monitoring_dag_publishes_the_feedback_asset_when_the_traffic_drifted(project, tmp_path):
    root, url = project
    shutil.copytree(REPO / "dags", root / "dags")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    log_traffic(url, off_topic_prompts(200), ["Restart it."] * 200)
    env = {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "FLYWHEEL_REQUEST_LOG_URL": url,
    }
    run(["airflow", "db", "migrate"], tmp_path, **env)
    outcome = json.loads(
        run(["python", "-c", DAG_TEST_SCRIPT, str(root / "dags")], root, **env).stdout.strip().splitlines()[-1]
    )
    assert outcome["state"] == "success"
    assert outcome["tasks"] == {"monitor": "success", "needs_retraining": "success", "new_feedback": "success"}
    # flywheel_training is scheduled on this Asset: the event starts one retraining run, and says why.
    [event] = outcome["events"]
    assert event["asset"] == "flywheel_feedback"
    assert event["extra"]["reason"].startswith("monitoring failed: ")
    assert event["extra"]["report"].startswith("reports/monitoring/")
    assert (root / event["extra"]["feedback"]).is_file()


@pytest.mark.slow
def test_the_reference_comes_from_the_dvc_remote_when_the_checkout_lacks_it(sample_project, tmp_path, monkeypatch):
    """Training runs make the split in workspaces of their own and push it; the project checkout
    monitoring runs in has only dvc.lock's pointer to it."""
    from flywheel.errors import FlywheelError
    from flywheel.monitoring.drift import reference_prompts
    from tests.helpers import repo_params

    repo = tmp_path / "project"
    (repo / "data/processed").mkdir(parents=True)
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repo)
    reference = repo / "data/processed/train.parquet"
    shutil.copyfile(sample_project / "data/processed/train.parquet", reference)
    run(["dvc", "add", "-q", "data/processed/train.parquet"], repo)
    run(["dvc", "push", "-q"], repo)
    config = repo_params(monitor={"reference_size": 100}).monitor
    monkeypatch.chdir(repo)
    expected = reference_prompts(config)

    reference.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    assert reference_prompts(config) == expected and reference.is_file()
    reference.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(tmp_path / "remote")
    with pytest.raises(FlywheelError, match="could not fetch it"):
        reference_prompts(config)
