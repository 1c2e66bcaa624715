"""A training run's workspace: made afresh by each of the run's tasks, on whichever worker runs it.

No directory is shared between tasks, runs or workers; a run moves between them through two stores
every worker reaches:

  git (the origin)   the project's repository, a path or a URL. A run in progress is the ref
                     refs/flywheel/runs/<name>: a commit on the run's base commit holding what the
                     run changed so far (params.yaml with the trigger form's values, dvc.lock and
                     the metrics, plots and reports of the stages done). A finished run is the DVC
                     experiment <name> (refs/exps/...), and the run ref goes.
  the DVC remote     the data and models: each stage's outputs (and DVC's run cache) are pushed as
                     the stage finishes, and a later stage pulls just the inputs it needs.

A task clones the origin into <runs root>/<name>, checks out the base commit, lays the run's state
on top, runs its step and moves the run ref forward with a compare-and-swap (`git push
--force-with-lease`): a run's state only ever advances from what the task started from, so a stale
attempt (a worker thought dead that was not) cannot overwrite a newer one. The workspaces of a host
share one DVC cache (<runs root>/.dvc-cache), so a stage whose inputs another run already made is
restored from DVC's run cache instead of recomputed. A workspace is removed when its task
succeeds and kept when it fails, for inspection, until `prune` finds it older than the retention.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from flywheel.errors import FlywheelError

RUN_REFS = "refs/flywheel/runs"
# What a run changes in git besides DVC's outputs (which git ignores and the remote holds).
RUN_PATHS = ("params.yaml", "dvc.lock", "metrics", "dvclive", "reports", "data/raw")
CACHE_DIR = ".dvc-cache"
RELEASES_DIR = ".releases"
IDENTITY = ("-c", "user.name=Flywheel", "-c", "user.email=flywheel@localhost")


@dataclass(frozen=True)
class Locations:
    """Where a worker finds the run's stores and keeps its workspaces."""

    origin: str  # git: a path or a URL every worker reaches
    runs_root: Path  # this host's workspaces and DVC cache
    dvc_remote: str | None = None  # the default remote's URL, when the origin's own does not do here

    @classmethod
    def from_environment(cls, project: Path | None = None, runs_root: str = ".flywheel/runs") -> Locations:
        """FLYWHEEL_GIT_ORIGIN, FLYWHEEL_RUNS_ROOT and FLYWHEEL_DVC_REMOTE where set (a worker on
        another host), else the project checkout this runs in and its runs root."""
        project = (project or Path.cwd()).resolve()
        origin = os.environ.get("FLYWHEEL_GIT_ORIGIN") or str(project)
        root = Path(os.environ.get("FLYWHEEL_RUNS_ROOT") or project / runs_root)
        return cls(origin=origin, runs_root=root.resolve(), dvc_remote=os.environ.get("FLYWHEEL_DVC_REMOTE"))

    @property
    def local_origin(self) -> Path | None:
        """The origin as a directory of this host, when it is one."""
        parsed = urlparse(self.origin)
        path = Path(parsed.path if parsed.scheme == "file" else self.origin)
        return path if parsed.scheme in ("", "file") and path.is_dir() else None


