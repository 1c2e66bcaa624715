"""Every flywheel_training run is a version: a DVC experiment named after the Airflow run.

  flywheel run start NAME [--run-conf JSON]   the run's first task: new feedback exports are put
                                              under DVC, and the trigger form's params are applied
                                              for this run only (as `dvc exp run -S` would)
  flywheel run save NAME                      after the last stage: `dvc exp save` (params, metrics,
                                              dvc.lock, plots, report), `dvc push` of the data and
                                              models to the default remote, and params.yaml back
                                              as it was before the run
  flywheel run promote NAME                   the gate passed: the experiment's commit becomes a
                                              registry version in `staging`

`dvc exp show --all-commits` lists every run with its params and metrics;
`dvc exp apply NAME` puts a run's params, dvc.lock, metrics, data and models back in the
workspace (`dvc pull` first where the cache does not hold them).

The params a run starts from are kept in .dvc/tmp/flywheel/params.before-run.yaml until `save`
puts them back. A run that died on the way leaves it behind; the next `start` restores it first,
so one run's trigger-form values never leak into the next.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from flywheel.errors import FlywheelError, ParamsError
from flywheel.io import atomic_path
from flywheel.params_file import apply_overrides

PARAMS = Path("params.yaml")
PARAMS_BEFORE_RUN = Path(".dvc/tmp/flywheel/params.before-run.yaml")
# What a run changes besides params.yaml; files here that git does not track yet (a new plot, a
# new report page) go into the experiment's commit.
RUN_OUTPUTS = ("dvc.lock", "metrics", "dvclive", "reports")
# Raw data goes in as its DVC pointers only (the data itself to the DVC remote, never into git).
DATA_POINTERS = (".dvc", ".gitignore")


def experiment_name(run_id: str) -> str:
    """An Airflow run id as a DVC experiment name (a git ref: no ':', '+', spaces ...)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")
    if not name:
        raise FlywheelError(f"cannot name an experiment after the run id {run_id!r}")
    return name


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FlywheelError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _untracked(paths: tuple[str, ...]) -> list[str]:
    present = [path for path in paths if Path(path).exists()]
    if not present:
        return []
    listed = _run("git", "ls-files", "-z", "--others", "--exclude-standard", "--", *present)
    return [path for path in listed.split("\0") if path]


def params_outside_runs(project: Path) -> Path:
    """params.yaml as it is between runs: during a run, the copy kept from before it. The DAG is
    built from this, so a run's own values do not make a new DAG version or the form's defaults."""
    before_run = project / PARAMS_BEFORE_RUN
    return before_run if before_run.is_file() else project / PARAMS


def restore_params() -> bool:
    """Put params.yaml back as it was before the current (or a dead) run; True if there was one."""
    if not PARAMS_BEFORE_RUN.is_file():
        return False
    with atomic_path(PARAMS) as tmp:
        shutil.copyfile(PARAMS_BEFORE_RUN, tmp)
    PARAMS_BEFORE_RUN.unlink()
    return True


def track_new_feedback(export_dir: str) -> list[str]:
    """`dvc add` the feedback exports git does not track (monitoring writes them between runs),
    so the run's experiment pins them and `dvc push` stores them."""
    exports = [
        path for path in _untracked((export_dir,)) if path.endswith(".jsonl") and not Path(path + ".dvc").exists()
    ]
    if exports:
        _run("dvc", "add", "--quiet", *exports)
    return exports


def start(name: str, overrides: dict, export_dir: str) -> dict:
    restored = restore_params()
    PARAMS_BEFORE_RUN.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PARAMS, PARAMS_BEFORE_RUN)
    try:
        changes = apply_overrides(PARAMS, overrides)
    except ParamsError:
        PARAMS_BEFORE_RUN.unlink()
        raise
    return {
        "run": name,
        "restored_params_of_an_unfinished_run": restored,
        "changes": {key: list(pair) for key, pair in changes.items()},
        "tracked_feedback": track_new_feedback(export_dir),
    }


def _experiment_commit(name: str) -> str:
    for line in _run("git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines():
        commit, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return commit
    raise FlywheelError(f"no DVC experiment named {name!r} (dvc exp show --all-commits lists them)")


def _default_remote() -> str | None:
    result = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def save(name: str, conf: dict) -> dict:
    """Record the workspace as experiment `name`, push its data and models, restore params."""
    message = f"Airflow run {name}" + (f": conf {json.dumps(conf, sort_keys=True)}" if conf else "")
    untracked = _untracked(RUN_OUTPUTS) + [path for path in _untracked(("data/raw",)) if path.endswith(DATA_POINTERS)]
    include = [arg for path in untracked for arg in ("--include-untracked", path)]
    _run("dvc", "exp", "save", "--force", "--name", name, "--message", message, *include)
    commit = _experiment_commit(name)
    remote = _default_remote()
    if remote:
        _run("dvc", "push", "--quiet")
    restore_params()
    return {"experiment": name, "commit": commit, "pushed_to": remote}


def promote(name: str) -> dict:
    from flywheel.release import registry

    return registry.register(ref=_experiment_commit(name))


def report(action: str, result: dict) -> str:
    if action == "start":
        lines = [f"run {result['run']}: params for this run only"]
        if result["restored_params_of_an_unfinished_run"]:
            lines.append(f"  params.yaml restored from {PARAMS_BEFORE_RUN} (an earlier run did not finish)")
        lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in result["changes"].items()]
        if not result["changes"]:
            lines.append("  no param changed: params.yaml as it is")
        lines += [f"  now tracked by DVC: {path}" for path in result["tracked_feedback"]]
        return "\n".join(lines)
    if action == "save":
        pushed = (
            f"data and models pushed to DVC remote {result['pushed_to']!r}"
            if result["pushed_to"]
            else "no DVC remote configured: nothing pushed"
        )
        return (
            f"experiment {result['experiment']} saved at {result['commit'][:10]}; {pushed}; "
            f"params.yaml restored\n  see it: dvc exp show --all-commits; restore it: dvc exp apply "
            f"{result['experiment']}"
        )
    what = "already registered as" if result["already_registered"] else "registered"
    return f"promoted: {what} {result['version']} (stage: {', '.join(result['stages'])}) at {result['commit'][:10]}"
