"""Which tables changed since the previous backup: sound change detection, proven twice.

For every table, inside the run's own snapshot S2, one sequential scan reads its exact row
count, how many of its visible rows were written by a transaction at or after the
previous backup's snapshot S1 (`xmin` at or after S1's xmin), and a content fingerprint of
its rows. A table is unchanged only when the scan proves it; everything else is dumped.

Why a table reported unchanged really is unchanged (the soundness argument):

    Let V1 be the rows of the table visible at S1 and V2 those visible at S2 (S1 earlier).
    Take a row r in V2 whose xmin is older than S1's xmin. Its inserting transaction
    committed before S1 began, so r was visible at S1 unless a transaction visible at S1
    had deleted it; such a deletion would be visible at S2 too, and r would not be in V2.
    So if no row of V2 is newer than S1's xmin, then V2 is a subset of V1; and if
    moreover |V2| = |V1|, then V2 = V1: the table holds exactly the rows it held at S1.

    Inserts and updates write rows with new xmins; deletes lower the count; TRUNCATE and
    rewrites change the relfilenode; ALTER TABLE changes the definition: each is caught.
    The definition (INVENTORY) is the table's kind, its live columns' names and types in
    order, and the positions of its dropped columns: a column dropped and added again
    with the same name and type (its values gone, or a fast DEFAULT in their place, with
    no rewrite) leaves the live columns as they were, but its old position stays dropped
    for good. Comparing with S1's xmin (not its xmax) also covers subtransactions of
    transactions that were in progress at S1. "Newer than S1's xmin" is tested as 0 <=
    age(xmin) <= age(S1's xmin) (see _threshold): every row written since S1 passes it;
    the only rows that pass wrongly are old frozen rows whose raw 32-bit xmin happens to
    fall in that window, which costs an unneeded dump, never a skipped one.

The argument is about stored rows. The catalog can change what those rows mean without
touching them: `ALTER TYPE mood RENAME VALUE` gives a stored enum value another label,
`ALTER TYPE pair ADD ATTRIBUTE` gives every stored value of a composite column another
text form, and so does anything else that changes a type's output but not the table.
An older archive holds the old text, which would not restore to what the table holds
now. Hence the second proof, by content: the fingerprint read in S2 must equal the one
recorded for the table by the previous backup, or the table is dumped ("content
changed"). It is independent of the first (no xmin, no catalog), so it also catches a
table that a bug in the first calls unchanged.

Statistics counters (pg_stat_user_tables) are recorded and serve as a fast path (a table
whose counters moved is certainly changed), but never as proof: they lag, include aborted
work, reset on crashes and pg_stat_reset, and miss TRUNCATE.

The fingerprints themselves are in fingerprint.py; the records this produces
(TableState) are the manifest's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

import psycopg2.extensions
from psycopg2 import sql

from . import output
from .db import user_schemas
from .fingerprint import binary_hash_is_stable, fingerprinted
from .manifest import TableState

log = logging.getLogger(__name__)


XID_SPACE = 1 << 32
# How long a connection of a run other than its snapshot's own waits for a table's lock.
WORKER_LOCK_TIMEOUT = "10s"


XID_HALF = 1 << 31


# The definition hashes the live columns in order and, only when there are any, the
# positions of dropped ones: a table that never lost a column keeps the hash it had
# before dropped columns counted.
INVENTORY = f"""
SELECT c.oid, n.nspname, c.relname, c.relfilenode,
       encode(sha256(convert_to(c.relkind::text || ':' || coalesce(string_agg(
           a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END,
           ',' ORDER BY a.attnum) FILTER (WHERE NOT a.attisdropped), '')
           || coalesce(' dropped ' || string_agg(a.attnum::text, ',' ORDER BY a.attnum)
                       FILTER (WHERE a.attisdropped), ''), 'UTF8')), 'hex'),
       coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, -1), c.relpages,
       coalesce(array_agg(a.atttypid) FILTER (WHERE NOT a.attisdropped), '{{}}'),
       coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                FILTER (WHERE NOT a.attisdropped AND a.attgenerated = ''), '{{}}'),
       pg_relation_size(c.oid), pg_table_size(c.oid)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND {user_schemas(parameters=True)}
  -- an extension's tables: pg_dump leaves their rows to CREATE EXTENSION, but for those a
  -- config table's filter keeps (pg_extension_config_dump), which it dumps itself
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
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


