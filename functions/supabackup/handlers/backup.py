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
SUPABACKUP_SNS_TOPIC_ARN, and optionally SUPABACKUP_PROFILE and SUPABACKUP_KEEP_DAYS (how
far back a restore to a time must reach: the retention pass after the backup keeps every
change-capture base those days need; default 7).

Storage files: with SUPABACKUP_STORAGE_ENDPOINT (the template's StorageEndpoint), or an
event's "storage" (events.py), a backup also copies the project's Storage files
(SUPABACKUP_STORAGE_BUCKETS: only these buckets), with the S3 keys of the secret
SUPABACKUP_STORAGE_SECRET_ARN names (StorageSecretArn; JSON: access_key_id,
secret_access_key, region), else the database secret's storage_access_key_id,
storage_secret_access_key and storage_region. They are read before anything is stored:
a missing key, or an endpoint that is neither https nor on loopback, refuses the run.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ..errors import DuplicateRun
from ..report import backup_and_report
from ..retention import KEEP_DAYS_ENV, checked_keep_days
from .common import (
    Invocation,
    env_int,
    logger,
    metrics,
    read_secret,
    store,
    with_storage_keys,
)
from .events import parse_backup_event


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    kind = event.get("kind", "full") if isinstance(event, dict) else "full"
    run = Invocation(str(kind)[:32], "Backup")
    with run.refusing():
        request = parse_backup_event(event, os.environ.get("SUPABACKUP_PROFILE")
                                     ).with_time_limit(
            context.get_remaining_time_in_millis() / 1000)
        if request.files is not None:
            request = replace(request, files=replace(request.files, endpoint=with_storage_keys(
                request.files.endpoint, "SUPABACKUP_STORAGE_SECRET_ARN",
                "SUPABACKUP_DB_SECRET_ARN")))
        keep_days = checked_keep_days(env_int(KEEP_DAYS_ENV),
                                      f"the function's environment variable {KEEP_DAYS_ENV}")
        backups = store()
        conn = read_secret("SUPABACKUP_DB_SECRET_ARN")
    logger.set_correlation_id(request.backup_id)
    logger.info("backup starting", extra={
        "database": conn.display(), "label": request.label, "retention": request.retention,
        "storage": request.files.endpoint.display() if request.files else None})
    try:
        with run.running(conn.redact):
            manifest, outcome = backup_and_report(conn, backups, request, run.notify,
                                                  keep_days)
    except DuplicateRun as duplicate:
        logger.info("duplicate delivery, nothing done: %s", duplicate)
        metrics.add_metric(name="DuplicateSkipped", unit=MetricUnit.Count, value=1)
        return {"duplicate": True, "tick": request.tick, "message": duplicate.message}
    metrics.add_metric(name="BackupBytes", unit=MetricUnit.Bytes, value=manifest.total_bytes)
    metrics.add_metric(name="BackupDuration", unit=MetricUnit.Seconds,
                       value=outcome.duration_seconds)
    return run.succeeded(manifest.summary())
