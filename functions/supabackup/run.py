"""Run a backup and report how it ended: shared by the CLI and the Lambda handler.

This is the one place that records every run's outcome: it times the run, publishes one
SNS message whatever happens, and re-raises the failure for the caller to map to an exit
status (CLI) or a failed invocation (Lambda).
"""

from __future__ import annotations

import time

from .backup import BackupRequest, run_backup
from .dburl import ConnectionInfo
from .manifest import Manifest
from .notify import Notifier, Outcome
from .store import Store


def backup_and_report(conn: ConnectionInfo, store: Store, request: BackupRequest,
                      notifier: Notifier) -> tuple[Manifest, Outcome]:
    database = request.database_of(conn)
    started = time.monotonic()
    try:
        manifest = run_backup(conn, store, request)
    except BaseException as exc:
        notifier.publish(Outcome(kind=request.kind, database=database,
                                 duration_seconds=time.monotonic() - started, error=exc,
                                 scrub=conn.redact))
        raise
    outcome = Outcome(kind=request.kind, database=database,
                      duration_seconds=time.monotonic() - started, manifest=manifest)
    notifier.publish(outcome)
    return manifest, outcome
