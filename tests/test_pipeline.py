"""End to end with real parts: `dvc repro` in a fresh copy, and an Airflow `dag.test()` run with a
bad trigger param failing before any stage, with an alert sent to a real webhook. (A full DAG run
under a real scheduler is test_airflow's.)"""

import json
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.browser import internet_requests, screenshot, wait_for
from tests.conftest import free_port, git_copy, run
from tests.helpers import QUICK_TRAINING, STAGES

pytestmark = pytest.mark.slow

DAG_TEST_SCRIPT = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["flywheel_training"]
    dag_run = dag.test(run_conf=json.loads(sys.argv[2]))
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    print(json.dumps({"state": str(dag_run.state), "tasks": states}))
""")


def metrics(project, stage: str) -> dict:
    return json.loads((project / f"metrics/{stage}.json").read_text())


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A fresh copy after `dvc repro` with quick training, and what the repro printed."""
    project = git_copy(tmp_path_factory.mktemp("pipeline") / "project")
    run(["flywheel", "params", "apply", "--json", json.dumps(QUICK_TRAINING)], project)
    return project, run(["dvc", "repro"], project).stdout


def test_dvc_repro_builds_the_outputs_and_a_second_run_is_a_no_op(reproduced):
    project_copy, printed = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in printed
    ingest = metrics(project_copy, "ingest")
    assert ingest["read"] == ingest["records"] + ingest["preferences"] + ingest["quarantined"]

    # The sample's planted problems are caught, and every count adds up stage to stage.
    clean = metrics(project_copy, "clean")
    assert clean["in"] == ingest["records"] == clean["kept"] + clean["removed"]
    assert clean["removed_by_reason"]["exact_duplicate"] >= 20  # 12 + 8 planted, some chance ones
    assert clean["removed_by_reason"]["near_duplicate"] >= 15  # 15 planted note variants
    for reason in ("empty_response", "too_long", "symbol_ratio"):
        assert clean["removed_by_reason"][reason] >= 1
    assert clean["pii_redacted"]["email"] >= 75 and clean["pii_redacted"]["card_number"] >= 75
    kept = pq.read_table(project_copy / "data/interim/clean/records.parquet").to_pylist()
    assert not any("@example.com" in (r["prompt"] + r["response"]) for r in kept)
    assert metrics(project_copy, "validate")["success"] is True
    split = metrics(project_copy, "split")
    assert split["in"] == clean["kept"] == (split["train"] + split["eval"] + split["test"] + split["decontaminated"])
    assert (project_copy / "reports/validate/index.html").is_file()
    assert (project_copy / "models/sft/model.safetensors").is_file()
    assert metrics(project_copy, "finetune")["steps"] > 0
    assert metrics(project_copy, "rlhf")["aligned"] is True
    assert (project_copy / "models/aligned/model.safetensors").is_file()
    # A fraction of an epoch makes a poor model: the gate says so, and the stage still succeeds.
    # The reward model the reward stage trained judges the safety probe's harmful requests too.
    assert metrics(project_copy, "evaluate")["safety_refusal_judge"] == "pattern or reward model"
    gate = metrics(project_copy, "gate")
    assert gate["decision"] in ("staging", "rejected") and gate["passed"] == (not gate["reasons"])
    assert (project_copy / "reports/evaluate/index.html").is_file()
    assert metrics(project_copy, "summary")["gate"] == gate["decision"]  # the DVC metric people compare

    # The curated curves, on a page that draws offline (DVC's own loads Vega from a CDN).
    run(["dvc", "plots", "show"], project_copy)
    page = (project_copy / "dvc_plots/index.html").read_text()
    assert "vegaEmbed(" in page and "cdn.jsdelivr.net" not in page
    assert page.count("vegaEmbed('#") == 7

    second = run(["dvc", "repro"], project_copy)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout


