"""Full and incremental backups, as a list of named steps.

    check the store -> choose the parent (incremental) -> open the snapshot -> list and
    lock the tables -> find the changed tables (incremental) -> dump roles -> dump the
    schema (pg_dump, without the tables' rows) -> dump the rows of every table that
    changed over N workers (tabledata.py) -> write the manifest (last, conditionally)

A full backup records every table's exact row count, counted from the workers' streams
(no table is read twice). An incremental's change detection reads every table before the
workers start, counting and fingerprinting each in one pass; it compares them with the
previous backup's (inventory.decide), its workers' counts must equal the scan's, and its
restore drill checks every table against the snapshot, also the tables whose parts it
references in an older backup's folder. A chain is of one manifest format: an
incremental whose parent is older escalates to a full backup.

Failure handling sits in one place: any exception after the first upload discards
everything the run wrote, so a failed run leaves no manifest and no orphaned upload.
"""

from __future__ import annotations

import io
import logging
import math
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from . import locks
from .budget import Budget
from .dburl import ConnectionInfo
from .dump import DumpProcess
from .errors import ConfigError, DumpFailed, DuplicateRun
from .files.copy import CopyRequest
from .files.run import FILES_RESERVE, SnapshotRows, back_up_files, previous_files
from .inventory import (
    CONTENT_CHANGED,
    WORKER_LOCK_TIMEOUT,
    XID_SPACE,
    Listed,
    decide,
    list_tables,
    scan_tables,
    snapshot_xmin,
    unchanged_since,
)
from .manifest import (
    FORMAT,
    RETENTION_CLASSES,
    Manifest,
    StoredObject,
    TablePart,
    TableState,
    iso,
    new_backup_id,
    parse_time,
    utcnow,
    with_kind,
)
from .pgtools import PgTools, find_tools
from .profiles import Profile, resolve_profile
from .roles import drop_reserved, quote_ident, reserved_roles
from .snapshot import SnapshotSession, connect
from .store import MANIFEST, BackupWriter, Store
from .tabledata import (
    Slice,
    TableDumper,
    checked_jobs,
    copy_encoding,
    default_jobs,
    lock_tables,
    plan_slices,
)

log = logging.getLogger(__name__)

KINDS = ("full", "incremental")
ROLES = "roles.sql"
SCHEMA = "schema.dump"


@dataclass(frozen=True)
class BackupRequest:
    kind: str = "full"
    profile: str | None = None      # None: the host's default
    retention: str = "daily"
    label: str | None = None
    trigger: str = "manual"          # "schedule" | "manual" | "cli"
    database_id: str | None = None   # None: derived from the connection
    backup_id: str | None = None     # None: from the snapshot's time
    tick: str | None = None          # the schedule's tick (ISO time): one backup per tick
    time_limit: float | None = None  # seconds the run may take (Lambda's remaining time)
    wait: float = 0.0                # seconds to wait for a run in progress to finish
    snapshot: str | None = None      # an exported snapshot to dump (capture.start's aligned base)
    jobs: int | None = None          # workers; None: derived from CPUs and memory
    files: CopyRequest | None = None  # Supabase Storage files to copy with the database

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown backup kind {self.kind!r}", f"use: {', '.join(KINDS)}")
        if self.retention not in RETENTION_CLASSES:
            raise ConfigError(f"unknown retention class {self.retention!r}",
                              f"choose one of: {', '.join(RETENTION_CLASSES)}")
        if not (math.isfinite(self.wait) and self.wait >= 0):
            raise ConfigError(f"--wait must be a number of seconds, 0 or more (not {self.wait})")
        if self.label is not None and (len(self.label) > 200 or not self.label.isprintable()):
            raise ConfigError("the label must be printable text of at most 200 characters")
        if self.jobs is not None:
            checked_jobs(self.jobs)

    def database_of(self, conn: ConnectionInfo) -> str:
        """The database's id in the store: as asked, or derived from the connection."""
        return self.database_id or conn.database_id

    def with_backup_id(self, backup_id: str) -> BackupRequest:
        return replace(self, backup_id=backup_id)

    def with_time_limit(self, seconds: float) -> BackupRequest:
        return replace(self, time_limit=seconds)


