"""Lambda entry point for scheduled and manual backups.

Thin: validate the event, read the database secret, call the engine through
`backup_and_report` (which publishes the SNS outcome), and emit metrics. A failure is
re-raised so the invocation fails: the Lambda Errors alarm sees it, and, as EventBridge
Scheduler invokes asynchronously, the function's EventInvokeConfig retries it once and
then sends the event to the dead-letter queue (see template.yaml).

A scheduled event carries its tick (the scheduled time): the backup id is derived from
it, so a second delivery of the same tick stops as a duplicate (a success that does
nothing; locks.py). The run's time limit is what the invocation has left (budget.py).

Environment: SUPABACKUP_STORE (s3://BUCKET/PREFIX), SUPABACKUP_DB_SECRET_ARN,
SUPABACKUP_SNS_TOPIC_ARN, and optionally SUPABACKUP_PROFILE.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ..errors import DuplicateRun, SupabackupError
from ..events import parse_backup_event
from ..manifest import new_backup_id, parse_time, utcnow
from ..run import backup_and_report
from .common import logger, metrics, notifier, read_secret, refuse, store


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    notify = notifier()
    started = time.monotonic()
    kind = event.get("kind", "full") if isinstance(event, dict) else "full"
    metrics.add_dimension(name="kind", value=str(kind)[:32])
    try:
        request = parse_backup_event(event)
        if request.profile is None and os.environ.get("SUPABACKUP_PROFILE"):
            request = request.with_profile(os.environ["SUPABACKUP_PROFILE"])
        backups = store()
        conn = read_secret("SUPABACKUP_DB_SECRET_ARN")
    except SupabackupError as exc:
        refuse(notify, str(kind)[:32], exc, started, "BackupFailed")
        raise
    # Every delivery of one schedule tick names the same backup; manual runs, the time now.
    when = parse_time(request.tick) if request.tick else utcnow()
    request = request.with_backup_id(new_backup_id(when, request.kind)).with_time_limit(
        context.get_remaining_time_in_millis() / 1000)
    logger.set_correlation_id(request.backup_id)
    logger.info("backup starting", extra={"database": conn.display(), "label": request.label,
                                          "retention": request.retention})
    try:
        manifest, outcome = backup_and_report(conn, backups, request, notify)
    except DuplicateRun as duplicate:
        logger.info("duplicate delivery, nothing done: %s", duplicate)
        metrics.add_metric(name="DuplicateSkipped", unit=MetricUnit.Count, value=1)
        return {"duplicate": True, "tick": request.tick, "message": duplicate.message}
    except Exception as exc:
        metrics.add_metric(name="BackupFailed", unit=MetricUnit.Count, value=1)
        logger.error("backup failed: %s", conn.redact(str(exc)))
        raise
    finally:
        if notify.failures:
            metrics.add_metric(name="NotifyFailed", unit=MetricUnit.Count, value=notify.failures)
    metrics.add_metric(name="BackupSucceeded", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="BackupBytes", unit=MetricUnit.Bytes, value=manifest.total_bytes)
    metrics.add_metric(name="BackupDuration", unit=MetricUnit.Seconds,
                       value=outcome.duration_seconds)
    logger.info("backup committed", extra=manifest.summary())
    return manifest.summary()
