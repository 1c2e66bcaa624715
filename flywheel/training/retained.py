"""The retain stage's output as the stages after it read it (finetune trains on it, preferences
pairs it with a refusal). Apart from the stage itself, so that reading it does not pull in what
the stage reads."""

from __future__ import annotations

from pathlib import Path

from flywheel import paths
from flywheel.config import RetainParams
from flywheel.io import read_records


def is_on(config: RetainParams) -> bool:
    return bool(config.prompts and config.examples)


def records(config: RetainParams, root: Path) -> list[dict]:
    """The retained examples: none when retain is off and its stage never ran (a project made
    before it, or by hand); when it is on, its output must be there."""
    if not is_on(config) and not (root / paths.RETAIN).is_file():
        return []
    return read_records(paths.RETAIN.require(root))
