"""Every flywheel_training run works in a workspace of its own and ends as a DVC experiment named
after the Airflow run (flywheel.orchestration.workspace: how the workspace and the run's state move
between workers through git and the DVC remote).

  flywheel run start NAME [--run-conf JSON]   the run's first task: new feedback exports in the
                                              project are put under DVC and pushed; the trigger
                                              form's params are applied in the run's workspace
                                              (never in the project's checkout) and recorded
  flywheel run stage NAME STAGE               one stage: `dvc repro --pull --single-item STAGE` in
                                              a workspace made from the run's state, its outputs
                                              pushed to the DVC remote, the state moved on
  flywheel run save NAME                      after the last stage: `dvc exp save` of the run as
                                              experiment NAME, pushed to the origin; the gate's
                                              decision printed for the DAG's branch
  flywheel run promote NAME                   the gate passed: the experiment's commit becomes a
                                              registry version in `staging`

Each takes its stores from the environment (FLYWHEEL_GIT_ORIGIN, FLYWHEEL_RUNS_ROOT,
FLYWHEEL_DVC_REMOTE) or, by default, the project checkout it runs in. `dvc exp show --all-commits`
in the project lists every run with its params and metrics; `dvc exp apply NAME` (after `dvc pull`
where the cache lacks its files) puts one back in the workspace.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from flywheel.errors import FlywheelError, ParamsError
from flywheel.io import file_lock
from flywheel.orchestration import workspace as ws
from flywheel.orchestration.dvc_graph import load_stages, overlapping, upstream_of
from flywheel.orchestration.workspace import Locations, Workspace, default_remote, dvc, git

# Raw data goes in as its DVC pointers only (the data itself to the DVC remote, never into git).
DATA_POINTERS = (".dvc", ".gitignore")
GATE_FILE = "metrics/gate.json"
# The stage that compares its candidate with the deployed model (evaluate.production_model).
READS_PRODUCTION = "evaluate"


def experiment_name(run_id: str) -> str:
    """An Airflow run id as a DVC experiment name (a git ref: no ':', '+', spaces ...)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")
    if not name:
        raise FlywheelError(f"cannot name an experiment after the run id {run_id!r}")
    return name


def _untracked(repo: Path, paths: tuple[str, ...]) -> list[str]:
    present = [path for path in paths if (repo / path).exists()]
    if not present:
        return []
    listed = git(repo, "ls-files", "-z", "--others", "--exclude-standard", "--", *present)
    return [path for path in listed.split("\0") if path]


def track_new_feedback(project: Path, export_dir: str) -> list[str]:
    """`dvc add` and push the feedback exports git does not track (monitoring writes them into the
    project between runs), so every run's experiment pins them and every worker can pull them.
    Returns the pointers of all untracked exports: each run from now on trains on them."""
    with file_lock(project / ".dvc/tmp/flywheel/feedback.lock"):  # two runs starting at once
        exports = [
            path
            for path in _untracked(project, (export_dir,))
            if path.endswith(".jsonl") and not (project / (path + ".dvc")).exists()
        ]
        if exports:
            dvc(project, "add", "--quiet", *exports)
        pointers = [path for path in _untracked(project, ("data/raw",)) if path.endswith(DATA_POINTERS)]
        if any(path.endswith(".dvc") for path in pointers) and default_remote(project):
            dvc(project, "push", "--quiet", *[path for path in pointers if path.endswith(".dvc")])
    return pointers


def run_conf_overrides(run_conf: dict, allowed: list[str]) -> dict:
    """The param overrides in an Airflow run's conf: its dotted keys, each one of the trigger
    form's fields (airflow.trigger_params). Anyone who may trigger a run may set those; the gate,
    paths and the rest change only through a commit to params.yaml."""
    overrides = {key: value for key, value in run_conf.items() if "." in key}
    refused = sorted(set(overrides) - set(allowed))
    if refused:
        raise ParamsError(
            f"run conf sets {', '.join(refused)}: a run may set only airflow.trigger_params "
            f"({', '.join(allowed) or 'none'}); add a param there in params.yaml to allow it"
        )
    return overrides


