"""Run a backup and report how it ended: shared by the CLI and the Lambda handler.

This is the one place that records every run's outcome: it times the run, publishes one
SNS message whatever happens (with what the retention pass after a good backup changed),
and re-raises the failure for the caller to map to an exit
status (CLI) or a failed invocation (Lambda).
"""

from __future__ import annotations

import logging
import time

from .backup import BackupRequest, run_backup
from .dburl import ConnectionInfo
from .errors import SupabackupError
from .manifest import Manifest
from .notify import Notifier, Outcome
from .retention import apply_retention
from .store import Store

log = logging.getLogger(__name__)


def _retention_pass(store: Store, manifest: Manifest) -> list[str]:
    """Re-tag after each backup; a failure is reported, never turned into a failed backup."""
    try:
        changes = apply_retention(store, manifest.database_id,
                                  store.manifests(manifest.database_id))
    except SupabackupError as exc:
        log.error("retention pass failed (the backup itself is committed): %s", exc)
        return [f"retention pass failed: {exc.message}"]
    return [str(c) for c in changes]


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
    retention = _retention_pass(store, manifest)
    outcome = Outcome(kind=request.kind, database=database,
                      duration_seconds=time.monotonic() - started, manifest=manifest,
                      retention=retention)
    notifier.publish(outcome)
    return manifest, outcome
