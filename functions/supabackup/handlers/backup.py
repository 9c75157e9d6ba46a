"""Lambda entry point for scheduled and manual backups.

Thin: validate the event, read the database secret, call the engine through
`backup_and_report` (which publishes the SNS outcome), and emit metrics. A failure is
re-raised so the invocation fails: the Lambda Errors alarm sees it, and, as EventBridge
Scheduler invokes asynchronously, the function's EventInvokeConfig retries it once and
then sends the event to the dead-letter queue (see template.yaml).

Environment: SUPABACKUP_STORE (s3://BUCKET/PREFIX), SUPABACKUP_DB_SECRET_ARN,
SUPABACKUP_SNS_TOPIC_ARN, and optionally SUPABACKUP_PROFILE.
"""

from __future__ import annotations

import os
import time
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from ..dburl import ConnectionInfo
from ..errors import ConfigError, SupabackupError
from ..events import parse_backup_event
from ..manifest import new_backup_id, utcnow
from ..notify import Notifier, Outcome
from ..run import backup_and_report
from ..store import BOTO_CONFIG, Store, StoreURL

logger = Logger(service="supabackup")
metrics = Metrics(namespace="supabackup", service="supabackup")
# Clients are created lazily and can be replaced by tests (moto-backed) before a call.
clients: dict[str, Any] = {}


def client(service: str) -> Any:
    if service not in clients:
        clients[service] = boto3.client(service, config=BOTO_CONFIG)
    return clients[service]


def read_secret(arn: str) -> ConnectionInfo:
    try:
        secret = client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    except (ClientError, BotoCoreError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
        raise ConfigError(f"cannot read the database secret {arn}: {code}",
                          "check SUPABACKUP_DB_SECRET_ARN and the function's IAM role") from None
    return ConnectionInfo.from_secret(secret)


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"the function's environment lacks {name}", "redeploy the stack")
    return value


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    notifier = Notifier(os.environ.get("SUPABACKUP_SNS_TOPIC_ARN"), client("sns"))
    started = time.monotonic()
    kind = event.get("kind", "full") if isinstance(event, dict) else "full"
    metrics.add_dimension(name="kind", value=str(kind)[:32])
    try:
        request = parse_backup_event(event)
        if request.profile is None and os.environ.get("SUPABACKUP_PROFILE"):
            request = request.with_profile(os.environ["SUPABACKUP_PROFILE"])
        store = Store(StoreURL.parse(env("SUPABACKUP_STORE")), client("s3"))
        conn = read_secret(env("SUPABACKUP_DB_SECRET_ARN"))
    except SupabackupError as exc:
        # Bad input fails before the engine starts; it still gets its SNS message.
        logger.error("backup refused: %s", exc)
        notifier.publish(Outcome(kind=str(kind)[:32], database="unknown",
                                 duration_seconds=time.monotonic() - started, error=exc))
        metrics.add_metric(name="BackupFailed", unit=MetricUnit.Count, value=1)
        raise
    request = request.with_backup_id(new_backup_id(utcnow(), request.kind))
    logger.set_correlation_id(request.backup_id)
    logger.info("backup starting", extra={"database": conn.display(), "label": request.label,
                                          "retention": request.retention})
    try:
        manifest, outcome = backup_and_report(conn, store, request, notifier)
    except Exception as exc:
        metrics.add_metric(name="BackupFailed", unit=MetricUnit.Count, value=1)
        logger.error("backup failed: %s", conn.redact(str(exc)))
        raise
    finally:
        if notifier.failures:
            metrics.add_metric(name="NotifyFailed", unit=MetricUnit.Count, value=notifier.failures)
    metrics.add_metric(name="BackupSucceeded", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="BackupBytes", unit=MetricUnit.Bytes, value=manifest.total_bytes)
    metrics.add_metric(name="BackupDuration", unit=MetricUnit.Seconds,
                       value=outcome.duration_seconds)
    logger.info("backup committed", extra=manifest.summary())
    return manifest.summary()
