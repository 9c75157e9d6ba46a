"""Restore a backup (full, or any incremental of a chain) into an empty database.

    choose the backup -> check the target is empty -> choose pg_restore -> roles
    -> pg_restore (pre-data, data, post-data) fed from S3

Options (RestoreOptions): `tables` restores the data of the named tables only (the whole
schema comes back, other tables empty, and foreign keys of restored tables are added
NOT VALID, since the rows they reference may not have been restored); profile
`supabase` restores into a fresh Supabase project (see SupabaseTarget).

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
import tempfile
import threading
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import IO

from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import RestoreFailed, StoreError
from ..files.putback import FilesRestore, files_of, restore_files
from ..manifest import Manifest, StoredObject
from ..pgtools import Child, PgTools, child_env, exit_reason, find_tools
from ..roles import drop_reserved, plan_roles, quote_ident
from ..store import Store
from ..tabledata import default_jobs
from .parallel import restore_parallel
from .plan import (
    Part,
    RestoreOptions,
    Step,
    entry_filter,
    restore_plan,
    select_tables,
    table_names,
    tables_to_load,
)
from .supabase import SupabaseTarget
from .target import apply_roles, check_empty, drop_roles, existing_roles

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    backup_id: str
    target: str
    bytes: int = 0
    roles_created: list[str] = field(default_factory=list)
    roles_existing: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)  # whose archives were read
    notes: list[str] = field(default_factory=list)    # what the options changed
    inexact: list[str] = field(default_factory=list)  # what is not as the backup held it
    files: FilesRestore | None = None  # the Storage files written, with a target endpoint

    def lines(self) -> list[str]:
        out = [f"restored {self.backup_id} into {self.target} ({self.bytes} bytes read)"]
        if len(self.backups) > 1:
            out.append(f"table data from: {', '.join(self.backups)}")
        out += self.notes
        if self.files is not None:
            out += self.files.lines()
        out += [f"NOT AS BACKED UP: {line}" for line in self.inexact]
        if self.roles_created:
            out.append(f"created roles: {', '.join(self.roles_created)} (without passwords)")
        if self.roles_existing:
            out.append(f"left existing roles as they are: {', '.join(self.roles_existing)}")
        return out


def run_restore(store: Store, manifest: Manifest, target: ConnectionInfo,
                options: RestoreOptions | None = None) -> RestoreReport:
    """Restore `manifest`'s backup into the empty database `target`."""
    options = options or RestoreOptions()
    if options.storage is not None:
        files_of(manifest)  # a backup without files refuses before the database is touched
    report = RestoreReport(backup_id=manifest.backup_id, target=target.display())
    selected = select_tables(manifest, options.tables)
    conn = connect(target)
    conn.autocommit = True
    try:
        supabase = SupabaseTarget.read(conn, manifest) if options.profile == "supabase" else None
        check_empty(conn, target, supabase.ignored_schemas if supabase else ())
        server_version_num = conn.server_version
        tools = find_tools(manifest.pg_dump_major, purpose="restore")
        roles_script = read_small(store, manifest, manifest.object("roles")).decode()
        if supabase is not None:  # the project has its reserved roles; never touch them
            roles_script = drop_reserved(roles_script, supabase.is_reserved)
        existing = existing_roles(conn)
        # A supabase-profile backup restored outside Supabase: its objects are owned by, and
        # granted to, the platform's roles, which roles.sql leaves out.
        placeholders = [] if supabase else [r for r in manifest.platform_roles
                                            if r not in existing]
        plan = plan_roles(roles_script, existing | set(placeholders))
        report.roles_created = placeholders + plan.create
        report.roles_existing = plan.existing
        apply_roles(conn, [f"CREATE ROLE {quote_ident(r)} NOLOGIN" for r in placeholders]
                     + plan.statements, target)
        if placeholders:
            report.notes.append("created the platform's roles as NOLOGIN placeholders, so "
                                "ownership, grants and policies restore (the platform's "
                                "event triggers are left out): " + ", ".join(placeholders))
    finally:
        conn.close()
    try:
        with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
            if manifest.format >= 2:
                wanted = entry_filter(selected, supabase, frozenset(placeholders))
                tables = tables_to_load(manifest, wanted)
                report.backups = sorted({t.held_in for t in tables if t.parts}
                                        | {manifest.backup_id})
                report.bytes = restore_parallel(
                    store, manifest, target, tools, Path(workdir), options.jobs or default_jobs(),
                    wanted, tables,
                    lambda: ScriptFilter(server_version_num, fk_not_valid=selected is not None),
                    supabase)
            else:
                steps = restore_plan(store, manifest, Path(workdir), selected, supabase,
                                     frozenset(placeholders))
                parts = [p for p in steps if isinstance(p, Part)]
                report.backups = sorted({p.manifest.backup_id for p in parts})
                report.bytes = _pg_restore(store, steps, target, tools, server_version_num,
                                           fk_not_valid=selected is not None)
    except RestoreFailed as exc:
        if manifest.format < 2:  # a format-1 restore is one transaction: nothing is left
            drop_roles(target, report.roles_created)
        exc.report = report  # what it created, for whoever drops the incomplete target
        raise
    except BaseException:
        if manifest.format < 2:
            drop_roles(target, report.roles_created)
        raise
    if selected is not None:
        report.notes.append(f"table data restored for: {table_names(manifest, selected)} (other "
                            "tables are empty; foreign keys of restored tables were added "
                            "NOT VALID)")
    if supabase is not None:
        report.notes += supabase.notes()
    if options.storage is not None:  # the database holds the files' rows: it comes first
        report.files = restore_files(store, manifest, options.storage, target)
        report.inexact += report.files.inexact
    log.info("restored %s into %s", manifest.backup_id, target.display())
    return report


