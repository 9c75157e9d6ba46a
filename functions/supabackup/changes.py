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
    that were in progress at S1. "Newer than S1's xmin" is tested as 0 <= age(xmin) <=
    age(S1's xmin) (see _threshold): every row written since S1 passes it; the only rows
    that pass wrongly are old frozen rows whose raw 32-bit xmin happens to fall in that
    window, which costs an unneeded dump, never a skipped one.

Statistics counters (pg_stat_user_tables) are recorded and serve as a fast path (a table
whose counters moved is certainly changed), but never as proof: they lag, include aborted
work, reset on crashes and pg_stat_reset, and miss TRUNCATE.

Every table a backup dumps also gets a content fingerprint read in the same snapshot (see
ROW_HASHES), so that a restore drill can prove the restored data is the data the snapshot
held, table by table. A table an incremental proves unchanged keeps the fingerprint of the
backup that holds its data: its rows are the same rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from .errors import DumpFailed

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
    fingerprint: str = ""  # content hash in the backup's snapshot (ROW_HASHES)

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
       coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, -1), c.relpages,
       coalesce(array_agg(a.atttypid) FILTER (WHERE a.attnum IS NOT NULL), '{}')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT n.nspname LIKE ANY (%(excluded)s)
  AND NOT format('%%s.%%s', n.nspname, c.relname) = ANY (%(no_data)s)
GROUP BY c.oid, n.nspname, c.relname, c.relfilenode, c.relpages, s.n_tup_ins, s.n_tup_upd,
         s.n_tup_del
ORDER BY n.nspname, c.relname
"""


def schema_like(pattern: str) -> str:
    """pg_dump's schema pattern (with *) as a LIKE pattern."""
    return pattern.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%").replace("*", "%")


def snapshot_xmin(conn: psycopg2.extensions.connection) -> int:
    """The snapshot's xmin as a 32-bit xid, as `xmin` columns show it."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        return int(cur.fetchone()[0]) % XID_SPACE


class Scanned(NamedTuple):
    """One table as a scan read it, in the scan's snapshot."""

    oid: int
    schema: str
    name: str
    relfilenode: int
    definition: str
    counters: int
    rows: int            # exact count of the table's own rows (not its children's)
    new_rows: int        # rows written at or after the previous snapshot; -1: not asked
    fingerprint: str = ""  # "r:<hex>" or "t:<hex>" (ROW_HASHES); "": not asked


# An order-independent hash of a table's rows: the sum of a 64-bit hash of each row. A
# restore gives back the same rows in any physical order, so the drill compares sums, not
# digests of an ordered scan (which would sort every table). Two ways to hash a row, the
# cheaper first: "r", hash_record_extended (PostgreSQL 14+), hashes each column's value
# with its type's own hash function, about 3x cheaper than "t", a hash of the row's text;
# but json, xml, point, tsvector and a few more have no hash function, and their tables
# take "t". The fingerprint names its way ("r:0123..."), so the drill hashes the same way.
# Row text depends on a few session settings, which STABLE_OUTPUT fixes on both sides.
# row_security is off as in pg_dump: policies that would hide rows from us are an error,
# not a short count. ROW(sb_row.*) is the whole row even when a column is named sb_row.
ROW_HASHES = {"r": "hash_record_extended(ROW(sb_row.*), 0)",
              "t": "hashtextextended(ROW(sb_row.*)::text, 0)"}
STABLE_OUTPUT = ("SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'postgres';"
                 " SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 3;"
                 " SET LOCAL bytea_output = 'hex'; SET LOCAL lc_monetary = 'C';"
                 " SET LOCAL xmloption = 'content'; SET LOCAL row_security = off")


def fingerprint_hex(total: object) -> str:
    """The row-hash sum as 16 hex digits (modulo 2^64)."""
    return format(int(str(total)) % (1 << 64), "016x")


