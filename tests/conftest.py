from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.net import free_port  # noqa: F401 - tests import it from here

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, nothing fetched from any hub."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"{process.args} exited with {process.returncode} before {url} answered:\n{output}")
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout} s"
        time.sleep(0.5)


@contextlib.contextmanager
def postgres_database(prefix: str):
    """A fresh database on the local PostgreSQL server (trust auth): yields its SQLAlchemy URL,
    drops it afterwards."""
    psycopg = pytest.importorskip("psycopg")
    name = f"{prefix}_{time.time_ns() % 10**12}"
    admin_dsn = "host=127.0.0.1 user=postgres dbname=postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def git_copy(copy: Path) -> Path:
    """A fresh git repository at `copy` holding this checkout's files, as a new clone would."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / relative)
    # Outputs of an earlier run in this checkout must not leak into the copy.
    shutil.rmtree(copy / "data" / "interim", ignore_errors=True)
    commit_all(copy, "copy", init=True)
    return copy


def commit_all(repo: Path, message: str, init: bool = False) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    if init:
        run(git + ["init", "-q"], repo)
    run(git + ["add", "-A"], repo)
    run(git + ["commit", "-q", "-m", message], repo)


def pytest_collection_modifyitems(items) -> None:
    """A test that needs a trained model is slow, and one that opens a browser is a browser test,
    whatever they say: `make test-fast` and BROWSER_TESTS=0 cannot pick one up by its forgetting
    a marker."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "trained_sft" in fixtures:
            item.add_marker(pytest.mark.slow)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)


@pytest.fixture
def browser():
    """A headless Chromium that reaches no host but 127.0.0.1 (tests/browser.py), one per test: a
    page left open (the Airflow UI polling a stopped server) kept a CPU a third busy."""
    from tests.browser import chromium

    with chromium() as driver:
        yield driver


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return git_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def sample_project(tmp_path_factory) -> Path:
    """The bundled sample (raw data, feedback export) ingested, cleaned and split, once per session."""
    from flywheel.config import load_params
    from flywheel.data import clean, ingest, split

    root = tmp_path_factory.mktemp("sample")
    shutil.copytree(REPO / "data/raw", root / "data/raw")
    shutil.copytree(REPO / "data/eval", root / "data/eval")  # split decontaminates against the probe
    shutil.copytree(REPO / "infra", root / "infra")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = load_params(REPO / "params.yaml")
    for stage in (ingest, clean, split):
        stage.run(params, root=root)
    return root


@pytest.fixture(scope="session")
def sample_splits(sample_project) -> Path:
    """data/processed/{train,eval,test}.parquet made from the bundled sample."""
    return sample_project / "data/processed"


@pytest.fixture(scope="session")
def trained_sft(sample_project, tmp_path_factory) -> Path:
    """A project whose models/sft is fine-tuned on the sample with the shipped params (the
    fine-tuning test checks how well it learned; alignment starts from it)."""
    root = tmp_path_factory.mktemp("sft") / "project"
    shutil.copytree(sample_project, root)
    run([str(BIN / "flywheel"), "finetune"], root)
    return root


def copy_project(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(source, root)
    return root


def project_with(tmp_path: Path, splits: Path, **sections) -> Path:
    """A scratch project: the sample's splits and params.yaml with some keys replaced, given as
    dotted keys per section, e.g. finetune={"training.epochs": 1}."""
    import yaml

    root = tmp_path / "project"
    shutil.copytree(splits, root / "data/processed")
    shutil.copytree(REPO / "infra", root / "infra")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        for dotted, value in values.items():
            node = data[section]
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root