# A chain whose base full is older than this escalates to a full backup, so that a chain
# never outlives its base's weekly retention (35 days by default).
MAX_CHAIN_AGE = timedelta(days=28)
# xids are compared modulo 2^32 (see inventory.py): a parent snapshot further back than this
# cannot be compared with safely, so the run escalates.
MAX_XID_DISTANCE = 1 << 30
# Connections an incremental's change detection counts and fingerprints on, all in the
# run's snapshot: the scan must end before pg_dump starts, and meanwhile nothing else
# uses the server.
SCAN_LANES = 2


def run_backup(conn: ConnectionInfo, store: Store, request: BackupRequest) -> Manifest:
    """Take one backup and commit it; raise (having stored nothing) on any failure.

    The run holds the database's lease in the store for its whole length (locks.py); a
    second delivery of a schedule tick that has its backup, or is taking it, stops there.
    An incremental needs a parent to chain from; when there is none it can trust, the run
    becomes a full backup by itself and its manifest says why (`escalation`).
    """
    profile = resolve_profile(request.profile, conn)
    started = utcnow()
    budget = Budget(request.time_limit) if request.time_limit else Budget()
    store.check_access()
    database_id = request.database_of(conn)
    owner = f"{request.trigger} run {uuid.uuid4().hex[:12]}" + (
        f" for tick {request.tick}" if request.tick else "")
    lease = locks.acquire(store, database_id, owner, request.tick, request.wait)
    try:
        if request.tick:
            _refuse_a_done_tick(store, database_id, request.tick)
        with locks.Renewer(store, lease):
            return _run_locked(conn, store, request, profile, started, database_id, budget)
    except BaseException as exc:
        if budget.expired:
            raise budget.ran_out(request.kind) from exc
        raise
    finally:
        budget.disarm()
        _release(store, lease)


def tick_backup_ids(tick: str) -> list[str]:
    """The ids a schedule tick's backup can have, one a kind: the tick names its backup."""
    return [new_backup_id(parse_time(tick), kind) for kind in KINDS]


def _refuse_a_done_tick(store: Store, database_id: str, tick: str) -> None:
    for backup_id in tick_backup_ids(tick):
        if store.read_small(store.backup_key(database_id, backup_id, MANIFEST)) is not None:
            raise DuplicateRun(f"schedule tick {tick} already has its backup, {backup_id}",
                               "nothing to do: a repeated delivery of the schedule")


def _release(store: Store, lease: locks.Lease) -> None:
    """Give the lease back; if S3 refuses now, it expires by itself (never hide the run)."""
    try:
        locks.release(store, lease)
    except Exception as exc:  # noqa: BLE001 - the run's own outcome is the one to report
        log.error("could not release the lease %s (it expires by itself): %s", lease.key, exc)