def scan_tables(conn: psycopg2.extensions.connection, excluded_schemas: Iterable[str],
                since_xmin: int | None,
                connect: Callable[[], psycopg2.extensions.connection] | None = None,
                snapshot_id: str | None = None, lanes: int = 1, *,
                no_data: Iterable[str] = (), only: set[int] | None = None,
                fingerprint: bool = False) -> list[Scanned]:
    """Inventory every table in the current snapshot, with its exact count and new rows.

    new_rows is -1 when there is no previous snapshot to compare with. Tables in
    `no_data` (schema.name: data the profile never dumps) are left out, and with `only`
    every table whose oid is not in it. With `fingerprint`, each table's rows are hashed
    too. With lanes > 1 (and connect, snapshot_id), the counting is shared with lanes - 1
    more connections that import the same snapshot, the largest tables first.
    """
    with conn.cursor() as cur:
        cur.execute(INVENTORY, {"excluded": [schema_like(p) for p in excluded_schemas] or [""],
                                "no_data": list(no_data) or [""]})
        tables = [t for t in cur.fetchall() if only is None or t[0] in only]
        if fingerprint:  # which row hash each table may take (ROW_HASHES)
            stable = _binary_hash_is_stable(cur, {oid for t in tables for oid in t[7]})
            tables = [(*t[:7], ("r", "t") if stable.issuperset(t[7]) else ("t",))
                      for t in tables]
    if connect is None or snapshot_id is None:
        lanes = 1
    shares: list[list[tuple]] = [[] for _ in range(max(1, lanes))]
    pages = [0] * len(shares)
    for t in sorted(tables, key=lambda t: -t[6]):  # relpages: biggest first, to the emptiest
        lane = pages.index(min(pages))
        shares[lane].append(t)
        pages[lane] += max(1, t[6])
    counted: dict[int, Scanned] = {}
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_lane, daemon=True,
                                args=(connect, snapshot_id, share, since_xmin, fingerprint,
                                      counted, errors))
               for share in shares[1:]]
    for thread in threads:
        thread.start()
    try:
        with conn.cursor() as cur:
            counted.update(_count(cur, shares[0], since_xmin, fingerprint))
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return [counted[t[0]] for t in tables]


def in_snapshot(connect: Callable[[], psycopg2.extensions.connection], snapshot_id: str,
                work: Callable[[psycopg2.extensions.cursor], None]) -> None:
    """Run `work` on a new connection whose transaction imports the run's snapshot."""
    conn = connect()
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
            work(cur)
    finally:
        conn.close()


def _lane(connect: Callable[[], psycopg2.extensions.connection] | None, snapshot_id: str | None,
          tables: list[tuple], since_xmin: int | None, fingerprint: bool,
          counted: dict[int, Scanned], errors: list[BaseException]) -> None:
    try:
        assert connect is not None and snapshot_id is not None
        in_snapshot(connect, snapshot_id,
                    lambda cur: counted.update(_count(cur, tables, since_xmin, fingerprint)))
    except BaseException as exc:  # noqa: BLE001 - raised by scan_tables in the caller
        errors.append(exc)


def _count(cur: psycopg2.extensions.cursor, tables: list[tuple],
           since_xmin: int | None, fingerprint: bool = False) -> dict[int, Scanned]:
    """Exact count, new rows (and fingerprint) of each table, in the cursor's transaction.

    FROM ONLY: a table's own rows, which are what pg_dump's COPY of it holds; an
    inheritance parent's count must not move with its children.
    """
    threshold = None if since_xmin is None else _threshold(cur, since_xmin)
    if fingerprint:
        cur.execute(STABLE_OUTPUT)
    result = {}
    for oid, schema, name, relfilenode, definition, counters, _pages, ways in tables:
        table = sql.Identifier(schema, name)
        if since_xmin is None:
            new = sql.SQL("-1")
        elif threshold is not None:
            # 0 <= age(xmin) <= age(S1's xmin): written at or after S1's xmin (_threshold).
            new = sql.SQL("count(*) FILTER (WHERE age(xmin) BETWEEN 0 AND {})").format(
                sql.Literal(threshold))
        else:
            # xmin at or after S1's xmin, modulo 2^32 (see the module's docstring).
            new = sql.SQL("count(*) FILTER (WHERE (xmin::text::bigint - {since} + {space})"
                          " % {space} < {half})").format(
                since=sql.Literal(since_xmin), space=sql.Literal(XID_SPACE),
                half=sql.Literal(XID_HALF))
        if fingerprint:
            rows, new_rows, digest = _fingerprinted(cur, table, new, ways)
        else:
            cur.execute(sql.SQL("SELECT count(*), {} FROM ONLY {} sb_row").format(new, table))
            (rows, new_rows), digest = cur.fetchone(), ""
        result[oid] = Scanned(oid, schema, name, relfilenode, definition, counters, int(rows),
                              int(new_rows), digest)
    return result


