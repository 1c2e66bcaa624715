"""Every monitoring check in Evidently, where people look: the snapshot, its tests and the UI.

The drift report held input drift only; hallucination, consistency, feedback, latency, errors and
the retraining decision lived in CLI text and metrics/monitor.json, and the Evidently UI showed
an empty dashboard. Now each run adds two snapshots to the workspace, tagged with the model
versions that answered the window and the verdict:

  checks   one value per check (MeanValue of a one-row table) with an Evidently test at the
           check's threshold, so the snapshot passes and fails as the run does
  drift    Evidently's own drift report on the prompts (text, embeddings, descriptors)

and the project's dashboard gets a panel per check over time, created once and kept.
"""

from __future__ import annotations

import math
from pathlib import Path

from flywheel.monitoring.checks import Check

PROJECT = "flywheel"
TAB = "Checks"


def checks_snapshot(checks: list[Check], tags: list[str], metadata: dict):
    """The run's checks as an Evidently snapshot: a metric and a test per measured check."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    measured = [check for check in checks if check.value is not None and not math.isnan(check.value)]
    table = pd.DataFrame([{check.name: float(check.value) for check in measured}])
    data = Dataset.from_pandas(table, data_definition=DataDefinition(numerical_columns=list(table.columns)))
    report = Report([MeanValue(column=check.name, tests=_tests(check)) for check in measured], include_tests=True)
    return report.run(data, None, tags=tags, metadata=metadata, name="checks")


def _tests(check: Check) -> list:
    """The check's own rule as an Evidently test (none where it has no threshold)."""
    from evidently.tests import gte, lt, lte

    if check.threshold is None:
        return []
    return [{"<=": lte, ">=": gte, "<": lt}[check.rule](check.threshold)]


def add_to_workspace(workspace_dir: Path, snapshots: list, checks: list[Check]) -> None:
    from evidently.ui.workspace import Workspace

    workspace = Workspace.create(str(workspace_dir))
    projects = [p for p in workspace.list_projects() if p.name == PROJECT]
    project = projects[0] if projects else workspace.create_project(PROJECT)
    for snapshot in snapshots:
        workspace.add_run(project.id, snapshot)
    _add_missing_panels(project, checks)


def _add_missing_panels(project, checks: list[Check]) -> None:
    """A line over time per check, titled with its name; a panel that exists is left as it is."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    shown = {panel.title for panel in project.dashboard.model().panels}
    for check in checks:
        if check.name in shown:
            continue
        rule = f"passes at {check.rule} {check.threshold:g}" if check.threshold is not None else "no threshold"
        metric = PanelMetric(metric="MeanValue", metric_labels={"column": check.name}, legend=check.name)
        project.dashboard.add_panel(
            line_plot_panel(check.name, [metric], description=f"{rule}; {check.detail}"[:200], size="half"),
            tab=TAB,
        )
