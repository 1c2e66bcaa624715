"""Small builders shared by the stage tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from flywheel.config import parse_params
from flywheel.data.records import RECORD_SCHEMA, content_id
from flywheel.orchestration.dvc_graph import load_stages
from tests.conftest import REPO

STAGES = tuple(load_stages(REPO / "dvc.yaml"))  # every stage of the pipeline, in dvc.yaml's order


def record(prompt: str, response: str, *, context: str | None = None, source: str = "test") -> dict:
    return {
        "id": content_id(prompt, response, context, None, []),
        "prompt": prompt,
        "response": response,
        "context": context,
        "system": None,
        "source": source,
        "license": "CC0-1.0",
        "ingested_at": datetime(2026, 1, 1, tzinfo=UTC),
        "metadata": json.dumps({"file": "test", "line": 1}),
    }


def write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), path)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def repo_params(**overrides):
    """The shipped params.yaml with some sections' keys replaced, e.g. clean={'strip_markup': False}."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_params(data)


# Training to the learning thresholds is test_finetune's and test_rlhf's job; where a test runs the
# whole pipeline, a fraction of an epoch shows each training stage runs in it.
QUICK_TRAINING = {
    "finetune.training.epochs": 0.2,
    "finetune.training.eval_examples": 10,
    "preferences.on_policy.prompts": 40,
    "rlhf.reward_model.training.epochs": 0.2,
    "rlhf.dpo.training.epochs": 0.2,
    "rlhf.eval_examples": 10,
    "evaluate.test_examples": 100,
    "evaluate.consistency.prompts": 10,
}


def experiments(project: Path) -> dict[str, dict]:
    """What `dvc exp show --all-commits` lists: each experiment's name -> its recorded data
    (params, metrics, rev)."""
    from flywheel.orchestration.runs import experiments as listed

    return listed(project)