def _run_locked(conn: ConnectionInfo, store: Store, request: BackupRequest, profile: Profile,
                started: datetime, database_id: str, budget: Budget) -> Manifest:
    # Earlier backups are read only when needed: to chain from, to predict the run's
    # length, or to know which files are stored already.
    needs_history = (request.kind == "incremental" or budget.limited
                     or request.files is not None)
    history = store.manifests(database_id) if needs_history else []
    parent, escalation = (None, "")
    if request.kind == "incremental":
        parent, escalation = parent_for(history, profile, started)
    jobs = request.jobs or default_jobs()
    with SnapshotSession(conn, request.snapshot) as session:
        # paced as what the run is: an incremental without a parent is a full
        budget.check("full" if parent is None else request.kind,
                     session.server.database_size, history, jobs)
        budget.on_expiry(session.connection.cancel)
        tools = find_tools(session.server.major)
        xmin = snapshot_xmin(session.connection)
        if parent is not None and (xmin - parent.snapshot_xmin) % XID_SPACE > MAX_XID_DISTANCE:
            escalation = f"more than {MAX_XID_DISTANCE} transactions since {parent.backup_id}"
            parent = None
        kind = "incremental" if parent is not None else "full"
        backup_id = (with_kind(request.backup_id, kind) if request.backup_id
                     else new_backup_id(session.server.snapshot_at, kind))
        with session.connection.cursor() as cur:
            listed = list_tables(cur, profile.exclude_schemas, profile.exclude_table_data)
        lock_tables(session.connection, listed)
        rows = None
        if request.files is not None:  # the files' rows, as of the snapshot
            with session.connection.cursor() as cur:
                rows = SnapshotRows.read(cur, request.files)
        _refuse_changed(conn, listed, profile, "as the backup began")
        if parent is not None:  # which tables to dump must be known before the workers start
            scanned = scan_tables(session.connection, profile.exclude_schemas,
                                  parent.snapshot_xmin, connect=lambda: connect(conn),
                                  snapshot_id=session.snapshot_id, lanes=min(jobs, SCAN_LANES),
                                  no_data=profile.exclude_table_data, fingerprint=True)
            tables = decide(scanned, parent.tables_by_oid, backup_id)
            for table in tables:
                if table.reason.startswith(CONTENT_CHANGED):
                    log.warning("%s: %s although change detection found it unchanged; "
                                "dumped", table.qualified, table.reason)
        else:  # a full backup dumps everything; its rows are counted from the streams
            tables = [TableState(oid=t.oid, schema=t.schema, name=t.name,
                                 relfilenode=t.relfilenode, definition=t.definition, rows=0,
                                 counters=t.counters, held_in=backup_id, reason="full backup")
                      for t in listed]
        by_oid = {t.oid: t for t in listed}
        to_dump = [by_oid[t.oid] for t in tables if t.reason]
        slices = plan_slices(to_dump, jobs, session.server.version_num >= 140000,
                             session.server.block_size)
        log.info("backup %s of %s: %s, server %s, pg_dump %s, snapshot %s, %d of %d tables "
                 "to dump in %d parts over %d workers%s", backup_id, conn.display(), kind,
                 session.server.version, tools.version, session.snapshot_id, len(to_dump),
                 len(tables), len(slices), jobs,
                 f" (escalated: {escalation})" if escalation else "")
        writer = store.begin(database_id, backup_id)
        tags = {"retention": request.retention, "kind": kind}
        dumper = TableDumper(conn, tools, writer, tags, session.snapshot_id,
                             copy_encoding(session.server.encoding), jobs)
        budget.on_expiry(dumper.stop)
        try:
            roles, platform_roles = _dump_roles(writer, tools, conn, profile, tags, budget)
            schema, warnings = _dump_schema(writer, tools, conn, profile, tags,
                                            session.snapshot_id, listed, budget,
                                            session.server.database_size,
                                            session.server.encoding)
            parts = dumper.run(slices)
            _refuse_changed(conn, listed, profile, "while the backup ran")
            tables = _with_parts(tables, by_oid, parts, parent)
            files = None
            if request.files is not None and rows is not None:
                files = back_up_files(
                    request.files, conn, store, writer, tags, rows, previous_files(history),
                    stop=lambda: budget.remaining() < budget.margin + FILES_RESERVE)
            manifest = Manifest(
                backup_id=backup_id, database_id=database_id, kind=kind,
                profile=profile.name, retention=request.retention, label=request.label,
                trigger=request.trigger, started_at=iso(started), finished_at=iso(utcnow()),
                snapshot_at=iso(session.server.snapshot_at), snapshot_id=session.snapshot_id,
                server_version=session.server.version, database=conn.dbname,
                database_size=session.server.database_size,
                pg_dump=tools.path("pg_dump"), pg_dump_version=tools.version,
                objects=[roles, schema, *_stored(parts)],
                platform_schemas=list(profile.platform_schemas),
                platform_roles=platform_roles,
                warnings=warnings, escalation=escalation, snapshot_xmin=xmin,
                base=(parent.base or parent.backup_id) if parent else "",
                parent=parent.backup_id if parent else "",
                tables=tables, encoding=copy_encoding(session.server.encoding),
                database_encoding=session.server.encoding, jobs=jobs, files=files,
            )
            if budget.expired:  # never commit past the margin
                raise budget.ran_out(kind)
            writer.commit(manifest, tags)
        except BaseException:
            log.warning("backup %s failed; discarding what it wrote", backup_id)
            dumper.stop()
            _discard(writer)
            raise
    log.info("backup %s committed: %d bytes", backup_id, manifest.total_bytes)
    return manifest


