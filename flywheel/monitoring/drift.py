"""Input drift: are the prompts people send still like the ones the model was trained on?

The window's distinct prompts are compared with the training prompts (each record's user turn, as
a client sends it) with Evidently 0.7: text drift (its domain classifier: ROC AUC of telling the
two apart from the text), embedding drift (the same classifier on all-MiniLM-L6-v2 embeddings,
computed offline), and K-S drift of offline descriptors (length, word count, non-letter share
from Evidently; digit share and questions, ours). Each signal is a test at drift.p_value / 3 (the
AUCs against what chance gives at the window's size, see chance_auc); any one drifts the verdict,
whose false-alarm rate therefore stays below drift.p_value. What a verdict catches at which window
size is measured by benchmarks/monitor_drift.py.
"""

from __future__ import annotations

import random
from pathlib import Path

from flywheel.config import MonitorParams
from flywheel.errors import FlywheelError
from flywheel.modeling import record_messages
from flywheel.monitoring.checks import Check


def prompt_of(messages: list[dict]) -> str:
    """What the user asked last: the text comparable to a training prompt."""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1].get("content") or "" if messages else "")


def sample(items: list, limit: int, seed: int) -> list:
    """At most `limit` of `items`, drawn uniformly and reproducibly for a seed."""
    return items if len(items) <= limit else random.Random(seed).sample(items, limit)


def _pull(path: Path) -> None:
    """The reference as the checkout's dvc.lock pins it, from the DVC cache or remote: training runs
    make it in workspaces of their own and push it there, not into this checkout."""
    import subprocess

    pulled = subprocess.run(["dvc", "pull", "--quiet", str(path)], capture_output=True, text=True)
    if pulled.returncode != 0 or not path.is_file():
        raise FlywheelError(
            f"monitor.reference {path} not found, and `dvc pull {path}` could not fetch it "
            f"({(pulled.stderr or pulled.stdout).strip()[:300]}): run the pipeline first (dvc repro split)"
        )


def reference_prompts(config: MonitorParams) -> list[str]:
    import pyarrow.parquet as pq

    path = Path(config.reference)
    if not path.is_file():
        _pull(path)
    # Each record's user turn as a client would send it (an instruction's input follows it after a
    # blank line): that, not the bare `prompt` column, is what prompt_of() reads from the log.
    records = pq.read_table(path, columns=["prompt", "context"]).to_pylist()
    prompts = [prompt_of(record_messages(record, with_response=False)) for record in records]
    # Distinct prompts, as drift() compares them.
    return sample(list(dict.fromkeys(p for p in prompts if p)), config.reference_size, config.seed)


def _digit_share(column):
    from evidently.core.datasets import DatasetColumn
    from evidently.legacy.core import ColumnType

    values = column.data.fillna("").map(lambda text: sum(c.isdigit() for c in text) / max(len(text), 1))
    return DatasetColumn(type=ColumnType.Numerical, data=values)


def _is_question(column):
    from evidently.core.datasets import DatasetColumn
    from evidently.legacy.core import ColumnType

    values = column.data.fillna("").map(lambda text: float(text.rstrip().endswith("?")))
    return DatasetColumn(type=ColumnType.Numerical, data=values)


DESCRIPTORS = ("length", "words", "non_letter", "digits", "question")


def _dataset(prompts: list[str], embeddings):
    import pandas as pd
    from evidently import DataDefinition, Dataset
    from evidently.descriptors import CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength, WordCount

    columns = [f"embedding_{i}" for i in range(embeddings.shape[1])]
    frame = pd.concat([pd.DataFrame({"prompt": prompts}), pd.DataFrame(embeddings, columns=columns)], axis=1)
    definition = DataDefinition(
        text_columns=["prompt"], numerical_columns=columns, embeddings={"prompt_embedding": columns}
    )
    return Dataset.from_pandas(
        frame,
        data_definition=definition,
        descriptors=[
            TextLength("prompt", alias="length"),
            WordCount("prompt", alias="words"),
            NonLetterCharacterPercentage("prompt", alias="non_letter"),
            CustomColumnDescriptor("prompt", _digit_share, alias="digits"),
            CustomColumnDescriptor("prompt", _is_question, alias="question"),
        ],
    )