def _fingerprinted(cur: psycopg2.extensions.cursor, table: sql.Composable,
                   extra: sql.Composable, ways: tuple[str, ...]) -> tuple[int, int, str]:
    """count(*), `extra` and the table's fingerprint, the first of `ways` that works.

    A way that cannot hash one of the table's types fails at once (UndefinedFunction); a
    savepoint keeps the transaction, and with it the run's snapshot, alive for the next.
    """
    for way in ways:
        cur.execute("SAVEPOINT sb_fingerprint")
        try:
            cur.execute(sql.SQL("SELECT count(*), {}, coalesce(sum({}), 0) FROM ONLY {} sb_row")
                        .format(extra, sql.SQL(ROW_HASHES[way]), table))
        except psycopg2.errors.UndefinedFunction:
            cur.execute("ROLLBACK TO SAVEPOINT sb_fingerprint")
            if way == ways[-1]:
                raise
            continue
        rows, other, total = cur.fetchone()
        cur.execute("RELEASE SAVEPOINT sb_fingerprint")
        return int(rows), int(other), f"{way}:{fingerprint_hex(total)}"
    raise AssertionError("unreachable")


# Types whose binary hash is the hash of an oid that a restore assigns anew.
_OID_VALUED = ("regclass", "regcollation", "regconfig", "regdictionary", "regnamespace",
               "regoper", "regoperator", "regproc", "regprocedure", "regrole", "regtype")


def _binary_hash_is_stable(cur: psycopg2.extensions.cursor, type_oids: set[int]) -> set[int]:
    """The column types whose binary hash ("r") survives a dump and restore.

    An enum's hash is that of its label's oid, and reg* values hash as oids: a restore
    gives both new oids, so their tables are hashed as text. Composites and ranges might
    hold either, and are hashed as text too. Domains and arrays are judged by what they
    are of.
    """
    cur.execute("SELECT oid, typtype, typcategory, typbasetype, typelem, typname,"
                " typnamespace = 'pg_catalog'::regnamespace FROM pg_type")
    types = {row[0]: row[1:] for row in cur.fetchall()}

    def stable(oid: int, depth: int = 0) -> bool:
        typtype, category, base, elem, name, in_catalog = types[oid]
        if depth > 10:
            return False
        if typtype == "d":
            return stable(base, depth + 1)
        if category == "A" and elem:
            return stable(elem, depth + 1)
        return typtype == "b" and not (in_catalog and name in _OID_VALUED)

    return {oid for oid in type_oids if oid in types and stable(oid)}


def table_contents(conn: psycopg2.extensions.connection,
                   tables: dict[tuple[str, str], str]) -> dict[tuple[str, str], tuple[int, str]]:
    """(rows, fingerprint) of each named table that exists, read as a backup read it.

    The restore drill's side of the comparison: `tables` maps (schema, name) to the
    fingerprint the backup recorded, whose way ("r" or "t") is used again, with the same
    FROM ONLY count under the same STABLE_OUTPUT, in one transaction. A table recorded
    without a fingerprint is counted only ("" for its fingerprint).
    """
    found = {}
    with conn.cursor() as cur:
        cur.execute(STABLE_OUTPUT)
        for (schema, name), recorded in tables.items():
            cur.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, name).as_string(cur),))
            if cur.fetchone()[0] is None:
                continue
            way = recorded.partition(":")[0]
            table = sql.Identifier(schema, name)
            if way in ROW_HASHES:
                rows, _, digest = _fingerprinted(cur, table, sql.SQL("0"), (way,))
            else:
                cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(table))
                rows, digest = int(cur.fetchone()[0]), ""
            found[(schema, name)] = (rows, digest)
    conn.rollback()
    return found