class StoreError(Exception):
    """git or DVC failed: often the network to the origin or the remote, so the task is retried
    (`flywheel run` exits 1). Not a FlywheelError, which Flywheel never retries."""


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *IDENTITY, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StoreError(f"`git {' '.join(args)}` in {cwd} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def dvc(cwd: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StoreError(f"`dvc {' '.join(args)}` in {cwd} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def default_remote(repo: Path) -> str | None:
    """The name of the repository's default DVC remote, or None where it has none."""
    result = subprocess.run(["dvc", "remote", "default"], cwd=repo, capture_output=True, text=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def run_ref(name: str) -> str:
    return f"{RUN_REFS}/{name}"


@dataclass
class Workspace:
    """One task's checkout of a run: HEAD at the run's base commit, the run's state in the tree."""

    path: Path
    name: str
    base: str
    state: str | None  # the run ref's commit this task started from (None: the run is new)
    locations: Locations
    in_use: object = None  # the open lock file that keeps `prune` away while a task works here

    @classmethod
    def clone(cls, name: str, locations: Locations) -> Workspace:
        """A fresh clone of the origin for run `name` (a leftover of an earlier attempt goes)."""
        path = locations.runs_root / name
        in_use = _hold(locations.runs_root, name)  # released when this process ends
        if path.exists():
            shutil.rmtree(path)
        git(path.parent, "clone", "--quiet", "--no-checkout", locations.origin, str(path))
        return cls(path=path, name=name, base="", state=None, locations=locations, in_use=in_use)

    @classmethod
    def new_run(cls, name: str, locations: Locations) -> Workspace:
        """The first task's workspace: the origin's HEAD, as the run's base commit."""
        workspace = cls.clone(name, locations)
        workspace.base = git(workspace.path, "rev-parse", "HEAD").strip()
        git(workspace.path, "checkout", "--quiet", "--detach", workspace.base)
        workspace._configure_dvc()
        # A start_run cleared and run again starts the run over: its earlier state is replaced.
        listed = git(workspace.path, "ls-remote", "origin", run_ref(name)).split()
        workspace.state = listed[0] if listed else None
        return workspace

    @classmethod
    def of_run(cls, name: str, locations: Locations) -> Workspace:
        """A later task's workspace: the base commit with the run's state so far on top."""
        workspace = cls.clone(name, locations)
        ref = run_ref(name)
        if not git(workspace.path, "ls-remote", "origin", ref).strip():
            raise FlywheelError(
                f"run {name} has no state in {locations.origin} ({ref}): its start_run task did not "
                "finish, or the run was saved already"
            )
        git(workspace.path, "fetch", "--quiet", "origin", f"+{ref}:{ref}")
        state = git(workspace.path, "rev-parse", ref).strip()
        workspace.base = git(workspace.path, "rev-parse", f"{state}^").strip()
        workspace.state = state
        # The state's files in the tree, HEAD and index at the base: `dvc exp save` records the
        # difference as the experiment, as it would in a workspace where the run happened.
        git(workspace.path, "checkout", "--quiet", "--detach", state)
        git(workspace.path, "reset", "--quiet", workspace.base)
        workspace._configure_dvc()
        return workspace

    def _configure_dvc(self) -> None:
        """This host's shared cache; the default remote's URL as this host reaches it."""
        cache = self.locations.runs_root / CACHE_DIR
        cache.mkdir(parents=True, exist_ok=True)
        dvc(self.path, "cache", "dir", "--local", str(cache))
        remote = default_remote(self.path)
        if remote is None:
            return
        url = self.locations.dvc_remote or self._remote_url_from_origin(remote)
        if url:
            dvc(self.path, "remote", "modify", "--local", remote, "url", url)

    def _remote_url_from_origin(self, remote: str) -> str | None:
        """A remote given as a relative path means: relative to the origin's .dvc/ directory (DVC's
        rule), which only a local origin has. Absolute paths and URLs stand as they are."""
        from configobj import ConfigObj  # DVC's own config reader; `dvc config` prints the path resolved

        url = ConfigObj(str(self.path / ".dvc/config")).get(f'remote "{remote}"', {}).get("url", "")
        if not url or "://" in url or os.path.isabs(url):
            return None
        origin = self.locations.local_origin
        if origin is None:
            raise FlywheelError(
                f"the DVC remote {remote!r} is the relative path {url!r}, which a workspace cloned from "
                f"{self.locations.origin} cannot reach: set FLYWHEEL_DVC_REMOTE on the workers, or give "
                f"the remote a URL every worker reaches (`dvc remote modify {remote} url s3://...`)"
            )
        return str((origin / ".dvc" / url).resolve())

    def message(self, default: str) -> str:
        return git(self.path, "log", "-1", "--format=%B", self.state).strip() if self.state else default

    def record(self, message: str) -> str:
        """Commit the run's state (RUN_PATHS as they are in the tree, on the base commit) and move
        the run ref in the origin to it, if it still is where this task found it."""
        index = self.path / ".git" / "flywheel-run-index"
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}

        def indexed(*args: str) -> str:
            result = subprocess.run(["git", *IDENTITY, *args], cwd=self.path, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise FlywheelError(f"`git {' '.join(args)}` failed: {result.stderr.strip()}")
            return result.stdout

        indexed("read-tree", self.base)
        present = [path for path in RUN_PATHS if (self.path / path).exists()]
        if present:
            indexed("add", "--all", "--", *present)
        tree = indexed("write-tree").strip()
        index.unlink(missing_ok=True)
        commit = git(self.path, "commit-tree", tree, "-p", self.base, "-m", message).strip()
        ref = run_ref(self.name)
        lease = f"--force-with-lease={ref}:{self.state or ''}"
        try:
            git(self.path, "push", "--quiet", lease, "origin", f"{commit}:{ref}")
        except StoreError as error:
            raise StoreError(
                f"run {self.name} moved on in {self.locations.origin} while this task ran (another attempt "
                "of it recorded its state first); this attempt's result is not recorded. A retry starts "
                "from the newer state."
            ) from error
        self.state = commit
        return commit

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


LOCKS_DIR = ".locks"


def _hold(runs_root: Path, name: str, wait: bool = True):
    """Lock run `name`'s workspace on this host: the open file, or None if another process holds it
    (only when not waiting). The lock goes with the process, however it ends."""
    path = runs_root / LOCKS_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def prune(runs_root: Path, keep_days: float, now: float | None = None) -> list[str]:
    """Remove the workspaces failed tasks left here more than `keep_days` ago (never one a task is
    working in)."""
    if not runs_root.is_dir():
        return []
    cutoff = (now or time.time()) - keep_days * 86400
    removed = []
    for path in sorted(runs_root.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or path.stat().st_mtime >= cutoff:
            continue
        held = _hold(runs_root, path.name, wait=False)
        if held is None:
            continue
        with held:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