def read_small(store: Store, manifest: Manifest, obj: StoredObject) -> bytes:
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


def _pg_restore(store: Store, steps: list[Step], target: ConnectionInfo,
                tools: PgTools, server_version_num: int, fk_not_valid: bool = False) -> int:
    """S3 -> pg_restore (script mode) -> psql --single-transaction, with no local copy.

    Every step's script goes to one psql. psql commits when its input ends, so its input
    is ended only after every archive's size and sha256 have matched its manifest and every
    pg_restore has exited cleanly; on any failure psql is killed first, and the
    transaction never commits.
    """
    env = child_env(target, application="supabackup restore")
    script_filter = ScriptFilter(server_version_num, fk_not_valid)
    psql = Child([tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                  "--single-transaction", "-o", "/dev/null"], env, stdin=True)
    total = 0
    try:
        for step in steps:
            if isinstance(step, bytes):
                psql.stdin.write(step)
            else:
                total += _restore_part(store, step, tools, env, script_filter, psql, target)
        psql.end_input()  # only now may psql reach its COMMIT
        _finish(psql, "restoring with psql", target)
    except BaseException:
        psql.kill()  # first: the single transaction must never commit
        raise
    return total


def _restore_part(store: Store, part: Part, tools: PgTools, env: dict[str, str],
                  script_filter: ScriptFilter, psql: Child, target: ConnectionInfo) -> int:
    """One pg_restore run into psql; the bytes of the archive it read and checked."""
    obj = part.manifest.object("database")
    restore = Child([tools.path("pg_restore"), "--file=-", *part.args], env, stdin=True,
                    stdout=True)
    pump = threading.Thread(target=script_filter.pump, args=(restore.stdout, psql.stdin),
                            daemon=True)
    pump.start()
    try:
        size, digest = store.stream_to(part.manifest, obj.name, restore.stdin,
                                       read_all=part.read_all)
        if part.read_all:
            _check_digest(obj, size, digest)
        _finish(restore, f"pg_restore of {part.manifest.backup_id}", target)
        pump.join()
    except BaseException:
        restore.kill()
        raise
    return size if part.read_all else 0


class ScriptFilter:
    """Adapts pg_restore's SQL script to the target server, leaving data untouched.

    Statements pass line by line through `statement()`; the rows of COPY blocks pass
    through unchanged, whatever they contain.
    """

    def __init__(self, server_version_num: int, fk_not_valid: bool = False) -> None:
        self.drop_lines = {line for version, line in NEWER_SETTINGS
                           if server_version_num < version}
        self.fk_not_valid = fk_not_valid
        self.previous = b""

    def statement(self, line: bytes) -> bytes:
        previous, self.previous = self.previous, line
        if line in self.drop_lines:
            return b""
        if self.fk_not_valid and _is_foreign_key(previous, line):
            return line[:-2] + b" NOT VALID;\n"
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


def _is_foreign_key(previous: bytes, line: bytes) -> bool:
    """The second line of pg_dump's `ALTER TABLE ONLY t ADD CONSTRAINT c FOREIGN KEY ...;`.

    Only for plain tables (ONLY): PostgreSQL cannot add a NOT VALID foreign key to a
    partitioned table, whose constraint then is validated as usual.
    """
    return (previous.startswith(b"ALTER TABLE ONLY ") and line.startswith(b"    ADD CONSTRAINT ")
            and b" FOREIGN KEY (" in line and line.endswith(b";\n")
            and not line.endswith(b" NOT VALID;\n"))


def _finish(child: Child, what: str, target: ConnectionInfo) -> None:
    """Wait for a pg_restore or psql of the restore; a failure names its errors."""
    code, stderr = child.wait()
    if code != 0:
        text = target.redact(stderr).strip()
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
        detail = "; ".join(errors)[:2000] or text[-2000:]
        raise RestoreFailed(f"{what} failed ({exit_reason(code)}): {detail}",
                            "nothing was restored (single transaction); "
                            "fix the cause and run again")
