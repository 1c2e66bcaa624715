"""`flywheel airflow` / `make airflow`: Airflow standalone for this checkout.

AIRFLOW_HOME lives inside the project (.airflow/, git-ignored) and the DAG folder is dags/, so
what the UI shows is exactly this repository's DAGs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from pipelines.errors import FlywheelError

ADMIN_USER = "admin"


def local_environment(project: Path, port: int) -> dict[str, str]:
    home = project / ".airflow"
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Locally, a DAG you can see is a DAG you mean to run: trigger it without unpausing first.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
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


def standalone(port: int = 8080, project: Path | None = None) -> int:
    project = (project or Path.cwd()).resolve()
    if not (project / "dvc.yaml").is_file() or not (project / "dags").is_dir():
        raise FlywheelError(f"{project} is not a Flywheel checkout (no dvc.yaml or dags/); "
                            "run `make airflow` from the project root")
    env = local_environment(project, port)
    password = admin_password(Path(env["AIRFLOW_HOME"]))
    print(f"Airflow UI: http://localhost:{port}   login: {ADMIN_USER} / {password}")
    print(f"AIRFLOW_HOME={env['AIRFLOW_HOME']}  DAGs from {env['AIRFLOW__CORE__DAGS_FOLDER']}")
    print("Starting `airflow standalone` (first start migrates the database; Ctrl-C stops it)...",
          flush=True)
    try:
        # The airflow next to this interpreter, so an un-activated .venv/bin/flywheel works too.
        airflow = Path(sys.executable).with_name("airflow")
        return subprocess.call([str(airflow), "standalone"], env=env, cwd=project)
    except FileNotFoundError:
        raise FlywheelError("the `airflow` command is not installed; run `make demo` first") from None
    except KeyboardInterrupt:
        return 0
