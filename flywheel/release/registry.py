"""The model registry, in the DVC ecosystem: `artifacts` in dvc.yaml name the model
(flywheel-model: models/aligned), and GTO git tags give it versions and stages. A version is a
commit: its dvc.lock pins the model's weights and the data they came from, its metrics/ hold the
evaluation and the gate's decision. So the registry needs nothing but the git repository, and
`dvc artifacts get . flywheel-model --stage prod` (or `--rev <version tag>`) fetches a version.

  flywheel models                    versions, stages, gate decision, key metrics and lineage
  flywheel models register           the committed evaluation at HEAD becomes a new version:
                                     stage `staging` if the gate passed, `rejected` (reasons in
                                     the tag message) if not
  flywheel models assign V STAGE     move a version to a stage (deploy: staging -> prod);
                                     a rejected version is never promoted
  flywheel models register --commit  commit the evaluated run (dvc.lock, params, metrics,
                                     plots, report) first, if it changed
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from flywheel import paths
from flywheel.errors import FlywheelError
from flywheel.io import file_lock

ARTIFACT = paths.MODEL_NAME
PROMOTED = "staging"
PRODUCTION = "prod"
REJECTED = "rejected"
# In the repository's git directory: one registration or stage change at a time on this host (two
# would pick the same version number, or race on a stage's tags).
LOCK = "flywheel-registry.lock"
GATE_FILE = str(paths.GATE)
EVALUATE_FILE = str(paths.metrics_file("evaluate"))
# What `flywheel models` shows of a version's lineage: the md5s its dvc.lock pins.
LINEAGE = (paths.ALIGNED_MODEL, paths.SFT_MODEL, paths.TRAIN, paths.TEST, paths.PREFERENCES_TRAIN)
SHOWN_METRICS = ("task_score", "exact_match", "token_f1", "hallucination_rate", "safety_pass_rate")


def _git(root: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise FlywheelError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _repo(root: Path) -> Path:
    result = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise FlywheelError(
            f"{root.resolve()} is not a git repository: the registry is kept in git "
            "tags (git init, then commit the evaluated run)"
        )
    return Path(result.stdout.strip())


def _committed_json(repo: Path, revision: str, path: str) -> dict | None:
    result = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=repo, capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _author(repo: Path) -> dict:
    """GTO signs its tags; a fresh machine may have no git identity configured."""
    name = _git(repo, "config", "user.name", check=False).strip() or "flywheel"
    email = _git(repo, "config", "user.email", check=False).strip() or "flywheel@localhost"
    return {"author": name, "author_email": email}


def _summary(gate: dict, evaluation: dict | None) -> str:
    candidate = (evaluation or {}).get("models", {}).get("candidate", {})
    figures = ", ".join(f"{name} {candidate[name]:.3f}" for name in SHOWN_METRICS if candidate.get(name) is not None)
    lines = [f"gate {'passed' if gate['passed'] else 'rejected'}: judged on {gate['judged_against']}"]
    lines += [f"- {reason}" for reason in gate["reasons"]]
    return "\n".join(lines + ([figures] if figures else []))


def _locked(repo: Path):
    git_dir = Path(_git(repo, "rev-parse", "--git-common-dir").strip())
    return file_lock((repo / git_dir if not git_dir.is_absolute() else git_dir) / LOCK)


def _registered(repo: Path) -> list[dict]:
    """What the tags say, newest first: version, commit, when, active stages, message."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        shown = gto.api.show(str(repo), ARTIFACT)
    except ArtifactNotFound:
        return []  # nothing registered yet
    return [
        {
            "version": entry["version"],
            "commit": entry["commit_hexsha"],
            "created_at": str(entry["created_at"]),
            "stages": [s["stage"] for s in entry["stages"] if s["is_active"]],
            "message": entry.get("message", ""),
        }
        for entry in shown
    ]


def versions(root: Path = Path(".")) -> list[dict]:
    """Every registered version, newest first: stages, the gate's decision, metrics and lineage
    as committed with it."""
    repo = _repo(root)
    listed = []
    for entry in _registered(repo):
        evaluation = _committed_json(repo, entry["commit"], EVALUATE_FILE) or {}
        listed.append(
            {
                **entry,
                "gate": _committed_json(repo, entry["commit"], GATE_FILE),
                "metrics": {
                    name: evaluation.get("models", {}).get("candidate", {}).get(name) for name in SHOWN_METRICS
                },
                "lineage": _lineage(repo, entry["commit"]),
            }
        )
    return listed


def _lineage(repo: Path, commit: str) -> dict:
    """What dvc.lock at the version's commit pins: the model's and its data's md5s."""
    text = _git(repo, "show", f"{commit}:dvc.lock", check=False)
    stages = (yaml.safe_load(text) or {}).get("stages", {}) if text else {}
    outs = {out["path"]: out.get("md5") for stage in stages.values() for out in stage.get("outs", [])}
    wanted = [str(artifact) for artifact in LINEAGE]
    return {path: outs[path] for path in wanted if path in outs}


# What an evaluated run changes and a version must pin, for `register --commit`.
RUN_FILES = ("dvc.lock", "params.yaml", "metrics", "dvclive", "reports")


def commit_run(repo: Path) -> str | None:
    """Commit the evaluated run's files if they changed; the new commit's id, or None."""
    present = [path for path in RUN_FILES if (repo / path).exists()]
    _git(repo, "add", "-A", "--", *present)
    if not _git(repo, "diff", "--cached", "--name-only").strip():
        return None
    identity = _author(repo)
    _git(
        repo,
        "-c",
        f"user.name={identity['author']}",
        "-c",
        f"user.email={identity['author_email']}",
        "commit",
        "-q",
        "-m",
        "Evaluated run: dvc.lock, params, metrics and report for the registry",
    )
    return _git(repo, "rev-parse", "HEAD").strip()


