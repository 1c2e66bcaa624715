"""validate: a Great Expectations suite, defined from params.yaml, run on the cleaned records.

Input:  data/interim/clean/records.parquet
Output: reports/validate/               Great Expectations Data Docs (open index.html)
        metrics/validate.json           each expectation's outcome, observed value and severity
A failed critical expectation fails the stage, naming every failed expectation and a few
offending rows; a failed warning is reported and the stage passes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flywheel import paths
from flywheel.config import Params, ValidateParams
from flywheel.errors import StageFailed
from flywheel.pii import find_pii

PII_COLUMN = "pii_found"  # derived: the PII kinds the shared detector still finds in a row


def build_suite(config: ValidateParams) -> list:
    """The expectations; each carries its check's name (in meta) and severity."""
    import great_expectations as gx

    expect = gx.expectations
    suite = []

    def add(check: str, expectation_type, **kwargs) -> None:
        suite.append(expectation_type(**kwargs, severity=config.severity_of(check), meta={"check": check}))

    add("columns", expect.ExpectTableColumnsToMatchSet, column_set=[*config.columns, PII_COLUMN], exact_match=True)
    for column in config.not_null:
        add("not_null", expect.ExpectColumnValuesToNotBeNull, column=column)
    for column in config.unique:
        add("unique", expect.ExpectColumnValuesToBeUnique, column=column)
    for column, (low, high) in config.lengths.items():
        add("lengths", expect.ExpectColumnValueLengthsToBeBetween, column=column, min_value=low, max_value=high)
    add("no_pii", expect.ExpectColumnValuesToBeNull, column=PII_COLUMN)
    add(
        "row_count", expect.ExpectTableRowCountToBeBetween, min_value=config.row_count[0], max_value=config.row_count[1]
    )
    add(
        "unique_prompt_share",
        expect.ExpectColumnProportionOfUniqueValuesToBeBetween,
        column="prompt",
        min_value=config.min_unique_prompt_share,
        max_value=1.0,
    )
    return suite


def with_pii_column(frame, columns: list[str]):
    def kinds(row) -> str | None:
        found = sorted({kind for column in columns if row[column] for kind in find_pii(row[column])})
        return ",".join(found) or None

    frame = frame.copy()
    frame[PII_COLUMN] = frame.apply(kinds, axis=1) if len(frame) else None
    return frame


def _outcome(result, shown: int) -> dict:
    config = result.expectation_config
    details = result.result or {}
    outcome = {
        "expectation": config.type,
        "check": config.meta["check"],
        "column": config.kwargs.get("column"),
        "severity": str(config.severity.value),
        "success": bool(result.success),
    }
    if "observed_value" in details:
        outcome["observed"] = details["observed_value"]
    if "unexpected_count" in details:
        outcome["unexpected_count"] = details["unexpected_count"]
        outcome["examples"] = details.get("partial_unexpected_index_list", [])[:shown]
    if result.exception_info and result.exception_info.get("raised_exception"):
        outcome["error"] = result.exception_info.get("exception_message")
        outcome["success"] = False
    return outcome


def _run_checkpoint(frame, config: ValidateParams, project: Path):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage statistics leave the machine
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(project))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset("cleaned_records")
        .add_batch_definition_whole_dataframe("all rows")
    )
    suite = gx.ExpectationSuite(name="cleaned_records")
    for expectation in build_suite(config):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="cleaned_records", data=batch, suite=context.suites.add(suite))
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": ["id"],
                "partial_unexpected_count": max(config.failed_rows_shown, 1),
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    docs = project / "gx" / "uncommitted" / "data_docs" / "local_site"
    return validation.results, docs


def _publish_docs(docs: Path, target: Path) -> None:
    """Replace the report directory with the freshly built Data Docs, never half-written."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(docs, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def run(params: Params, root: Path = Path(".")) -> dict:
    import pandas as pd

    config = params.validate_
    frame = with_pii_column(pd.read_parquet(paths.CLEAN_RECORDS.require(root)), config.no_pii_in)
    with tempfile.TemporaryDirectory() as project:
        results, docs = _run_checkpoint(frame, config, Path(project))
        outcomes = [_outcome(result, config.failed_rows_shown) for result in results]
        _publish_docs(docs, root / paths.VALIDATION_REPORT)
    return _verdict(outcomes, rows=len(frame))


def _verdict(outcomes: list[dict], rows: int) -> dict:
    failed = [o for o in outcomes if not o["success"]]
    critical = [o for o in failed if o["severity"] == "critical"]
    metrics = {
        "success": not critical,
        "rows": rows,
        "expectations": len(outcomes),
        "failed_critical": len(critical),
        "failed_warning": len(failed) - len(critical),
        "results": outcomes,
    }
    if critical:
        raise StageFailed(describe_failures(metrics), metrics)
    return metrics


def describe_failures(metrics: dict) -> str:
    lines = [
        f"{metrics['failed_critical']} critical expectation(s) failed on {metrics['rows']:,} "
        f"cleaned records (Data Docs: {paths.VALIDATION_REPORT}/index.html)"
    ]
    for outcome in metrics["results"]:
        if outcome["success"]:
            continue
        target = f" on {outcome['column']}" if outcome.get("column") else ""
        seen = (
            f"{outcome['unexpected_count']:,} offending rows"
            if "unexpected_count" in outcome
            else f"observed {outcome.get('observed')!r}"
        )
        lines.append(f"  [{outcome['severity']}] {outcome['expectation']}{target}: {seen}")
        for example in outcome.get("examples", []):
            lines.append(f"      e.g. {example}")
        if outcome.get("error"):
            lines.append(f"      error: {outcome['error']}")
    return "\n".join(lines)


def report(metrics: dict) -> str:
    lines = [
        f"validate: {metrics['expectations']} expectations on {metrics['rows']:,} records, "
        f"{metrics['failed_critical']} critical and {metrics['failed_warning']} warning failures"
    ]
    for outcome in metrics["results"]:
        if not outcome["success"]:
            observed = outcome.get("observed", outcome.get("unexpected_count"))
            lines.append(f"  warning: {outcome['expectation']} on {outcome.get('column')}: {observed}")
    lines.append(f"  Data Docs: {paths.VALIDATION_REPORT}/index.html")
    return "\n".join(lines)
