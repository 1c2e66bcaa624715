"""What the Airflow DAGs' tasks run; the DAG files in dags/ only wire these together.

Imported by the DAG files at every parse, so it imports nothing but Airflow's SDK and the
standard library at module level.

  FlywheelCommand   runs a command (a `flywheel` tool, e.g. `flywheel run stage <run> <stage>`)
                    in the project, its output in the task log. Exit code 2, or a DVC stage that
                    exited with 2, is one of Flywheel's expected failures (bad params, bad data, a
                    missing engine, a failed validation): the task fails at once, without retries.
                    Anything else (a killed worker, out of memory, a flaky file system) is retried
                    with exponential backoff; a command a killed attempt left running on this
                    worker is stopped before the retry starts. With result_xcom, the command's
                    JSON result (--result-file) is the task's XCom.
  alert             the failure callback: an error line in the task log and, when the Airflow
                    Connection `flywheel_alerts` exists, a JSON POST to it (a Slack/Teams/
                    PagerDuty-style webhook: its host, port and schema make the URL).
  gate_branch       after the run is saved: `promote` when the run's metrics/gate.json (in
                    save_run's XCom) says the gate passed, `not_promoted` otherwise.
  explain_rejection not_promoted: the gate's reasons and the report's path, in its log and XCom.
  publish_feedback  the monitoring DAG's Asset event for exported feedback, with the reason and
                    the report in its extra; asset-scheduled training starts from it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from airflow.sdk import Asset, BaseOperator

PYTHON = sys.executable  # the interpreter Airflow runs in has Flywheel and DVC installed
ALERT_CONNECTION = "flywheel_alerts"
NOT_RETRYABLE_EXIT = 2  # flywheel.cli: a FlywheelError (the message names the fix)
log = logging.getLogger("flywheel.airflow")


def project_dir(dag_file: str) -> Path:
    """The checkout a DAG file belongs to (dags/ is in its root): the workspace its tasks run in.
    FLYWHEEL_PROJECT_DIR overrides it (DAGs deployed apart from the workspace)."""
    return Path(os.environ.get("FLYWHEEL_PROJECT_DIR") or Path(dag_file).resolve().parents[1])


def feedback_asset(project: Path) -> Asset:
    """Monitoring exports feedback under data/raw/feedback; flywheel_training is scheduled on it."""
    return Asset(name="flywheel_feedback", uri=f"file://{project / 'data/raw/feedback'}")


def task_env() -> dict[str, str]:
    # DVC runs each stage's `cmd` through a shell: put this environment's scripts first on PATH.
    return {
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        "DVC_NO_ANALYTICS": "1",
    }


def flywheel(*args: str) -> list[str]:
    return [PYTHON, "-m", "flywheel", *args]


# What `dvc repro` prints for a person at a terminal; a run's save_run commits dvc.lock itself.
DVC_GIT_HINTS = re.compile(
    r"^(To track the changes with git, run:|\s*git add \S*dvc\.lock.*|To enable auto staging, run:"
    r"|\s*dvc config core\.autostage true|\s*)$"
)


def log_lines(stream, every_s: float = 30.0, clock=None):
    """The lines of a command's output worth a task log line each. A progress bar redraws itself
    after carriage returns: its state is kept at most every `every_s` seconds and when it ends
    (it made a log line per step); DVC's git hints and blank lines are dropped."""
    import time

    clock = clock or time.monotonic
    last_progress, pending = clock(), b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += chunk
        *complete, pending = re.split(rb"(\r\n|\r|\n)", pending)
        for piece, separator in zip(complete[::2], complete[1::2]):
            line = piece.decode("utf-8", "replace").rstrip()
            if separator == b"\r":  # a redraw: shown now and then
                if line and clock() - last_progress >= every_s:
                    last_progress = clock()
                    yield line
            elif not DVC_GIT_HINTS.match(line):
                yield line
    if pending.strip():
        yield pending.decode("utf-8", "replace").rstrip()


def exit_status(returncode: int, output_tail: list[str]) -> int:
    """The command's own exit code; for `dvc repro`, the failed stage command's."""
    for line in reversed(output_tail):
        found = re.search(r"failed to run: .*, exited with (-?\d+)\s*$", line)
        if found:
            return int(found.group(1))
    return returncode


