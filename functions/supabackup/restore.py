"""Restore a backup (full, or any incremental of a chain) into an empty database.

    choose the backup -> check the target is empty -> choose pg_restore -> roles
    -> pg_restore (pre-data, data, post-data) fed from S3

pg_restore reads the archive on stdin, straight from the S3 response: no local copy.
It writes the SQL script, psql applies it in a single transaction, and the
archive's sha256 and size are checked against the manifest before psql may commit, so a
damaged archive or a failed restore leaves the target as empty as it was; roles the
restore created are dropped again. (Script mode, rather than pg_restore --dbname, lets
a pg_restore 17 restore into PostgreSQL 15 and 16, and a backup of one server
restore into another: see ScriptFilter.)
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import IO

import psycopg2

from .dburl import ConnectionInfo
from .dump import child_env
from .errors import BackupNotFound, RestoreFailed, StoreError
from .manifest import Manifest, StoredObject
from .pgtools import PgTools, find_tools
from .roles import plan_roles, quote_ident
from .snapshot import connect
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    backup_id: str
    target: str
    bytes: int = 0
    roles_created: list[str] = field(default_factory=list)
    roles_existing: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)  # whose archives were read

    def lines(self) -> list[str]:
        out = [f"restored {self.backup_id} into {self.target} ({self.bytes} bytes read)"]
        if len(self.backups) > 1:
            out.append(f"table data from: {', '.join(self.backups)}")
        if self.roles_created:
            out.append(f"created roles: {', '.join(self.roles_created)} (without passwords)")
        if self.roles_existing:
            out.append(f"left existing roles as they are: {', '.join(self.roles_existing)}")
        return out


def run_restore(store: Store, manifest: Manifest, target: ConnectionInfo) -> RestoreReport:
    """Restore `manifest`'s backup into the empty database `target`."""
    report = RestoreReport(backup_id=manifest.backup_id, target=target.display())
    conn = connect(target)
    conn.autocommit = True
    try:
        _check_empty(conn, target)
        server_version_num = conn.server_version
        tools = find_tools(int(manifest.pg_dump_version.split(".")[0]), purpose="restore")
        roles_script = _read_small(store, manifest, manifest.object("roles")).decode()
        plan = plan_roles(roles_script, _existing_roles(conn))
        report.roles_created, report.roles_existing = plan.create, plan.existing
        _apply_roles(conn, plan.statements, target)
    finally:
        conn.close()
    try:
        with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
            parts = restore_plan(store, manifest, Path(workdir))
            report.backups = sorted({p.manifest.backup_id for p in parts})
            report.bytes = _pg_restore(store, parts, target, tools, server_version_num)
    except BaseException:
        _drop_roles(target, report.roles_created)
        raise
    log.info("restored %s into %s", manifest.backup_id, target.display())
    return report


def _check_empty(conn: psycopg2.extensions.connection, target: ConnectionInfo) -> None:
    with conn.cursor() as cur:
        cur.execute("""
            SELECT n.nspname || '.' || c.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
            ORDER BY 1 LIMIT 5""")
        found = [r[0] for r in cur.fetchall()]
    if found:
        raise RestoreFailed(
            f"the target {target.display()} is not empty (it has {', '.join(found)}, ...)",
            "restore into a new, empty database (createdb NAME) so nothing is overwritten",
        )


def _existing_roles(conn: psycopg2.extensions.connection) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT rolname FROM pg_roles")
        return {r[0] for r in cur.fetchall()}


def _apply_roles(conn: psycopg2.extensions.connection, statements: list[str],
                 target: ConnectionInfo) -> None:
    if not statements:
        return
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            for stmt in statements:
                cur.execute(stmt)
            cur.execute("COMMIT")
    except psycopg2.Error as exc:
        conn.rollback()
        detail = target.redact(" ".join(str(exc).split()))
        raise RestoreFailed(f"creating roles on {target.display()} failed: {detail}",
                            "the restoring user needs CREATEROLE; nothing was restored") from None


def _drop_roles(target: ConnectionInfo, roles: list[str]) -> None:
    """Undo the roles a failed restore created (best effort: the error already speaks)."""
    if not roles:
        return
    try:
        conn = connect(target)
        conn.autocommit = True
        with conn.cursor() as cur:
            for role in reversed(roles):
                cur.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        conn.close()
    except Exception as exc:  # noqa: BLE001 - the restore's own error is the one to report
        log.warning("could not drop roles created by the failed restore: %s", exc)


