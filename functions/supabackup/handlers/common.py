"""What every Lambda handler shares: Powertools logger and metrics, AWS clients, the secret,
the function's environment, and the skeleton of an invocation (`Invocation`).

Clients are created lazily, once per execution environment, and tests replace them with
moto-backed ones (`clients`) before a call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from ..catalog import resolve_database_id
from ..dburl import ConnectionInfo
from ..errors import ConfigError
from ..files import StorageEndpoint
from ..notify import Notifier, Outcome
from ..store import Store, StoreURL, aws_client

logger = Logger(service="supabackup")
metrics = Metrics(namespace="supabackup", service="supabackup")
clients: dict[str, Any] = {}


def client(service: str) -> Any:
    if service not in clients:
        clients[service] = aws_client(service)
    return clients[service]


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"the function's environment lacks {name}", "redeploy the stack")
    return value


def env_int(name: str) -> int | None:
    """A whole number from the function's environment (None when unset or empty)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the function's environment variable {name} is not a whole number: "
                          f"{value[:40]!r}", "set it in the stack's parameters and redeploy"
                          ) from None


def read_secret(variable: str) -> ConnectionInfo:
    """The database credentials in the secret whose ARN the variable `variable` holds."""
    return ConnectionInfo.from_secret(_secret_text(variable, "database"))


def _secret_text(variable: str, what: str) -> str:
    """The text of the secret whose ARN the variable `variable` holds (`what`: its name in
    messages)."""
    arn = env(variable)
    try:
        secret = client("secretsmanager").get_secret_value(SecretId=arn).get("SecretString")
    except (ClientError, BotoCoreError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
        raise ConfigError(f"cannot read the {what} secret {arn}: {code}",
                          f"check {variable} and the function's IAM role") from None
    if not secret:
        raise ConfigError(f"the {what} secret {arn} holds no text (SecretString)",
                          "store the connection as JSON text: host, port, username, password, "
                          "dbname" if what == "database" else
                          "store the Storage S3 keys as JSON text: access_key_id, "
                          "secret_access_key, region")
    return str(secret)


STORAGE_KEYS = ("access_key_id", "secret_access_key", "region")
# The variables that name a secret of Storage keys, and the stack parameter behind each.
STORAGE_SECRETS = {"SUPABACKUP_STORAGE_SECRET_ARN": "StorageSecretArn",
                   "SUPABACKUP_TARGET_STORAGE_SECRET_ARN": "TargetStorageSecretArn"}


def with_storage_keys(endpoint: StorageEndpoint, variable: str, fallback: str
                      ) -> StorageEndpoint:
    """`endpoint` (as an event or the stack names it, without keys) with its S3 keys:
    those of the secret the variable `variable` names (JSON: access_key_id,
    secret_access_key, region), else the storage_access_key_id, storage_secret_access_key
    and storage_region of the database secret the variable `fallback` names. A missing
    key is named, never a value."""
    source, names, what = variable, list(STORAGE_KEYS), "Storage"
    if not os.environ.get(variable):
        source, names, what = fallback, [f"storage_{k}" for k in STORAGE_KEYS], "database"
    try:
        values = json.loads(_secret_text(source, what))
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, dict):
        raise ConfigError(f"the {what} secret {os.environ[source]} is not a JSON object",
                          f"store the Storage S3 keys in it as JSON: {', '.join(names)}")
    missing = [n for n in names if not str(values.get(n) or "").strip()]
    if missing:
        raise ConfigError(f"the Storage endpoint {endpoint.display()} needs its S3 keys: the "
                          f"{what} secret {os.environ[source]} ({source}) lacks "
                          f"{', '.join(missing)}",
                          "add them from the project's Storage settings (S3 access keys; the "
                          "region is the project's), or give the stack "
                          f"{STORAGE_SECRETS[variable]}")
    return StorageEndpoint.of(endpoint.url, values, names)


def store() -> Store:
    return Store(StoreURL.parse(env("SUPABACKUP_STORE")), client("s3"))


def database_in(backups: Store, asked: str | None) -> str:
    """The database an event names, else SUPABACKUP_DATABASE_ID, else the store's only one."""
    return resolve_database_id(backups, asked or os.environ.get("SUPABACKUP_DATABASE_ID"))


def notifier() -> Notifier:
    return Notifier(os.environ.get("SUPABACKUP_SNS_TOPIC_ARN"), client("sns"))


class Invocation:
    """What every handler does around the engine, so that each reads: parse, call, report.

        run = Invocation("restore", "Restore")
        with run.refusing():          # bad input: SNS message, metric, re-raised
            request = parse_restore_event(event)
        with run.running(target.redact):   # the engine publishes its own outcome
            report = restore_and_report(...)
        run.succeeded()

    Failures are re-raised so the invocation fails and the Lambda Errors alarm sees it.
    """

    def __init__(self, kind: str, metric: str) -> None:
        self.kind = kind
        self.metric = metric
        self.notify = notifier()
        self.started = time.monotonic()
        # Powertools keeps dimensions when an invocation published no metric (a dry run, a
        # status call): each invocation starts from none, in a warm environment too.
        metrics.clear_metrics()
        metrics.add_dimension(name="kind", value=kind[:32])

    @contextmanager
    def refusing(self) -> Iterator[None]:
        """Bad input fails before the engine starts; it still gets its SNS message. So
        does anything else that fails here (a bug, a library's own error): no failure
        before the engine may go unreported."""
        try:
            yield
        except Exception as exc:
            logger.error("%s refused: %s", self.metric.lower(), exc)
            self.notify.publish(Outcome(kind=self.kind, database="unknown", error=exc,
                                        duration_seconds=time.monotonic() - self.started))
            self.count("Failed")
            raise

    @contextmanager
    def running(self, scrub: Callable[[str], str] = str) -> Iterator[None]:
        """The engine's run (which publishes its own outcome): a failure is counted and
        logged with `scrub` applied, so no password reaches the log. So is a run stopped
        by a signal (an ECS task's SIGTERM, raised as a KeyboardInterrupt: handlers/task.py)."""
        try:
            yield
        except BaseException as exc:
            self.count("Failed")
            logger.error("%s failed: %s", self.metric.lower(), scrub(str(exc)))
            raise
        finally:
            if self.notify.failures:
                metrics.add_metric(name="NotifyFailed", unit=MetricUnit.Count,
                                   value=self.notify.failures)

    def count(self, outcome: str) -> None:
        metrics.add_metric(name=f"{self.metric}{outcome}", unit=MetricUnit.Count, value=1)

    def succeeded(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Count the success, log the summary, and return it as the invocation's result."""
        self.count("Succeeded")
        logger.info("%s succeeded", self.metric.lower(), extra=summary)
        return summary
