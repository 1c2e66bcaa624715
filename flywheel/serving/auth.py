"""Who may call the API, how often, and how the project's own clients identify themselves.

Standard library only: deploy's health checks and the monitor's canaries use it without loading
the server (FastAPI, SQLAlchemy, torch).

API keys: FLYWHEEL_API_KEYS (comma-separated) or a file named by FLYWHEEL_API_KEYS_FILE (one per
line); with neither, the API is open.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from flywheel.errors import FlywheelError

KEYS_VARIABLE = "FLYWHEEL_API_KEYS"
KEYS_FILE_VARIABLE = "FLYWHEEL_API_KEYS_FILE"
# The monitor's canary queries carry this header; the server logs their endpoint with the prefix,
# so they are not counted as user traffic.
CANARY_HEADER = "x-flywheel-canary"
CANARY_PREFIX = "canary:"


def load_api_keys() -> list[str]:
    keys = [k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()]
    path = os.environ.get(KEYS_FILE_VARIABLE)
    if path:
        try:
            keys += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise FlywheelError(f"{KEYS_FILE_VARIABLE}={path}: cannot read it ({error.strerror})") from None
    return keys


def client_headers() -> dict[str, str]:
    """Headers for this project's own clients of the API (deploy's checks, the monitor's
    canaries): the first configured key as a bearer token, none when the API is open."""
    keys = load_api_keys()
    return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def key_name(key: str) -> str:
    """What the log and metrics call a key: a hash prefix, never the key."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class RateLimiter:
    """A token bucket per client: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int):
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            allowed = tokens >= 1
            self._buckets[client] = (tokens - 1 if allowed else tokens, now)
            return allowed
