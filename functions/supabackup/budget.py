"""A run's time budget: refuse a backup that cannot fit, and stop one that is running out.

Lambda kills a function at its timeout, wherever it is: no cleanup runs, no SNS message
is sent, and the multipart upload stays open until lifecycle aborts it a day later. So a
run with a time limit

  - estimates, once the database's size is known, how long it will take, from the pace
    of the recent backups of the same kind (seconds per byte of database, the median of
    the last three), and fails at once, saying so, when that does not fit;
  - arms a watchdog that stops pg_dump MARGIN seconds before the limit. The stream then
    ends badly, the upload aborts, nothing is committed, and the run reports that it ran
    out of time, while it still can.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import TimeLimitExceeded
from .manifest import Manifest
from .notify import human_bytes, human_duration

log = logging.getLogger(__name__)

MARGIN = 60.0   # seconds kept for aborting uploads, deleting objects and reporting
HISTORY = 3     # recent backups whose pace predicts this one


def estimate_seconds(history: list[Manifest], kind: str, database_size: int,
                     jobs: int | None = None) -> float | None:
    """How long a `kind` backup of `database_size` bytes should take, from recent ones.

    With `jobs` (the workers this run will have), a recent run that had more workers (a
    Fargate task's, before a Lambda run) counts as slower by their ratio: its streams
    carried the bytes side by side. Without that, a database that moved to Fargate
    would look fast enough to go back to Lambda, and run out of time there, every time.
    A run with fewer workers counts as it was (the estimate errs long, never short)."""
    recent = [m for m in history if m.kind == kind and m.database_size > 0
              and m.duration_seconds > 0][-HISTORY:]
    if not recent:
        return None

    def slower(m: Manifest) -> float:
        return max(1.0, m.jobs / jobs) if jobs and m.jobs > 0 else 1.0
    pace = statistics.median(m.duration_seconds / m.database_size * slower(m)
                             for m in recent)
    return pace * database_size


@dataclass
class Budget:
    """Seconds a run may take, counted from `started` (time.monotonic()). The default,
    no limit (the command line's), checks nothing and never expires, so a run asks its
    budget the same questions whether it has a limit or not."""

    seconds: float = math.inf
    started: float = field(default_factory=time.monotonic)
    margin: float = MARGIN
    expired: bool = False
    _stops: list[Callable[[], None]] = field(default_factory=list)
    _timer: threading.Timer | None = None

    @property
    def limited(self) -> bool:
        return not math.isinf(self.seconds)

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def check(self, kind: str, database_size: int, history: list[Manifest],
              jobs: int | None = None) -> None:
        """Fail now if the estimate does not fit in what is left before the margin."""
        estimate = estimate_seconds(history, kind, database_size, jobs)
        left = self.remaining() - self.margin
        if estimate is not None and estimate > left:
            raise TimeLimitExceeded(
                f"this {kind} backup would take about {human_duration(estimate)} "
                f"({human_bytes(database_size)} at the pace of the last backups), but "
                f"{human_duration(max(left, 0))} are left before the time limit",
                "raise the time limit (on Lambda FunctionTimeout, at most 900 s, and memory; "
                "on Fargate TaskTimeoutHours), give the stack TaskSubnetIds so that the "
                "state machine runs what does not fit on Fargate, or run `supabackup "
                "backup` where there is no limit")

    def on_expiry(self, stop: Callable[[], None]) -> None:
        """Call `stop` (kill pg_dump, cancel a scan) when the margin is reached."""
        if not self.limited:
            return
        if self.expired:
            stop()
            return
        self._stops.append(stop)
        if self._timer is None:
            self._timer = threading.Timer(max(self.remaining() - self.margin, 0), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        log.error("stopping the run %.0f s before its time limit", self.margin)
        for stop in self._stops:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - one stop failing must not spare the rest
                log.warning("stopping %s failed: %s", stop, exc)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def ran_out(self, kind: str) -> TimeLimitExceeded:
        return TimeLimitExceeded(
            f"the {kind} backup was stopped {self.margin:.0f} s before the time limit "
            f"({human_duration(self.seconds)}) and nothing of it was kept",
            "raise the time limit (on Lambda FunctionTimeout and memory; on Fargate "
            "TaskTimeoutHours), or run `supabackup backup` where there is no limit")