class FlywheelCommand(BaseOperator):
    """Run `command` in the project directory; see the module docstring for failures."""

    template_fields = ("command",)
    ui_color = "#e8f0fe"

    def __init__(self, *, command: list[str], project: Path, result_xcom: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.project = str(project)
        self.result_xcom = result_xcom
        self._process: subprocess.Popen | None = None

    def execute(self, context) -> dict | None:
        import tempfile

        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        # A run's tasks never run two at a time (max_active_tasks), so a command still registered
        # for this run was orphaned by a killed attempt on this worker: stop it before it races this one.
        running = _running_dir(Path(self.project)) / f"{self.dag_id}.{_safe(context['run_id'])}.running"
        stop_leftover(running, self.log)
        command = list(self.command)
        if self.result_xcom:
            result_file = Path(tempfile.mkdtemp(prefix="flywheel-result-")) / "result.json"
            command += ["--result-file", str(result_file)]
        self.log.info("in %s: %s", self.project, " ".join(command))
        # A session of its own, so on_kill (or the next attempt) stops it and all it started.
        self._process = subprocess.Popen(
            command,
            cwd=self.project,
            env={
                **os.environ,
                **task_env(),
                "FLYWHEEL_PROJECT_DIR": self.project,
                "FLYWHEEL_RUN_NAME": context["run_id"],  # names reports by run
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running.parent.mkdir(parents=True, exist_ok=True)
        running.write_text(json.dumps({"pgid": self._process.pid, "command": command}))
        try:
            tail: collections.deque[str] = collections.deque(maxlen=30)
            for line in log_lines(self._process.stdout):
                tail.append(line)
                self.log.info("%s", line)
            returncode = self._process.wait()
        finally:
            running.unlink(missing_ok=True)
        if returncode == 0:
            return _read_and_remove(result_file) if self.result_xcom else None
        status = exit_status(returncode, list(tail))
        last = next((line for line in reversed(tail) if line.strip()), "")
        message = f"`{' '.join(command)}` exited with {status}: {last}"
        if status == NOT_RETRYABLE_EXIT:
            raise AirflowFailException(f"{message} (not retried: fix the cause named above)")
        raise AirflowException(message)

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)


def _read_and_remove(result_file: Path) -> dict:
    import shutil

    try:
        return json.loads(result_file.read_text())
    finally:
        shutil.rmtree(result_file.parent, ignore_errors=True)


def _running_dir(project: Path) -> Path:
    """Where a worker notes the command a task runs: its runs root (FLYWHEEL_RUNS_ROOT, a worker
    that does not write into the project), else the project's DVC temp directory."""
    runs_root = os.environ.get("FLYWHEEL_RUNS_ROOT")
    return Path(runs_root) / ".running" if runs_root else project / ".dvc/tmp/flywheel"


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_leftover(running: Path, logger) -> None:
    """Stop the process group recorded in `running` (SIGTERM, then SIGKILL after 10 s)."""
    import time

    if not running.is_file():
        return
    leftover = json.loads(running.read_text())
    running.unlink()
    pgid = leftover["pgid"]
    if not _group_alive(pgid):
        return
    logger.warning(
        "stopping %s (process group %d), left running by a killed attempt", " ".join(leftover["command"]), pgid
    )
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def webhook_url(connection) -> str:
    host = connection.host or ""
    if "://" not in host:
        scheme = "https" if connection.conn_type == "https" else "http"
        host = f"{scheme}://{host}" + (f":{connection.port}" if connection.port else "")
    return host.rstrip("/") + (f"/{connection.schema.lstrip('/')}" if connection.schema else "")


def alert(context) -> None:
    """on_failure_callback: log the failure; POST it to the `flywheel_alerts` connection if set."""
    import urllib.request

    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    ti = context["ti"]
    payload = {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "error": str(context.get("exception") or "failed"),
    }
    log.error("ALERT flywheel: %s", json.dumps(payload))
    try:
        connection = Connection.get(ALERT_CONNECTION)
    except AirflowNotFoundException:
        return
    request = urllib.request.Request(
        webhook_url(connection),
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as error:  # an alert that cannot be sent must not hide the failure itself
        log.error("the alert webhook %s did not take the alert: %s", ALERT_CONNECTION, error)


def _saved_gate(ti) -> dict:
    return ti.xcom_pull(task_ids="save_run")["gate"]


def gate_branch(ti) -> str:
    gate = _saved_gate(ti)
    if gate.get("passed"):
        return "promote"
    log.warning("not promoted: %s", "; ".join(gate.get("reasons", [])))
    return "not_promoted"


def explain_rejection(ti) -> list[str]:
    """not_promoted: the gate's reasons and where the evaluation report is, in the task's log and
    XCom, so a rejected run says why where it is looked at (it ended as one more green box)."""
    gate = _saved_gate(ti)
    experiment = ti.xcom_pull(task_ids="save_run")["experiment"]
    log.warning("the promotion gate rejected this run's model; nothing is promoted. Its reasons:")
    for reason in gate.get("reasons", []):
        log.warning("  - %s", reason)
    log.warning(
        "the evaluation report: reports/evaluate/index.html of experiment %s (dvc exp apply %s)", experiment, experiment
    )
    return gate.get("reasons", [])


def retraining_asked(project: str) -> dict | bool:
    """The monitoring run's retraining request (kept in XCom), or False to stop there."""
    retrain = json.loads((Path(project) / "metrics/monitor.json").read_text()).get("retrain") or {}
    return retrain if retrain.get("triggered") else False


def publish_feedback(project: str, ti, outlet_events) -> None:
    retrain = ti.xcom_pull(task_ids="needs_retraining")
    extra = {key: retrain[key] for key in ("reason", "report", "feedback", "traffic")}
    outlet_events[feedback_asset(Path(project))].extra = extra
