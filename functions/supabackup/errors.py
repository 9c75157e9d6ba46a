"""One exception tree for the engine.

Every failure the engine expects is a `SupabackupError` with a message (what went wrong)
and a hint (what to do). The CLI turns them into one line on stderr and an exit status;
the Lambda handler into a failed invocation and an SNS message. Library code never exits.
"""

from __future__ import annotations

from typing import Any


class SupabackupError(Exception):
    """Base of every expected failure."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(SupabackupError):
    """Bad input: a malformed URL, event, profile or store address."""

    exit_code = 2


class ConnectionFailed(SupabackupError):
    """The database could not be reached or refused us."""


class ToolError(SupabackupError):
    """No suitable PostgreSQL client binary (pg_dump, pg_restore, ...) is available."""


class DumpFailed(SupabackupError):
    """pg_dump or pg_dumpall did not finish cleanly; nothing of the run is kept."""


class StoreError(SupabackupError):
    """The S3 store could not be read or written."""


class BackupNotFound(StoreError):
    """No committed backup matches what was asked for."""


class RestoreFailed(SupabackupError):
    """A restore did not complete; the target was left as the error describes, and
    `report` (a RestoreReport, when the restore got that far) says what it created."""

    report: Any = None


class VerifyFailed(SupabackupError):
    """Verify found a backup that would not restore as recorded; `report` says what."""

    def __init__(self, message: str, hint: str = "", report: Any = None) -> None:
        super().__init__(message, hint)
        self.report = report


class RunInProgress(SupabackupError):
    """Another run holds the database's lock (in the store, or in PostgreSQL)."""


class DuplicateRun(SupabackupError):
    """A second delivery of a schedule tick that already has (or is taking) its backup.

    Not a failure: the first delivery reports; the duplicate does nothing and says so.
    """

    exit_code = 0


class TimeLimitExceeded(SupabackupError):
    """The run would not fit, or did not fit, in the time it has (Lambda's limit)."""


class CaptureError(SupabackupError):
    """Change capture could not start, run or replay."""
