"""The full backup, as a list of named steps.

    check the store -> open the snapshot -> choose pg_dump -> dump roles -> dump database
    -> write the manifest (last, conditionally)

Failure handling sits in one place: any exception after the first upload discards
everything the run wrote, so a failed run leaves no manifest and no orphaned upload.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace

from .dburl import ConnectionInfo
from .dump import DumpProcess
from .errors import ConfigError
from .manifest import (
    RETENTION_CLASSES,
    Manifest,
    StoredObject,
    iso,
    new_backup_id,
    utcnow,
)
from .pgtools import PgTools, find_tools
from .profiles import Profile, resolve_profile
from .roles import drop_reserved
from .snapshot import SnapshotSession
from .store import BackupWriter, HashingReader, Store

log = logging.getLogger(__name__)

ROLES = "roles.sql"
DATABASE = "database.dump"


@dataclass(frozen=True)
class BackupRequest:
    kind: str = "full"
    profile: str | None = None      # None: the host's default
    retention: str = "daily"
    label: str | None = None
    trigger: str = "manual"          # "schedule" | "manual" | "cli"
    database_id: str | None = None   # None: derived from the connection
    backup_id: str | None = None     # None: from the snapshot's time

    def __post_init__(self) -> None:
        if self.kind != "full":
            raise ConfigError(f"unknown backup kind {self.kind!r}", "use: full")
        if self.retention not in RETENTION_CLASSES:
            raise ConfigError(f"unknown retention class {self.retention!r}",
                              f"choose one of: {', '.join(RETENTION_CLASSES)}")
        if self.label is not None and (len(self.label) > 200 or not self.label.isprintable()):
            raise ConfigError("the label must be printable text of at most 200 characters")

    def database_of(self, conn: ConnectionInfo) -> str:
        """The database's id in the store: as asked, or derived from the connection."""
        return self.database_id or conn.database_id

    def with_profile(self, profile: str) -> BackupRequest:
        return replace(self, profile=profile)

    def with_backup_id(self, backup_id: str) -> BackupRequest:
        return replace(self, backup_id=backup_id)


def run_full_backup(conn: ConnectionInfo, store: Store, request: BackupRequest) -> Manifest:
    """Take one full backup and commit it; raise (having stored nothing) on any failure."""
    profile = resolve_profile(request.profile, conn)
    started = utcnow()
    store.check_access()
    with SnapshotSession(conn) as session:
        tools = find_tools(session.server.major)
        database_id = request.database_of(conn)
        backup_id = request.backup_id or new_backup_id(session.server.snapshot_at, "full")
        log.info("backup %s of %s: server %s, pg_dump %s, snapshot %s", backup_id,
                 conn.display(), session.server.version, tools.version, session.snapshot_id)
        writer = store.begin(database_id, backup_id)
        tags = {"retention": request.retention, "kind": "full"}
        try:
            roles = _dump_roles(writer, tools, conn, profile, tags)
            database, warnings = _dump_database(writer, tools, conn, profile, tags,
                                                session.snapshot_id, session.server.database_size)
            manifest = Manifest(
                backup_id=backup_id, database_id=database_id, kind="full",
                profile=profile.name, retention=request.retention, label=request.label,
                trigger=request.trigger, started_at=iso(started), finished_at=iso(utcnow()),
                snapshot_at=iso(session.server.snapshot_at), snapshot_id=session.snapshot_id,
                server_version=session.server.version, database=conn.dbname,
                database_size=session.server.database_size,
                pg_dump=tools.path("pg_dump"), pg_dump_version=tools.version,
                objects=[roles, database], platform_schemas=list(profile.platform_schemas),
                warnings=warnings,
            )
            writer.commit(manifest, tags)
        except BaseException:
            log.warning("backup %s failed; discarding what it wrote", backup_id)
            _discard(writer)
            raise
    log.info("backup %s committed: %d bytes", backup_id, manifest.total_bytes)
    return manifest


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
                tags: dict[str, str]) -> StoredObject:
    """pg_dumpall --roles-only, without passwords, minus the profile's reserved roles.

    Roles live in a shared catalog that pg_dumpall cannot read through --snapshot; they
    are dumped while the run's snapshot is held, which is as close as PostgreSQL allows.
    """
    argv = [tools.path("pg_dumpall"), "--roles-only", "--no-role-passwords",
            "-l", conn.dbname]
    with DumpProcess(argv, conn, "pg_dumpall --roles-only") as proc:
        script = b"".join(iter(lambda: proc.read(1 << 20), b"")).decode()
    filtered = drop_reserved(script, profile.is_reserved).encode()
    reader = HashingReader(io.BytesIO(filtered))
    writer.upload(ROLES, reader, len(filtered), tags)
    return StoredObject(name=ROLES, kind="roles", size=reader.size, sha256=reader.hexdigest,
                        format="sql")


def _dump_database(writer: BackupWriter, tools: PgTools, conn: ConnectionInfo,
                   profile: Profile, tags: dict[str, str], snapshot_id: str,
                   expected_bytes: int) -> tuple[StoredObject, list[str]]:
    """pg_dump -Fc in the run's snapshot, streamed straight into a multipart upload."""
    compression = "zstd" if tools.supports_zstd else "gzip"
    level = "--compress=zstd" if tools.supports_zstd else "--compress=6"
    argv = [tools.path("pg_dump"), "--format=custom", level,
            f"--snapshot={snapshot_id}", "--no-sync", *profile.pg_dump_args()]
    with DumpProcess(argv, conn, "pg_dump") as proc:
        reader = HashingReader(proc)
        writer.upload(DATABASE, reader, expected_bytes, tags)
        obj = StoredObject(name=DATABASE, kind="database", size=reader.size,
                           sha256=reader.hexdigest, format="custom", compression=compression)
        return obj, proc.warnings
