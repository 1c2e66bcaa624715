"""monitor: is the deployed model still healthy? (`flywheel monitor`, the flywheel_monitoring DAG)

One run judges the last `monitor.window_hours` of the request log:

  input drift    the window's distinct prompts against the training prompts (each record's user
                 turn, as a client sends it), with Evidently 0.7: text drift (its domain
                 classifier: ROC AUC of telling the two apart from the text), embedding drift (the
                 same classifier on all-MiniLM-L6-v2 embeddings, computed offline), and K-S drift
                 of offline descriptors (length, word count, non-letter share from Evidently; digit
                 share and questions, ours). Each signal is a test at drift.p_value / 3 (the AUCs
                 against what chance gives at the window's size, see chance_auc); any one drifts
                 the verdict, whose false-alarm rate therefore stays below drift.p_value.
  output quality canaries (held-out test prompts sent to the live endpoint, judged against their
                 references by the evaluate stage's detector), self-consistency of a sample of
                 real prompts re-asked at temperature 1, empty and refusal rates of the logged
                 answers, and the share of "down" ratings in the window's feedback.
  operations     5xx share and p95 latency from the log.

Each check has a value, a threshold and pass/fail in metrics/monitor.json; the Evidently report of
the run is written to reports/monitoring/<time>.html and added to the Evidently workspace in
data/monitoring/workspace (`make monitoring-ui`). A window with fewer than `min_prompts` distinct
prompts gets "insufficient data", not a verdict. A window larger than `max_requests` is sampled
uniformly (seeded) for the drift tests, whose power only grows with the sample: the run stays well
under a minute for 100,000 logged requests. What a verdict catches at which window size is
measured by benchmarks/monitor_drift.py.

When a check fails, and no retraining was asked for within `cooldown_hours`, the window's traffic
and feedback (already PII-redacted in the log) are exported to `export_dir` (data/raw/feedback/,
which the pipeline's DVC stages read) and the run asks for retraining: `retrain` in its result,
which the DAG turns into a triggered flywheel_training run.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flywheel.evaluation import scoring
from flywheel.config import MonitorParams, Params
from flywheel.errors import FlywheelError
from flywheel.io import atomic_path, write_json

REPORTS_DIR = Path("reports/monitoring")
STATE_DIR = Path("data/monitoring")
WORKSPACE_DIR = STATE_DIR / "workspace"
LAST_RETRAIN = STATE_DIR / "last_retrain.json"
WORKSPACE_PROJECT = "flywheel"
INSUFFICIENT = "insufficient data"


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool | None  # None: not measured this run (e.g. no endpoint, no ratings)
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# The window


def prompt_of(messages: list[dict]) -> str:
    """What the user asked last: the text comparable to a training prompt."""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1].get("content") or "" if messages else "")


def load_window(request_log, end: datetime, hours: float) -> tuple[list[dict], list[dict]]:
    """User requests (canaries left out) and feedback in [end - hours, end)."""
    from flywheel.serving.request_log import CANARY_PREFIX

    start = end - timedelta(hours=hours)
    requests = [row for row in request_log.requests_between(start, end)
                if not row["endpoint"].startswith(CANARY_PREFIX)]
    return requests, request_log.feedback_between(start, end)


def sample(items: list, limit: int, seed: int) -> list:
    return items if len(items) <= limit else random.Random(seed).sample(items, limit)


def reference_prompts(config: MonitorParams) -> list[str]:
    import pyarrow.parquet as pq

    path = Path(config.reference)
    if not path.is_file():
        raise FlywheelError(f"monitor.reference {path} not found: run the pipeline first (dvc repro split)")
    from flywheel.modeling import record_messages

    # Each record's user turn as a client would send it (an instruction's input follows it after a
    # blank line): that, not the bare `prompt` column, is what prompt_of() reads from the log.
    records = pq.read_table(path, columns=["prompt", "context"]).to_pylist()
    prompts = [prompt_of(record_messages(record, with_response=False)) for record in records]
    # Distinct prompts, as drift() compares them.
    return sample(list(dict.fromkeys(p for p in prompts if p)), config.reference_size, config.seed)


# ---------------------------------------------------------------------------------------------
# Input drift, with Evidently


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
    from evidently.descriptors import (CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength,
                                       WordCount)

    columns = [f"embedding_{i}" for i in range(embeddings.shape[1])]
    frame = pd.concat([pd.DataFrame({"prompt": prompts}), pd.DataFrame(embeddings, columns=columns)], axis=1)
    definition = DataDefinition(text_columns=["prompt"], numerical_columns=columns,
                                embeddings={"prompt_embedding": columns})
    return Dataset.from_pandas(frame, data_definition=definition, descriptors=[
        TextLength("prompt", alias="length"), WordCount("prompt", alias="words"),
        NonLetterCharacterPercentage("prompt", alias="non_letter"),
        CustomColumnDescriptor("prompt", _digit_share, alias="digits"),
        CustomColumnDescriptor("prompt", _is_question, alias="question")])


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


def drift(reference: list[str], current: list[str], embedder, config: MonitorParams):
    """(checks, the Evidently snapshot) for the current prompts against the reference."""
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift

    # Distinct prompts on both sides: a prompt asked many times would otherwise sit on both sides
    # of the domain classifier's own train/test split, be learnt by heart and read as drift.
    reference, current = list(dict.fromkeys(reference)), list(dict.fromkeys(current))
    report = Report([ValueDrift(column="prompt"), EmbeddingsDrift(embeddings_name="prompt_embedding"),
                     *[ValueDrift(column=name, method="ks") for name in DESCRIPTORS]])
    snapshot = report.run(_dataset(current, embedder.encode(current)),
                          _dataset(reference, embedder.encode(reference)))
    values = [float(metric["value"]) for metric in snapshot.dict()["metrics"]]
    text_auc, embedding_auc, p_values = values[0], values[1], dict(zip(DESCRIPTORS, values[2:]))
    # Drifted when any signal is significant at p_value / 3: by the union bound the verdict's
    # false-alarm rate stays below p_value however the three signals correlate.
    alpha = config.drift.p_value / 3
    auc_limit = chance_auc(len(reference), len(current), alpha)
    descriptor_limit = alpha / len(DESCRIPTORS)  # five K-S tests make one signal
    drifted_descriptors = sorted(name for name, p in p_values.items() if p < descriptor_limit)
    signals = {"text": text_auc > auc_limit, "embeddings": embedding_auc > auc_limit,
               "descriptors": bool(drifted_descriptors)}
    sizes = f"{len(current)} distinct prompts against {len(reference)}"
    checks = [
        Check("text_drift_auc", text_auc, auc_limit, not signals["text"],
              f"Evidently domain classifier on the prompt text; {sizes}"),
        Check("embedding_drift_auc", embedding_auc, auc_limit, not signals["embeddings"],
              "Evidently classifier on all-MiniLM-L6-v2 embeddings"),
        Check("descriptor_drift_min_p", min(p_values.values()), descriptor_limit, not drifted_descriptors,
              "K-S p-values: " + ", ".join(f"{name} {p:.2g}" for name, p in p_values.items())),
    ]
    drifted = [name for name, hit in signals.items() if hit]
    checks.append(Check("input_drift", float(len(drifted)), 1.0, not drifted,
                        f"{len(drifted)} of 3 signals drifted ({', '.join(drifted) or 'none'})"))
    return checks, snapshot


# ---------------------------------------------------------------------------------------------
# Output quality and operations


def _maximum(name: str, value: float | None, config: MonitorParams, detail: str = "") -> Check:
    limit = config.maximum.get(name)
    passed = None if value is None or limit is None else value <= limit
    return Check(name, value, limit, passed, detail)


def logged_quality(requests: list[dict], feedback: list[dict], config: MonitorParams) -> list[Check]:
    answers = [row["response"] or "" for row in requests if row["status"] == 200]
    ratings = [row["rating"] for row in feedback if row["rating"]]
    errors = sum(row["status"] >= 500 for row in requests)
    latencies = sorted(row["latency_ms"] for row in requests if row["latency_ms"] is not None)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
    share = (lambda hits, total: hits / total if total else None)
    return [
        _maximum("empty_rate", share(sum(map(scoring.is_empty, answers)), len(answers)), config),
        _maximum("refusal_rate", share(sum(map(scoring.is_refusal, answers)), len(answers)), config),
        _maximum("negative_feedback_rate", share(ratings.count("down"), len(ratings)), config,
                 f"{len(ratings)} ratings in the window"),
        _maximum("error_rate", share(errors, len(requests)), config, f"{errors} 5xx of {len(requests)}"),
        _maximum("latency_p95_ms", p95, config),
    ]


def endpoint_url(config: MonitorParams) -> str | None:
    if config.endpoint:
        return config.endpoint.rstrip("/")
    from flywheel.release import deploy

    state = deploy.load_state()
    return state.get("url") if state and state.get("target") != "kubernetes" else None


def _ask(url: str, messages: list[dict], temperature: float = 0.0) -> str:
    import httpx

    from flywheel.serving.app import CANARY_HEADER, client_headers

    headers = {CANARY_HEADER: "1", **client_headers()}
    response = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "flywheel-model", "max_tokens": 64, "temperature": temperature,
        "messages": messages})
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def live_quality(url: str | None, requests: list[dict], embedder, params: Params) -> list[Check]:
    """Canaries judged against their references, and self-consistency of real prompts."""
    config = params.monitor
    if url is None:
        return [Check("hallucination_rate", None, config.maximum.get("hallucination_rate"), None,
                      "no live endpoint (deploy one, or set monitor.endpoint)"),
                Check("consistency_hallucination_rate", None,
                      config.maximum.get("consistency_hallucination_rate"), None, "no live endpoint")]
    import httpx
    import pyarrow.parquet as pq

    from flywheel.evaluation import evaluate
    from flywheel.evaluation import hallucination
    from flywheel import modeling

    try:
        records = sample(pq.read_table(config.canary_source).to_pylist(), config.canaries, config.seed)
        # A canary is asked as evaluate asks it: with its system prompt, history and context.
        answers = [_ask(url, modeling.record_messages(record, with_response=False)) for record in records]
        asked = sample([row["messages"] for row in requests if row["status"] == 200],
                       config.consistency_prompts, config.seed)
        greedy = [_ask(url, messages) for messages in asked]
        drawn = [[_ask(url, messages, temperature=1.0) for _ in range(config.consistency_samples)]
                 for messages in asked]
    except (httpx.HTTPError, OSError) as error:
        raise FlywheelError(f"the live endpoint {url} did not answer the monitor: {error}") from None
    judged = [item["hallucinated"] for item in
              evaluate.reference_hallucinations(answers, records, embedder, params.evaluate)]
    judged = [flag for flag in judged if flag is not None]
    scores = hallucination.disagreement(greedy, drawn, embedder)
    return [
        _maximum("hallucination_rate", sum(judged) / len(judged) if judged else None, config,
                 f"{len(records)} canaries from {config.canary_source}, {len(judged)} judged"),
        _maximum("consistency_hallucination_rate",
                 sum(s > config.consistency_threshold for s in scores) / len(scores) if scores else None,
                 config, f"{len(asked)} real prompts x {config.consistency_samples} samples"),
    ]


# ---------------------------------------------------------------------------------------------
# Closing the loop


def in_cooldown(now: datetime, config: MonitorParams) -> bool:
    if not LAST_RETRAIN.is_file():
        return False
    last = datetime.fromisoformat(json.loads(LAST_RETRAIN.read_text())["at"])
    return now - last < timedelta(hours=config.cooldown_hours)


def export_window(requests: list[dict], request_log, start: datetime, directory: Path, stamp: str) -> dict:
    """The window's feedback, in the preferences stage's format, to <directory>/monitor-<time>.jsonl
    (the stage reads it on the next run), and its traffic to <directory>/traffic/ (a record of
    what was asked; the preferences stage reads only the directory's own *.jsonl). Both were
    PII-redacted when they were logged; both are under data/raw/feedback, a DVC dependency."""
    feedback_file = directory / f"monitor-{stamp}.jsonl"
    traffic_file = directory / "traffic" / f"monitor-{stamp}.jsonl"
    feedback_count = request_log.export_feedback(feedback_file, since=start)
    with atomic_path(traffic_file) as tmp:
        with open(tmp, "w") as handle:
            for row in requests:
                handle.write(json.dumps({"request_id": row["id"], "created_at": row["created_at"].isoformat(),
                                         "model_version": row["model_version"], "messages": row["messages"],
                                         "response": row["response"], "status": row["status"]},
                                        ensure_ascii=False) + "\n")
    return {"traffic": str(traffic_file), "traffic_requests": len(requests),
            "feedback": str(feedback_file), "feedback_events": feedback_count}


def _slug(moment: datetime) -> str:
    return re.sub(r"[^0-9TZ]", "", moment.strftime("%Y%m%dT%H%M%SZ"))


# ---------------------------------------------------------------------------------------------
# The run


def add_to_workspace(snapshot) -> None:
    from evidently.ui.workspace import Workspace

    workspace = Workspace.create(str(WORKSPACE_DIR))
    projects = [p for p in workspace.list_projects() if p.name == WORKSPACE_PROJECT]
    project = projects[0] if projects else workspace.create_project(WORKSPACE_PROJECT)
    workspace.add_run(project.id, snapshot)


def run(params: Params, now: datetime | None = None, request_log=None) -> dict:
    from flywheel.evaluation.hallucination import load_embedder
    from flywheel.serving.request_log import RequestLog

    config = params.monitor
    now = now or datetime.now(timezone.utc)
    own_log = request_log is None
    request_log = request_log or RequestLog()
    try:
        requests, feedback = load_window(request_log, now, config.window_hours)
        result = {"at": now.isoformat(), "window_hours": config.window_hours, "requests": len(requests),
                  "feedback_events": len(feedback), "retrain": None}
        current = [prompt_of(row["messages"]) for row in sample(requests, config.max_requests, config.seed)]
        distinct = len(set(current))
        if distinct < config.min_prompts:
            return {**result, "verdict": INSUFFICIENT, "checks": [],
                    "detail": f"{len(requests)} requests, {distinct} distinct prompts in the window; "
                              f"a verdict needs {config.min_prompts} distinct prompts"}
        embedder = load_embedder(config.embedding_model)
        drift_checks, snapshot = drift(reference_prompts(config), current, embedder, config)
        checks = drift_checks + logged_quality(requests, feedback, config) + \
            live_quality(endpoint_url(config), requests, embedder, params)
        report = REPORTS_DIR / f"{_slug(now)}.html"
        REPORTS_DIR.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(report))
        add_to_workspace(snapshot)
        failed = [check.name for check in checks if check.passed is False]
        result.update(verdict="failed" if failed else "passed", checks=[asdict(c) for c in checks],
                      failed=failed, report=str(report), sampled_prompts=len(current))
        if failed:
            result["retrain"] = ask_for_retraining(failed, report, requests, request_log, now, config)
        return result
    finally:
        if own_log:
            request_log.close()


def ask_for_retraining(failed: list[str], report: Path, requests: list[dict], request_log,
                       now: datetime, config: MonitorParams) -> dict:
    if in_cooldown(now, config):
        return {"triggered": False, "reason": f"cooldown: retraining was asked for within the last "
                                              f"{config.cooldown_hours:g} h ({LAST_RETRAIN})"}
    start = now - timedelta(hours=config.window_hours)
    exported = export_window(requests, request_log, start, Path(config.export_dir), _slug(now))
    retrain = {"triggered": True, "reason": f"monitoring failed: {', '.join(failed)}",
               "report": str(report), **exported}
    write_json(LAST_RETRAIN, {"at": now.isoformat(), **retrain})
    return retrain


def report(result: dict) -> str:
    lines = [f"monitor: {result['verdict']} ({result['requests']:,} requests, "
             f"{result['feedback_events']:,} feedback events in the last {result['window_hours']:g} h)"]
    if result["verdict"] == INSUFFICIENT:
        return "\n".join(lines + [f"  {result['detail']}"])
    for check in result["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[check["passed"]]
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        limit = "-" if check["threshold"] is None else f"{check['threshold']:g}"
        lines.append(f"  {mark} {check['name']:<32} {value:>9}  (threshold {limit})  {check['detail']}")
    lines.append(f"  report: {result['report']} (all runs: make monitoring-ui)")
    retrain = result.get("retrain")
    if retrain:
        lines.append(f"  retraining: {'asked for' if retrain['triggered'] else 'not asked for'}: {retrain['reason']}")
        if retrain["triggered"]:
            lines.append(f"  exported {retrain['traffic_requests']:,} requests to {retrain['traffic']} and "
                         f"{retrain['feedback_events']:,} feedback events to {retrain['feedback']}")
    return "\n".join(lines)
