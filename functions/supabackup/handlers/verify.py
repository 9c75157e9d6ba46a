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
import time
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from ..errors import SupabackupError
from ..events import parse_verify_event
from ..run import verify_and_report
from .common import database_in, logger, metrics, notifier, read_secret, refuse, store


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    notify = notifier()
    started = time.monotonic()
    metrics.add_dimension(name="kind", value="verify")
    try:
        request = parse_verify_event(event)
        backups = store()
        database_id = database_in(backups, request.database_id)
        drill = (read_secret("SUPABACKUP_DRILL_SECRET_ARN")
                 if request.drill and os.environ.get("SUPABACKUP_DRILL_SECRET_ARN") else None)
    except SupabackupError as exc:
        refuse(notify, "verify", exc, started, "VerifyFailed")
        raise
    logger.info("verify starting", extra={"database_id": database_id,
                                          "backup_id": request.backup_id,
                                          "drill": drill.display() if drill else None})
    try:
        report = verify_and_report(backups, database_id, notify, request.backup_id, drill)
    except Exception as exc:
        metrics.add_metric(name="VerifyFailed", unit=MetricUnit.Count, value=1)
        logger.error("verify failed: %s", drill.redact(str(exc)) if drill else exc)
        raise
    metrics.add_metric(name="VerifySucceeded", unit=MetricUnit.Count, value=1)
    summary = report.summary()
    logger.info("verify succeeded", extra=summary)
    return summary
