"""Lambda entry point for verify runs: weekly after the full backup, or by hand.

Thin: validate the event, read the drill server's secret (when the stack has one), call
`verify_and_report` (which publishes the SNS outcome), emit metrics. Any problem fails the
invocation, so the Lambda Errors alarm sees it too.

A run that drills (the event asks for it and the stack has a drill server) also emits
DrillPassed: 1 when the newest backup (or the one asked for) restored on the drill server
and matched what it recorded, 0 when it did not (a mismatch, a failed restore, a drill not
run because the backup failed to verify, or a run that failed before the drill). The
dashboard shows the last one.

Environment: SUPABACKUP_STORE, SUPABACKUP_SNS_TOPIC_ARN, and optionally
SUPABACKUP_DRILL_SECRET_ARN (a scratch server the drill may create databases on) and
SUPABACKUP_DATABASE_ID (which database of the store; default: its only one).
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ..errors import VerifyFailed
from ..report import verify_and_report
from ..verify import VerifyReport
from .common import Invocation, database_in, logger, metrics, read_secret, store
from .events import parse_verify_event


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    run = Invocation("verify", "Verify")
    with run.refusing():
        request = parse_verify_event(event)
        backups = store()
        database_id = database_in(backups, request.database_id)
        drill = (read_secret("SUPABACKUP_DRILL_SECRET_ARN")
                 if request.drill and os.environ.get("SUPABACKUP_DRILL_SECRET_ARN") else None)
    logger.info("verify starting", extra={"database_id": database_id,
                                          "backup_id": request.backup_id,
                                          "drill": drill.display() if drill else None})
    report: VerifyReport | None = None
    try:
        with run.running(drill.redact if drill else str):
            report = verify_and_report(backups, database_id, run.notify, request.backup_id,
                                       drill)
    except VerifyFailed as failed:
        report = failed.report if isinstance(failed.report, VerifyReport) else None
        raise
    finally:
        if drill is not None:
            metrics.add_metric(name="DrillPassed", unit=MetricUnit.Count,
                               value=1 if drill_passed(report) else 0)
    return run.succeeded(report.summary())


def drill_passed(report: VerifyReport | None) -> bool:
    """Whether the run's drill restored its backup and found it as recorded. The drill runs
    only on a backup whose chain verified, so a problem named by its backup after that is
    the drill's own: a table that does not match, a Storage file that does not compare."""
    if report is None or report.drill is None:
        return False
    return report.drill.ok and not any(f.backup_id == report.drill.backup_id
                                       for f in report.findings)