def _threshold(cur: psycopg2.extensions.cursor, since_xmin: int) -> int | None:
    """age() of S1's xmin in this transaction, or None if it cannot be compared with.

    age(x) is (int32)(R - x), with R an xid fixed for the whole transaction (its own, or
    the next xid when it first asks) and INT_MAX for permanent xids. R is newer than every
    xid visible in the snapshot, and K = R - S1's xmin is in [0, 2^31). A visible row
    written at or after S1's xmin therefore has 1 <= R - xmin <= K: its age is in [0, K]
    and it is counted. A row whose age falls outside is older than S1's xmin, or is a
    frozen row whose raw xmin lies 2^31 or more behind R, which an unfrozen row cannot.
    So no new row is missed, and an old frozen row is counted as new only when its raw
    xmin falls, modulo 2^32, within the K xids since S1. (The modular test "(xmin - S1)
    mod 2^32 < 2^31" counts every row 2^31 to 2^32 xids old as new. A busy database
    passes 2^31 xids within months, and then every table with rows that old is dumped in
    every incremental.) It is also one conversion per transaction instead of
    xid -> text -> bigint on every row.
    """
    cur.execute("SELECT age(%s::text::xid)", (str(since_xmin),))
    k = int(cur.fetchone()[0])
    return k if 0 <= k < XID_HALF else None


class BackgroundScan:
    """`scan_tables` with fingerprints, on a second connection that imports the run's snapshot.

    It runs alongside pg_dump rather than before it: a full backup dumps every table
    whatever the scan finds, and an incremental has already decided what to dump. Both see
    the same snapshot, so the counts and fingerprints are those of the archive. `only`
    limits it to the tables an incremental dumps.
    """

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection],
                 snapshot_id: str, excluded_schemas: Iterable[str],
                 no_data: Iterable[str] = (), only: set[int] | None = None) -> None:
        self._result: list[Scanned] = []
        self._error: BaseException | None = None
        self._conn: psycopg2.extensions.connection | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            args=(connect, snapshot_id, list(excluded_schemas), list(no_data), only))
        self._thread.start()

    def _run(self, connect: Callable[[], psycopg2.extensions.connection], snapshot_id: str,
             excluded: list[str], no_data: list[str], only: set[int] | None) -> None:
        def kept() -> psycopg2.extensions.connection:  # so that cancel() can reach it
            self._conn = connect()
            return self._conn

        try:
            def work(cur: psycopg2.extensions.cursor) -> None:
                self._result = scan_tables(cur.connection, excluded, None, no_data=no_data,
                                           only=only, fingerprint=True)
            in_snapshot(kept, snapshot_id, work)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def cancel(self) -> None:
        """Stop the scan of a run that failed: no query of ours outlives the run."""
        if self._conn is not None and not self._conn.closed:
            self._conn.cancel()
        self._thread.join(timeout=10)

    def result(self) -> list[Scanned]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def with_fingerprints(tables: list[TableState], scanned: list[Scanned]) -> list[TableState]:
    """The tables an incremental dumped, with the fingerprints read alongside its pg_dump.

    Both scans ran in the run's snapshot, so their counts agree; if they did not, the
    snapshot was not shared and nothing about this backup could be trusted.
    """
    by_oid = {s.oid: s for s in scanned}
    out = []
    for table in tables:
        if table.reason:
            seen = by_oid[table.oid]
            if seen.rows != table.rows:
                raise DumpFailed(f"{table.qualified}: {seen.rows} rows alongside pg_dump, "
                                 f"{table.rows} before it, in what should be one snapshot",
                                 "nothing was stored; run the backup again")
            table = replace(table, fingerprint=seen.fingerprint)
        out.append(table)
    return out


def decide(scanned: Iterable[tuple], previous: dict[int, TableState] | None,
           backup_id: str) -> list[TableState]:
    """For each table: unchanged (data stays where it is held) or dumped here, and why.

    A pure function of the scan and the parent's table records, so it can be tested over
    every kind of change without a server. An unchanged table keeps the fingerprint of the
    backup that holds it.
    """
    states = []
    for seen in map(lambda t: Scanned(*t), scanned):
        before = (previous or {}).get(seen.oid)
        reason = _reason(before, seen.schema, seen.name, seen.relfilenode, seen.definition,
                         seen.counters, seen.rows, seen.new_rows)
        states.append(TableState(
            oid=seen.oid, schema=seen.schema, name=seen.name, relfilenode=seen.relfilenode,
            definition=seen.definition, rows=seen.rows, counters=seen.counters,
            held_in=backup_id if reason else before.held_in,  # type: ignore[union-attr]
            reason=reason,
            fingerprint=seen.fingerprint if reason else before.fingerprint))  # type: ignore[union-attr]
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

