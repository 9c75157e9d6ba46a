"""The `supabackup` command line (what users read is DESCRIPTION and EPILOG): parse flags
into options and call the engine.

Errors map to exit status and one clear line on stderr here, and only here:
0 success, 1 a failed run, 2 bad input, 70 an unexpected error (a bug: the traceback
follows with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from . import __version__, capture
from .backup import KINDS, BackupRequest
from .capture.stream import FlushPolicy
from .catalog import describe_point, resolve_database_id, restore_point
from .dburl import ConnectionInfo
from .errors import ConfigError, SupabackupError, VerifyFailed
from .files import CopyRequest, StorageEndpoint, files_lines, parse_buckets
from .files.endpoint import SOURCE_ENV as STORAGE_ENV
from .files.endpoint import TARGET_ENV as TARGET_STORAGE_ENV
from .manifest import RETENTION_CLASSES
from .notify import Notifier, human_bytes, human_duration
from .profiles import NAMES as PROFILE_NAMES
from .report import (
    backup_and_report,
    capture_and_report,
    restore_and_report,
    verify_and_report,
)
from .restore import RestoreOptions
from .retention import KEEP_DAYS, KEEP_DAYS_ENV, checked_keep_days
from .status import NEEDS_A_PERSON, Limits, screen, store_status
from .store import Store, StoreURL
from .tabledata import JOBS_ENV, checked_jobs
from .verify import VerifyReport

EXIT_BUG = 70

DESCRIPTION = """\
Verifiable backups of Supabase and PostgreSQL databases into your own S3 bucket:
full and incremental backups in one snapshot, restores of any backup or any point in
time, verify with restore drills, and change capture for point-in-time recovery."""

EPILOG = """\
examples:
  supabackup backup full --database-url "$URL" --store s3://BUCKET/PREFIX --label "pre-migration"
  supabackup list --store s3://BUCKET/PREFIX
  supabackup restore --store s3://BUCKET/PREFIX --target-url "$EMPTY_DB" --at latest
  supabackup restore --store s3://BUCKET/PREFIX --target-url "$EMPTY_DB" --at 2026-11-29T14:03:00Z
  supabackup verify --store s3://BUCKET/PREFIX --drill-url "$SCRATCH_SERVER"
  supabackup status --store s3://BUCKET/PREFIX    # exit 1 when something needs a person