def chance_auc(n_reference: int, n_current: int, p_value: float) -> float:
    """The ROC AUC a domain classifier exceeds with probability `p_value` by chance alone.

    Evidently's classifiers (text and embeddings) are fitted on a random half of the two samples
    and scored on the other half (train_test_split, test_size=0.5, random_state=42). When both
    samples come from one distribution the held-out AUC is the Mann-Whitney statistic of
    exchangeable scores: mean 0.5, variance (n1 + n2 + 1) / (12 n1 n2) for the n1 reference and
    n2 current prompts in that half. So the threshold adapts to the window: a fixed AUC cut-off
    would miss modest but real drift in large windows and fire by chance on small ones.
    """
    import numpy as np
    from scipy.stats import norm
    from sklearn.model_selection import train_test_split

    labels = np.r_[np.zeros(n_reference), np.ones(n_current)]
    _, held_out = train_test_split(labels, test_size=0.5, random_state=42, shuffle=True)
    n1, n2 = int((held_out == 0).sum()), int((held_out == 1).sum())
    return 0.5 + norm.isf(p_value) * ((n1 + n2 + 1) / (12 * n1 * n2)) ** 0.5


def drift(reference: list[str], current: list[str], embedder, config: MonitorParams, tags: list[str] = ()):
    """(checks, the Evidently snapshot, tagged with `tags`) for the current prompts against the reference."""
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift

    # Distinct prompts on both sides: a prompt asked many times would otherwise sit on both sides
    # of the domain classifier's own train/test split, be learnt by heart and read as drift.
    reference, current = list(dict.fromkeys(reference)), list(dict.fromkeys(current))
    report = Report(
        [
            ValueDrift(column="prompt"),
            EmbeddingsDrift(embeddings_name="prompt_embedding"),
            *[ValueDrift(column=name, method="ks") for name in DESCRIPTORS],
        ]
    )
    snapshot = report.run(
        _dataset(current, embedder.encode(current)),
        _dataset(reference, embedder.encode(reference)),
        tags=list(tags),
        name="drift",
    )
    values = [float(metric["value"]) for metric in snapshot.dict()["metrics"]]
    text_auc, embedding_auc, p_values = values[0], values[1], dict(zip(DESCRIPTORS, values[2:]))
    # Drifted when any signal is significant at p_value / 3: by the union bound the verdict's
    # false-alarm rate stays below p_value however the three signals correlate.
    alpha = config.drift.p_value / 3
    auc_limit = chance_auc(len(reference), len(current), alpha)
    descriptor_limit = alpha / len(DESCRIPTORS)  # five K-S tests make one signal
    drifted_descriptors = sorted(name for name, p in p_values.items() if p < descriptor_limit)
    signals = {
        "text": text_auc > auc_limit,
        "embeddings": embedding_auc > auc_limit,
        "descriptors": bool(drifted_descriptors),
    }
    sizes = f"{len(current)} distinct prompts against {len(reference)}"
    checks = [
        Check(
            "text_drift_auc",
            text_auc,
            auc_limit,
            not signals["text"],
            f"Evidently domain classifier on the prompt text; {sizes}",
        ),
        Check(
            "embedding_drift_auc",
            embedding_auc,
            auc_limit,
            not signals["embeddings"],
            "Evidently classifier on all-MiniLM-L6-v2 embeddings",
        ),
        Check(
            "descriptor_drift_min_p",
            min(p_values.values()),
            descriptor_limit,
            not drifted_descriptors,
            "K-S p-values: " + ", ".join(f"{name} {p:.2g}" for name, p in p_values.items()),
            rule=">=",
        ),
    ]
    drifted = [name for name, hit in signals.items() if hit]
    checks.append(
        Check(
            "input_drift",
            float(len(drifted)),
            1.0,
            not drifted,
            f"{len(drifted)} of 3 signals drifted ({', '.join(drifted) or 'none'})",
            rule="<",
        )
    )
    return checks, snapshot