def _refuse_changed(conn: ConnectionInfo, listed: list[Listed], profile: Profile,
                    when: str) -> None:
    """Stop the run if a table is not, in the catalog as it is now, what the snapshot
    listed: the workers COPY by name, and a name that found another table (renamed,
    re-created, its columns moved) would be stored as this one."""
    fresh = connect(conn)
    try:
        changed = unchanged_since(fresh, listed, profile.exclude_schemas,
                                  profile.exclude_table_data)
    finally:
        fresh.close()
    if changed:
        raise DumpFailed(f"{', '.join(changed[:5])} changed {when} (renamed, truncated, "
                         "rewritten, re-created or altered)",
                         "run again; nothing of this run was kept")


def _with_parts(tables: list[TableState], listed: dict[int, Listed],
                parts: list[tuple[Slice, TablePart]], parent: Manifest | None
                ) -> list[TableState]:
    """Every table's record with the objects that hold its rows: its new parts when this
    run dumped it (and the rows they hold), else the parent's, which name the backup
    holding them. An incremental's counted rows must be what its parts hold."""
    dumped: dict[int, list[TablePart]] = {}
    for piece, part in sorted(parts, key=lambda p: (p[0].table.oid, p[0].index)):
        dumped.setdefault(piece.table.oid, []).append(part)
    before = parent.tables_by_oid if parent else {}
    out = []
    for table in tables:
        if not table.reason:
            held = before[table.oid]
            out.append(replace(table, columns=held.columns, parts=held.parts))
            continue
        own = dumped.get(table.oid, [])
        rows = sum(p.rows for p in own)
        if parent is not None and rows != table.rows:
            raise DumpFailed(f"{table.qualified}: the COPY gave {rows} rows where the scan "
                             f"of the same snapshot counted {table.rows}",
                             "nothing was kept; report this, and take a full backup")
        out.append(replace(table, rows=rows, columns=list(listed[table.oid].columns),
                           parts=own))
    return out


def _stored(parts: list[tuple[Slice, TablePart]]) -> list[StoredObject]:
    """The table parts as objects of this backup's folder (what verify checks)."""
    return [StoredObject(name=p.name, kind="table-data", size=p.size, sha256=p.sha256,
                         format="copy", compression=p.compression)
            for p in sorted((part for _, part in parts), key=lambda p: p.name)]


