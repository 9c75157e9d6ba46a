"""Which tables changed since the previous backup: sound change detection.

For every table, inside the run's own snapshot S2, one sequential scan reads its exact row
count and how many of its visible rows were written by a transaction at or after the
previous backup's snapshot S1 (`xmin` at or after S1's xmin). A table is unchanged only when
the scan proves it; everything else is dumped.

Why a table reported unchanged really is unchanged (the soundness argument):

    Let V1 be the rows of the table visible at S1 and V2 those visible at S2 (S1 earlier).
    Take a row r in V2 whose xmin is older than S1's xmin. Its inserting transaction
    committed before S1 began, so r was visible at S1 unless a transaction visible at S1
    had deleted it; such a deletion would be visible at S2 too, and r would not be in V2.
    So if no row of V2 is newer than S1's xmin, then V2 is a subset of V1; and if
    moreover |V2| = |V1|, then V2 = V1: the table holds exactly the rows it held at S1.

    Inserts and updates write rows with new xmins; deletes lower the count; TRUNCATE and
    rewrites change the relfilenode; ALTER TABLE changes the definition: each is caught.
    Comparing with S1's xmin (not its xmax) also covers subtransactions of transactions
    that were in progress at S1. xids are 32-bit and compared modulo 2^32: an old frozen
    row may then look new, which only causes an unneeded dump, never a skipped one.

Statistics counters (pg_stat_user_tables) are recorded and serve as a fast path (a table
whose counters moved is certainly changed), but never as proof: they lag, include aborted
work, reset on crashes and pg_stat_reset, and miss TRUNCATE.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import psycopg2.extensions
from psycopg2 import sql

log = logging.getLogger(__name__)

XID_SPACE = 1 << 32
XID_HALF = 1 << 31


@dataclass(frozen=True)
class TableState:
    """A table as one backup saw it, and which backup holds its data."""

    oid: int
    schema: str
    name: str
    relfilenode: int
    definition: str      # sha256 of the columns (names, types, order) and kind
    rows: int            # exact count in the backup's snapshot
    counters: int        # n_tup_ins + n_tup_upd + n_tup_del (a hint only)
    held_in: str         # backup id whose archive holds this table's data
    reason: str = ""     # why this backup dumped it ("" when unchanged)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


INVENTORY = """
SELECT c.oid, n.nspname, c.relname, c.relfilenode,
       encode(sha256(convert_to(c.relkind::text || ':' || coalesce(string_agg(
           a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END,
           ',' ORDER BY a.attnum), ''), 'UTF8')), 'hex'),
       coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, -1)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT n.nspname LIKE ANY (%(excluded)s)
GROUP BY c.oid, n.nspname, c.relname, c.relfilenode, s.n_tup_ins, s.n_tup_upd, s.n_tup_del
ORDER BY n.nspname, c.relname
"""


def _like(pattern: str) -> str:
    """pg_dump's schema pattern (with *) as a LIKE pattern."""
    return pattern.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%").replace("*", "%")


def snapshot_xmin(conn: psycopg2.extensions.connection) -> int:
    """The snapshot's xmin as a 32-bit xid, as `xmin` columns show it."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        return int(cur.fetchone()[0]) % XID_SPACE


def scan_tables(conn: psycopg2.extensions.connection, excluded_schemas: Iterable[str],
                since_xmin: int | None) -> list[tuple[int, str, str, int, str, int, int, int]]:
    """Inventory every table in the current snapshot, with its exact count and new rows.

    Returns (oid, schema, name, relfilenode, definition, counters, rows, new_rows);
    new_rows is -1 when there is no previous snapshot to compare with.
    """
    with conn.cursor() as cur:
        cur.execute(INVENTORY, {"excluded": [_like(p) for p in excluded_schemas] or [""]})
        tables = cur.fetchall()
        result = []
        for oid, schema, name, relfilenode, definition, counters in tables:
            table = sql.Identifier(schema, name)
            if since_xmin is None:
                cur.execute(sql.SQL("SELECT count(*), -1 FROM {}").format(table))
            else:
                # xmin at or after S1's xmin, modulo 2^32 (see the module's docstring).
                cur.execute(sql.SQL(
                    "SELECT count(*), count(*) FILTER (WHERE "
                    "(xmin::text::bigint - %(since)s + %(space)s) %% %(space)s < %(half)s)"
                    " FROM {}").format(table),
                    {"since": since_xmin, "space": XID_SPACE, "half": XID_HALF})
            rows, new_rows = cur.fetchone()
            result.append((oid, schema, name, relfilenode, definition, counters,
                           int(rows), int(new_rows)))
        return result


class BackgroundScan:
    """`scan_tables` on a second connection that imports the run's snapshot.

    A full backup dumps every table whatever the scan finds, so its scan (which records
    the counts the next incremental compares with) runs alongside pg_dump rather than
    before it. Both see the same snapshot, so the counts are those of the archive.
    """

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection],
                 snapshot_id: str, excluded_schemas: Iterable[str]) -> None:
        self._result: list[tuple[int, str, str, int, str, int, int, int]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(connect, snapshot_id, list(excluded_schemas)))
        self._thread.start()

    def _run(self, connect: Callable[[], psycopg2.extensions.connection], snapshot_id: str,
             excluded: list[str]) -> None:
        try:
            conn = connect()
            try:
                conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
                with conn.cursor() as cur:
                    cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
                self._result = scan_tables(conn, excluded, None)
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def result(self) -> list[tuple[int, str, str, int, str, int, int, int]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def decide(scanned: list[tuple[int, str, str, int, str, int, int, int]],
           previous: dict[int, TableState] | None, backup_id: str) -> list[TableState]:
    """For each table: unchanged (data stays where it is held) or dumped here, and why.

    A pure function of the scan and the parent's table records, so it can be tested over
    every kind of change without a server.
    """
    states = []
    for oid, schema, name, relfilenode, definition, counters, rows, new_rows in scanned:
        before = (previous or {}).get(oid)
        reason = _reason(before, schema, name, relfilenode, definition, counters, rows,
                         new_rows)
        states.append(TableState(
            oid=oid, schema=schema, name=name, relfilenode=relfilenode,
            definition=definition, rows=rows, counters=counters,
            held_in=backup_id if reason else before.held_in,  # type: ignore[union-attr]
            reason=reason))
    return states


def _reason(before: TableState | None, schema: str, name: str, relfilenode: int,
            definition: str, counters: int, rows: int, new_rows: int) -> str:
    if before is None:
        return "new table" if new_rows != -1 else "full backup"
    if (before.schema, before.name) != (schema, name):
        return "renamed"
    if before.relfilenode != relfilenode:
        return "relfilenode changed (truncated or rewritten)"
    if before.definition != definition:
        return "definition changed"
    if counters > before.counters >= 0:
        return "counters moved"
    if new_rows != 0:
        return "rows written since the previous backup" if new_rows > 0 else "no previous snapshot"
    if rows != before.rows:
        return "row count changed"
    return ""

