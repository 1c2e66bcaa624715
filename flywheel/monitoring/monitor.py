"""monitor: is the deployed model still healthy? (`flywheel monitor`, the flywheel_monitoring DAG)

One run judges the last `monitor.window_hours` of the request log:

  input drift    the window's distinct prompts against the training prompts, with Evidently:
                 text, embedding and descriptor drift, whose verdict's false-alarm rate stays
                 below drift.p_value (flywheel/monitoring/drift.py).
  output quality canaries (held-out test prompts sent to the live endpoint, judged against their
                 references by the evaluate stage's detector), self-consistency of a sample of
                 real prompts re-asked at temperature 1, empty and refusal rates of the logged
                 answers, and the share of "down" ratings in the window's feedback.
  operations     5xx share and p95 latency from the log.

Each check has a value, a threshold and pass/fail in metrics/monitor.json, and in Evidently
(flywheel/monitoring/dashboard.py): reports/monitoring/<time>.html holds every check with its
test, <time>-drift.html the drift detail, and both are runs of the workspace in
data/monitoring/workspace, whose dashboard has a panel per check (`make monitoring-ui`).
A window with fewer than `min_prompts` distinct prompts gets "insufficient data", not a verdict.
A window larger than `max_requests` is sampled uniformly (seeded) for the drift tests, whose power
only grows with the sample: the run stays well under a minute for 100,000 logged requests.

When a check fails in a run that may retrain (`flywheel monitor --retrain`, as the
flywheel_monitoring DAG runs it), and no retraining was asked for within `cooldown_hours`, the
window's traffic and feedback (already PII-redacted in the log) are exported to `export_dir`
(data/raw/feedback/, which the pipeline's DVC stages read) and the run asks for retraining:
`retrain` in its result, which the DAG turns into a triggered flywheel_training run. A run by hand
only judges: it used to export, say "asked for" and start the cooldown, so nothing retrained,
not even the DAG's next run.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flywheel import paths, scoring
from flywheel.config import MonitorParams, Params
from flywheel.errors import FlywheelError
from flywheel.io import atomic_path, write_json
from flywheel.monitoring.checks import Check, at_most
from flywheel.monitoring.drift import drift, prompt_of, reference_prompts, sample
from flywheel.serving.auth import CANARY_HEADER, CANARY_PREFIX, client_headers

REPORTS_DIR = Path("reports/monitoring")
STATE_DIR = Path("data/monitoring")
WORKSPACE_DIR = STATE_DIR / "workspace"
LAST_RETRAIN = STATE_DIR / "last_retrain.json"
INSUFFICIENT = "insufficient data"


# ---------------------------------------------------------------------------------------------
# The window


def load_window(request_log, end: datetime, hours: float) -> tuple[list[dict], list[dict]]:
    """User requests (canaries left out) and feedback in [end - hours, end)."""
    start = end - timedelta(hours=hours)
    requests = [
        row for row in request_log.requests_between(start, end) if not row["endpoint"].startswith(CANARY_PREFIX)
    ]
    return requests, request_log.feedback_between(start, end)


# ---------------------------------------------------------------------------------------------
# Output quality and operations


def share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def logged_quality(requests: list[dict], feedback: list[dict], config: MonitorParams) -> list[Check]:
    answers = [row["response"] or "" for row in requests if row["status"] == 200]
    ratings = [row["rating"] for row in feedback if row["rating"]]
    errors = sum(row["status"] >= 500 for row in requests)
    latencies = sorted(row["latency_ms"] for row in requests if row["latency_ms"] is not None)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
    return [
        at_most("empty_rate", share(sum(map(scoring.is_empty, answers)), len(answers)), config),
        at_most("refusal_rate", share(sum(map(scoring.is_refusal, answers)), len(answers)), config),
        at_most(
            "negative_feedback_rate",
            share(ratings.count("down"), len(ratings)),
            config,
            f"{len(ratings)} ratings in the window",
        ),
        at_most("error_rate", share(errors, len(requests)), config, f"{errors} 5xx of {len(requests)}"),
        at_most("latency_p95_ms", p95, config),
    ]


def endpoint_url(config: MonitorParams) -> str | None:
    if config.endpoint:
        return config.endpoint.rstrip("/")
    from flywheel.release import deploy

    state = deploy.load_state()
    return state.get("url") if state and state.get("target") != "kubernetes" else None


def _ask(url: str, messages: list[dict], temperature: float = 0.0) -> str:
    import httpx

    headers = {CANARY_HEADER: "1", **client_headers()}
    response = httpx.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        timeout=120,
        json={"model": paths.MODEL_NAME, "max_tokens": 64, "temperature": temperature, "messages": messages},
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def live_quality(url: str | None, requests: list[dict], embedder, params: Params) -> list[Check]:
    """Canaries judged against their references, and self-consistency of real prompts."""
    config = params.monitor
    if url is None:
        return [
            Check(
                "hallucination_rate",
                None,
                config.maximum.get("hallucination_rate"),
                None,
                "no live endpoint (deploy one, or set monitor.endpoint)",
            ),
            Check(
                "consistency_hallucination_rate",
                None,
                config.maximum.get("consistency_hallucination_rate"),
                None,
                "no live endpoint",
            ),
        ]
    import httpx
    import pyarrow.parquet as pq

    from flywheel import modeling
    from flywheel.evaluation import hallucination

    try:
        records = sample(pq.read_table(config.canary_source).to_pylist(), config.canaries, config.seed)
        # A canary is asked as evaluate asks it: with its system prompt, history and context.
        answers = [_ask(url, modeling.record_messages(record, with_response=False)) for record in records]
        asked = sample(
            [row["messages"] for row in requests if row["status"] == 200], config.consistency_prompts, config.seed
        )
        greedy = [_ask(url, messages) for messages in asked]
        drawn = [
            [_ask(url, messages, temperature=1.0) for _ in range(config.consistency_samples)] for messages in asked
        ]
    except (httpx.HTTPError, OSError) as error:
        raise FlywheelError(f"the live endpoint {url} did not answer the monitor: {error}") from None
    judged = [
        item["hallucinated"]
        for item in hallucination.reference_hallucinations(answers, records, embedder, params.evaluate.hallucination)
    ]
    judged = [flag for flag in judged if flag is not None]
    scores = hallucination.disagreement(greedy, drawn, embedder)
    return [
        at_most(
            "hallucination_rate",
            sum(judged) / len(judged) if judged else None,
            config,
            f"{len(records)} canaries from {config.canary_source}, {len(judged)} judged",
        ),
        at_most(
            "consistency_hallucination_rate",
            sum(s > config.consistency_threshold for s in scores) / len(scores) if scores else None,
            config,
            f"{len(asked)} real prompts x {config.consistency_samples} samples",
        ),
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
                handle.write(
                    json.dumps(
                        {
                            "request_id": row["id"],
                            "created_at": row["created_at"].isoformat(),
                            "model_version": row["model_version"],
                            "messages": row["messages"],
                            "response": row["response"],
                            "status": row["status"],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    return {
        "traffic": str(traffic_file),
        "traffic_requests": len(requests),
        "feedback": str(feedback_file),
        "feedback_events": feedback_count,
    }


def _slug(moment: datetime) -> str:
    return re.sub(r"[^0-9TZ]", "", moment.strftime("%Y%m%dT%H%M%SZ"))


# ---------------------------------------------------------------------------------------------
# The run


def run(params: Params, now: datetime | None = None, request_log=None, may_retrain: bool = False) -> dict:
    from flywheel.evaluation.hallucination import load_embedder
    from flywheel.serving.request_log import RequestLog

    config = params.monitor
    now = now or datetime.now(UTC)
    own_log = request_log is None
    request_log = request_log or RequestLog()
    try:
        requests, feedback = load_window(request_log, now, config.window_hours)
        result = {
            "at": now.isoformat(),
            "window_hours": config.window_hours,
            "requests": len(requests),
            "feedback_events": len(feedback),
            "retrain": None,
        }
        current = [prompt_of(row["messages"]) for row in sample(requests, config.max_requests, config.seed)]
        distinct = len(set(current))
        if distinct < config.min_prompts:
            return {
                **result,
                "verdict": INSUFFICIENT,
                "checks": [],
                "detail": f"{len(requests)} requests, {distinct} distinct prompts in the window; "
                f"a verdict needs {config.min_prompts} distinct prompts",
            }
        embedder = load_embedder(config.embedding_model)
        versions = _model_tags(requests)
        drift_checks, snapshot = drift(reference_prompts(config), current, embedder, config, versions)
        checks = (
            drift_checks
            + logged_quality(requests, feedback, config)
            + live_quality(endpoint_url(config), requests, embedder, params)
        )
        failed = [check.name for check in checks if check.passed is False]
        verdict = "failed" if failed else "passed"
        result.update(verdict=verdict, checks=[asdict(c) for c in checks], failed=failed, sampled_prompts=len(current))
        result.update(save_reports(checks, snapshot, [f"verdict:{verdict}", *versions], result, now))
        if failed and not may_retrain:
            result["retrain"] = {
                "triggered": False,
                "reason": f"monitoring failed: {', '.join(failed)}; a run without --retrain only judges "
                "(the flywheel_monitoring DAG retrains; the cooldown is left alone)",
            }
        elif failed:
            result["retrain"] = ask_for_retraining(failed, result["report"], requests, request_log, now, config)
        return result
    finally:
        if own_log:
            request_log.close()


def _model_tags(requests: list[dict]) -> list[str]:
    """The model versions that answered the window, as Evidently run tags."""
    return [f"model:{v}" for v in sorted({str(row["model_version"]) for row in requests if row.get("model_version")})]


def save_reports(checks: list[Check], drift_snapshot, tags: list[str], result: dict, now: datetime) -> dict:
    """The run's two Evidently snapshots (every check with its test; the drift detail) as HTML
    pages and as runs of the workspace's project, whose dashboard gets a panel per check."""
    from flywheel.monitoring import dashboard

    metadata = {"window_hours": str(result["window_hours"]), "requests": str(result["requests"])}
    checks_snapshot = dashboard.checks_snapshot(checks, tags, metadata)
    REPORTS_DIR.mkdir(parents=True, exist_ok=True)
    report, drift_report = REPORTS_DIR / f"{_slug(now)}.html", REPORTS_DIR / f"{_slug(now)}-drift.html"
    checks_snapshot.save_html(str(report))
    drift_snapshot.save_html(str(drift_report))
    dashboard.add_to_workspace(WORKSPACE_DIR, [checks_snapshot, drift_snapshot], checks)
    return {"report": str(report), "drift_report": str(drift_report), "tags": tags}


