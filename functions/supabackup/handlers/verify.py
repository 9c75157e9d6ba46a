"""Lambda entry point for verify runs: weekly after the full backup, or by hand.

Thin: validate the event, read the drill server's secret (when the stack has one), call
`verify_and_report` (which publishes the SNS outcome), emit metrics. Any problem fails the
invocation, so the Lambda Errors alarm sees it too.

Environment: SUPABACKUP_STORE, SUPABACKUP_SNS_TOPIC_ARN, and optionally
SUPABACKUP_DRILL_SECRET_ARN (a scratch server the drill may create databases on) and
SUPABACKUP_DATABASE_ID (which database of the store; default: its only one).
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from ..report import verify_and_report
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
    with run.running(drill.redact if drill else str):
        report = verify_and_report(backups, database_id, run.notify, request.backup_id, drill)
    return run.succeeded(report.summary())
