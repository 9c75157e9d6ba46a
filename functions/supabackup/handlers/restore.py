"""Lambda entry point for restores on demand, into the database named by the stack's secret.

Thin: validate the event (which backup, which tables, which profile; never a credential),
read the target's secret, call `restore_and_report` (which publishes the SNS outcome).
A dry run returns the plan and touches no database. A restore must fit in the function's
timeout (15 minutes at most); larger databases restore with the CLI.

Environment: SUPABACKUP_STORE, SUPABACKUP_RESTORE_SECRET_ARN (the target: an empty
database, or a fresh Supabase project with "profile": "supabase"), SUPABACKUP_SNS_TOPIC_ARN,
and optionally SUPABACKUP_DATABASE_ID.
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ..catalog import select_backup
from ..errors import SupabackupError
from ..events import parse_restore_event
from ..restore import describe_plan
from ..run import restore_and_report
from .common import database_in, logger, metrics, notifier, read_secret, refuse, store


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    notify = notifier()
    started = time.monotonic()
    metrics.add_dimension(name="kind", value="restore")
    try:
        request = parse_restore_event(event)
        backups = store()
        database_id = database_in(backups, request.database_id)
        manifest = select_backup(backups, database_id, request.at)
        if request.dry_run:
            return {"backup_id": manifest.backup_id, "dry_run": True,
                    "plan": describe_plan(backups, manifest, request.options)}
        target = read_secret("SUPABACKUP_RESTORE_SECRET_ARN")
    except SupabackupError as exc:
        refuse(notify, "restore", exc, started, "RestoreFailed")
        raise
    logger.set_correlation_id(manifest.backup_id)
    logger.info("restore starting", extra={"backup_id": manifest.backup_id,
                                           "target": target.display(),
                                           "tables": list(request.options.tables),
                                           "profile": request.options.profile})
    try:
        report = restore_and_report(backups, manifest, target, notify, request.options)
    except Exception as exc:
        metrics.add_metric(name="RestoreFailed", unit=MetricUnit.Count, value=1)
        logger.error("restore failed: %s", target.redact(str(exc)))
        raise
    metrics.add_metric(name="RestoreSucceeded", unit=MetricUnit.Count, value=1)
    logger.info("restore succeeded", extra={"lines": report.lines()})
    return {"backup_id": manifest.backup_id, "target": report.target, "bytes": report.bytes,
            "lines": report.lines()}
