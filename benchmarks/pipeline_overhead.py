"""Fixed costs a user feels on every run: DAG parse time and a no-op `dvc repro`.

    python benchmarks/pipeline_overhead.py

Parses dags/flywheel_training.py the way Airflow's DAG processor does (DagBag, timed after Airflow
itself is imported), and times `dvc repro` on an up-to-date pipeline in a scratch copy of this
checkout. Goals (issue #2): parse < 0.5 s, no-op repro < 3 s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

PARSE_SCRIPT = """
import statistics, sys, time
from airflow.dag_processing.dagbag import DagBag
times = []
for _ in range(5):
    started = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    times.append(time.perf_counter() - started)
    assert not bag.import_errors, bag.import_errors
print(statistics.median(times))
"""


def dag_parse_seconds(scratch: Path) -> float:
    env = {**ENV, "AIRFLOW_HOME": str(scratch / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(REPO / "dags")], env=env, capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def noop_repro_seconds(scratch: Path) -> list[float]:
    project = scratch / "project"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for relative in files:
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, project / relative)
    shutil.rmtree(project / "data/interim", ignore_errors=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for command in (git + ["init", "-q"], git + ["add", "-A"], git + ["commit", "-qm", "bench"], ["dvc", "repro"]):
        subprocess.run(command, cwd=project, env=ENV, check=True, capture_output=True)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        out = subprocess.run(["dvc", "repro"], cwd=project, env=ENV, check=True, capture_output=True, text=True).stdout
        times.append(time.perf_counter() - started)
        assert "Running stage" not in out, out
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        parse = dag_parse_seconds(Path(scratch))
        repro = noop_repro_seconds(Path(scratch))
    print(f"DAG parse (DagBag of dags/, median of 5)   {parse * 1000:7.1f} ms   (goal: < 500 ms)")
    print(
        f"no-op dvc repro (median of 3)              {statistics.median(repro):7.2f} s    "
        f"(goal: < 3 s; runs: {', '.join(f'{t:.2f}' for t in repro)})"
    )


if __name__ == "__main__":
    main()
