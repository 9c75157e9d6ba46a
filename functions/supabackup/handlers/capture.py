"""Lambda entry point for change capture: every minute (the schedule), or by hand to start
it or see its status.

Thin: validate the event, read the direct connection's secret, call the engine, emit the
slot's health as metrics (the retained-WAL alarm watches them). A run reports to SNS only
what needs a person (run.capture_and_report).

Environment: SUPABACKUP_STORE, SUPABACKUP_CAPTURE_SECRET_ARN (a direct connection:
replication cannot use a pooler), SUPABACKUP_SNS_TOPIC_ARN, and optionally
SUPABACKUP_MAX_RETAINED_WAL (bytes: drop the slot and start over above it).
"""

from __future__ import annotations

import os
import time
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from .. import cdc
from ..backup import BackupRequest
from ..errors import SupabackupError
from ..events import parse_capture_event
from ..run import capture_and_report
from .common import logger, metrics, notifier, read_secret, refuse, store


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    notify = notifier()
    started = time.monotonic()
    metrics.add_dimension(name="kind", value="capture")
    try:
        action = parse_capture_event(event)
        backups = store()
        conn = cdc.require_direct(read_secret("SUPABACKUP_CAPTURE_SECRET_ARN"))
    except SupabackupError as exc:
        refuse(notify, "capture", exc, started, "CaptureFailed")
        raise
    database_id = os.environ.get("SUPABACKUP_DATABASE_ID") or conn.database_id
    if action == "status":
        return cdc.status(conn, backups, database_id)
    if action == "start":
        state, base = cdc.start(conn, backups, BackupRequest(
            database_id=database_id, retention="weekly", label="change capture base"))
        return {"slot": state.slot, "plugin": state.plugin, "base": base.backup_id}
    limit = int(os.environ.get("SUPABACKUP_MAX_RETAINED_WAL") or 0) or None
    try:
        result = capture_and_report(conn, backups, database_id, notify, limit)
    except Exception as exc:
        metrics.add_metric(name="CaptureFailed", unit=MetricUnit.Count, value=1)
        logger.error("capture failed: %s", conn.redact(str(exc)))
        raise
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
    return {"transactions": stored, "restarted": result.restarted, "lost": result.lost,
            "slot": result.slot}
