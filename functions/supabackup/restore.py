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
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import IO

import psycopg2

from .dburl import ConnectionInfo
from .dump import child_env
from .errors import BackupNotFound, ConfigError, RestoreFailed, StoreError
from .manifest import Manifest, StoredObject
from .pgtools import PgTools, find_tools
from .profiles import PROFILES
from .roles import drop_reserved, plan_roles, quote_ident
from .snapshot import connect
from .store import Store
from .supabase_restore import SupabaseTarget
from .toc import TocEntry, read_toc

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

    def lines(self) -> list[str]:
        out = [f"restored {self.backup_id} into {self.target} ({self.bytes} bytes read)"]
        if len(self.backups) > 1:
            out.append(f"table data from: {', '.join(self.backups)}")
        out += self.notes
        out += [f"NOT AS BACKED UP: {line}" for line in self.inexact]
        if self.roles_created:
            out.append(f"created roles: {', '.join(self.roles_created)} (without passwords)")
        if self.roles_existing:
            out.append(f"left existing roles as they are: {', '.join(self.roles_existing)}")
        return out


@dataclass(frozen=True)
class RestoreOptions:
    tables: tuple[str, ...] = ()  # schema.name, or name alone when one schema has it
    profile: str = "postgres"     # "supabase": into a fresh Supabase project

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown restore profile {self.profile!r}",
                              f"choose one of: {', '.join(PROFILES)}")


def run_restore(store: Store, manifest: Manifest, target: ConnectionInfo,
                options: RestoreOptions | None = None) -> RestoreReport:
    """Restore `manifest`'s backup into the empty database `target`."""
    options = options or RestoreOptions()
    report = RestoreReport(backup_id=manifest.backup_id, target=target.display())
    selected = select_tables(manifest, options.tables)
    conn = connect(target)
    conn.autocommit = True
    try:
        supabase = SupabaseTarget.read(conn, manifest) if options.profile == "supabase" else None
        _check_empty(conn, target, supabase.ignored_schemas if supabase else ())
        server_version_num = conn.server_version
        tools = find_tools(manifest.pg_dump_major, purpose="restore")
        roles_script = _read_small(store, manifest, manifest.object("roles")).decode()
        if supabase is not None:  # the project has its reserved roles; never touch them
            roles_script = drop_reserved(roles_script, supabase.is_reserved)
        existing = _existing_roles(conn)
        # A supabase-profile backup restored outside Supabase: its objects are owned by, and
        # granted to, the platform's roles, which roles.sql leaves out.
        placeholders = [] if supabase else [r for r in manifest.platform_roles
                                            if r not in existing]
        plan = plan_roles(roles_script, existing | set(placeholders))
        report.roles_created = placeholders + plan.create
        report.roles_existing = plan.existing
        _apply_roles(conn, [f"CREATE ROLE {quote_ident(r)} NOLOGIN" for r in placeholders]
                     + plan.statements, target)
        if placeholders:
            report.notes.append("created the platform's roles as NOLOGIN placeholders, so "
                                "ownership, grants and policies restore (the platform's "
                                "event triggers are left out): " + ", ".join(placeholders))
    finally:
        conn.close()
    try:
        with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
            steps = restore_plan(store, manifest, Path(workdir), selected, supabase,
                                 frozenset(placeholders))
            parts = [p for p in steps if isinstance(p, Part)]
            report.backups = sorted({p.manifest.backup_id for p in parts})
            report.bytes = _pg_restore(store, steps, target, tools, server_version_num,
                                       fk_not_valid=selected is not None)
    except BaseException:
        drop_roles(target, report.roles_created)
        raise
    if selected is not None:
        report.notes.append(f"table data restored for: {_names(manifest, selected)} (other "
                            "tables are empty; foreign keys of restored tables were added "
                            "NOT VALID)")
    if supabase is not None:
        report.notes += supabase.notes()
    log.info("restored %s into %s", manifest.backup_id, target.display())
    return report


def _names(manifest: Manifest, oids: set[int]) -> str:
    return ", ".join(sorted(t.qualified for t in manifest.table_states.values()
                            if t.oid in oids))


