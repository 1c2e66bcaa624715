"""Every training run works in workspaces of its own and is a version (`flywheel run start|stage|
save|promote`, what the Airflow DAG's tasks run), in a real git + DVC repository with a one-stage
pipeline: trigger-form params apply in the run's workspace only (the project's checkout never
changes), a bad one fails before anything is recorded, new feedback exports are put under DVC, a
stage runs on a "host" that shares no directory with the others (its own runs root and DVC cache:
only git and the DVC remote), the run is a DVC experiment whose data reached the remote, `dvc exp
apply` brings it back, two runs at once stay apart, a stale attempt cannot overwrite a newer state,
a stage another run on the host made comes from DVC's run cache, and a passing run is promoted in the registry."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from flywheel.orchestration.workspace import Locations, StoreError, Workspace
from tests.conftest import BIN, REPO, run
from tests.helpers import experiments

FLYWHEEL = str(BIN / "flywheel")
RUN_ID = "manual__2026-11-22T10:00:00.123456+00:00"
EXPERIMENT = "manual__2026-11-22T10-00-00.123456-00-00"

DVC_YAML = """
stages:
  evaluate:
    cmd: python evaluate.py
    deps: [evaluate.py, data/raw]
    params: [evaluate.test_examples]
    outs: [models/aligned]
    metrics:
      - metrics/gate.json:
          cache: false
artifacts:
  flywheel-model:
    path: models/aligned
    type: model
"""
# Stands in for the pipeline: a "model" that records the param it was made with, and a gate.
EVALUATE_PY = """
import json, pathlib, yaml
examples = yaml.safe_load(open("params.yaml"))["evaluate"]["test_examples"]
pathlib.Path("models/aligned").mkdir(parents=True, exist_ok=True)
pathlib.Path("models/aligned/weights.txt").write_text(f"made with {examples} examples")
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/gate.json").write_text(json.dumps(
    {"passed": True, "decision": "staging", "judged_against": "absolute thresholds", "reasons": []}))
