"""`flywheel airflow` / `make airflow`: Airflow standalone for this checkout; `flywheel airflow
--setup-only`: what any Airflow deployment of the project needs before its scheduler starts.

AIRFLOW_HOME lives inside the project (.airflow/, git-ignored) and the DAG folder is dags/, so
what the UI shows is exactly this repository's DAGs. Setup migrates the metadata database and
creates the pool the GPU stages share (airflow.gpu_pool): a task in a pool that does not exist is
never scheduled.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from flywheel.config import AirflowParams
from flywheel.errors import FlywheelError

ADMIN_USER = "admin"


def local_environment(project: Path, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    home = project / ".airflow"
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Locally, a DAG you can see is a DAG you mean to run: trigger it without unpausing first.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        # Airflow's api-server listens on 0.0.0.0 by default: every network this machine is on.
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://{'localhost' if host in ('127.0.0.1', 'localhost') else host}:{port}",
        # Pick up edits to dags/ and dvc.yaml quickly while developing.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    }


def admin_password(home: Path) -> str:
    """The admin password, generated once and kept in AIRFLOW_HOME like Airflow itself does."""
    password_file = home / "simple_auth_manager_passwords.json.generated"
    if password_file.exists():
        passwords = json.loads(password_file.read_text() or "{}")
        if ADMIN_USER in passwords:
            return passwords[ADMIN_USER]
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    password_file.write_text(json.dumps({ADMIN_USER: password}))
    return password


def _airflow(*args: str) -> list[str]:
    # The airflow next to this interpreter, so an un-activated .venv/bin/flywheel works too.
    airflow = Path(sys.executable).with_name("airflow")
    if not airflow.exists():
        raise FlywheelError("the `airflow` command is not installed; run `make install` first")
    return [str(airflow), *args]


def setup(config: AirflowParams, env: dict[str, str] | None = None) -> None:
    """Migrate the metadata database (AIRFLOW_HOME's, or AIRFLOW__DATABASE__SQL_ALCHEMY_CONN's)
    and create or resize the GPU stages' pool."""
    for command in (
        _airflow("db", "migrate"),
        _airflow(
            "pools",
            "set",
            config.gpu_pool,
            str(config.gpu_pool_slots),
            "flywheel_training's GPU stages (airflow.gpu_stages in params.yaml)",
        ),
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise FlywheelError(
                f"`airflow {' '.join(command[1:3])}` failed:\n{(result.stderr or result.stdout)[-2000:]}"
            )
    print(f"Airflow metadata database migrated; pool {config.gpu_pool!r} has {config.gpu_pool_slots} slot(s)")


def standalone(config: AirflowParams, port: int = 8080, project: Path | None = None, host: str = "127.0.0.1") -> int:
    project = (project or Path.cwd()).resolve()
    if not (project / "dvc.yaml").is_file() or not (project / "dags").is_dir():
        raise FlywheelError(
            f"{project} is not a Flywheel checkout (no dvc.yaml or dags/); run `make airflow` from the project root"
        )
    env = local_environment(project, port, host)
    password = admin_password(Path(env["AIRFLOW_HOME"]))
    print("Setting up the metadata database (the first time takes about a minute)...", flush=True)
    setup(config, env)
    print(f"Airflow UI: {env['AIRFLOW__API__BASE_URL']}   login: {ADMIN_USER} / {password}")
    print(f"AIRFLOW_HOME={env['AIRFLOW_HOME']}  DAGs from {env['AIRFLOW__CORE__DAGS_FOLDER']}")
    print("Starting `airflow standalone` (Ctrl-C stops it)...", flush=True)
    try:
        return subprocess.call(_airflow("standalone"), env=env, cwd=project)
    except KeyboardInterrupt:
        return 0