def start(name: str, run_conf: dict, locations: Locations) -> dict:
    """Begin run `name` from the origin's HEAD: its params, its feedback, its first recorded state."""
    from flywheel.config import load_params
    from flywheel.params_file import apply_overrides

    workspace = Workspace.new_run(name, locations)
    params_file = workspace.path / "params.yaml"
    # The base commit's params decide what a run may set, not whatever a worker has checked out.
    params = load_params(params_file)
    ws.prune(locations.runs_root, params.airflow.keep_failed_workspaces_days)
    overrides = run_conf_overrides(run_conf, params.airflow.trigger_params)
    changes = apply_overrides(params_file, overrides)
    load_params(params_file)  # a bad value fails here, before any stage, with the key named
    feedback = []
    project = locations.local_origin
    if project is not None and (project / "dvc.yaml").is_file():
        for pointer in track_new_feedback(project, params.monitor.export_dir):
            target = workspace.path / pointer
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(project / pointer, target)
            feedback.append(pointer)
    message = f"Airflow run {name}" + (f": conf {json.dumps(run_conf, sort_keys=True)}" if run_conf else "")
    state = workspace.record(message)
    workspace.remove()
    return {
        "run": name,
        "base": workspace.base,
        "state": state,
        "changes": {key: list(pair) for key, pair in changes.items()},
        "not_params": {key: value for key, value in run_conf.items() if "." not in key},
        "tracked_feedback": feedback,
    }