def _read_small(store: Store, manifest: Manifest, obj: StoredObject) -> bytes:
    data = b"".join(store.open_object(manifest, obj.name))
    _check_digest(obj, len(data), sha256(data).hexdigest())
    return data


def _check_digest(obj: StoredObject, size: int, digest: str) -> None:
    if size != obj.size or digest != obj.sha256:
        raise StoreError(
            f"{obj.name} does not match its manifest (size {size}, expected {obj.size}; "
            f"sha256 {digest[:12]}..., expected {obj.sha256[:12]}...)",
            "the object is damaged: run `supabackup verify` and restore another backup",
        )


# Session settings newer pg_restore versions emit that older servers reject, by the
# server version that introduced them. pg_restore 17 sets transaction_timeout even when
# restoring into PostgreSQL 15 or 16.
NEWER_SETTINGS = ((170000, b"SET transaction_timeout = 0;\n"),)
# Column options a server assigns itself. PostgreSQL 15.20 stamps every column with
# pg_attver and ignores a client's value; PostgreSQL 17.11 rejects the option outright.
# pg_dump 17.11 dumps it anyway, so it is left out of every restore script.
SERVER_MANAGED_COLUMN_OPTIONS = (b"pg_attver",)
_COLUMN_OPTIONS = re.compile(rb"^(ALTER TABLE (?:ONLY )?.+ ALTER COLUMN .+ SET \()(.*)(\);\n)$")


@dataclass(frozen=True)
class Part:
    """One pg_restore run of a restore: an archive and which of its entries to take."""

    manifest: Manifest
    args: tuple[str, ...] = ()


def restore_plan(store: Store, manifest: Manifest, workdir: Path) -> list[Part]:
    """The pg_restore runs that rebuild `manifest`'s database, in order.

    A full backup is one run. An incremental: its pre-data; then the data of each table
    it did not dump, from the backup of the chain that holds it (matched by the table's
    oid, whose definition that backup recorded as the same); then its own data and
    sequences; then its post-data (indexes, constraints, triggers, matview contents).
    """
    if manifest.kind == "full":
        return [Part(manifest)]
    holders: dict[str, set[int]] = {}
    for oid, table in manifest.table_states.items():
        if table.held_in != manifest.backup_id:
            holders.setdefault(table.held_in, set()).add(oid)
    by_id = {m.backup_id: m for m in store.manifests(manifest.database_id)}
    parts = [Part(manifest, ("--section=pre-data",))]
    for holder_id in sorted(holders):
        holder = by_id.get(holder_id)
        if holder is None:
            raise BackupNotFound(
                f"{manifest.backup_id} needs table data from {holder_id}, which is gone",
                "restore an earlier or a full backup (`supabackup list`)")
        entries = [line for line in _toc(store, holder)
                   if " TABLE DATA " in line and int(line.split()[2]) in holders[holder_id]]
        if len(entries) != len(holders[holder_id]):
            raise RestoreFailed(f"{holder_id} lacks table data that {manifest.backup_id} "
                                "relies on", "run `supabackup verify`; restore another backup")
        listing = workdir / f"{holder_id}.list"
        listing.write_text("\n".join(entries) + "\n")
        parts.append(Part(holder, ("--data-only", f"--use-list={listing}")))
    parts += [Part(manifest, ("--section=data",)), Part(manifest, ("--section=post-data",))]
    return parts


def describe_plan(store: Store, manifest: Manifest) -> list[str]:
    """What a restore of `manifest` would read, in order, without touching any database."""
    lines = [f"restore of {manifest.backup_id} ({manifest.kind}, snapshot at "
             f"{manifest.snapshot_at}):"]
    roles = manifest.object("roles")
    lines.append(f"  roles      {manifest.backup_id}/{roles.name}  {roles.size} bytes")
    with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
        for part in restore_plan(store, manifest, Path(workdir)):
            obj = part.manifest.object("database")
            sections = [a.split("=", 1)[1] for a in part.args if a.startswith("--section=")]
            what = " ".join(sections) or "everything"
            if part.manifest.backup_id != manifest.backup_id:
                tables = sorted(f"{t['schema']}.{t['name']}" for t in manifest.tables
                                if t["held_in"] == part.manifest.backup_id)
                what = f"data of {len(tables)} table(s): {', '.join(tables[:8])}" + (
                    ", ..." if len(tables) > 8 else "")
            lines.append(f"  {part.manifest.backup_id}/{obj.name}  {obj.size} bytes  {what}")
    return lines