--at TIME restores by replaying change capture where capture covers the time, else the
newest backup taken at or before it; the output says which. Exit status: 0 success,
1 a failed run, 2 bad input, 70 a bug (run again with --debug for the traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supabackup", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"supabackup {__version__}")
    parser.add_argument("--debug", action="store_true", help="log progress and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=os.environ.get("SUPABACKUP_STORE"),
                       help="s3://BUCKET/PREFIX (default: $SUPABACKUP_STORE)")
        p.add_argument("--database-id", help="which database in the store (default: derived "
                       "from the URL when backing up; the store's only one otherwise)")

    def sns_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sns-topic-arn", default=os.environ.get("SUPABACKUP_SNS_TOPIC_ARN"),
                       help="publish the outcome here (default: $SUPABACKUP_SNS_TOPIC_ARN)")

    def keep_days_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keep-days", default=os.environ.get(KEEP_DAYS_ENV), metavar="N",
                       help="how far back a restore to a time must reach: retention keeps "
                            "every change-capture base those days need (default: "
                            f"${KEEP_DAYS_ENV}, else {KEEP_DAYS})")

    def jobs_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--jobs", default=os.environ.get(JOBS_ENV), metavar="N",
                       help=f"{what} (default: ${JOBS_ENV}, else derived from the CPUs and "
                            "memory of this machine)")

    backup = sub.add_parser("backup", help="take a backup")
    backup.add_argument("kind", choices=KINDS)
    backup.add_argument("--database-url", default=os.environ.get("SUPABACKUP_DATABASE_URL"),
                        help="postgresql://USER:PASSWORD@HOST:PORT/DB "
                             "(default: $SUPABACKUP_DATABASE_URL)")
    store_flag(backup)
    backup.add_argument("--profile", help=f"one of {', '.join(PROFILE_NAMES)} "
                        "(default: supabase for Supabase hosts, postgres elsewhere)")
    backup.add_argument("--label", help='a note shown by list and SNS, e.g. "before migration 42"')
    backup.add_argument("--retention", default="daily", choices=RETENTION_CLASSES)
    backup.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="if another backup of the database is in progress, wait this "
                             "long for it to finish (default: fail at once, naming it)")
    jobs_flag(backup, "dump tables over N connections at once")
    backup.add_argument("--storage-endpoint", default=os.environ.get("SUPABACKUP_STORAGE_ENDPOINT"),
                        metavar="URL", help="also copy the project's Storage files from its S3 "
                        "endpoint (https://<ref>.storage.supabase.co/storage/v1/s3; keys in "
                        f"${STORAGE_ENV}_ACCESS_KEY_ID, ${STORAGE_ENV}_SECRET_ACCESS_KEY, "
                        f"${STORAGE_ENV}_REGION)")
    backup.add_argument("--storage-buckets", default=os.environ.get("SUPABACKUP_STORAGE_BUCKETS"),
                        metavar="A,B", help="copy only these buckets (default: every bucket)")
    keep_days_flag(backup)
    sns_flag(backup)

    lister = sub.add_parser("list", help="list committed backups")
    store_flag(lister)
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")

    restore = sub.add_parser("restore", help="restore a backup, or a point in time, into an "
                                             "empty database")
    store_flag(restore)
    restore.add_argument("--target-url", required=True, help="the empty database to restore into")
    restore.add_argument("--at", default="latest",
                         help="latest, a BACKUP_ID, or an ISO time: replayed from change "
                              "capture where it covers the time, else the newest backup at "
                              "or before it")
    restore.add_argument("--dry-run", action="store_true",
                         help="print which archives would be read, and how much, then stop")
    restore.add_argument("--tables", action="append", default=[], metavar="SCHEMA.TABLE[,...]",
                         help="restore the data of these tables only (the schema comes back "
                              "whole, other tables empty)")
    restore.add_argument("--profile", default="postgres", choices=PROFILE_NAMES,
                         help="supabase: into a fresh Supabase project, skipping what it "
                              "already has (default: postgres, into an empty database)")
    jobs_flag(restore, "load tables and build indexes over N connections at once")
    restore.add_argument("--target-storage-endpoint", metavar="URL",
                         help="also write the backup's Storage files to this S3 endpoint (the "
                         "target project's; keys in "
                         f"${TARGET_STORAGE_ENV}_ACCESS_KEY_ID, ..._SECRET_ACCESS_KEY, "
                         "..._REGION) and make storage.objects the backup's rows")
    sns_flag(restore)
    capture = sub.add_parser("cdc", help="change capture, for restores to any point in time")
    capture.add_argument("action", choices=("start", "run", "status", "drop"),
                         help="start: create the slot and its base backup; run: store what "
                              "the slot holds (as the schedule does); status; drop")
    capture.add_argument("--database-url", default=os.environ.get("SUPABACKUP_DATABASE_URL"),
                         help="a direct connection (replication cannot use a pooler)")
    store_flag(capture)
    capture.add_argument("--max-retained-wal", type=int, metavar="BYTES",
                         help="run: drop the slot and start over (a new base) when it holds "
                              "more WAL than this, before it fills the disk (0: no limit)")
    capture.add_argument("--for", dest="seconds", type=float, metavar="SECONDS",
                         help="run: stay connected and stream for this long, storing what "
                              "commits every --flush-interval (default: drain once, exit)")
    capture.add_argument("--flush-interval", type=float, default=5.0, metavar="SECONDS",
                         help="run --for: store what has committed at least this often "
                              "(default 5: the recovery point)")
    capture.add_argument("--json", action="store_true", help="status: as JSON")
    keep_days_flag(capture)
    sns_flag(capture)

    verify = sub.add_parser("verify", help="re-read backups and prove they are whole")
    store_flag(verify)
    verify.add_argument("--backup", help="one BACKUP_ID and the chain it relies on "
                        "(default: every backup)")
    verify.add_argument("--drill-url", default=os.environ.get("SUPABACKUP_DRILL_URL"),
                        help="also restore the backup (default: the newest) on this scratch "
                             "server and compare every table with what the backup recorded "
                             "(default: $SUPABACKUP_DRILL_URL)")
    sns_flag(verify)

    status = sub.add_parser("status", help="health at a glance: the newest backups, the "
                            "point-in-time window, the last verify and drill, and what needs "
                            "a person (exit status 1 when anything does)")
    store_flag(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a screen")
    keep_days_flag(status)
    limits_flags(status)
    return parser


# status's thresholds: (flag, the Limits field, the flag's unit in seconds or 0 for bytes,
# metavar, help). The defaults follow the stack's schedules and alarms (status.Limits); a
# stack deployed with others passes its own.
LIMIT_FLAGS = (
    ("--missed-backup-hours", "backup", 3600, "H", "no backup for longer needs a person "
     "(default: 26, the stack's MissedBackupHours)"),
    ("--full-days", "full", 86400, "D", "no full backup for longer needs a person (default: "
     "a week and 2 hours, the weekly full)"),
    ("--verify-days", "verify", 86400, "D", "no verify, or drill, for longer needs a person "
     "(default: a week and 2 hours, the weekly verify)"),
    ("--capture-lag-minutes", "capture_lag", 60, "M", "capture further behind needs a "
     "person (default: 15, three 5-minute runs)"),
    ("--retained-wal-bytes", "retained_wal", 0, "BYTES", "a slot holding more WAL needs a "
     "person (default: 1 GiB, the stack's RetainedWalAlarmBytes)"),
    ("--safe-wal-bytes", "safe_wal", 0, "BYTES", "a slot closer than this to "
     "max_slot_wal_keep_size needs a person (default: 128 MiB, the stack's SafeWalAlarmBytes)"),
)


def limits_flags(p: argparse.ArgumentParser) -> None:
    default = Limits()
    for flag, name, unit, metavar, help_ in LIMIT_FLAGS:
        value = getattr(default, name)
        p.add_argument(flag, dest=name, type=float if unit else int, metavar=metavar,
                       default=value.total_seconds() / unit if unit else value, help=help_)


def _jobs(value: str | None) -> int | None:
    return checked_jobs(value, f"--jobs (or ${JOBS_ENV})") if value not in (None, "") else None


def _keep_days(value: str | None) -> int:
    return checked_keep_days(value, f"--keep-days (or ${KEEP_DAYS_ENV})")


def require(value: str | None, flag: str, env: str) -> str:
    if not value:
        raise ConfigError(f"{flag} is required", f"pass {flag} or set {env}")
    return value


def cmd_backup(args: argparse.Namespace) -> int:
    keep_days = _keep_days(args.keep_days)
    conn = ConnectionInfo.from_url(require(args.database_url, "--database-url",
                                           "SUPABACKUP_DATABASE_URL"))
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    request = BackupRequest(kind=args.kind, profile=args.profile, retention=args.retention,
                            label=args.label, trigger="cli", database_id=args.database_id,
                            wait=args.wait, jobs=_jobs(args.jobs), files=_files(args))
    manifest, outcome = backup_and_report(conn, store, request, Notifier(args.sns_topic_arn),
                                          keep_days)
    print(f"{manifest.backup_id}: {human_bytes(manifest.total_bytes)} in "
          f"{human_duration(outcome.duration_seconds)}, {manifest.tables_dumped} of "
          f"{len(manifest.tables)} tables dumped ({manifest.profile} profile, server "
          f"{manifest.server_version}, pg_dump {manifest.pg_dump_version})")
    if manifest.escalation:
        print(f"an incremental was asked for; took a full backup because {manifest.escalation}")
    if manifest.files is not None:
        for line in files_lines(manifest.files):
            print(line)
    return 0


def _files(args: argparse.Namespace) -> CopyRequest | None:
    """--storage-endpoint and --storage-buckets as the backup's file request."""
    if not args.storage_endpoint:
        if args.storage_buckets:
            raise ConfigError("--storage-buckets needs --storage-endpoint")
        return None
    return CopyRequest(StorageEndpoint.from_env(args.storage_endpoint, STORAGE_ENV),
                       parse_buckets(args.storage_buckets))


def cmd_list(args: argparse.Namespace) -> int:
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    ids = [args.database_id] if args.database_id else store.database_ids()
    rows = [m.summary() for db in ids for m in store.manifests(db)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no backups in {store.url}")
        return 0
    header = ("DATABASE", "BACKUP", "KIND", "RETENTION", "SIZE", "SNAPSHOT AT", "LABEL")
    table = [header] + [
        (r["database_id"], r["backup_id"], r["kind"], r["retention"], human_bytes(r["bytes"]),
         r["snapshot_at"][:19] + "Z", r["label"] or "") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    target = ConnectionInfo.from_url(args.target_url)
    storage = (StorageEndpoint.from_env(args.target_storage_endpoint, TARGET_STORAGE_ENV)
               if args.target_storage_endpoint else None)
    options = RestoreOptions(tables=tuple(t.strip() for arg in args.tables
                                          for t in arg.split(",") if t.strip()),
                             profile=args.profile, jobs=_jobs(args.jobs), storage=storage)
    point = restore_point(store, resolve_database_id(store, args.database_id), args.at)
    if args.dry_run:
        for line in describe_point(store, point, options):
            print(line)
        return 0
    report = restore_and_report(store, point, target, Notifier(args.sns_topic_arn), options)
    for line in report.lines():
        print(line)
    return 0


def cmd_cdc(args: argparse.Namespace) -> int:
    # a drop frees the slot's WAL whatever else is wrong: it reads no --keep-days
    keep_days = _keep_days(args.keep_days) if args.action != "drop" else KEEP_DAYS
    conn = ConnectionInfo.from_url(require(args.database_url, "--database-url",
                                           "SUPABACKUP_DATABASE_URL"))
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    database_id = args.database_id or conn.database_id
    if args.action == "start":
        state, base = capture.start(conn, store, BackupRequest(database_id=database_id,
                                                           retention="weekly", trigger="cli",
                                                           label="change capture base"))
        print(f"capturing {database_id} through slot {state.slot} ({state.plugin}) from "
              f"{state.start_lsn}; base backup {base.backup_id}")
        for line in capture.cannot_replay(conn):
            print(f"warning: a restore to a time gives this as of the base only: {line}",
                  file=sys.stderr)
    elif args.action == "run":
        try:
            policy = FlushPolicy(interval=args.flush_interval)
        except ValueError as exc:
            raise ConfigError(f"--flush-interval: {exc}") from None
        result = capture_and_report(conn, store, database_id, Notifier(args.sns_topic_arn),
                                    args.max_retained_wal or None, seconds=args.seconds,
                                    policy=policy, keep_days=keep_days)
        segment = result.segment
        if result.left:
            print(f"left without draining: {result.left}")
        print(f"stored {result.transactions} transaction(s) in {result.segments} segment(s), "
              f"the last committed at {segment.last_commit_time}" if segment
              else "nothing new to store")
        if result.covered_through is not None:
            print(f"restores to a time now reach {result.covered_through.isoformat()}")
        if result.restarted:
            print(f"started a new epoch: {result.restarted}")
    elif args.action == "status":
        found = capture.status(conn, store, database_id, keep_days)
        print(json.dumps(found, indent=2, default=str) if args.json
              else "\n".join(capture.status_lines(found)))
    else:
        dropped = capture.drop(conn, store, database_id)
        print(f"dropped slot {dropped.slot}; what was captured stays restorable" if dropped
              else f"change capture of {database_id} was not started")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    database_id = resolve_database_id(store, args.database_id)
    drill = ConnectionInfo.from_url(args.drill_url) if args.drill_url else None
    try:
        report = verify_and_report(store, database_id, Notifier(args.sns_topic_arn),
                                   args.backup, drill)
    except VerifyFailed as exc:
        if exc.report is not None:
            _print_verify(exc.report)
        raise
    _print_verify(report)
    return 0


def _print_verify(report: VerifyReport) -> None:
    for finding in report.findings:
        print(f"PROBLEM {finding}")
    if report.drill is not None:
        drill = report.drill
        print(f"drill: restored {drill.backup_id} on {drill.server} (from "
              f"{', '.join(drill.restore.backups) if drill.restore else '-'}), compared "
              f"{drill.tables} tables, {drill.rows} rows" + (f", {drill.files} files" if drill.files
                                                        else "")
              + f": {len(drill.mismatches)} mismatch(es)")
    if report.capture is not None:
        found = report.capture
        print(f"verified change capture: {found.segments} segment(s) in {found.epochs} "
              f"epoch(s), {found.transactions} transaction(s)" + (
                  f"; {found.released} epoch(s) past the window not checked"
                  if found.released else ""))
    print(f"verified {len(report.verified)} backup(s) of {report.database_id}: "
          f"{human_bytes(report.bytes_read)} read, {len(report.findings)} problem(s)")
    if report.record_error:
        print(f"NOT RECORDED: {report.record_error} (`supabackup status` will not see this run)")


def cmd_status(args: argparse.Namespace) -> int:
    store = Store(StoreURL.parse(require(args.store, "--store", "SUPABACKUP_STORE")))
    found = store_status(store, args.database_id, _keep_days(args.keep_days), _limits(args))
    print(json.dumps(found, indent=2) if args.json else "\n".join(screen(found)))
    return 0 if found["healthy"] else NEEDS_A_PERSON


def _limits(args: argparse.Namespace) -> Limits:
    values: dict[str, Any] = {}
    for flag, name, unit, _, _ in LIMIT_FLAGS:
        value = getattr(args, name)
        if not value > 0:
            raise ConfigError(f"{flag} must be more than 0, not {value}")
        values[name] = timedelta(seconds=value * unit) if unit else value
    return Limits(**values)


COMMANDS = {"backup": cmd_backup, "list": cmd_list, "restore": cmd_restore,
            "verify": cmd_verify, "cdc": cmd_cdc, "status": cmd_status}


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, systemd, timeout) cleans up as Ctrl-C does: the run stops
        # its workers, aborts its uploads, removes what it wrote and gives back its lease.
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        return COMMANDS[args.command](args)
    except SupabackupError as exc:
        print(f"supabackup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("supabackup: interrupted; nothing of this run was committed", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"supabackup: unexpected error: {type(exc).__name__}: {exc} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
