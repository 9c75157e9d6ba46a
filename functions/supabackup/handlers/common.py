"""What every Lambda handler shares: Powertools logger and metrics, AWS clients, the secret,
the function's environment, and the skeleton of an invocation (`Invocation`).

Clients are created lazily, once per execution environment, and tests replace them with
moto-backed ones (`clients`) before a call.
"""

from __future__ import annotations

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
from ..errors import ConfigError, SupabackupError
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
    arn = env(variable)
    try:
        secret = client("secretsmanager").get_secret_value(SecretId=arn).get("SecretString")
    except (ClientError, BotoCoreError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else type(exc).__name__
        raise ConfigError(f"cannot read the database secret {arn}: {code}",
                          f"check {variable} and the function's IAM role") from None
    if not secret:
        raise ConfigError(f"the database secret {arn} holds no text (SecretString)",
                          "store the connection as JSON text: host, port, username, password, "
                          "dbname")
    return ConnectionInfo.from_secret(secret)


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
        """Bad input fails before the engine starts; it still gets its SNS message."""
        try:
            yield
        except SupabackupError as exc:
            logger.error("%s refused: %s", self.metric.lower(), exc)
            self.notify.publish(Outcome(kind=self.kind, database="unknown", error=exc,
                                        duration_seconds=time.monotonic() - self.started))
            self.count("Failed")
            raise

    @contextmanager
    def running(self, scrub: Callable[[str], str] = str) -> Iterator[None]:
        """The engine's run (which publishes its own outcome): a failure is counted and
        logged with `scrub` applied, so no password reaches the log."""
        try:
            yield
        except Exception as exc:
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