def _toc(store: Store, manifest: Manifest) -> list[str]:
    """pg_restore --list of an archive, read from S3 (only its head is needed)."""
    tools = find_tools(int(manifest.pg_dump_version.split(".")[0]), purpose="restore")
    proc = subprocess.Popen([tools.path("pg_restore"), "--list"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    assert proc.stdin is not None
    # It reads the table of contents and stops: no need to fetch the rest.
    store.stream_to(manifest, manifest.object("database").name, proc.stdin, read_all=False)
    proc.wait()
    reader.join()
    return [line for line in b"".join(out).decode().splitlines()
            if line and not line.startswith(";")]


def _pg_restore(store: Store, parts: list[Part], target: ConnectionInfo,
                tools: PgTools, server_version_num: int) -> int:
    """S3 -> pg_restore (script mode) -> psql --single-transaction, with no local copy.

    Every part's script goes to one psql. psql commits when its input ends, so its input
    is ended only after every archive's size and sha256 have matched its manifest and every
    pg_restore has exited cleanly; on any failure psql is killed first, and the
    transaction never commits.
    """
    env = child_env(target, application="supabackup restore")
    script_filter = ScriptFilter(server_version_num)
    psql = _Process([tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                     "--single-transaction", "-o", "/dev/null"], env, stdin=True)
    total = 0
    try:
        for part in parts:
            total += _restore_part(store, part, tools, env, script_filter, psql, target)
        _close(psql.stdin)  # only now may psql reach its COMMIT
        psql.finish("restoring with psql", target)
    except BaseException:
        psql.kill()  # first: the single transaction must never commit
        raise
    return total


def _restore_part(store: Store, part: Part, tools: PgTools, env: dict[str, str],
                  script_filter: ScriptFilter, psql: _Process, target: ConnectionInfo) -> int:
    obj = part.manifest.object("database")
    restore = _Process([tools.path("pg_restore"), "--file=-", *part.args], env, stdin=True,
                       stdout=True)
    pump = threading.Thread(target=script_filter.pump, args=(restore.stdout, psql.stdin),
                            daemon=True)
    pump.start()
    try:
        size, digest = store.stream_to(part.manifest, obj.name, restore.stdin)
        _check_digest(obj, size, digest)
        restore.finish(f"pg_restore of {part.manifest.backup_id}", target)
        pump.join()
    except BaseException:
        restore.kill()
        raise
    return size


class ScriptFilter:
    """Adapts pg_restore's SQL script to the target server, leaving data untouched.

    Statements pass line by line through `statement()`; the rows of COPY blocks pass
    through unchanged, whatever they contain.
    """

    def __init__(self, server_version_num: int) -> None:
        self.drop_lines = {line for version, line in NEWER_SETTINGS
                           if server_version_num < version}

    def statement(self, line: bytes) -> bytes:
        if line in self.drop_lines:
            return b""
        if b"ALTER COLUMN" in line:
            match = _COLUMN_OPTIONS.match(line)
            if match:
                options = [o for o in match.group(2).split(b", ")
                           if o.split(b"=", 1)[0] not in SERVER_MANAGED_COLUMN_OPTIONS]
                if not options:
                    return b""
                return match.group(1) + b", ".join(options) + match.group(3)
        return line

    def pump(self, src: IO[bytes], dst: IO[bytes]) -> None:
        """Copy pg_restore's script to psql through the filter."""
        in_copy = False
        try:
            for line in src:
                if in_copy:
                    in_copy = line != b"\\.\n"
                elif line.startswith(b"COPY ") and line.endswith(b" FROM stdin;\n"):
                    in_copy = True
                else:
                    line = self.statement(line)
                dst.write(line)
        except (BrokenPipeError, ValueError):
            pass  # psql stopped or was killed; its exit status and the caller speak


class _Process:
    """A child process with its stderr drained in the background."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: bool = False,
                 stdout: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = b""
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def finish(self, what: str, target: ConnectionInfo) -> None:
        code = self.proc.wait()
        self._drain.join()
        if code != 0:
            text = target.redact(self.stderr.decode("utf-8", "replace")).strip()
            errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
            detail = "; ".join(errors)[:2000] or text[-2000:]
            raise RestoreFailed(f"{what} failed (exit status {code}): {detail}",
                                "nothing was restored (single transaction); "
                                "fix the cause and run again")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _close(pipe: IO[bytes]) -> None:
    try:
        pipe.close()
    except BrokenPipeError:
        pass