def test_the_report_pages_render_in_a_browser_with_no_internet(reproduced, browser):
    project, _ = reproduced
    # The evaluation report: one self-contained file, every section with its tables and charts.
    browser.get((project / "reports/evaluate/index.html").as_uri())
    headings = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.innerText)")
    assert headings[:5] == [
        "Promotion gate",
        "Metrics",
        "Task score by source",
        "Hallucination detector",
        "Safety probe",
    ]
    assert browser.execute_script("return document.querySelectorAll('table tr').length") > 20
    charts = browser.execute_script("return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert len(charts) >= 3 and all(charts), charts  # PNGs inlined as data: URLs
    shown = browser.execute_script("return document.body.innerText")
    gate = metrics(project, "gate")
    assert gate["decision"].upper() in shown and all(reason in shown for reason in gate["reasons"])
    screenshot(browser, "evaluation-report")
    assert internet_requests(browser) == []

    # dvc plots show: each of the 7 curated plots drawn by Vega (inlined in the page), with data.
    run(["dvc", "plots", "show"], project)
    browser.get((project / "dvc_plots/index.html").as_uri())
    marks = wait_for(browser, lambda b: len(marks_per_plot(b)) == 7 and marks_per_plot(b), what="the plots")
    assert all(count > 0 for count in marks.values()), marks
    screenshot(browser, "dvc-plots")
    assert internet_requests(browser) == []

    # Data Docs: the run listed by its name with its pass icon (a vendored web font).
    browser.get((project / "reports/validate/index.html").as_uri())
    rows = wait_for(
        browser,
        lambda b: b.find_elements("css selector", ".ge-index-page-validation-results-table tbody tr"),
        what="runs",
    )
    assert len(rows) == 1 and "local" in rows[0].text  # dvc repro outside an Airflow run: "local"
    icon = rows[0].find_element("css selector", ".ge-success-icon")
    assert icon.size["width"] > 0
    fonts = browser.execute_script("return [...document.fonts].map(f => [f.family, f.status])")
    assert ["Font Awesome 6 Free", "loaded"] in fonts, fonts
    screenshot(browser, "data-docs")
    assert internet_requests(browser) == []


def marks_per_plot(browser) -> dict[str, int]:
    """The coloured pixels Vega drew on each plot's canvas in dvc's page, by the plot's element id:
    the data's lines and points (axes, grid and labels are grey)."""
    return browser.execute_script("""
        const drawn = {};
        for (const plot of document.querySelectorAll(".vega-embed")) {
            const canvas = plot.querySelector("canvas");
            if (!canvas || !canvas.width) continue;
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let coloured = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                const [r, g, b, a] = [pixels[i], pixels[i + 1], pixels[i + 2], pixels[i + 3]];
                if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
            }
            drawn[plot.id] = coloured;
        }
        return drawn;
    """)


class Webhook(BaseHTTPRequestHandler):
    """Records the JSON bodies POSTed to it, as a chat or paging webhook would receive them."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_airflow_refuses_a_bad_param_before_any_stage_and_alerts(project_copy, tmp_path):
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(project_copy / "dags"),
        # The optional alert webhook is an Airflow Connection; here from the environment.
        "AIRFLOW_CONN_FLYWHEEL_ALERTS": f"http://127.0.0.1:{port}/hooks/flywheel",
    }
    run(["airflow", "db", "migrate"], tmp_path, **env)
    dags = str(project_copy / "dags")
    try:
        # Out of the form's bounds (the typed params' own): Airflow refuses it, no run starts.
        refused = run(
            ["python", "-c", DAG_TEST_SCRIPT, dags, json.dumps({"ingest.chunk_size": -5})],
            project_copy,
            check=False,
            **env,
        )
        assert refused.returncode != 0
        assert "Invalid input for param ingest.chunk_size: -5 is less than the minimum of 1" in refused.stderr
        # A param the form does not offer: the run's first task refuses it, before any stage.
        result = run(
            ["python", "-c", DAG_TEST_SCRIPT, dags, json.dumps({"evaluate.test_examples": 5})], project_copy, **env
        )
    finally:
        server.shutdown()
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "failed"
    assert outcome["tasks"] == {
        "start_run": "failed",
        "save_run": "upstream_failed",
        "gate": "upstream_failed",
        "promote": "upstream_failed",
        "not_promoted": "upstream_failed",
        **{name: "upstream_failed" for name in STAGES},
    }
    assert not (project_copy / "data/interim/ingest/records.parquet").exists()
    # One alert, not one per retry: a bad param is not retried.
    [alert] = Webhook.received
    assert alert["task_id"] == "start_run" and alert["dag_id"] == "flywheel_training"
    assert "evaluate.test_examples" in alert["error"] and "not retried" in alert["error"]
