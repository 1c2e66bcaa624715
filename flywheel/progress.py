"""A progress line now and then for loops that run minutes (generation, scoring): how far, how
long so far, about how long left. On-policy sampling was silent for 4 minutes on a busy machine."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, every_s: float = 30.0, stream=None, clock=time.monotonic):
        self.label, self.total, self.every_s = label, total, every_s
        self.stream, self.clock = stream or sys.stderr, clock
        self.done, self.started = 0, clock()
        self.last_shown = self.started

    def advance(self, count: int) -> None:
        self.done += count
        now = self.clock()
        if now - self.last_shown < self.every_s or self.done >= self.total:
            return
        self.last_shown = now
        elapsed = now - self.started
        left = elapsed * (self.total - self.done) / self.done
        print(
            f"  {self.label}: {self.done:,} of {self.total:,} ({elapsed:.0f} s, about {left:.0f} s left)",
            file=self.stream,
            flush=True,
        )
