"""The artifact catalog: every file or directory a pipeline stage writes, and which stage writes it.

Stages never import each other: they meet only through these artifacts, which dvc.yaml declares as
the writer's `outs` and each reader's `deps` (tests/test_layout.py checks both, reading which
artifacts a stage's code names). A stage that needs an artifact asks for it with `require`, which
names the stage to run when it is missing.

Paths are relative to the project root; `root / artifact` gives the path in a project.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flywheel.errors import FlywheelError

METRICS_DIR = Path("metrics")


@dataclass(frozen=True)
class Artifact:
    path: Path
    stage: str  # the stage that writes it
    marker: str | None = None  # for a directory: the file that shows it is complete

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def run_first(self) -> str:
        """How to make it: what every "missing" message tells the user."""
        return f"run the {self.stage} stage first (dvc repro {self.stage})"

    def require(self, root: Path = Path(".")) -> Path:
        """The artifact's path under `root`; one clear error naming its stage if it is missing."""
        path = root / self.path
        if not path.exists():
            raise FlywheelError(f"{path} not found: {self.run_first}")
        if self.marker and not (path / self.marker).exists():
            raise FlywheelError(f"{path} is incomplete (no {self.marker} there): {self.run_first}")
        return path


def metrics_file(stage: str) -> Path:
    """metrics/<stage>.json: what every stage's run() returns, written by the CLI."""
    return METRICS_DIR / f"{stage}.json"


# ingest
INGESTED_RECORDS = Artifact(Path("data/interim/ingest/records.parquet"), "ingest")
INGESTED_PREFERENCES = Artifact(Path("data/interim/ingest/preferences.parquet"), "ingest")
QUARANTINE = Artifact(Path("data/interim/ingest/quarantine.jsonl"), "ingest")

# clean
CLEAN_RECORDS = Artifact(Path("data/interim/clean/records.parquet"), "clean")
CLEAN_REMOVED = Artifact(Path("data/interim/clean/removed.parquet"), "clean")

# validate
VALIDATION_REPORT = Artifact(Path("reports/validate"), "validate", marker="index.html")

# split
TRAIN = Artifact(Path("data/processed/train.parquet"), "split")
EVAL = Artifact(Path("data/processed/eval.parquet"), "split")
TEST = Artifact(Path("data/processed/test.parquet"), "split")
SPLITS = {"train": TRAIN, "eval": EVAL, "test": TEST}
DECONTAMINATED = Artifact(Path("data/processed/decontaminated.parquet"), "split")

# base
BASE_MODEL = Artifact(Path("models/base"), "base", marker="source.json")

# retain
RETAIN = Artifact(Path("data/processed/retain.parquet"), "retain")
RETAIN_REMOVED = Artifact(Path("data/interim/retain/removed.jsonl"), "retain")

# finetune
SFT_MODEL = Artifact(Path("models/sft"), "finetune", marker="config.json")
SFT_CURVES = Artifact(Path("dvclive/finetune"), "finetune")

# preferences
PREFERENCES_TRAIN = Artifact(Path("data/processed/preferences/train.parquet"), "preferences")
PREFERENCES_EVAL = Artifact(Path("data/processed/preferences/eval.parquet"), "preferences")
PREFERENCE_SPLITS = {"train": PREFERENCES_TRAIN, "eval": PREFERENCES_EVAL}
PREFERENCES_REMOVED = Artifact(Path("data/interim/preferences/removed.jsonl"), "preferences")

# reward: a directory with only README.md (no config.json) when no reward model was trained
REWARD_MODEL = Artifact(Path("models/reward"), "reward", marker="README.md")
REWARD_CURVES = Artifact(Path("dvclive/reward"), "reward")

# rlhf
ALIGNED_MODEL = Artifact(Path("models/aligned"), "rlhf", marker="config.json")
# Its name in the model registry (dvc.yaml's artifacts), which serving also answers to whatever
# version is deployed, as OpenAI's "gpt-4o" names whichever snapshot is current.
MODEL_NAME = "flywheel-model"
RLHF_CURVES = Artifact(Path("dvclive/rlhf"), "rlhf")

# evaluate
EVALUATION_REPORT = Artifact(Path("reports/evaluate/index.html"), "evaluate")
GATE = Artifact(METRICS_DIR / "gate.json", "evaluate")

# flywheel export: a serving artifact beside the pipeline (not a stage's output), served by llama.cpp
EXPORTS = Path("models/export")
EXPORT_GGUF = "model.gguf"  # the weights, tokenizer and chat template in one file
EXPORT_DESCRIPTION = "export.json"  # its source, size, context and (once judged) the gate's decision
