"""Every training run is a version (`flywheel run start|save|promote`, what the Airflow DAG's first
and last tasks run), in a real git + DVC repository with a one-stage pipeline: trigger-form params
apply to that run only, a bad one fails before anything changes, a run that died leaves nothing
behind for the next, new feedback exports are put under DVC, the run is a DVC experiment whose data
reached the remote, `dvc exp apply` brings it back, and a passing run is promoted in the registry."""

import json
import shutil

import pytest
import yaml

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
    (repo / ".gitignore").write_text("/.dvc-storage/\n")
    (repo / "data/raw/feedback").mkdir(parents=True)
    (repo / "data/raw/feedback/sample-export.jsonl").write_text("{}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "project")
    return repo


def flywheel_run(repo, *args, check=True):
    return run([FLYWHEEL, "run", *args], repo, check=check)


def test_a_run_is_an_experiment_with_its_own_params_its_data_pushed_and_restorable(repo):
    assert examples_param(repo) == 1000
    # Monitoring exported feedback since the last run: the run puts it under DVC.
    (repo / "data/raw/feedback/monitor-20261122T090000Z.jsonl").write_text('{"rating": "down"}\n')

    started = flywheel_run(
        repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.test_examples": 7, "reason": "drift"})
    ).stdout
    assert "evaluate.test_examples: 1000 -> 7" in started and "reason='drift'" in started
    assert (repo / "data/raw/feedback/monitor-20261122T090000Z.jsonl.dvc").is_file()
    run(["dvc", "repro"], repo)
    saved = flywheel_run(repo, "save", RUN_ID, "--run-conf", json.dumps({"evaluate.test_examples": 7})).stdout
    assert f"experiment {EXPERIMENT} saved" in saved and "pushed to DVC remote 'storage'" in saved

    # The override was for that run only; the run is listed with it.
    assert examples_param(repo) == 1000
    recorded = experiments(repo)[EXPERIMENT]
    assert recorded["params"]["params.yaml"]["data"]["evaluate"]["test_examples"] == 7
    commit = recorded["rev"]
    committed = git(repo, "show", "--name-only", "--format=", commit).split()
    assert "dvc.lock" in committed
    # The export is pinned by its DVC pointer; the data itself went to the remote, not into git.
    assert "data/raw/feedback/monitor-20261122T090000Z.jsonl.dvc" in committed
    assert "data/raw/feedback/monitor-20261122T090000Z.jsonl" not in committed
    assert '"evaluate.test_examples": 7' in git(repo, "log", "-1", "--format=%B", commit)
    # Its data and model reached the remote: a clone with an empty cache gets them back.
    assert any((repo / ".dvc-storage").rglob("*"))

    # Another run changes the model; `dvc exp apply` brings the first one back, data included.
    run(["dvc", "repro"], repo)
    assert (repo / "models/aligned/weights.txt").read_text() == "made with 1000 examples"
    run(["dvc", "exp", "apply", EXPERIMENT], repo)
    assert examples_param(repo) == 7
    assert (repo / "models/aligned/weights.txt").read_text() == "made with 7 examples"


def test_a_passing_run_is_promoted_from_its_experiment_commit(repo):
    flywheel_run(repo, "start", RUN_ID)
    run(["dvc", "repro"], repo)
    flywheel_run(repo, "save", RUN_ID)
    promoted = flywheel_run(repo, "promote", RUN_ID).stdout
    assert "registered v0.0.1 (stage: staging)" in promoted
    versions = json.loads(run([FLYWHEEL, "models", "--json"], repo).stdout)
    assert versions[0]["version"] == "v0.0.1" and versions[0]["stages"] == ["staging"]
    assert versions[0]["commit"] == git(repo, "rev-parse", f"refs/exps/{_exp_ref(repo)}").strip()
    assert "already registered" in flywheel_run(repo, "promote", RUN_ID).stdout


def _exp_ref(repo) -> str:
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return next(ref for ref in refs if ref.endswith("/" + EXPERIMENT)).removeprefix("refs/exps/")


def test_a_bad_param_fails_the_start_and_changes_nothing(repo):
    failed = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.test_examples": -1}), check=False)
    assert failed.returncode == 2
    assert "evaluate.test_examples" in failed.stderr and "Traceback" not in failed.stderr
    assert examples_param(repo) == 1000
    assert not (repo / ".dvc/tmp/flywheel/params.before-run.yaml").exists()
    unknown = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps({"evaluate.no_such": 1}), check=False)
    assert unknown.returncode == 2 and "evaluate.no_such" in unknown.stderr


def test_a_run_may_set_only_the_trigger_forms_params(repo):
    # Anyone who may trigger a run could otherwise switch the gate off: with no rules it passed.
    gate_off = {f"evaluate.gate.{rule}": {} for rule in ("minimum", "maximum", "max_regression")}
    before = (repo / "params.yaml").read_text()
    for conf in (gate_off, {"evaluate.safety_probe": "/etc/shadow"}, {"monitor.export_dir": "/etc/cron.d"}):
        refused = flywheel_run(repo, "start", RUN_ID, "--run-conf", json.dumps(conf), check=False)
        assert refused.returncode == 2, refused.stdout
        assert "a run may set only airflow.trigger_params (evaluate.test_examples)" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / ".dvc/tmp/flywheel/params.before-run.yaml").exists()


def test_the_params_of_a_run_that_died_do_not_leak_into_the_next(repo):
    flywheel_run(repo, "start", "manual__died", "--run-conf", json.dumps({"evaluate.test_examples": 3}))
    assert examples_param(repo) == 3  # the worker died here: no save
    started = flywheel_run(repo, "start", "scheduled__next").stdout
    assert "restored" in started
    assert examples_param(repo) == 1000
