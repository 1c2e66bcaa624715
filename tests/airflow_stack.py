"""A real Airflow deployment on this machine, for the tests and benchmarks: the metadata database on
PostgreSQL, LocalExecutor (or CeleryExecutor with workers on hosts of their own), and the
api-server, scheduler and dag-processor as processes of their own (what
infra/airflow/docker-compose.yaml runs in containers), set up by `flywheel airflow --setup-only`
and driven through the REST API exactly as the UI drives it."""

from __future__ import annotations

import contextlib
import dataclasses
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
    def __init__(
        self,
        project: Path,
        home: Path,
        database_url: str,
        port: int,
        log_port: int,
        host: str = "127.0.0.1",
        **extra_env: str,
    ):
        self.project, self.home, self.port = project, home, port
        self.base = f"http://{host}:{port}"
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
            "AIRFLOW__API__HOST": host,
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
            with contextlib.suppress(ProcessLookupError):
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


# A stand-in pipeline for the tests of orchestration: each stage reads what the one before wrote;
# `train` takes long enough to be killed in; `evaluate`'s gate passes when the run's
# evaluate.test_examples is at least 100. The real pipeline under Airflow is
# benchmarks/airflow_run.py's and benchmarks/airflow_sweep.py's.
STAND_IN_STAGES = ("prepare", "train", "evaluate")
STAND_IN_DVC_YAML = """
stages:
  prepare:
    cmd: python stand_in.py prepare
    deps: [stand_in.py]
    params: [evaluate.test_examples]
    outs: [data/processed/stand_in.txt]
  train:
    cmd: python stand_in.py train
    deps: [stand_in.py, data/processed/stand_in.txt]
    outs: [models/aligned]
  evaluate:
    cmd: python stand_in.py evaluate
    deps: [stand_in.py, models/aligned]
    metrics:
      - metrics/gate.json:
          cache: false
artifacts:
  flywheel-model:
    path: models/aligned
    type: model
"""
STAND_IN_SCRIPT = """
import json, pathlib, sys, time, yaml
stage = sys.argv[1]
if stage == "prepare":
    examples = yaml.safe_load(open("params.yaml"))["evaluate"]["test_examples"]
    pathlib.Path("data/processed/stand_in.txt").write_text(f"{examples} examples")
elif stage == "train":
    time.sleep(20)
    pathlib.Path("models/aligned").mkdir(parents=True, exist_ok=True)
    text = pathlib.Path("data/processed/stand_in.txt").read_text()
    pathlib.Path("models/aligned/weights.txt").write_text(f"trained on {text}")
else:
    pathlib.Path("models/aligned/weights.txt").read_text()
    pathlib.Path("metrics").mkdir(exist_ok=True)
    examples = yaml.safe_load(open("params.yaml"))["evaluate"]["test_examples"]
    passed = examples >= 100
    reasons = [] if passed else [f"evaluate.test_examples is {examples}, below the stand-in's 100"]
    decision = "staging" if passed else "rejected"
    gate = {"passed": passed, "decision": decision, "judged_against": "a stand-in", "reasons": reasons}
    pathlib.Path("metrics/gate.json").write_text(json.dumps(gate))
"""


def stand_in_project(path: Path) -> Path:
    """A git copy of this checkout whose dvc.yaml is the stand-in pipeline (not yet committed)."""
    from tests.conftest import git_copy

    project = git_copy(path)
    (project / "dvc.yaml").write_text(STAND_IN_DVC_YAML)
    (project / "dvc.lock").unlink()
    (project / "stand_in.py").write_text(STAND_IN_SCRIPT)
    return project


CELERY_SUBNET = "10.79.0"
GATEWAY = f"{CELERY_SUBNET}.1"  # this machine, as the workers' hosts reach it
REDIS_DB = 7  # the broker's database on the local Redis: emptied at the start


