"""Lambda entry point for change capture: on a schedule (by default every 5 minutes, each
run streaming for just under 5: the schedule's event says {"action": "run", "for": 285}),
or by hand to start it or see its status. A run streams for its "for" or until the
invocation's remaining time less RUN_MARGIN, whichever comes first; the capture lease
makes a run that overlaps the one before it wait for it, or leave.

Thin: validate the event, read the direct connection's secret, call the engine, emit the
slot's health as metrics (the retained-WAL alarm watches them). A run reports to SNS only
what needs a person (report.capture_and_report).

Every run (the "run" action) also emits CaptureLagSeconds: now less the time restores to a
time reach (the run's covered_through; for a run that stored nothing of its own, as one
that left to the run holding the lease, or one that failed, the stored progress of the
running epoch). It grows while runs fail, so the dashboard shows an outage as it lasts.

Environment: SUPABACKUP_STORE, SUPABACKUP_CAPTURE_SECRET_ARN (a direct connection:
replication cannot use a pooler), SUPABACKUP_SNS_TOPIC_ARN, and optionally
SUPABACKUP_MAX_RETAINED_WAL (bytes: drop the slot and start over above it) and
SUPABACKUP_KEEP_DAYS (how far back a restore to a time must reach: a run that starts a new
epoch runs the retention pass, which keeps every base those days need; default 7).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from .. import capture
from ..backup import BackupRequest
from ..capture.drain import CaptureRun
from ..capture.state import read_progress, read_state
from ..capture.stream import FlushPolicy
from ..manifest import parse_time, utcnow
from ..report import capture_and_report
from ..retention import KEEP_DAYS_ENV, checked_keep_days
from ..store import Store
from .common import Invocation, env_int, logger, metrics, read_secret, store
from .events import parse_capture_event

RUN_MARGIN = 20.0  # seconds a streaming run leaves of its invocation for its last flush


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    run = Invocation("capture", "Capture")
    with run.refusing():
        request = parse_capture_event(event)
        action = request.action
        seconds = (None if request.seconds is None else
                   min(float(request.seconds),
                       context.get_remaining_time_in_millis() / 1000 - RUN_MARGIN))
        policy = FlushPolicy(interval=float(request.flush_interval or FlushPolicy.interval))
        limit = env_int("SUPABACKUP_MAX_RETAINED_WAL") or None
        keep_days = checked_keep_days(env_int(KEEP_DAYS_ENV),
                                      f"the function's environment variable {KEEP_DAYS_ENV}")
        backups = store()
        conn = capture.require_direct(read_secret("SUPABACKUP_CAPTURE_SECRET_ARN"))
    database_id = os.environ.get("SUPABACKUP_DATABASE_ID") or conn.database_id
    result: CaptureRun | None = None
    try:
        with run.running(conn.redact):
            if action == "status":
                return capture.status(conn, backups, database_id, keep_days)
            if action == "start":
                state, base = capture.start(conn, backups, BackupRequest(
                    database_id=database_id, retention="weekly", label="change capture base"))
                return run.succeeded({"slot": state.slot, "plugin": state.plugin,
                                      "base": base.backup_id})
            result = capture_and_report(conn, backups, database_id, run.notify, limit,
                                        seconds=seconds, policy=policy, keep_days=keep_days)
    finally:
        if action == "run":  # whether the run stored, left or failed
            covered = (result.covered_through if result is not None else None
                       ) or stored_coverage(backups, database_id)
            if covered is not None:
                metrics.add_metric(name="CaptureLagSeconds", unit=MetricUnit.Seconds,
                                   value=max(0.0, (utcnow() - covered).total_seconds()))
    stored = result.transactions
    metrics.add_metric(name="CapturedTransactions", unit=MetricUnit.Count, value=stored)
    if result.slot:
        metrics.add_metric(name="RetainedWalBytes", unit=MetricUnit.Bytes,
                           value=result.slot["retained_wal_bytes"])
        if result.slot.get("safe_wal_size") is not None:
            metrics.add_metric(name="SafeWalSize", unit=MetricUnit.Bytes,
                               value=result.slot["safe_wal_size"])
    if result.lost:
        metrics.add_metric(name="CaptureSlotLost", unit=MetricUnit.Count, value=1)
    return run.succeeded({"transactions": stored, "segments": result.segments,
                          "restarted": result.restarted, "lost": result.lost,
                          "left": result.left, "slot": result.slot,
                          "covered_through": result.covered_through.isoformat()
                          if result.covered_through else None})


def stored_coverage(backups: Store, database_id: str) -> datetime | None:
    """How far the running epoch's stored progress says restores reach (None when capture
    is not started, or the store cannot say: the lag is then not emitted, and the run's
    own failure, if any, is what the invocation reports)."""
    try:
        state = read_state(backups, database_id)
        progress = read_progress(backups, database_id, state) if state else None
        return parse_time(progress.verified_at) if progress else None
    except Exception as exc:  # noqa: BLE001 - never hides the run's own outcome
        logger.warning("capture lag unknown: cannot read the capture progress: %s", exc)
        return None
