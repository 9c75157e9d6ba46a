"""What every Lambda handler shares: Powertools logger and metrics, AWS clients, the secret.

Clients are created lazily, once per execution environment, and tests replace them with
moto-backed ones (`clients`) before a call.
"""

from __future__ import annotations

import os
import time
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from ..catalog import resolve_database_id
from ..dburl import ConnectionInfo
from ..errors import ConfigError
from ..notify import Notifier, Outcome
from ..store import BOTO_CONFIG, Store, StoreURL

logger = Logger(service="supabackup")
metrics = Metrics(namespace="supabackup", service="supabackup")
clients: dict[str, Any] = {}


def client(service: str) -> Any:
    if service not in clients:
        clients[service] = boto3.client(service, config=BOTO_CONFIG)
    return clients[service]


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"the function's environment lacks {name}", "redeploy the stack")
    return value


def read_secret(variable: str) -> ConnectionInfo:
    """The database credentials in the secret whose ARN the variable `variable` holds."""
    arn = env(variable)
    try:
        secret = client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    except (ClientError, BotoCoreError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
        raise ConfigError(f"cannot read the database secret {arn}: {code}",
                          f"check {variable} and the function's IAM role") from None
    return ConnectionInfo.from_secret(secret)


def store() -> Store:
    return Store(StoreURL.parse(env("SUPABACKUP_STORE")), client("s3"))


def database_in(backups: Store, asked: str | None) -> str:
    """The database an event names, else SUPABACKUP_DATABASE_ID, else the store's only one."""
    return resolve_database_id(backups, asked or os.environ.get("SUPABACKUP_DATABASE_ID"))


def notifier() -> Notifier:
    return Notifier(os.environ.get("SUPABACKUP_SNS_TOPIC_ARN"), client("sns"))


def refuse(notify: Notifier, kind: str, error: Exception, started: float, metric: str) -> None:
    """Bad input fails before the engine starts; it still gets its SNS message and metric."""
    logger.error("%s refused: %s", kind, error)
    notify.publish(Outcome(kind=kind, database="unknown", error=error,
                           duration_seconds=time.monotonic() - started))
    metrics.add_metric(name=metric, unit=MetricUnit.Count, value=1)
