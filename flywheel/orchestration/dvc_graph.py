"""The stage graph of dvc.yaml, read the way DVC reads it: stage B depends on stage A when one of
B's deps is one of A's outputs (outs, metrics or plots), or lies inside or contains one.

Imports nothing heavy (just PyYAML), because the Airflow DAG file calls it on every parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def _paths(entries: list | None) -> tuple[str, ...]:
    """dvc.yaml lists paths either bare or as one-key mappings carrying options."""
    paths = []
    for entry in entries or []:
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        paths.append(str(PurePosixPath(path)))
    return tuple(paths)


def load_stages(dvc_yaml: Path) -> dict[str, Stage]:
    document = yaml.safe_load(dvc_yaml.read_text()) or {}
    stages = {}
    for name, body in (document.get("stages") or {}).items():
        if "foreach" in body or "matrix" in body:
            raise ValueError(
                f"{dvc_yaml}: stage {name!r} uses foreach/matrix, which the Airflow "
                "DAG builder does not expand; list the stages one by one"
            )
        cmd = body["cmd"] if isinstance(body["cmd"], str) else " && ".join(body["cmd"])
        outs = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots"))
        stages[name] = Stage(name=name, cmd=cmd, deps=_paths(body.get("deps")), outs=outs)
    return stages


def _overlaps(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def overlapping(deps, outs) -> bool:
    """Whether any of `deps` is, lies inside or contains any of `outs`."""
    return any(_overlaps(dep, out) for dep in deps for out in outs)


def upstream_of(stages: dict[str, Stage]) -> dict[str, set[str]]:
    """For each stage, the stages whose outputs it depends on."""
    return {
        stage.name: {
            other.name for other in stages.values() if other.name != stage.name and overlapping(stage.deps, other.outs)
        }
        for stage in stages.values()
    }
