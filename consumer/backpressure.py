"""The rate-limit gate shared by every worker thread of a process.

An OpenAI 429 with Retry-After pauses new transcription starts across all workers, and the poller
stops receiving while the gate is closed (a received message would only burn a receive count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from consumer.errors import RetryableError

DEFAULT_PAUSE = 20.0  # a 429 without Retry-After; OpenAI's limits reset on a per-minute window
MAX_PAUSE = 300.0


class RateGate:
    """Closed until a deadline after a rate limit; `wait()` blocks transcription starts until then."""

    def __init__(self, stop: threading.Event, *, clock: Callable[[], float] = time.monotonic,
                 on_paused: Callable[[float], None] | None = None) -> None:
        self._stop = stop
        self._clock = clock
        self._until = 0.0
        self._lock = threading.Lock()
        self._on_paused = on_paused or (lambda seconds: None)

    def pause(self, seconds: float | None) -> None:
        """Close the gate for `seconds` (Retry-After), extending any pause already running."""
        seconds = min(MAX_PAUSE, DEFAULT_PAUSE if seconds is None else max(0.0, seconds))
        with self._lock:
            now = self._clock()
            added = max(0.0, now + seconds - max(self._until, now))
            self._until = max(self._until, now + seconds)
        self._on_paused(added)

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    def wait(self) -> None:
        """Block while closed; a shutdown while waiting raises, so the job is released, not started."""
        while (left := self.remaining()) > 0:
            if self._stop.wait(min(left, 1.0)):
                raise RetryableError("daemon is stopping", code="shutting_down", delay=0)