class Listed(NamedTuple):
    """One table of the inventory, from the catalog alone (no table is read)."""

    oid: int
    schema: str
    name: str
    relfilenode: int
    definition: str       # see INVENTORY, and type_signatures for the types it uses
    counters: int
    pages: int            # relpages: the planner's estimate
    type_oids: list[int]  # the live columns' types
    columns: list[str]    # the columns a COPY of the table holds, in order (not generated)
    bytes: int            # pg_relation_size: the heap's size now, in bytes
    total_bytes: int = 0  # pg_table_size: with its TOAST table (values stored out of line)


def list_tables(cur: psycopg2.extensions.cursor, excluded_schemas: Iterable[str],
                no_data: Iterable[str] = ()) -> list[Listed]:
    """The tables whose data a backup holds, in the cursor's snapshot.

    A table's definition also covers what its column types' text form depends on in the
    catalog (type_signatures): `ALTER TYPE mood RENAME VALUE` or `ALTER TYPE pair ADD
    ATTRIBUTE` change no row, but they change what a COPY of the table says, so they are
    a change of definition for change detection.
    """
    cur.execute(INVENTORY, {"excluded": [schema_like(p) for p in excluded_schemas] or [""],
                            "no_data": list(no_data) or [""]})
    rows = [Listed(*row) for row in cur.fetchall()]
    signatures = type_signatures(cur, {oid for t in rows for oid in t.type_oids})
    listed = []
    for t in rows:
        signature = ";".join(signatures[oid] for oid in sorted(set(t.type_oids))
                             if signatures.get(oid))
        if signature:
            definition = hashlib.sha256(f"{t.definition} types {signature}".encode()).hexdigest()
            t = t._replace(definition=definition)
        listed.append(t)
    return listed


def unchanged_since(conn: psycopg2.extensions.connection, listed: list[Listed],
                    excluded_schemas: Iterable[str], no_data: Iterable[str] = ()) -> list[str]:
    """The listed tables that the catalog as it is now (not as the snapshot saw it) holds
    otherwise: another name, file, definition or columns, or gone. `conn` must not be in
    the snapshot's transaction. Empty when every table is as listed."""
    with conn.cursor() as cur:
        now = {t.oid: t for t in list_tables(cur, excluded_schemas, no_data)}
    conn.rollback()
    def same(a: Listed, b: Listed | None) -> bool:
        return b is not None and (a.schema, a.name, a.relfilenode, a.definition, a.columns) \
            == (b.schema, b.name, b.relfilenode, b.definition, b.columns)
    return [f"{t.schema}.{t.name}" for t in listed if not same(t, now.get(t.oid))]


