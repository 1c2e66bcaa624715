"""The house rules that keep `dvc repro` honest and the package layered.

- The import contracts in pyproject.toml hold (import-linter): the layers, no stage module
  importing another, serving on the core alone, the Airflow helpers on nothing of Flywheel.
- dvc.yaml's code deps of each stage are exactly the modules it runs: its module and everything
  that module imports, directly or not, at module level or inside a function. A missing dep would
  let `dvc repro` call a stage "up to date" after a change to code it runs.
- Every artifact in flywheel/paths.py is an output of the stage that writes it, and a dep of every
  stage whose code names it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from flywheel import paths
from flywheel.cli import STAGES
from flywheel.orchestration.dvc_graph import load_stages
from tests.conftest import REPO

PACKAGE = REPO / "flywheel"
DVC_STAGES = load_stages(REPO / "dvc.yaml")


def module_file(name: str) -> Path | None:
    """The file of a module of the package, or None if `name` is not one."""
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _has_code(file: Path) -> bool:
    """More than a docstring: a package's __init__.py only counts when it does something."""
    body = ast.parse(file.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


@cache
def imported_modules(name: str) -> frozenset[str]:
    """The package's modules `name` imports anywhere in its file, and its parent packages."""
    tree = ast.parse(module_file(name).read_text())
    found = {".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(module for module in found if module.startswith("flywheel") and module_file(module))


@cache
def closure(name: str) -> frozenset[str]:
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(module))
    return frozenset(seen)


def code_files(stage: str) -> set[str]:
    """The files of the code a stage runs, as dvc.yaml names them."""
    files = (module_file(module) for module in closure(STAGES[stage][0]))
    return {file.relative_to(REPO).as_posix() for file in files if _has_code(file)}


def covered(file: str, deps: tuple[str, ...]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def named_artifacts(module: str) -> set[str]:
    """The catalog names a module's code uses: paths.TRAIN, or `from flywheel.paths import TRAIN`."""
    names = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths":
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module == "flywheel.paths":
            names.update(alias.name for alias in node.names)
    return names


def artifacts_read(stage: str) -> list[paths.Artifact]:
    """The artifacts of other stages that a stage's code names (a dict of them counts as all)."""
    read = []
    for module in closure(STAGES[stage][0]):
        for name in named_artifacts(module):
            value = getattr(paths, name, None)
            for artifact in value.values() if isinstance(value, dict) else [value]:
                if isinstance(artifact, paths.Artifact) and artifact.stage != stage:
                    read.append(artifact)
    return read


def catalog() -> dict[str, paths.Artifact]:
    return {name: value for name, value in vars(paths).items() if isinstance(value, paths.Artifact)}


# ---------------------------------------------------------------------------------------------


def test_the_import_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_every_dvc_stage_is_a_flywheel_stage():
    assert set(DVC_STAGES) == set(STAGES)
    for name, stage in DVC_STAGES.items():
        assert stage.cmd == f"flywheel {name}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_code_deps_are_exactly_the_modules_it_runs(stage):
    deps = DVC_STAGES[stage].deps
    needed = code_files(stage)
    missing = sorted(file for file in needed if not covered(file, deps))
    listed = {dep for dep in deps if dep.startswith("flywheel/")}
    unused = sorted(dep for dep in listed if not any(covered(file, (dep,)) for file in needed))
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs these modules but does not list them as deps, so "
        f"`dvc repro` would not re-run it when they change; add:\n" + "\n".join(f"      - {file}" for file in missing)
    )
    assert not unused, (
        f"dvc.yaml stage {stage!r} lists code it does not run (a change there re-runs it for nothing); remove: {unused}"
    )


def test_every_artifact_is_an_output_of_its_stage():
    for name, artifact in catalog().items():
        assert artifact.stage in DVC_STAGES, f"paths.{name}: no stage {artifact.stage!r} in dvc.yaml"
        outs = DVC_STAGES[artifact.stage].outs
        assert any(overlaps(str(PurePosixPath(artifact.path)), out) for out in outs), (
            f"paths.{name} ({artifact.path}) is not among the outputs of stage {artifact.stage!r} in dvc.yaml"
        )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_every_artifact_its_code_reads(stage):
    deps = DVC_STAGES[stage].deps
    undeclared = sorted(
        {
            str(a.path)
            for a in artifacts_read(stage)
            if not any(overlaps(str(PurePosixPath(a.path)), dep) for dep in deps)
        }
    )
    assert not undeclared, (
        f"stage {stage!r} reads {undeclared} (flywheel/paths.py) but dvc.yaml does not "
        "list them as its deps: DVC would run it before they exist, or not after they change"
    )


def test_the_checks_see_what_they_check():
    """The closure follows lazy imports and packages; the reader scan finds catalog names."""
    assert "flywheel.evaluation.report" in closure("flywheel.evaluation.evaluate")  # imported inside run()
    assert "flywheel.modeling" in closure("flywheel.training.preferences")
    assert "flywheel.training.alignment" in closure("flywheel.training.rlhf")
    assert paths.REWARD_MODEL in artifacts_read("rlhf")
    assert {paths.EVAL, paths.TEST} <= set(artifacts_read("preferences"))  # through paths.SPLITS
