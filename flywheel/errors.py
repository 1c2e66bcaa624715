"""Errors that are meant for the user: the CLI prints them as one clear message and exits non-zero."""


class FlywheelError(Exception):
    """An expected failure (bad config, bad data, missing engine) with a message that names the fix."""


class ParamsError(FlywheelError):
    """params.yaml is missing, malformed, or does not match the typed schema."""


class StageFailed(FlywheelError):
    """A stage ran and its verdict is a failure (e.g. a critical expectation failed).

    `metrics` still describe the run: the CLI writes them before reporting the failure.
    """

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


class RolloutFailed(FlywheelError):
    """A new version failed a deploy check (health, smoke query, rollout); what served before
    still serves."""