def type_signatures(cur: psycopg2.extensions.cursor, type_oids: set[int]) -> dict[int, str]:
    """For each type, the catalog state its values' text form depends on, beyond its name.

    An enum's labels in order; a composite's attributes (names and types) in order; and
    through domains, arrays and ranges, those of what they are made of. Base types map to
    "" (their output function is their own). Read once per run from pg_type, pg_enum and
    pg_attribute.
    """
    if not type_oids:
        return {}
    cur.execute("SELECT oid, typtype, typbasetype, typelem, typrelid, typcategory"
                " FROM pg_type")
    types = {row[0]: row[1:] for row in cur.fetchall()}
    cur.execute("SELECT enumtypid, array_agg(enumlabel::text ORDER BY enumsortorder)"
                " FROM pg_enum GROUP BY enumtypid")
    labels = dict(cur.fetchall())
    cur.execute("SELECT rngtypid, rngsubtype FROM pg_range")
    subtypes = dict(cur.fetchall())
    cur.execute("SELECT t.oid, array_agg(ARRAY[a.attname::text, a.atttypid::text]"
                " ORDER BY a.attnum) FROM pg_type t JOIN pg_attribute a"
                " ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped"
                " WHERE t.typtype = 'c' GROUP BY t.oid")
    attributes = dict(cur.fetchall())
    memo: dict[int, str] = {}

    def signature(oid: int, depth: int = 0) -> str:
        if oid in memo or oid not in types or depth > 20:
            return memo.get(oid, "")
        typtype, base, elem, _relid, category = types[oid]
        if typtype == "e":
            text = f"enum {oid} {labels.get(oid, [])!r}"
        elif typtype == "c":
            text = f"composite {oid} " + repr([(name, sub, signature(int(sub), depth + 1))
                                                for name, sub in attributes.get(oid, [])])
        elif typtype == "d":
            text = signature(base, depth + 1)
        elif typtype == "r":
            text = signature(subtypes.get(oid, 0), depth + 1)
        elif category == "A" and elem:
            text = signature(elem, depth + 1)
        else:
            text = ""
        memo[oid] = text
        return text

    return {oid: signature(oid) for oid in type_oids}


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


def scan_tables(conn: psycopg2.extensions.connection, excluded_schemas: Iterable[str],
                since_xmin: int | None,
                connect: Callable[[], psycopg2.extensions.connection] | None = None,
                snapshot_id: str | None = None, lanes: int = 1, *,
                no_data: Iterable[str] = (), fingerprint: bool = False) -> list[Scanned]:
    """Inventory every table in the current snapshot, with its exact count and new rows.

    new_rows is -1 when there is no previous snapshot to compare with. Tables in
    `no_data` (schema.name: data the profile never dumps) are left out. With
    `fingerprint`, each table's rows are hashed in the same pass. With lanes > 1 (and
    connect, snapshot_id), the work is shared with lanes - 1 more connections that import
    the same snapshot, the largest tables first; if this connection's share fails (a
    cancel, say), the other lanes' queries are cancelled too.
    """
    with conn.cursor() as cur:
        listed = list_tables(cur, excluded_schemas, no_data)
        stable = (binary_hash_is_stable(cur, {oid for t in listed for oid in t.type_oids})
                  if fingerprint else set())
        # (oid, schema, name, relfilenode, definition, counters, pages, ways): the row hash
        # each table may take (ROW_HASHES), when fingerprinting
        tables = [(*t[:7], ("r", "t") if stable.issuperset(t.type_oids) else ("t",))
                  for t in listed]
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
    opened: list[psycopg2.extensions.connection] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_lane, daemon=True,
                                args=(connect, snapshot_id, share, since_xmin, fingerprint,
                                      counted, errors, opened, stop))
               for share in shares[1:]]
    for thread in threads:
        thread.start()
    try:
        with conn.cursor() as cur:
            counted.update(_count(cur, shares[0], since_xmin, fingerprint))
    except BaseException:
        stop.set()
        for other in list(opened):  # no query of the scan outlives it
            with contextlib.suppress(psycopg2.Error):  # a lane that closed meanwhile
                other.cancel()
        raise
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return [counted[t[0]] for t in tables]


def in_snapshot(connect: Callable[[], psycopg2.extensions.connection], snapshot_id: str,
                work: Callable[[psycopg2.extensions.cursor], None]) -> None:
    """Run `work` on a new connection whose transaction imports the run's snapshot.

    Its lock waits are bounded (WORKER_LOCK_TIMEOUT): the run's own session holds every
    table, so a migration that queues behind it would otherwise queue this connection
    behind itself, and the application behind both, until the run ended, which it never
    would."""
    conn = connect()
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
            cur.execute("SET LOCAL lock_timeout = %s; SET LOCAL statement_timeout = 0",
                        (WORKER_LOCK_TIMEOUT,))
            work(cur)
    finally:
        conn.close()


