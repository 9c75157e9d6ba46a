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

Storage files: an event's "target_storage" ({"endpoint": the target project's S3
endpoint}) writes the backup's files there after the database, and makes the target's
storage.objects the backup's rows. Its S3 keys (the target project's) are in the secret
SUPABACKUP_TARGET_STORAGE_SECRET_ARN names (TargetStorageSecretArn; JSON: access_key_id,
secret_access_key, region), else the restore target's secret's storage_access_key_id,
storage_secret_access_key and storage_region. A dry run reads no key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from ..catalog import describe_point, restore_point
from ..report import restore_and_report
from .common import (
    Invocation,
    database_in,
    logger,
    metrics,
    read_secret,
    store,
    with_storage_keys,
)
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
        options = request.options
        point.check(options)
        if options.storage is not None:
            options = replace(options, storage=with_storage_keys(
                options.storage, "SUPABACKUP_TARGET_STORAGE_SECRET_ARN",
                "SUPABACKUP_RESTORE_SECRET_ARN"))
        target = read_secret("SUPABACKUP_RESTORE_SECRET_ARN")
    logger.info("restore starting", extra={
        "restoring": point.describe(), "target": target.display(),
        "tables": list(options.tables), "profile": options.profile,
        "storage": options.storage.display() if options.storage else None})
    with run.running(target.redact):
        report = restore_and_report(backups, point, target, run.notify, options)
    files = getattr(report, "files", None)  # a restore to a time writes none
    return run.succeeded({"backup_id": report.backup_id, "at": request.at,
                          "method": point.method,
                          "target": target.display(), "lines": report.lines(),
                          **({"files": files.files} if files is not None else {})})
