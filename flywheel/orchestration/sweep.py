"""`flywheel sweep`: one flywheel_training run per point of a small grid of params, triggered through
Airflow's REST API exactly as the UI's trigger button does (each run's conf is its point), so the
runs go in parallel up to airflow.max_active_runs, each in workspaces of its own. `dvc exp show`
lists them side by side; `--promote-best METRIC` waits for them and registers the best run that the
gate passed.

  flywheel sweep -p finetune.training.learning_rate=0.0005,0.001 -p finetune.training.epochs=3,6 \\
      --promote-best model.task_score

The API is AIRFLOW_URL's (default http://localhost:8080), with AIRFLOW_TOKEN, or AIRFLOW_USERNAME
and AIRFLOW_PASSWORD exchanged for a token at /auth/token (what `make airflow` prints).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import yaml

from flywheel.errors import FlywheelError

DAG_ID = "flywheel_training"
FINISHED = ("success", "failed")


def grid(axes: list[str], allowed: list[str]) -> list[dict]:
    """`key=v1,v2` axes as the list of their combinations (values typed as YAML reads them)."""
    parsed = {}
    for axis in axes:
        key, separator, values = axis.partition("=")
        if not separator or not values:
            raise FlywheelError(f"-p {axis!r}: expected KEY=VALUE[,VALUE...]")
        if key not in allowed:
            raise FlywheelError(
                f"-p {key}: a run may set only airflow.trigger_params ({', '.join(allowed) or 'none'}); "
                "add the param there in params.yaml to sweep it"
            )
        parsed[key] = [_typed(value) for value in values.split(",")]
    return [dict(zip(parsed, point, strict=True)) for point in itertools.product(*parsed.values())]


def _typed(value: str):
    """As YAML reads it, except that 1e-3 is a number (YAML 1.1 wants 1.0e-3)."""
    typed = yaml.safe_load(value)
    if isinstance(typed, str):
        try:
            return float(typed)
        except ValueError:
            return typed
    return typed


@dataclass
class AirflowApi:
    url: str
    token: str

    @classmethod
    def from_environment(cls) -> AirflowApi:
        url = os.environ.get("AIRFLOW_URL", "http://localhost:8080").rstrip("/")
        token = os.environ.get("AIRFLOW_TOKEN")
        if not token:
            user, password = os.environ.get("AIRFLOW_USERNAME"), os.environ.get("AIRFLOW_PASSWORD")
            if not (user and password):
                raise FlywheelError("set AIRFLOW_TOKEN, or AIRFLOW_USERNAME and AIRFLOW_PASSWORD, for Airflow's API")
            token = _request("POST", f"{url}/auth/token", {"username": user, "password": password})["access_token"]
        return cls(url=url, token=token)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        return _request(method, f"{self.url}/api/v2{path}", body, token=self.token)

    def trigger(self, conf: dict) -> str:
        return self.call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def state(self, run_id: str) -> str:
        return self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"]


def _request(method: str, url: str, body: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=30) as reply:
            return json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        raise FlywheelError(
            f"Airflow's API refused {method} {url}: {error.code} {error.read().decode()[:300]}"
        ) from None
    except OSError as error:
        raise FlywheelError(f"cannot reach Airflow's API at {url}: {error}; is AIRFLOW_URL right?") from None


def wait(api: AirflowApi, run_ids: list[str], timeout_s: float, poll_s: float = 10) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        states = {run_id: api.state(run_id) for run_id in run_ids}
        if all(state in FINISHED for state in states.values()):
            return states
        if time.monotonic() > deadline:
            raise FlywheelError(f"the sweep did not finish in {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)


# The gate's decision as the summary stage records it (the one DVC metric, what `dvc exp show` lists).
SUMMARY_GATE = "metrics/summary.json:gate"
REJECTED = "rejected"


def _lookup(experiment: dict, metric: str):
    """`file:dotted.key` (or a dotted key looked up in every metrics file) in `dvc exp show --json`'s
    data of one experiment, e.g. metrics/summary.json:model.task_score."""
    file, _, key = metric.rpartition(":")
    for path, recorded in (experiment.get("metrics") or {}).items():
        if file and path != file:
            continue
        value = recorded.get("data") or {}
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def metric_of(experiment: dict, metric: str) -> float | None:
    value = _lookup(experiment, metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def metric_of_text(experiment: dict, metric: str) -> str | None:
    value = _lookup(experiment, metric)
    return value if isinstance(value, str) else None


def best(experiments: dict[str, dict], names: list[str], metric: str, maximize: bool) -> tuple[str, float]:
    """The best run the gate passed, by `metric`."""
    scored = []
    for name in names:
        data = experiments.get(name)
        if data is None:
            continue
        value = metric_of(data, metric)
        if metric_of_text(data, SUMMARY_GATE) not in (None, REJECTED) and value is not None:
            scored.append((value, name))
    if not scored:
        raise FlywheelError(f"no run of the sweep passed the gate with a value for {metric}; nothing promoted")
    value, name = max(scored) if maximize else min(scored)
    return name, value