@dataclasses.dataclass
class CeleryWorker:
    name: str  # its hostname, which Airflow records on each task instance it runs
    namespace: str
    root: Path  # its own AIRFLOW_HOME and runs root: no directory shared with the other workers
    process: subprocess.Popen | None = None


@contextlib.contextmanager
def celery_cluster(project: Path, root: Path, database_url: str, workers: int = 2):
    """The stack (api-server, scheduler, dag-processor) on this machine with CeleryExecutor on the
    local Redis, and `workers` Celery workers, each on a host of its own (a network namespace with its
    own hostname) that reaches PostgreSQL, Redis, the api-server and git (a git daemon serving the
    project) over the bridge. The workers share no working directory: each has its own AIRFLOW_HOME,
    workspaces and DVC cache; the run's state and data move through git and the DVC remote (a path,
    standing in for S3). They read the DAG files from the project (in production: an image or a
    DAG bundle)."""
    import redis

    from tests.netns import Forwarder, bridged_hosts

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    broker = f"redis://127.0.0.1:6379/{REDIS_DB}"
    celery = {
        "AIRFLOW__CORE__EXECUTOR": "airflow.providers.celery.executors.celery_executor.CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
        # A worker that died (its host gone) stops heartbeating: its task is failed, then retried.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    }
    from tests.conftest import free_port

    with (
        bridged_hosts(CELERY_SUBNET, workers) as hosts,
        Forwarder(GATEWAY, 5432, 5432),
        Forwarder(GATEWAY, 6379, 6379),
        git_daemon(project.parent, GATEWAY),
    ):
        stack = AirflowStack(project, root / "home", database_url, free_port(), free_port(), host=GATEWAY, **celery)
        started: list[CeleryWorker] = []
        try:
            stack.start()
            for n, (namespace, _) in enumerate(hosts, 1):
                worker = CeleryWorker(name=f"worker-{n}", namespace=namespace, root=root / f"worker-{n}")
                worker.process = _start_worker(stack, worker, database_url, broker)
                started.append(worker)
            yield stack, started
        finally:
            for worker in started:
                if worker.process and worker.process.poll() is None:
                    os.killpg(worker.process.pid, signal.SIGKILL)
            stack.stop()


def _on_gateway(url: str) -> str:
    return url.replace("127.0.0.1", GATEWAY)


def _start_worker(stack: AirflowStack, worker: CeleryWorker, database_url: str, broker: str) -> subprocess.Popen:
    (worker.root / "home").mkdir(parents=True, exist_ok=True)
    env = {
        **{key: value for key, value in stack.env.items() if "PASSWORDS_FILE" not in key},
        "AIRFLOW_HOME": str(worker.root / "home"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _on_gateway(database_url),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": _on_gateway(database_url),
        "AIRFLOW__CELERY__BROKER_URL": _on_gateway(broker),
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _on_gateway(database_url),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{stack.base}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "8793",
        "FLYWHEEL_RUNS_ROOT": str(worker.root / "runs"),
        "FLYWHEEL_GIT_ORIGIN": f"git://{GATEWAY}/{stack.project.name}",
        "FLYWHEEL_DVC_REMOTE": str(stack.project / ".dvc-storage"),
    }
    command = ["ip", "netns", "exec", worker.namespace, "unshare", "--uts", "sh", "-c"]
    command += [f"hostname {worker.name} && exec airflow celery worker --queues default --concurrency 1"]
    log = open(worker.root / "worker.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def git_daemon(base: Path, host: str, port: int = 9418):
    """`git daemon` serving the repositories under `base` (push too) at git://host/<name>."""
    import socket

    command = ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack", f"--base-path={base}"]
    daemon = subprocess.Popen(
        [*command, f"--listen={host}", f"--port={port}", str(base)], stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                break
            assert time.monotonic() < deadline and daemon.poll() is None, "git daemon did not start"
            time.sleep(0.2)
        yield f"git://{host}"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=10)
