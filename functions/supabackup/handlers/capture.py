"""Lambda entry point for change capture: every minute (the schedule), or by hand to start
it or see its status.

Thin: validate the event, read the direct connection's secret, call the engine, emit the
slot's health as metrics (the retained-WAL alarm watches them). A run reports to SNS only
what needs a person (report.capture_and_report).

Environment: SUPABACKUP_STORE, SUPABACKUP_CAPTURE_SECRET_ARN (a direct connection:
replication cannot use a pooler), SUPABACKUP_SNS_TOPIC_ARN, and optionally
SUPABACKUP_MAX_RETAINED_WAL (bytes: drop the slot and start over above it).
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from .. import capture
from ..backup import BackupRequest
from ..report import capture_and_report
from .common import Invocation, env_int, logger, metrics, read_secret, store
from .events import parse_capture_event


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    run = Invocation("capture", "Capture")
    with run.refusing():
        action = parse_capture_event(event)
        limit = env_int("SUPABACKUP_MAX_RETAINED_WAL") or None
        backups = store()
        conn = capture.require_direct(read_secret("SUPABACKUP_CAPTURE_SECRET_ARN"))
    database_id = os.environ.get("SUPABACKUP_DATABASE_ID") or conn.database_id
    with run.running(conn.redact):
        if action == "status":
            return capture.status(conn, backups, database_id)
        if action == "start":
            state, base = capture.start(conn, backups, BackupRequest(
                database_id=database_id, retention="weekly", label="change capture base"))
            return run.succeeded({"slot": state.slot, "plugin": state.plugin,
                                  "base": base.backup_id})
        result = capture_and_report(conn, backups, database_id, run.notify, limit)
    stored = result.segment.transactions if result.segment else 0
    metrics.add_metric(name="CapturedTransactions", unit=MetricUnit.Count, value=stored)
    if result.slot:
        metrics.add_metric(name="RetainedWalBytes", unit=MetricUnit.Bytes,
                           value=result.slot["retained_wal_bytes"])
        if result.slot.get("safe_wal_size") is not None:
            metrics.add_metric(name="SafeWalSize", unit=MetricUnit.Bytes,
                               value=result.slot["safe_wal_size"])
    if result.lost:
        metrics.add_metric(name="CaptureSlotLost", unit=MetricUnit.Count, value=1)
    return run.succeeded({"transactions": stored, "restarted": result.restarted,
                          "lost": result.lost, "slot": result.slot})
