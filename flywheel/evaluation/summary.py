"""summary: the numbers people compare between runs, in one small file (metrics/summary.json).

Every stage's own metrics file holds its detail (hundreds of values: counts by source and reason,
length statistics, per-category safety rates). Declared as DVC metrics, they flattened to 257
columns in `dvc exp show`; this stage's file is the only DVC metric, so `dvc exp show` and
`dvc metrics diff` fit a terminal, and the detail stays in metrics/<stage>.json.

A value a run did not produce (a stage skipped, a model not aligned) is null, never left out, so
the columns line up across runs.
"""

from __future__ import annotations

import json

from flywheel.config import get_dotted
from flywheel.paths import metrics_file

# summary key -> (stage, dotted key in metrics/<stage>.json)
SUMMARY = {
    "gate": ("gate", "decision"),
    "data.records": ("ingest", "records"),
    "data.quarantined": ("ingest", "quarantined"),
    "data.exact_duplicates": ("clean", "removed_by_reason.exact_duplicate"),
    "data.near_duplicates": ("clean", "removed_by_reason.near_duplicate"),
    "data.kept": ("clean", "kept"),
    "data.train": ("split", "train"),
    "finetune.eval_loss": ("finetune", "eval_loss_after"),
    "finetune.task_score": ("finetune", "task_score_after"),
    "reward.accuracy": ("reward", "pairwise_accuracy"),
    "dpo.preference_accuracy": ("rlhf", "aligned_model.preference_accuracy"),
    "dpo.kl_from_sft": ("rlhf", "kl_from_sft"),
    "model.task_score": ("evaluate", "models.candidate.task_score"),
    "model.hallucination_rate": ("evaluate", "models.candidate.hallucination_rate"),
    "model.safety_pass_rate": ("evaluate", "models.candidate.safety_pass_rate"),
    "model.perplexity": ("evaluate", "models.candidate.perplexity"),
}
STAGES = sorted({stage for stage, _ in SUMMARY.values()})


def run(params=None) -> dict:  # params: every stage is called with them; this one reads files only
    stages = {stage: _read(stage) for stage in STAGES}
    summary: dict = {}
    for key, (stage, path) in SUMMARY.items():
        section, name = key.split(".") if "." in key else (None, key)
        value = _value(stages[stage], path)
        (summary.setdefault(section, {}) if section else summary)[name] = _rounded(value)
    return summary


def _read(stage: str) -> dict:
    path = metrics_file(stage)
    return json.loads(path.read_text()) if path.is_file() else {}


def _value(data: dict, path: str):
    try:
        return get_dotted(data, path)
    except KeyError:
        return None


def _rounded(value):
    """Four significant decimals: the columns stay narrow, and no run differs only in noise digits."""
    return round(value, 4) if isinstance(value, float) else value


def report(summary: dict) -> str:
    model = summary["model"]
    return (
        f"summary: gate {summary['gate']}; task score {model['task_score']}, hallucination rate "
        f"{model['hallucination_rate']}, safety pass rate {model['safety_pass_rate']} -> metrics/summary.json"
    )
