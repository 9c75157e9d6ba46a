"""One SNS message per run, on success and on failure.

The subject reads well in an email; the body is JSON (the manifest summary, or the error
and what to do); message attributes `status`, `kind` and `database` let a subscription
filter for failures only. Publishing never turns a good backup into a failed one: a
publish error is logged and counted, and the run's own outcome stands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from .errors import SupabackupError
from .manifest import Manifest

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
else:
    SNSClient = Any

log = logging.getLogger(__name__)
SUBJECT_MAX = 100  # SNS's limit


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


BACKUP_KINDS = ("full", "incremental")


@dataclass(frozen=True)
class Outcome:
    """How one run ended: a manifest (backups), a report (verify, restore), or an error."""

    kind: str                  # full | incremental | verify | restore
    database: str
    duration_seconds: float
    manifest: Manifest | None = None
    error: BaseException | None = None
    scrub: Callable[[str], str] = str  # removes secrets from error text
    retention: list[str] = field(default_factory=list)  # what the retention pass re-tagged
    details: dict[str, Any] | None = None  # verify and restore: what the run found
    headline: str = ""         # verify and restore: the subject's tail on success

    @property
    def status(self) -> str:
        return "succeeded" if self.error is None else "failed"

    @property
    def what(self) -> str:
        kind = self.manifest.kind if self.manifest is not None else self.kind
        return f"{kind} backup" if kind in BACKUP_KINDS else kind

    def subject(self) -> str:
        head = f"supabackup: {self.what} of {self.database} {self.status}"
        if self.manifest is not None and self.manifest.escalation:
            head += " (escalated)"  # the body says why
        if self.error is not None:
            text = f"{head}: {self.scrub(error_message(self.error))}"
        elif self.manifest is not None:
            text = (f"{head}: {human_bytes(self.manifest.total_bytes)} in "
                    f"{human_duration(self.duration_seconds)}")
            if self.manifest.kind == "incremental":
                text += f", {self.manifest.tables_dumped} of {len(self.manifest.tables)} tables"
            files = self.manifest.files
            if files is not None:
                text += f", {len(files.files)} files" + (
                    "; files INCOMPLETE" if not files.complete else "") + (
                    f"; {len(files.out_of_step())} out of step" if files.out_of_step() else "")
        else:
            text = f"{head}: {self.headline}" if self.headline else head
        text = " ".join(text.split()).encode("ascii", "replace").decode()
        return text if len(text) <= SUBJECT_MAX else text[: SUBJECT_MAX - 3] + "..."

    def body(self) -> dict[str, Any]:
        kind = self.manifest.kind if self.manifest is not None else self.kind
        body: dict[str, Any] = {"status": self.status, "kind": kind,
                                "database": self.database,
                                "duration_seconds": round(self.duration_seconds, 1)}
        if self.manifest is not None:
            body["backup"] = self.manifest.summary()
            body["retention_changes"] = self.retention
        if self.details is not None:
            body["details"] = self.details
        if self.error is not None:
            body["error"] = self.scrub(error_message(self.error))
            body["error_type"] = type(self.error).__name__
            body["what_to_do"] = self.scrub(error_hint(self.error))
        return body


def error_message(error: BaseException | None) -> str:
    if isinstance(error, SupabackupError):
        return error.message
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM in a task: no bug
        return str(error) or "interrupted"
    return f"unexpected {type(error).__name__}: {error}"


def error_hint(error: BaseException | None) -> str:
    if isinstance(error, SupabackupError) and error.hint:
        return error.hint
    if isinstance(error, KeyboardInterrupt):
        return ("run it again: a backup stopped on Fargate Spot runs once more on demand by "
                "itself; a restore goes into a new, empty database")
    return "see the function's logs for the traceback, and report it if it recurs"


class Notifier:
    """Publishes outcomes to one SNS topic; a Notifier without a topic stays silent."""

    def __init__(self, topic_arn: str | None, client: SNSClient | None = None) -> None:
        self.topic_arn = topic_arn
        self._client = client
        self.failures = 0

    @property
    def client(self) -> SNSClient:
        if self._client is None:
            from .store import aws_client
            self._client = aws_client("sns")
        return self._client

    def publish(self, outcome: Outcome) -> bool:
        if not self.topic_arn:
            return False
        try:
            body = outcome.body()
            self.client.publish(
                TopicArn=self.topic_arn,
                Subject=outcome.subject(),
                Message=json.dumps(body, indent=2, default=str),
                MessageAttributes={
                    "status": {"DataType": "String", "StringValue": outcome.status},
                    "kind": {"DataType": "String", "StringValue": body["kind"]},
                    "database": {"DataType": "String", "StringValue": outcome.database},
                },
            )
            return True
        except (ClientError, BotoCoreError, SupabackupError) as exc:
            self.failures += 1
            log.error("could not publish the run's outcome to SNS: %s", exc)
            return False
