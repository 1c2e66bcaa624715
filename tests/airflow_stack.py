"""A real Airflow deployment on this machine, for the tests and benchmarks/airflow_run.py: the
metadata database on PostgreSQL, LocalExecutor, and the api-server, scheduler and dag-processor
as processes of their own (what infra/airflow/docker-compose.yaml runs in containers), set up by
`flywheel airflow --setup-only` and driven through the REST API exactly as the UI drives it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
COMPONENTS = ("api-server", "scheduler", "dag-processor")
FINISHED = ("success", "failed")


class AirflowStack:
    def __init__(self, project: Path, home: Path, database_url: str, port: int, log_port: int, **extra_env: str):
        self.project, self.home, self.port = project, home, port
        self.base = f"http://127.0.0.1:{port}"
        self.password = secrets.token_urlsafe(12)
        home.mkdir(parents=True, exist_ok=True)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({"admin": self.password}))
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            # SQLAlchemy's psycopg (3) dialect is async too: no asyncpg needed.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": database_url,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The scheduler's log server (for the UI) on a port of its own, not the fixed 8793.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
            "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            **extra_env,
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.headers: dict[str, str] = {}

    def start(self, timeout: float = 180) -> AirflowStack:
        subprocess.run(
            [str(BIN / "flywheel"), "airflow", "--setup-only"],
            cwd=self.project,
            env=self.env,
            check=True,
            capture_output=True,
        )
        for component in COMPONENTS:
            log = open(self.home / f"{component}.log", "w")
            # A session each, so stop() ends the component's own children (executor workers,
            # the log server) with it.
            self.processes[component] = subprocess.Popen(
                [str(BIN / "airflow"), component],
                cwd=self.project,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            for component, process in self.processes.items():
                assert process.poll() is None, f"airflow {component} exited:\n{self.log(component)}"
            assert time.monotonic() < deadline, f"the api-server did not answer:\n{self.log('api-server')}"
            time.sleep(1)
        token = httpx.post(f"{self.base}/auth/token", json={"username": "admin", "password": self.password})
        token.raise_for_status()
        self.headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/api/v2/monitor/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        for process in self.processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def log(self, component: str) -> str:
        path = self.home / f"{component}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def api(self, method: str, path: str, **kwargs) -> dict:
        response = httpx.request(method, f"{self.base}/api/v2{path}", headers=self.headers, timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.api("GET", f"/dags/{dag_id}/details")
            except httpx.HTTPStatusError:
                assert time.monotonic() < deadline, f"{dag_id} was not parsed:\n{self.log('dag-processor')}"
                time.sleep(2)

    def trigger(self, dag_id: str, conf: dict) -> str:
        """What the UI's trigger button does: POST the form's values as the run's conf."""
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "start_date"})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        listed = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in listed}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in FINISHED:
                return run
            assert time.monotonic() < deadline, f"{dag_id} {run_id} did not finish:\n{self.log('scheduler')}"
            time.sleep(2)