"""


def git(repo, *args) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo).stdout


def examples_param(repo) -> int:
    return yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["test_examples"]


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO / ".dvc/config", repo / ".dvc/config")  # the default remote: ../.dvc-storage
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    trigger_form = {"airflow.trigger_params": ["evaluate.test_examples"]}  # what a run may set
    run([FLYWHEEL, "params", "apply", "--json", json.dumps(trigger_form)], repo)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "evaluate.py").write_text(EVALUATE_PY)
    (repo / ".gitignore").write_text("/.dvc-storage/\n/.flywheel/\n")
    (repo / "data/raw/feedback").mkdir(parents=True)
    (repo / "data/raw/feedback/sample-export.jsonl").write_text("{}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "project")
    return repo


def flywheel_run(repo, *args, check=True, host=None):
    """`flywheel run ...` as a task on `host`: a runs root (workspaces and DVC cache) of its own."""
    env = {"FLYWHEEL_RUNS_ROOT": str(host)} if host else {}
    return run([FLYWHEEL, "run", *args], repo, check=check, **env)


def whole_run(repo, run_id, conf=None, hosts=(None, None, None)):
    start, stage, save = hosts
    flywheel_run(repo, "start", run_id, *(["--run-conf", json.dumps(conf)] if conf else []), host=start)
    staged = flywheel_run(repo, "stage", run_id, "evaluate", host=stage).stdout
    return staged, flywheel_run(repo, "save", run_id, host=save).stdout


@pytest.mark.slow
def test_a_run_is_an_experiment_with_its_own_params_its_data_pushed_and_restorable(repo, tmp_path):
    assert examples_param(repo) == 1000
    # Monitoring exported feedback since the last run: the run puts it under DVC.
    (repo / "data/raw/feedback/monitor-20261122T090000Z.jsonl").write_text('{"rating": "down"}\n')

    started = flywheel_run(
        repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.test_examples": 7, "reason": "drift"})
    ).stdout
    assert "evaluate.test_examples: 1000 -> 7" in started and "reason='drift'" in started
    assert (repo / "data/raw/feedback/monitor-20261122T090000Z.jsonl.dvc").is_file()
    assert examples_param(repo) == 1000  # the project's checkout is never the run's workspace
    # The stage runs on another host: its own runs root and DVC cache, nothing of the first one's.
    other_host = tmp_path / "other-host"
    staged = flywheel_run(repo, "stage", RUN_ID, "evaluate", host=other_host).stdout
    assert "stage evaluate recorded" in staged
    assert not (other_host / EXPERIMENT).exists()  # a task that succeeded leaves no workspace
    saved = flywheel_run(repo, "save", RUN_ID, host=tmp_path / "third-host").stdout
    assert f"experiment {EXPERIMENT} saved" in saved and "in DVC remote 'storage'" in saved

    assert examples_param(repo) == 1000
    recorded = experiments(repo)[EXPERIMENT]
    assert recorded["params"]["params.yaml"]["data"]["evaluate"]["test_examples"] == 7
    commit = recorded["rev"]
    assert git(repo, "rev-parse", f"{commit}^").strip() == git(repo, "rev-parse", "HEAD").strip()
    committed = git(repo, "show", "--name-only", "--format=", commit).split()
    assert "dvc.lock" in committed
    # The export is pinned by its DVC pointer; the data itself went to the remote, not into git.
    assert "data/raw/feedback/monitor-20261122T090000Z.jsonl.dvc" in committed
    assert "data/raw/feedback/monitor-20261122T090000Z.jsonl" not in committed
    assert '"evaluate.test_examples": 7' in git(repo, "log", "-1", "--format=%B", commit)
    assert not git(repo, "for-each-ref", "refs/flywheel/runs").strip()  # the run's state went with it

    # `dvc exp apply` (and `dvc pull`) bring the run into the project, its model from the remote.
    run(["dvc", "exp", "apply", EXPERIMENT], repo, check=False)
    run(["dvc", "pull", "-q"], repo)
    assert examples_param(repo) == 7
    assert (repo / "models/aligned/weights.txt").read_text() == "made with 7 examples"


@pytest.mark.slow
def test_two_runs_at_once_keep_apart(repo, tmp_path):
    confs = {f"manual__run{n}": {"evaluate.test_examples": n} for n in (11, 22)}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda item: whole_run(repo, *item, hosts=(tmp_path / "h",) * 3), confs.items()))
    recorded = experiments(repo)
    for run_id, conf in confs.items():
        params = recorded[run_id]["params"]["params.yaml"]["data"]
        assert params["evaluate"]["test_examples"] == conf["evaluate.test_examples"]
        run(["dvc", "exp", "apply", run_id], repo, check=False)
        run(["dvc", "pull", "-q"], repo)
        expected = f"made with {conf['evaluate.test_examples']} examples"
        assert (repo / "models/aligned/weights.txt").read_text() == expected


@pytest.mark.slow
def test_a_stale_attempt_cannot_overwrite_a_newer_state(repo, tmp_path):
    flywheel_run(repo, "start", RUN_ID)
    locations = Locations(origin=str(repo), runs_root=tmp_path / "host")
    stale = Workspace.of_run(EXPERIMENT, locations)  # a worker thought dead, still working
    stale.in_use.close()
    flywheel_run(repo, "stage", RUN_ID, "evaluate", host=tmp_path / "retry")  # its retry, elsewhere
    newer = git(repo, "rev-parse", f"refs/flywheel/runs/{EXPERIMENT}").strip()
    with pytest.raises(StoreError, match="moved on"):
        stale.record("the stale attempt's state")
    assert git(repo, "rev-parse", f"refs/flywheel/runs/{EXPERIMENT}").strip() == newer


@pytest.mark.slow
def test_a_stage_another_run_made_on_this_host_comes_from_the_run_cache(repo, tmp_path):
    whole_run(repo, "manual__first", {"evaluate.test_examples": 5}, hosts=(tmp_path / "host",) * 3)
    staged, _ = whole_run(repo, "manual__second", {"evaluate.test_examples": 5}, hosts=(tmp_path / "host",) * 3)
    assert "is cached - skipping run, checking out outputs" in staged
    assert "Running stage 'evaluate'" not in staged


@pytest.mark.slow
def test_a_passing_run_is_promoted_from_its_experiment_commit(repo, tmp_path):
    whole_run(repo, RUN_ID)
    promoted = flywheel_run(repo, "promote", RUN_ID, host=tmp_path / "elsewhere").stdout
    assert "registered v0.0.1 (stage: staging)" in promoted
    versions = json.loads(run([FLYWHEEL, "models", "--json"], repo).stdout)
    assert versions[0]["version"] == "v0.0.1" and versions[0]["stages"] == ["staging"]
    assert versions[0]["commit"] == git(repo, "rev-parse", f"refs/exps/{_exp_ref(repo)}").strip()
    assert "already registered" in flywheel_run(repo, "promote", RUN_ID).stdout


def _exp_ref(repo) -> str:
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return next(ref for ref in refs if ref.endswith("/" + EXPERIMENT)).removeprefix("refs/exps/")


def test_a_bad_param_fails_the_start_and_records_nothing(repo):
    failed = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.test_examples": -1}), check=False)
    assert failed.returncode == 2
    assert "evaluate.test_examples" in failed.stderr and "Traceback" not in failed.stderr
    unknown = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.no_such": 1}), check=False)
    assert unknown.returncode == 2 and "evaluate.no_such" in unknown.stderr
    assert not git(repo, "for-each-ref", "refs/flywheel/runs").strip()
    assert examples_param(repo) == 1000


def test_a_run_may_set_only_the_trigger_forms_params(repo):
    # Anyone who may trigger a run could otherwise switch the gate off: with no rules it passed.
    gate_off = {f"evaluate.gate.{rule}": {} for rule in ("minimum", "maximum", "max_regression")}
    for conf in (gate_off, {"evaluate.safety_probe": "/etc/shadow"}, {"monitor.export_dir": "/etc/cron.d"}):
        refused = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps(conf), check=False)
        assert refused.returncode == 2, refused.stdout
        assert "a run may set only airflow.trigger_params (evaluate.test_examples)" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert not git(repo, "for-each-ref", "refs/flywheel/runs").strip()


def test_a_stage_of_a_run_that_never_started_says_so(repo):
    failed = flywheel_run(repo, "stage", "manual__never", "evaluate", check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "run manual__never has no state" in failed.stderr


def test_prune_removes_old_failed_workspaces_but_never_one_in_use(tmp_path):
    import os
    import time

    from flywheel.orchestration import workspace

    now = time.time()
    for name in ("old-failed", "old-in-use", "recent-failed"):
        (tmp_path / name).mkdir()
    for name in ("old-failed", "old-in-use"):
        os.utime(tmp_path / name, (now - 8 * 86400, now - 8 * 86400))
    in_use = workspace._hold(tmp_path, "old-in-use")  # a task working there
    try:
        assert workspace.prune(tmp_path, keep_days=7, now=now) == ["old-failed"]
    finally:
        in_use.close()
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == [
        "old-in-use",
        "recent-failed",
    ]
