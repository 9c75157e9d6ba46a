"""Restore drill: restore a backup into a scratch database and prove it is what was backed up.

Checksums prove that the stored bytes are the bytes that were written; only a restore
proves that those bytes are the database. The drill

    creates a scratch database on the drill server -> restores the backup into it (the
    same restore users run) -> compares, table by table, the row count and content
    fingerprint the backup recorded inside its own snapshot with the restored table's
    -> drops the scratch database and the roles the restore created

A table its backup recorded no fingerprint for (a format-2 full backup hashes none; see
tabledata.py) is compared with its stored parts instead: the restored table must give
back the very lines stored, which proves the restore, though not the dump itself; the
next incremental fingerprints every table in its own snapshot, and its drill does.

So it catches what no checksum can: an archive that is whole but does not hold what the
snapshot held (a table altered between snapshot and dump, a restore that loses rows,
an incremental that takes a table's data from the wrong backup, or that called a changed
table unchanged). The last is why every backup records every table's count and
fingerprint as its own snapshot held them, also the tables an incremental leaves in an
older archive: a recorded value inherited from that archive would agree with the stale
restore and prove nothing. The drill's user needs CREATEDB and CREATEROLE on the drill
server; the server must not be the production one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import zstandard
from psycopg2 import sql

from .db import connect, run_statement
from .dburl import ConnectionInfo
from .errors import RestoreFailed
from .fingerprint import copy_text_fingerprint, table_contents
from .manifest import Manifest, TableState
from .pgtools import Child, child_env, find_tools
from .restore import RestoreReport, drop_roles, run_restore
from .store import Store
from .tabledata import copy_settings, copy_target

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "supabackup_drill_"


@dataclass(frozen=True)
class Mismatch:
    table: str     # schema.name
    problem: str

    def __str__(self) -> str:
        return f"{self.table}: {self.problem}"


@dataclass
class DrillReport:
    backup_id: str
    server: str
    tables: int = 0           # tables compared
    rows: int = 0             # rows compared
    unfingerprinted: int = 0  # tables whose backup recorded no fingerprint (counts only)
    mismatches: list[Mismatch] = field(default_factory=list)
    restore: RestoreReport | None = None
    files: int = 0            # Storage files restored and compared (files/check.py)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "server": self.server, "tables": self.tables,
                "rows": self.rows, "files": self.files,
                "mismatches": [str(m) for m in self.mismatches],
                "restored_from": self.restore.backups if self.restore else []}


def run_drill(store: Store, manifest: Manifest, server: ConnectionInfo) -> DrillReport:
    """Restore `manifest` into a new scratch database on `server`, compare, clean up."""
    report = DrillReport(backup_id=manifest.backup_id, server=server.display())
    scratch = replace(server, dbname=SCRATCH_PREFIX + secrets.token_hex(4))
    # In the backup's encoding: fingerprints hash the server's bytes of each value.
    encoding = sql.SQL("") if manifest.database_encoding in ("", "UTF8") else sql.SQL(
        " TEMPLATE template0 ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'").format(
        sql.Literal(manifest.database_encoding))
    _admin(server, sql.SQL("CREATE DATABASE {}{}").format(sql.Identifier(scratch.dbname),
                                                          encoding),
           "create a scratch database", "the drill's user needs CREATEDB")
    created: list[str] = []
    try:
        try:
            report.restore = run_restore(store, manifest, scratch)
        except RestoreFailed as exc:  # a restore over N connections leaves what it did
            created = exc.report.roles_created if isinstance(exc.report, RestoreReport) else []
            raise
        created = report.restore.roles_created
        report.mismatches = compare(manifest, scratch, report, store)
    finally:
        _drop_database(server, scratch.dbname)
        drop_roles(server, created)
    log.info("drill of %s: %d tables, %d rows compared, %d mismatch(es)", manifest.backup_id,
             report.tables, report.rows, len(report.mismatches))
    return report


def compare(manifest: Manifest, restored: ConnectionInfo, report: DrillReport,
            store: Store | None = None) -> list[Mismatch]:
    """Each table the backup recorded against the restored table: rows, then content (the
    recorded fingerprint; without one, and with `store`, the table's stored parts)."""
    expected = {(t.schema, t.name): t for t in manifest.tables}
    conn = connect(restored)
    try:
        found = table_contents(conn, {k: t.fingerprint for k, t in expected.items()})
    finally:
        conn.close()
    mismatches = []
    for key, table in sorted(expected.items()):
        name = f"{key[0]}.{key[1]}"
        report.tables += 1
        if key not in found:
            mismatches.append(Mismatch(name, "missing after the restore"))
            continue
        rows, fingerprint = found[key]
        report.rows += rows
        if rows != table.rows:
            mismatches.append(Mismatch(name, f"{rows} rows restored, the backup's snapshot "
                                             f"held {table.rows}"))
        elif not table.fingerprint and table.parts and store is not None:
            stored, restored_text = _parts_against_restored(store, manifest, table, restored)
            if stored != restored_text:
                mismatches.append(Mismatch(name, f"content differs from its stored parts "
                                                 f"({restored_text[1]} restored, {stored[1]} "
                                                 f"stored; {rows} rows)"))
        elif not table.fingerprint:
            report.unfingerprinted += 1
        elif fingerprint != table.fingerprint:
            mismatches.append(Mismatch(name, f"content differs from the backup's snapshot "
                                             f"(fingerprint {fingerprint}, recorded "
                                             f"{table.fingerprint}; {rows} rows in both)"))
    return mismatches


def _parts_against_restored(store: Store, manifest: Manifest, table: TableState,
                            restored: ConnectionInfo) -> tuple[tuple[int, str], tuple[int, str]]:
    """copy_text_fingerprint of the table's stored parts and of a COPY of the restored
    table, under the settings the backup's COPY had."""
    def stored() -> Iterator[bytes]:
        for part in table.parts:
            unzstd = zstandard.ZstdDecompressor().decompressobj()
            for chunk in store.open_object(manifest, part.name, table.held_in):
                yield unzstd.decompress(chunk)

    tools = find_tools(manifest.pg_dump_major, purpose="restore")
    copy = Child([tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                  "-c", copy_settings(manifest.encoding),
                  "-c", f"COPY {copy_target(table)} TO STDOUT"],
                 child_env(restored, application="supabackup drill"), stdout=True)
    try:
        restored_text = copy_text_fingerprint(iter(lambda: copy.stdout.read(1 << 20), b""))
        code, stderr = copy.wait()
    finally:
        copy.kill()
        copy.close()
    if code != 0:
        raise RestoreFailed(f"the drill could not read {table.qualified} back: "
                            f"{' '.join(stderr.split())[:300]}", "see the drill server's log")
    return copy_text_fingerprint(stored()), restored_text


def _admin(server: ConnectionInfo, statement: sql.Composable, what: str, hint: str) -> None:
    run_statement(server, statement, fail=lambda detail: RestoreFailed(
        f"the drill could not {what} on {server.display()}: {detail}", hint))


def _drop_database(server: ConnectionInfo, name: str) -> None:
    """Drop the scratch database (best effort: the drill's own outcome is what matters)."""
    try:
        _admin(server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)), f"drop the scratch database {name}", "drop it by hand")
    except Exception as exc:  # noqa: BLE001 - reported, never hides the drill's result
        log.warning("%s", exc)