def parent_for(manifests: list[Manifest], profile: Profile,
               now: datetime) -> tuple[Manifest | None, str]:
    """The backup an incremental chains from, or None and the reason to take a full."""
    if not manifests:
        return None, "no previous backup to chain from"
    parent = manifests[-1]
    by_id = {m.backup_id: m for m in manifests}
    base_id = parent.base or parent.backup_id
    base = by_id.get(base_id)
    if base is None:
        return None, f"the chain's base {base_id} is gone"
    if any(needed not in by_id for needed in parent.depends_on):
        return None, f"a backup in the chain of {parent.backup_id} is gone"
    if now - parse_time(base.snapshot_at) > MAX_CHAIN_AGE:
        return None, f"the chain's base {base_id} is older than {MAX_CHAIN_AGE.days} days"
    if parent.profile != profile.name:
        return None, f"the profile changed from {parent.profile} to {profile.name}"
    if parent.snapshot_xmin < 0 or not parent.tables:
        return None, f"{parent.backup_id} recorded no table states to compare with"
    if parent.format < FORMAT:
        return None, (f"{parent.backup_id} is of manifest format {parent.format}; a chain "
                      f"is of one format ({FORMAT} now)")
    return parent, ""


def _discard(writer: BackupWriter) -> None:
    """Remove what a failed run wrote, without hiding the failure itself.

    If S3 is unreachable now too, the objects stay behind without a manifest (so they
    never count as a backup) and lifecycle aborts the incomplete uploads after a day.
    """
    try:
        writer.discard()
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        log.error("could not remove the failed backup %s's objects: %s", writer.backup_id, exc)


def _dump_roles(writer: BackupWriter, tools: PgTools, conn: ConnectionInfo, profile: Profile,
                tags: dict[str, str], budget: Budget
                ) -> tuple[StoredObject, list[str]]:
    """pg_dumpall --roles-only, without passwords, minus the profile's reserved roles.

    Roles live in a shared catalog that pg_dumpall cannot read through --snapshot; they
    are dumped while the run's snapshot is held, which is as close as PostgreSQL allows.
    Returns the object and the reserved roles left out, which a restore into a server
    without them creates as placeholders.
    """
    argv = [tools.path("pg_dumpall"), "--roles-only", "--no-role-passwords",
            "-l", conn.dbname]
    with DumpProcess(argv, conn, "pg_dumpall --roles-only") as proc:
        budget.on_expiry(proc.stop)
        script = b"".join(iter(lambda: proc.read(1 << 20), b"")).decode()
    filtered = drop_reserved(script, profile.is_reserved).encode()
    stored = writer.upload(ROLES, io.BytesIO(filtered), len(filtered), tags, kind="roles",
                           format="sql")
    return stored, reserved_roles(script, profile.is_reserved)


def _dump_schema(writer: BackupWriter, tools: PgTools, conn: ConnectionInfo,
                 profile: Profile, tags: dict[str, str], snapshot_id: str,
                 tables: list[Listed], budget: Budget, expected_bytes: int,
                 encoding: str) -> tuple[StoredObject, list[str]]:
    """pg_dump -Fc in the run's snapshot, streamed into a multipart upload: everything but
    the data of `tables`, which the workers dump (pre-data, sequence values, large
    objects, post-data). Each table is named exactly: a wildcard would also leave out
    sequence values and materialized view contents."""
    compression = "zstd" if tools.supports_zstd else "gzip"
    level = "--compress=zstd" if tools.supports_zstd else "--compress=6"
    argv = [tools.path("pg_dump"), "--format=custom", level,
            f"--snapshot={snapshot_id}", "--no-sync", *profile.pg_dump_args(),
            f"--lock-wait-timeout={WORKER_LOCK_TIMEOUT}",
            # in the encoding of our names: a pattern read in the database's own (LATIN1,
            # say) would not find "tablé", whose rows would then be stored twice
            f"--encoding={copy_encoding(encoding)}",
            # each name quoted: a pg_dump pattern that matches exactly it (no wildcards)
            *(f"--exclude-table-data={quote_ident(t.schema)}.{quote_ident(t.name)}"
              for t in tables)]
    with DumpProcess(argv, conn, "pg_dump") as proc:
        budget.on_expiry(proc.stop)
        # Large objects are in it: its parts are sized for the whole database.
        stored = writer.upload(SCHEMA, proc, expected_bytes, tags, kind="database",
                               format="custom", compression=compression)
        return stored, proc.warnings
