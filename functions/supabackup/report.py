"""Run a backup, a verify, a restore or a capture run and report how it ended: shared by
the CLI and Lambda.

This is the one place that records every run's outcome: it times the run, publishes one
SNS message whatever happens (with what the retention pass after a good backup changed,
what verify found, what a restore read; a capture run, every minute, only when a person
is needed), and re-raises the failure for the caller to map to an exit status (CLI) or a
failed invocation (Lambda).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from . import capture
from .backup import BackupRequest, run_backup
from .capture import CaptureRun
from .capture.lifecycle import REBASE_EVERY
from .capture.pointintime import PointInTimeReport, restore_to_time
from .capture.stream import FlushPolicy
from .catalog import RestorePoint
from .dburl import ConnectionInfo
from .errors import CaptureError, DuplicateRun, SupabackupError, VerifyFailed
from .files.retain import sweep_files
from .manifest import Manifest
from .notify import Notifier, Outcome
from .restore import RestoreOptions, RestoreReport, run_restore
from .retention import KEEP_DAYS, apply_retention
from .store import Store
from .verify import VerifyReport, verify_database

log = logging.getLogger(__name__)


def _retention_pass(store: Store, database_id: str, keep_days: int = KEEP_DAYS) -> list[str]:
    """Re-tag after each backup and each new capture epoch (keeping the bases a restore to
    any time of the last `keep_days` days needs), then remove the stored Storage files no
    backup lists (files/retain.py); a failure is reported, never turned into a failed run."""
    try:
        changes = [str(c) for c in apply_retention(store, store.manifests(database_id),
                                                   keep_days)]
        swept = sweep_files(store, database_id)
    except SupabackupError as exc:
        log.error("retention pass failed (what the run stored is committed): %s", exc)
        return [f"retention pass failed: {exc.message}"]
    return changes + ([str(swept)] if swept is not None and swept.files else [])


def backup_and_report(conn: ConnectionInfo, store: Store, request: BackupRequest,
                      notifier: Notifier, keep_days: int = KEEP_DAYS
                      ) -> tuple[Manifest, Outcome]:
    database = request.database_of(conn)
    started = time.monotonic()
    try:
        manifest = run_backup(conn, store, request)
    except DuplicateRun:
        raise  # a repeated delivery: the first one reports, this one says nothing
    except BaseException as exc:
        notifier.publish(Outcome(kind=request.kind, database=database,
                                 duration_seconds=time.monotonic() - started, error=exc,
                                 scrub=conn.redact))
        raise
    retention = _retention_pass(store, manifest.database_id, keep_days)
    outcome = Outcome(kind=request.kind, database=database,
                      duration_seconds=time.monotonic() - started, manifest=manifest,
                      retention=retention)
    notifier.publish(outcome)
    return manifest, outcome


def verify_and_report(store: Store, database_id: str, notifier: Notifier,
                      backup_id: str | None = None,
                      drill: ConnectionInfo | None = None) -> VerifyReport:
    """Verify (and drill); any problem fails the run with a message that names the first."""
    started = time.monotonic()
    scrub = drill.redact if drill is not None else str
    report: VerifyReport | None = None
    try:
        report = verify_database(store, database_id, backup_id, drill)
        if not report.ok:
            more = len(report.findings) - 1
            raise VerifyFailed(f"{report.findings[0]}" + (f" (and {more} more problem(s))"
                                                          if more else ""),
                               "restore from a backup that verifies; see the problems listed",
                               report)
    except BaseException as exc:
        notifier.publish(Outcome(kind="verify", database=database_id, error=exc, scrub=scrub,
                                 duration_seconds=time.monotonic() - started,
                                 details=report.summary() if report is not None else None))
        raise
    headline = f"{len(report.verified)} backup(s) whole"
    if report.capture is not None:
        headline += f"; change capture: {report.capture.segments} segment(s) whole"
    if report.drill is not None:
        headline += f"; drill: {report.drill.tables} tables match"
    notifier.publish(Outcome(kind="verify", database=database_id, headline=headline,
                             duration_seconds=time.monotonic() - started,
                             details=report.summary()))
    return report


def restore_and_report(store: Store, point: RestorePoint, target: ConnectionInfo,
                       notifier: Notifier, options: RestoreOptions | None = None
                       ) -> RestoreReport | PointInTimeReport:
    """Restore what `point` names (a backup, or a time by replaying capture), and say on
    SNS which it was, what was restored where and what is not as of that point; or why
    it failed."""
    started = time.monotonic()
    asked = {"at": point.at, "target": target.display(),
             "method": point.method}
    try:
        report: RestoreReport | PointInTimeReport
        if point.replay:
            assert point.when is not None
            point.check(options)
            report = restore_to_time(store, point.database_id, target, point.when)
        else:
            assert point.manifest is not None
            report = run_restore(store, point.manifest, target, options)
            if point.when is not None:
                report.notes.insert(0, point.describe())
    except BaseException as exc:
        notifier.publish(Outcome(kind="restore", database=point.database_id, error=exc,
                                 scrub=target.redact, details=asked,
                                 duration_seconds=time.monotonic() - started))
        raise
    headline = f"{point.describe().removeprefix('restoring ')} into {target.display()}" + (
        f"; {len(report.inexact)} thing(s) not as of that point" if report.inexact else "")
    notifier.publish(Outcome(kind="restore", database=point.database_id,
                             duration_seconds=time.monotonic() - started, headline=headline,
                             details={**asked, "backup_id": report.backup_id,
                                      "inexact": report.inexact, "lines": report.lines()}))
    return report


def capture_and_report(conn: ConnectionInfo, store: Store, database_id: str,
                       notifier: Notifier, max_retained_wal: int | None = None,
                       seconds: float | None = None, policy: FlushPolicy | None = None,
                       keep_days: int = KEEP_DAYS,
                       rebase_every: timedelta | None = REBASE_EVERY) -> CaptureRun:
    """One change-capture run. It runs all the time, so SNS hears only what needs a
    person: a failed run, a lost slot (naming the times no restore can reach now), a
    new epoch after a schema change, and a rebase that failed. A run that left because
    another drainer holds the lease says nothing: the schedule overlaps runs on purpose.

    A run that started a new epoch (a restart, or a rebase that handed over) runs the
    retention pass, only then (the pass reads every manifest): the new base is held, and
    so is the ended epoch's for `keep_days`."""
    started = time.monotonic()
    try:
        result = capture.run(conn, store, database_id, max_retained_wal=max_retained_wal,
                             seconds=seconds, policy=policy, rebase_every=rebase_every)
    except BaseException as exc:
        notifier.publish(Outcome(kind="capture", database=database_id, error=exc,
                                 scrub=conn.redact, duration_seconds=time.monotonic() - started))
        raise
    retention = (_retention_pass(store, database_id, keep_days)
                 if result.restarted or result.rebased else [])
    if result.lost:
        notifier.publish(Outcome(
            kind="capture", database=database_id, duration_seconds=time.monotonic() - started,
            error=CaptureError(f"changes lost since the last capture run: "
                                   f"{result.restarted}; a new base was taken; no restore "
                                   f"can reach the times from {result.lost_window}",
                                   "check what dropped or invalidated the slot (max_slot_wal_"
                                   "keep_size, a manual drop); restores after the new base "
                                   "are whole again"),
            details={"slot": result.slot, "lost_window": result.lost_window,
                     "retention_changes": retention}))
    elif result.restarted:
        notifier.publish(Outcome(kind="capture", database=database_id,
                                 duration_seconds=time.monotonic() - started,
                                 headline=f"{result.restarted}: a new base was taken",
                                 details={"slot": result.slot,
                                          "retention_changes": retention}))
    if result.rebase_error:  # capture went on in the old epoch; the window still holds
        notifier.publish(Outcome(
            kind="capture", database=database_id, duration_seconds=time.monotonic() - started,
            error=CaptureError(f"{result.rebase_error}; capture goes on in the old epoch",
                               "the next run tries again; until a rebase works, restores "
                               "replay ever more changes, and changes older than the "
                               "window plus 2 days expire (restores into them refuse)"),
            details={"slot": result.slot}))
    return result
