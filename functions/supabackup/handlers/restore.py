"""Lambda entry point for restores on demand, into the database named by the stack's secret.

Thin: validate the event (what to restore, which tables, which profile; never a
credential), read the target's secret, call `restore_and_report` (which publishes the SNS
outcome). "at" means what it means on the command line (catalog.restore_point): latest, a
backup id, or a time, replayed from change capture where capture covers it, else the
newest backup at or before it; the result and the SNS message say which. A dry run
returns the plan and touches no database. A restore must fit in the function's timeout
(15 minutes at most); larger databases restore with the CLI.

Environment: SUPABACKUP_STORE, SUPABACKUP_RESTORE_SECRET_ARN (the target: an empty
database, or a fresh Supabase project with "profile": "supabase"), SUPABACKUP_SNS_TOPIC_ARN,
and optionally SUPABACKUP_DATABASE_ID.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from ..catalog import describe_point, restore_point
from ..report import restore_and_report
from .common import Invocation, database_in, logger, metrics, read_secret, store
from .events import parse_restore_event


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    run = Invocation("restore", "Restore")
    with run.refusing():
        request = parse_restore_event(event)
        backups = store()
        point = restore_point(backups, database_in(backups, request.database_id), request.at)
        if request.dry_run:
            return {"at": request.at, "dry_run": True,
                    "backup_id": point.manifest.backup_id if point.manifest else None,
                    "method": point.method,
                    "plan": describe_point(backups, point, request.options)}
        point.check(request.options)
        target = read_secret("SUPABACKUP_RESTORE_SECRET_ARN")
    logger.info("restore starting", extra={"restoring": point.describe(),
                                           "target": target.display(),
                                           "tables": list(request.options.tables),
                                           "profile": request.options.profile})
    with run.running(target.redact):
        report = restore_and_report(backups, point, target, run.notify, request.options)
    return run.succeeded({"backup_id": report.backup_id, "at": request.at,
                          "method": point.method,
                          "target": target.display(), "lines": report.lines()})