def ask_for_retraining(
    failed: list[str], report: str, requests: list[dict], request_log, now: datetime, config: MonitorParams
) -> dict:
    if in_cooldown(now, config):
        return {
            "triggered": False,
            "reason": f"cooldown: retraining was asked for within the last "
            f"{config.cooldown_hours:g} h ({LAST_RETRAIN})",
        }
    start = now - timedelta(hours=config.window_hours)
    exported = export_window(requests, request_log, start, Path(config.export_dir), _slug(now))
    retrain = {
        "triggered": True,
        "reason": f"monitoring failed: {', '.join(failed)}",
        "report": str(report),
        **exported,
    }
    write_json(LAST_RETRAIN, {"at": now.isoformat(), **retrain})
    return retrain


def report(result: dict) -> str:
    lines = [
        f"monitor: {result['verdict']} ({result['requests']:,} requests, "
        f"{result['feedback_events']:,} feedback events in the last {result['window_hours']:g} h)"
    ]
    if result["verdict"] == INSUFFICIENT:
        return "\n".join(lines + [f"  {result['detail']}"])
    for check in result["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[check["passed"]]
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        limit = "-" if check["threshold"] is None else f"{check['threshold']:g}"
        lines.append(f"  {mark} {check['name']:<32} {value:>9}  (threshold {limit})  {check['detail']}")
    lines.append(f"  reports: {result['report']} (every check), {result['drift_report']} (input drift)")
    lines.append(f"  tags: {', '.join(result['tags'])}; every run and a panel per check: make monitoring-ui")
    retrain = result.get("retrain")
    if retrain:
        lines.append(f"  retraining: {'asked for' if retrain['triggered'] else 'not asked for'}: {retrain['reason']}")
        if retrain["triggered"]:
            lines.append(
                f"  exported {retrain['traffic_requests']:,} requests to {retrain['traffic']} and "
                f"{retrain['feedback_events']:,} feedback events to {retrain['feedback']}"
            )
    return "\n".join(lines)