def _lane(connect: Callable[[], psycopg2.extensions.connection] | None, snapshot_id: str | None,
          tables: list[tuple], since_xmin: int | None, fingerprint: bool,
          counted: dict[int, Scanned], errors: list[BaseException],
          opened: list[psycopg2.extensions.connection], stop: threading.Event) -> None:
    assert connect is not None and snapshot_id is not None

    def kept() -> psycopg2.extensions.connection:  # so that scan_tables can cancel it
        opened.append(connect())
        return opened[-1]

    try:
        in_snapshot(kept, snapshot_id,
                    lambda cur: counted.update(_count(cur, tables, since_xmin, fingerprint,
                                                      stop)))
    except BaseException as exc:  # noqa: BLE001 - raised by scan_tables in the caller
        errors.append(exc)


def _count(cur: psycopg2.extensions.cursor, tables: list[tuple], since_xmin: int | None,
           fingerprint: bool = False, stop: threading.Event | None = None
           ) -> dict[int, Scanned]:
    """Exact count, new rows (and fingerprint) of each table, in the cursor's transaction.

    FROM ONLY: a table's own rows, which are what pg_dump's COPY of it holds; an
    inheritance parent's count must not move with its children. Once `stop` is set, no
    further table is read (the caller has given up on the scan).
    """
    threshold = None if since_xmin is None else _threshold(cur, since_xmin)
    if fingerprint:
        output.pin(cur, local=True, settings=output.FINGERPRINT)
    result = {}
    for oid, schema, name, relfilenode, definition, counters, _pages, ways in tables:
        if stop is not None and stop.is_set():
            break
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
            rows, new_rows, digest = fingerprinted(cur, table, new, ways)
        else:
            cur.execute(sql.SQL("SELECT count(*), {} FROM ONLY {} sb_row").format(new, table))
            (rows, new_rows), digest = cur.fetchone(), ""
        result[oid] = Scanned(oid, schema, name, relfilenode, definition, counters, int(rows),
                              int(new_rows), digest)
    return result


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


def decide(scanned: Iterable[tuple], previous: dict[int, TableState] | None,
           backup_id: str) -> list[TableState]:
    """For each table: unchanged (data stays where it is held) or dumped here, and why.

    A pure function of the scan and the parent's table records, so it can be tested over
    every kind of change without a server. Every table records what the scan read in this
    backup's snapshot, its fingerprint included, whether it is dumped or not: so the
    drill compares a restore with the snapshot, never with an older backup's word.
    """
    states = []
    for seen in map(lambda t: Scanned(*t), scanned):
        before = (previous or {}).get(seen.oid)
        reason = (_reason(before, seen.schema, seen.name, seen.relfilenode, seen.definition,
                          seen.counters, seen.rows, seen.new_rows)
                  or _content_reason(before, seen.fingerprint))
        states.append(TableState(
            oid=seen.oid, schema=seen.schema, name=seen.name, relfilenode=seen.relfilenode,
            definition=seen.definition, rows=seen.rows, counters=seen.counters,
            held_in=backup_id if reason else before.held_in,  # type: ignore[union-attr]
            reason=reason, fingerprint=seen.fingerprint))
    return states


CONTENT_CHANGED = "content changed"


def _content_reason(before: TableState | None, fingerprint: str) -> str:
    """The second proof: a table change detection calls unchanged must hash as before.

    `before.fingerprint` is what the previous backup read for the table, and (by this
    same check, backup after backup) what the archive of `before.held_in` holds. A
    different way of hashing (r or t) counts as different. Without a fingerprint on either
    side (a manifest older than fingerprints) there is nothing to compare.
    """
    if before is None or not before.fingerprint or not fingerprint:
        return ""
    if fingerprint != before.fingerprint:
        return f"{CONTENT_CHANGED} (fingerprint differs from {before.held_in})"
    return ""


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