def select_tables(manifest: Manifest, names: Iterable[str]) -> set[int] | None:
    """The oids of the named tables in `manifest`, or None for all; unknown names are an error."""
    names = list(names)
    if not names:
        return None
    tables = manifest.table_states.values()
    oids: set[int] = set()
    for wanted in names:
        found = [t for t in tables if wanted in (t.qualified, t.name)]
        if len(found) != 1:
            known = ", ".join(sorted(t.qualified for t in tables)[:10])
            problem = "is in several schemas" if found else "is not in the backup"
            raise ConfigError(f"table {wanted!r} {problem} {manifest.backup_id}",
                              f"name it as schema.table; the backup has: {known}")
        oids.add(found[0].oid)
    return oids


def _check_empty(conn: psycopg2.extensions.connection, target: ConnectionInfo,
                 ignored_schemas: Iterable[str] = ()) -> None:
    """Refuse a target that holds any relation (outside a fresh Supabase project's own)."""
    with conn.cursor() as cur:
        cur.execute("""
            SELECT n.nspname || '.' || c.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
              AND NOT n.nspname LIKE ANY (%s)
            ORDER BY 1 LIMIT 5""", (list(ignored_schemas) or [""],))
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


def drop_roles(target: ConnectionInfo, roles: list[str]) -> None:
    """Drop roles a restore created: after it failed, or after a drill (best effort)."""
    if not roles:
        return
    try:
        conn = connect(target)
        conn.autocommit = True
        with conn.cursor() as cur:
            for role in reversed(roles):
                cur.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        conn.close()
    except Exception as exc:  # noqa: BLE001 - the restore's own outcome is the one to report
        log.warning("could not drop the roles the restore created: %s", exc)


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
    what: str = "everything"
    read_all: bool = True  # False: a pass that needs only the table of contents


# A restore is pg_restore runs and, between them, SQL of our own (bytes), all fed to one psql.
Step = Part | bytes


def restore_plan(store: Store, manifest: Manifest, workdir: Path,
                 selected: set[int] | None = None,
                 supabase: SupabaseTarget | None = None,
                 placeholders: frozenset[str] = frozenset()) -> list[Step]:
    """The steps that rebuild `manifest`'s database, in order.

    A full backup is one run. An incremental: its pre-data; then the data of each table
    it did not dump, from the backup of the chain that holds it (matched by the table's
    oid, whose definition that backup recorded as the same); then its own data and
    sequences; then its post-data (indexes, constraints, triggers, matview contents).
    `selected` (table oids) keeps the data of those tables only; `supabase` skips what a
    fresh project has and applies the backup's grants last (see supabase_restore.py).
    Event triggers owned by `placeholders` (platform roles made NOLOGIN stand-ins on a
    server without them) are the platform's own, and only a superuser may own one: they
    are left out.
    """
    def wanted(entry: TocEntry) -> bool:
        if entry.desc == "TABLE DATA" and selected is not None and entry.oid not in selected:
            return False
        if entry.desc == "EVENT TRIGGER" and entry.owner in placeholders:
            return False
        return supabase is None or supabase.keep(entry)

    tocs: dict[str, list[TocEntry]] = {}

    def toc(of: Manifest) -> list[TocEntry]:  # each archive's head is read once
        if of.backup_id not in tocs:
            tocs[of.backup_id] = read_toc(store, of)
        return tocs[of.backup_id]

    def use_list(of: Manifest, keep: Callable[[TocEntry], bool], name: str) -> str:
        listing = workdir / f"{of.backup_id}.{name}.list"
        listing.write_text("".join(e.line + "\n" for e in toc(of) if keep(e)))
        return f"--use-list={listing}"

    filtered = selected is not None or supabase is not None or bool(placeholders)
    own = (use_list(manifest, wanted, "restore"),) if filtered else ()
    steps: list[Step] = [supabase.prologue()] if supabase is not None else []
    if manifest.kind == "full":
        steps.append(Part(manifest, own))
    else:
        steps.append(Part(manifest, ("--section=pre-data", *own), "pre-data"))
        steps += _holder_parts(store, manifest, selected, wanted, toc, use_list)
        steps += [Part(manifest, ("--section=data", *own), "data"),
                  Part(manifest, ("--section=post-data", *own), "post-data")]
    if supabase is not None:
        steps += [supabase.reset_default_grants(),
                  Part(manifest, (use_list(manifest, supabase.keep_grant, "grants"),),
                       "grants", read_all=False)]
    return steps