def _link_production_model(workspace: Workspace, production_model: str) -> str | None:
    """The deployed version (the registry's `production` stage) where evaluate looks for it, fetched
    once per host from the DVC remote: the project's models/production link is not on every host."""
    from flywheel.release import registry

    target = workspace.path / production_model
    try:
        version = registry.latest(registry.PRODUCTION, root=workspace.path)
    except FlywheelError:
        return None  # nothing deployed yet: judged against thresholds and its SFT model
    releases = workspace.locations.runs_root / ws.RELEASES_DIR
    fetched = releases / version
    with file_lock(releases / f"{version}.lock"):
        if not fetched.exists():
            registry.fetch(version, fetched, root=workspace.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(fetched)
    return version


def stage(name: str, stage_name: str, locations: Locations) -> dict:
    """Run one stage of run `name` here; its output streams to this process's stdout (the task log)."""
    from flywheel.config import load_params

    workspace = Workspace.of_run(name, locations)
    params = load_params(workspace.path / "params.yaml")
    ws.prune(locations.runs_root, params.airflow.keep_failed_workspaces_days)
    reads_production = stage_name == READS_PRODUCTION
    production = _link_production_model(workspace, params.evaluate.production_model) if reads_production else None
    sys.stdout.flush()
    # --pull: the stage's inputs (and a run-cache hit's outputs) from this host's cache or the remote.
    command = ["dvc", "repro", "--pull", "--single-item", stage_name]
    returncode = subprocess.call(command, cwd=workspace.path)
    if returncode != 0:
        # The workspace stays, for inspection; dvc's own message above names the stage's failure.
        raise StageFailed(f"`{' '.join(command)}` in {workspace.path} exited with {returncode}")
    if default_remote(workspace.path):
        dvc(workspace.path, "push", "--quiet", "--run-cache", stage_name)
    state = workspace.record(workspace.message(f"Airflow run {name}"))
    workspace.remove()
    return {"run": name, "stage": stage_name, "state": state, "production": production}


class StageFailed(Exception):
    """The stage's command failed. Not a FlywheelError (exit 2, never retried): whether it may be
    retried is the stage's own exit status, which dvc printed in the task log."""


def _last_stages(repo: Path) -> tuple[list[str], list[str]]:
    """The stages nothing depends on, and the earlier stages that made the inputs of theirs the
    workspace lacks (in the DVC remote). `dvc pull` is given stages: a path that is one stage's
    output and another's input may be taken as the input, which pulls nothing."""
    stages = load_stages(repo / "dvc.yaml")
    upstream = upstream_of(stages)
    feeding = {parent for parents in upstream.values() for parent in parents}
    last = sorted(set(upstream) - feeding)
    missing = {dep for name in last for dep in stages[name].deps if not (repo / dep).exists()}
    makers = {parent for name in last for parent in upstream[name] if overlapping(missing, stages[parent].outs)}
    return last, sorted(makers)


def save(name: str, locations: Locations) -> dict:
    """Record the finished run as DVC experiment `name` in the origin; its run ref goes."""
    workspace = Workspace.of_run(name, locations)
    last, makers = _last_stages(workspace.path)
    # `dvc exp save` caches the outputs of the stages it is given, and checks their inputs: the last
    # stages, which every earlier stage's outputs fed (all in the remote already, pinned by dvc.lock).
    dvc(workspace.path, "pull", "--quiet", *last, *makers)
    include = _untracked(workspace.path, ws.RUN_PATHS)
    include = [path for path in include if not path.startswith("data/raw/") or path.endswith(DATA_POINTERS)]
    dvc(
        workspace.path,
        "exp",
        "save",
        "--force",
        "--name",
        name,
        "--message",
        workspace.message(f"Airflow run {name}"),
        *[arg for path in include for arg in ("--include-untracked", path)],
        *last,
    )
    ref, commit = _experiment_ref(workspace.path, name)
    git(workspace.path, "push", "--quiet", "--force", "origin", f"{ref}:{ref}")
    git(workspace.path, "push", "--quiet", "origin", f":{ws.run_ref(name)}")
    gate_file = workspace.path / GATE_FILE
    gate = json.loads(gate_file.read_text()) if gate_file.is_file() else None
    remote = default_remote(workspace.path)
    workspace.remove()
    return {"experiment": name, "commit": commit, "pushed_to": remote, "gate": gate}


def _experiment_ref(repo: Path, name: str) -> tuple[str, str]:
    """DVC experiment `name`'s ref (refs/exps/<baseline>/<name>) and commit."""
    for line in git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines():
        commit, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return ref, commit
    raise FlywheelError(f"no DVC experiment named {name!r} (dvc exp show --all-commits lists them)")


def experiments(project: Path) -> dict[str, dict]:
    """What `dvc exp show --all-commits` lists in the project: each experiment's name -> its data
    (params, metrics, rev)."""
    shown = json.loads(dvc(project, "exp", "show", "--all-commits", "--json"))
    return {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in commit.get("experiments") or []}


def promote(name: str, locations: Locations) -> dict:
    """Register experiment `name`'s commit, then push the registry's new tags to the origin. Tags
    are created once: if another promotion took the same version number first, the push is
    refused and the task's retry numbers it anew."""
    from flywheel.release import registry

    workspace = Workspace.clone(name, locations)
    git(workspace.path, "fetch", "--quiet", "origin", "+refs/exps/*:refs/exps/*")
    origin = locations.local_origin
    lock = file_lock(origin / ".git" / registry.LOCK) if origin else contextlib.nullcontext()
    with lock:  # one promotion at a time on a host that holds the origin
        before = set(git(workspace.path, "tag", "--list").split())
        result = registry.register(root=workspace.path, ref=_experiment_ref(workspace.path, name)[1])
        new_tags = sorted(set(git(workspace.path, "tag", "--list").split()) - before)
        if new_tags:
            git(workspace.path, "push", "--quiet", "--atomic", "origin", *[f"refs/tags/{tag}" for tag in new_tags])
    workspace.remove()
    return result


def report(action: str, result: dict) -> str:
    if action == "start":
        lines = [f"run {result['run']}: base {result['base'][:10]}, state {result['state'][:10]}"]
        lines += [f"  {key}: {old!r} -> {new!r} (this run only)" for key, (old, new) in result["changes"].items()]
        if not result["changes"]:
            lines.append("  no param changed: params.yaml as committed")
        lines += [
            f"  run conf {key}={value!r} (not a param; recorded with the run)"
            for key, value in result["not_params"].items()
        ]
        lines += [f"  feedback tracked by DVC: {path}" for path in result["tracked_feedback"]]
        return "\n".join(lines)
    if action == "stage":
        deployed = f"; compared with production {result['production']}" if result["production"] else ""
        return f"run {result['run']}: stage {result['stage']} recorded at {result['state'][:10]}{deployed}"
    if action == "save":
        pushed = (
            f"data and models in DVC remote {result['pushed_to']!r}"
            if result["pushed_to"]
            else "no DVC remote configured: data and models stay in this host's cache"
        )
        return (
            f"experiment {result['experiment']} saved at {result['commit'][:10]}; {pushed}\n"
            f"  see it: dvc exp show --all-commits; restore it: dvc exp apply {result['experiment']}"
        )
    what = "already registered as" if result["already_registered"] else "registered"
    return f"promoted: {what} {result['version']} (stage: {', '.join(result['stages'])}) at {result['commit'][:10]}"
