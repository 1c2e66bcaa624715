"""One served version of a model, as a local process or a container: starting it, asking whether
it is alive, stopping it (SIGTERM first, so the server drains and flushes its request log).

deploy (flywheel/release/deploy.py) starts a new Backend beside the one serving, gates it and
switches the stable endpoint to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import Params, source_file
from flywheel.errors import FlywheelError
from flywheel.net import free_port
from flywheel.release import package

LOG_DIR = Path("data/serving/logs")
CONTAINER_PORT = 8000
STOP_GRACE_S = 30


@dataclass
class Release:
    """What to deploy: a registered version (its model files materialised), or a model directory
    given by hand (not registered: the registry is left alone)."""

    version: str
    model_dir: Path
    registered: bool


# ---------------------------------------------------------------------------------------------
# Processes


def started_at(pid: int | None) -> float | None:
    """When the process with this pid started (seconds since the epoch), or None if there is
    none. With the pid it names one process: one that later gets the same pid (after a reboot,
    or pid reuse) started at another time."""
    import psutil

    try:
        return psutil.Process(pid).create_time() if pid else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def alive(pid: int | None, started: float | None) -> bool:
    """Whether the process deploy started, `pid` started at `started`, still runs. A pid now
    held by another process is not alive; neither is one recorded without its start time
    (nothing proves it is still the process deploy started)."""
    if not pid or started is None:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False  # our child, exited (and now reaped, not left a zombie)
    except ChildProcessError:
        pass  # started by an earlier deploy command: not ours to reap
    now = started_at(pid)
    return now is not None and abs(now - started) < 0.01


def stop_process(pid: int | None, started: float | None) -> None:
    """SIGTERM (the server drains and flushes its request log), SIGKILL after the grace period;
    only ever to the process deploy started, never to one that reused its pid."""
    if not alive(pid, started):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while alive(pid, started):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.2)


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def flywheel_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flywheel", *args]


def spawn(command: list[str], log: Path) -> tuple[int, float]:
    """A process that outlives this command (its own session), output to `log`: (pid, start time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    return process.pid, started_at(process.pid)


# ---------------------------------------------------------------------------------------------
# A served version


@dataclass
class Backend:
    kind: str  # process | container
    port: int
    ref: str  # pid or container id
    log: str
    started: float | None = None  # a process's start time: with the pid, its identity

    def alive(self) -> bool:
        if self.kind == "process":
            return alive(int(self.ref), self.started)
        from docker.errors import NotFound

        try:
            container = package.docker_client().containers.get(self.ref)
        except NotFound:
            return False
        return container.status in ("created", "running")

    def stop(self) -> None:
        if self.kind == "process":
            stop_process(int(self.ref), self.started)
            return
        from docker.errors import NotFound

        try:
            container = package.docker_client().containers.get(self.ref)
        except NotFound:
            return
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        container.stop(timeout=STOP_GRACE_S)
        Path(self.log).write_bytes(container.logs())
        container.remove()

    def describe_failure(self) -> str:
        if self.kind == "container":
            from docker.errors import NotFound

            try:
                return package.docker_client().containers.get(self.ref).logs(tail=15).decode(errors="replace")
            except NotFound:
                return ""
        return tail(Path(self.log))


def start_process(release: Release, params: Params) -> Backend:
    port = free_port()
    log = LOG_DIR / f"{release.version}-{port}.log"
    pid, started = spawn(
        flywheel_command(
            "--params",
            str(source_file(params)),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(release.model_dir),
        ),
        log,
    )
    return Backend("process", port, str(pid), str(log), started)


def start_container(release: Release, params: Params) -> Backend:
    from docker.errors import ImageNotFound

    client = package.docker_client()
    tag = package.image_tag(params.package, release.version)
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        raise FlywheelError(
            f"no image {tag} in the Docker engine: run `flywheel package {release.version}` first"
        ) from None
    port = free_port()
    environment = {
        name: os.environ[name] for name in ("FLYWHEEL_API_KEYS", "FLYWHEEL_REQUEST_LOG_URL") if os.environ.get(name)
    }
    # The request log outlives containers: a named volume (or PostgreSQL via the URL above).
    volumes = {"flywheel-serving-data": {"bind": "/srv/data", "mode": "rw"}}
    if image.labels.get(package.MODEL_BAKED_LABEL) != "true":
        volumes[str(release.model_dir.resolve())] = {"bind": "/srv/model", "mode": "ro"}
    container = client.containers.run(
        image.id,
        detach=True,
        name=f"flywheel-{release.version}-{port}",
        environment=environment,
        ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", port)},
        volumes=volumes,
        labels={"flywheel.version": release.version},
    )
    return Backend("container", port, container.id, str(LOG_DIR / f"{release.version}-{port}.log"))