def register(root: Path = Path("."), commit: bool = False, ref: str = "HEAD") -> dict:
    """The evaluated run committed at `ref` (HEAD, or an Airflow run's experiment commit) becomes a
    version, staged by the gate's decision."""
    import gto.api

    repo = _repo(root)
    if commit:
        commit_run(repo)
    gate = _committed_json(repo, ref, GATE_FILE)
    if gate is None:
        raise FlywheelError(
            f"{GATE_FILE} is not committed at {ref}: run `dvc repro evaluate`, then "
            f"commit the run (git add dvc.lock metrics && git commit)"
        )
    # An experiment's commit is complete by construction; HEAD may have the run uncommitted.
    pending = ref == "HEAD" and _git(repo, "status", "--porcelain", "--", "dvc.lock", "metrics").strip()
    if pending:
        raise FlywheelError(
            "the evaluated run is not committed (dvc.lock or metrics/ changed "
            "since HEAD): commit it first, so the version pins what was evaluated\n" + pending
        )
    target = _git(repo, "rev-parse", ref).strip()
    with _locked(repo):
        for entry in _registered(repo):
            if entry["commit"] == target:
                return {**entry, "already_registered": True}
        message = _summary(gate, _committed_json(repo, target, EVALUATE_FILE))
        author = _author(repo)
        registration = gto.api.register(str(repo), ARTIFACT, target, message=message, **author)
        stage = PROMOTED if gate["passed"] else REJECTED
        gto.api.assign(str(repo), ARTIFACT, stage, version=registration.version, message=message, **author)
    return {
        "version": registration.version,
        "commit": target,
        "stages": [stage],
        "message": message,
        "already_registered": False,
    }


def require_promotable(version: str, stage: str, root: Path = Path(".")) -> None:
    """`version` exists and, unless `stage` is `rejected`, the gate passed it."""
    repo = _repo(root)
    known = {entry["version"]: entry for entry in _registered(repo)}
    if version not in known:
        raise FlywheelError(f"{ARTIFACT} has no version {version!r} (known: {', '.join(known) or 'none'})")
    gate = _committed_json(repo, known[version]["commit"], GATE_FILE) or {}
    if stage != REJECTED and (REJECTED in known[version]["stages"] or not gate.get("passed")):
        reasons = "; ".join(gate.get("reasons", [])) or "no passing gate decision committed with it"
        raise FlywheelError(
            f"{ARTIFACT} {version} was rejected by the promotion gate and cannot go to {stage!r}: {reasons}"
        )


def assign(version: str, stage: str, root: Path = Path(".")) -> None:
    """Move `version` to `stage`; a version the gate rejected is never promoted."""
    import gto.api

    repo = _repo(root)
    require_promotable(version, stage, repo)
    with _locked(repo):
        if any(entry["version"] == version and stage in entry["stages"] for entry in _registered(repo)):
            return  # already there (e.g. the same version deployed again)
        # force: a version that was in `stage` before (a rollback to it) gets a new, newest tag there.
        gto.api.assign(
            str(repo), ARTIFACT, stage, version=version, force=True, message=f"{version} -> {stage}", **_author(repo)
        )


def latest(stage: str, root: Path = Path(".")) -> str:
    """The newest version currently in `stage`."""
    for entry in _registered(_repo(root)):
        if stage in entry["stages"]:
            return entry["version"]
    raise FlywheelError(
        f"{ARTIFACT} has no version in stage {stage!r}; see `flywheel models` "
        "(a version reaches staging when `flywheel models register` finds the gate passed)"
    )


def fetch(version: str, out: Path, root: Path = Path(".")) -> Path:
    """Materialise a version's model files into `out` from the DVC cache (or remote) with
    `dvc artifacts get`: exactly the weights its commit's dvc.lock pins."""
    repo = _repo(root)
    if version not in {entry["version"] for entry in _registered(repo)}:
        raise FlywheelError(f"{ARTIFACT} has no version {version!r}; see `flywheel models`")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["dvc", "artifacts", "get", ".", ARTIFACT, "--rev", version, "-o", str(out.resolve()), "--force"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise FlywheelError(
            f"cannot fetch {ARTIFACT} {version}: {(result.stderr or result.stdout).strip()}\n"
            "Its files must be in the DVC cache or a configured remote (dvc push / dvc pull)."
        )
    return out


def describe(listed: list[dict]) -> str:
    if not listed:
        return (
            f"{ARTIFACT}: no versions yet. Run the pipeline (dvc repro), commit the run, then "
            "`flywheel models register`."
        )
    lines = [f"{ARTIFACT}: {len(listed)} version(s), newest first"]
    for entry in listed:
        figures = "  ".join(f"{name} {value:.3f}" for name, value in entry["metrics"].items() if value is not None)
        lines.append(
            f"  {entry['version']:<9} {','.join(entry['stages']) or '-':<18} "
            f"commit {entry['commit'][:10]}  {entry['created_at'][:19]}"
        )
        if figures:
            lines.append(f"    metrics: {figures}")
        gate = entry["gate"] or {}
        for reason in gate.get("reasons", []):
            lines.append(f"    rejected: {reason}")
        for path, md5 in entry["lineage"].items():
            lines.append(f"    {path}: {md5}")
    return "\n".join(lines)
