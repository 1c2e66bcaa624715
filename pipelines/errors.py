"""Errors that are meant for the user: the CLI prints them as one clear message and exits non-zero."""


class FlywheelError(Exception):
    """An expected failure (bad config, bad data, missing engine) with a message that names the fix."""


class ParamsError(FlywheelError):
    """params.yaml is missing, malformed, or does not match the typed schema."""
