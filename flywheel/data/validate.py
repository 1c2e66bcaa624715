"""validate: a Great Expectations suite, defined from params.yaml, run on the cleaned records.

Input:  data/interim/clean/records.parquet
Output: reports/validate/               Great Expectations Data Docs (open index.html): this run
                                        and the ones before it (the last RUNS_KEPT), each under
                                        its run's name; they draw offline
        metrics/validate.json           each expectation's outcome, observed value and severity
A failed critical expectation fails the stage, naming every failed expectation and a few
offending rows; a failed warning is reported and the stage passes.

A run is named by FLYWHEEL_RUN_NAME (an Airflow task sets it to the run id), else "local".
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from flywheel import paths
from flywheel.config import Params, ValidateParams
from flywheel.errors import StageFailed
from flywheel.pii import find_pii

PII_COLUMN = "pii_found"  # derived: the PII kinds the shared detector still finds in a row
RUNS_KEPT = 20  # validation runs the Data Docs list; older ones are dropped
RESULTS = ".results"  # inside the Data Docs: the earlier runs' validation results, for the next index
VENDOR = Path("infra/data-docs/vendor")  # the pages' scripts, styles and fonts (its README: what and why)
# Each CDN address GX's pages use -> its copy under VENDOR; GX's logo comes from its own static/.
_TABLE = "https://unpkg.com/bootstrap-table@{version}/dist/extensions/filter-control/bootstrap-table-filter-control"
_CDNJS = "https://cdnjs.cloudflare.com/ajax/libs"
OFFLINE_COPIES = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "js/jquery.min.js",
    f"{_CDNJS}/popper.js/1.12.9/umd/popper.min.js": "js/popper.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "js/bootstrap.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "css/bootstrap.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "js/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "css/bootstrap-table.min.css",
    _TABLE.format(version="1.19.1") + ".min.js": "js/bootstrap-table-filter-control.min.js",
    _TABLE.format(version="1.19.0") + ".min.css": "css/bootstrap-table-filter-control.min.css",
    _TABLE.format(version="1.19.0") + ".css": "css/bootstrap-table-filter-control.min.css",
    f"{_CDNJS}/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": "js/bootstrap-datepicker.min.js",
    f"{_CDNJS}/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": "css/bootstrap-datepicker.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "css/bootstrap-prefers-dark.min.css"
    ),
    f"{_CDNJS}/font-awesome/6.6.0/css/all.min.css": "css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "js/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "js/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "js/vega-embed.min.js",
}
REMOTE_LOGO = re.compile(r"https://great-expectations-web-assets\.s3[^\"']*/logo-long\.png[^\"']*")


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


def _run_checkpoint(frame, config: ValidateParams, project: Path, run_name: str):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage statistics leave the machine
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
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
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    (validation,) = result.run_results.values()
    return validation.results


# ---------------------------------------------------------------------------------------------
# The Data Docs: every kept run, offline


def _site(project: Path) -> Path:
    return project / "gx" / "uncommitted" / "data_docs" / "local_site"


def _store(project: Path) -> Path:
    return project / "gx" / "uncommitted" / "validations"


def _runs(validations: Path) -> list[Path]:
    """<suite>/<run name>/<run time> folders, oldest first (run times are UTC stamps)."""
    return sorted(validations.glob("*/*/*"), key=lambda run: run.name) if validations.is_dir() else []


def _bring_back_earlier_runs(published: Path, project: Path) -> None:
    """The last RUNS_KEPT - 1 runs' results and pages into a new GX project, so its index lists
    them beside this run (GX keeps runs in its project, which lasts one stage run here)."""
    for run in _runs(published / RESULTS)[-(RUNS_KEPT - 1) :]:
        relative = run.relative_to(published / RESULTS)
        shutil.copytree(run, _store(project) / relative)
        if (page := published / "validations" / relative).is_dir():
            shutil.copytree(page, _site(project) / "validations" / relative)


def _keep_results(project: Path) -> None:
    store = _store(project)
    for run in _runs(store):
        shutil.copytree(run, _site(project) / RESULTS / run.relative_to(store))


def _make_offline(site: Path, vendor: Path) -> None:
    """Point every page at the copies in static/vendor instead of CDNs (offline the index's table
    of runs is never drawn and the pass/fail icons vanish)."""
    shutil.copytree(vendor, site / "static" / "vendor", dirs_exist_ok=True)
    for page in site.rglob("*.html"):
        to_root = os.path.relpath(site, page.parent).replace(os.sep, "/")
        text = page.read_text()
        for address, copy in OFFLINE_COPIES.items():
            text = text.replace(f'"{address}"', f'"{to_root}/static/vendor/{copy}"')
        text = REMOTE_LOGO.sub(f"{to_root}/static/images/logo-long.png", text)
        # GX's run pages climb one folder too few to static/ (the favicon); every page from its depth.
        text = re.sub(r'((?:src|href)=")(?:\.\.?/)+static/', rf"\g<1>{to_root}/static/", text)
        text = re.sub(r'\s(integrity|crossorigin)="[^"]*"', "", text)  # hashes of the CDN files' bytes
        page.write_text(text)


def _vendor(root: Path) -> Path:
    """The project's copies; where root is not a checkout (a test's folder), this code's own."""
    return root / VENDOR if (root / VENDOR).is_dir() else Path(__file__).resolve().parents[2] / VENDOR


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
    published = root / paths.VALIDATION_REPORT
    with tempfile.TemporaryDirectory() as project:
        project = Path(project)
        _bring_back_earlier_runs(published, project)
        results = _run_checkpoint(frame, config, project, os.environ.get("FLYWHEEL_RUN_NAME") or "local")
        outcomes = [_outcome(result, config.failed_rows_shown) for result in results]
        _keep_results(project)
        _make_offline(_site(project), _vendor(root))
        _publish_docs(_site(project), published)
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