def _holder_parts(store: Store, manifest: Manifest, selected: set[int] | None,
                  wanted: Callable[[TocEntry], bool],
                  toc: Callable[[Manifest], list[TocEntry]],
                  use_list: Callable[[Manifest, Callable[[TocEntry], bool], str], str]
                  ) -> list[Part]:
    """The data an incremental did not dump, from the backups of its chain that hold it."""
    holders: dict[str, set[int]] = {}
    for oid, table in manifest.table_states.items():
        if table.held_in != manifest.backup_id and (selected is None or oid in selected):
            holders.setdefault(table.held_in, set()).add(oid)
    by_id = {m.backup_id: m for m in store.manifests(manifest.database_id)} if holders else {}
    parts = []
    for holder_id in sorted(holders):
        holder = by_id.get(holder_id)
        if holder is None:
            raise BackupNotFound(
                f"{manifest.backup_id} needs table data from {holder_id}, which is gone",
                "restore an earlier or a full backup (`supabackup list`)")
        oids = holders[holder_id]
        found = {e.oid for e in toc(holder) if e.desc == "TABLE DATA"} & oids
        if found != oids:
            raise RestoreFailed(f"{holder_id} lacks table data that {manifest.backup_id} "
                                "relies on", "run `supabackup verify`; restore another backup")
        data = use_list(holder, lambda e, oids=oids: (  # type: ignore[misc]
            e.desc == "TABLE DATA" and e.oid in oids and wanted(e)), "data")
        tables = sorted(f"{t['schema']}.{t['name']}" for t in manifest.tables
                        if t["held_in"] == holder_id and int(t["oid"]) in oids)
        what = f"data of {len(tables)} table(s): {', '.join(tables[:8])}" + (
            ", ..." if len(tables) > 8 else "")
        parts.append(Part(holder, ("--data-only", data), what))
    return parts


def describe_plan(store: Store, manifest: Manifest, options: RestoreOptions | None = None
                  ) -> list[str]:
    """What a restore of `manifest` would read, in order, without touching any database."""
    options = options or RestoreOptions()
    lines = [f"restore of {manifest.backup_id} ({manifest.kind}, snapshot at "
             f"{manifest.snapshot_at}):"]
    roles = manifest.object("roles")
    lines.append(f"  roles      {manifest.backup_id}/{roles.name}  {roles.size} bytes")
    selected = select_tables(manifest, options.tables)
    with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
        for step in restore_plan(store, manifest, Path(workdir), selected):
            if isinstance(step, Part):
                obj = step.manifest.object("database")
                lines.append(f"  {step.manifest.backup_id}/{obj.name}  {obj.size} bytes  "
                             f"{step.what}")
    if selected is not None:
        lines.append(f"  table data of: {_names(manifest, selected)} only")
    return lines


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
    psql = _Process([tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                     "--single-transaction", "-o", "/dev/null"], env, stdin=True)
    total = 0
    try:
        for step in steps:
            if isinstance(step, bytes):
                psql.stdin.write(step)
            else:
                total += _restore_part(store, step, tools, env, script_filter, psql, target)
        _close(psql.stdin)  # only now may psql reach its COMMIT
        psql.finish("restoring with psql", target)
    except BaseException:
        psql.kill()  # first: the single transaction must never commit
        raise
    return total


def _restore_part(store: Store, part: Part, tools: PgTools, env: dict[str, str],
                  script_filter: ScriptFilter, psql: _Process, target: ConnectionInfo) -> int:
    """One pg_restore run into psql; the bytes of the archive it read and checked."""
    obj = part.manifest.object("database")
    restore = _Process([tools.path("pg_restore"), "--file=-", *part.args], env, stdin=True,
                       stdout=True)
    pump = threading.Thread(target=script_filter.pump, args=(restore.stdout, psql.stdin),
                            daemon=True)
    pump.start()
    try:
        size, digest = store.stream_to(part.manifest, obj.name, restore.stdin,
                                       read_all=part.read_all)
        if part.read_all:
            _check_digest(obj, size, digest)
        restore.finish(f"pg_restore of {part.manifest.backup_id}", target)
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

