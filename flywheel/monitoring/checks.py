"""A monitoring check: one measured value against its threshold, passed, failed, or not measured."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.config import MonitorParams


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool | None  # None: not measured this run (e.g. no endpoint, no ratings)
    detail: str = ""
    rule: str = "<="  # how the value passes its threshold: "<=", ">=" or "<" (the Evidently test's)


def at_most(name: str, value: float | None, config: MonitorParams, detail: str = "") -> Check:
    limit = config.maximum.get(name)
    passed = None if value is None or limit is None else value <= limit
    return Check(name, value, limit, passed, detail)
