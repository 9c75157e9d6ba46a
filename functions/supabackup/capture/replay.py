"""Replay captured transactions into a restored base: each once, each exactly.

    pin the output settings -> triggers off (replica mode, and the ALWAYS and REPLICA
    ones disabled by name), identity columns settable -> each transaction in a
    transaction of its own, every row change touching exactly one row -> triggers and
    identities back as they were

Why each rule:
- Values arrive as the source's text, decoded under output.STABLE; they are parsed under
  the same settings, so a date, a float, a bytea, a money amount, a regclass reads back as
  the value it was, whatever the source or target database sets for its sessions.
- The stream already holds what triggers did at the source. session_replication_role =
  replica stops ordinary triggers (and foreign-key checks), but triggers set ENABLE ALWAYS
  still fire in it and ENABLE REPLICA ones fire only in it: those are disabled for the
  replay and set back to their mode afterwards. Rules set so are treated the same way.
- One change is one row. UPDATE and DELETE find their row by the replica identity: the key
  (with `=`, so an index serves it) or, under REPLICA IDENTITY FULL, every column's text
  (some types have no equality operator) and one row of equal ones by ctid (duplicates are
  legal there, and a DELETE of one must not take its twins). ONLY, so an inheritance
  parent's change does not touch its children. A change that finds no row means the target
  is not what the source was: the replay stops and says so, never skips.
- Columns the target computes itself (GENERATED ... STORED) are left out; it computes them
  from the replayed values. Identity columns take the source's values: those GENERATED
  ALWAYS are BY DEFAULT for the replay (an UPDATE may not set them otherwise) and ALWAYS
  again afterwards.
- Only the tables whose data the base holds: the rest was left out by the backup's profile,
  or lived and died between two capture runs.
- A TRUNCATE of several tables at once (a CASCADE, or tables linked by foreign keys) is
  one statement again: truncated one by one, the first would fail on the foreign key.
- Tables without a replica identity: only their inserts and truncates can be replayed
  (updates and deletes are left out and counted); the caller names them as inexact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql

from .. import output
from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import SupabackupError

log = logging.getLogger(__name__)


class ReplayFailed(SupabackupError):
    """A captured transaction could not be applied: the target is not the database as of
    the time asked for."""


@dataclass(frozen=True)
class TableShape:
    full_identity: bool          # REPLICA IDENTITY FULL: rows are found by every column
    generated: frozenset[str]    # columns the target computes (GENERATED ALWAYS AS ... STORED)
    types: dict[str, str]        # column -> its type, as the target names it (qualified)
    partitioned: bool = False    # TRUNCATE ONLY refuses a partitioned table
    keyless: bool = False        # no replica identity: updates and deletes cannot be found


@dataclass
class Replayed:
    transactions: int = 0
    last_commit_time: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # table -> updates/deletes left out
    ambiguous: set[str] = field(default_factory=set)  # tables with nulls that may be NaN


def replay(target: ConnectionInfo, transactions: Iterable[dict[str, Any]],
           held: set[tuple[str, str]] | None = None) -> Replayed:
    """Apply `transactions` to `target` in order, each in its own transaction; with `held`,
    only the changes to those tables (schema, name), the ones whose data the base holds."""
    db = connect(target)
    done = Replayed()
    current: dict[str, Any] | None = None
    try:
        with db.cursor() as cur:
            output.pin(cur)
            cur.execute("SET session_replication_role = replica; SET row_security = off")
            shapes = _shapes(cur)
            toggles = _firing_triggers(cur) + _firing_rules(cur) + _always_identities(cur)
            _toggle(cur, toggles, replaying=True)
            db.commit()
            try:
                for current in transactions:
                    for statement, table, expect_one in _statements(current, shapes, done,
                                                                    held):
                        cur.execute(statement)
                        if expect_one and cur.rowcount != 1:
                            raise _Diverged(table, cur.rowcount)
                    db.commit()
                    done.transactions += 1
                    done.last_commit_time = current["commit_time"]
                current = None
            finally:
                db.rollback()
                _toggle(cur, toggles, replaying=False)
                db.commit()
    except (psycopg2.Error, _Diverged) as exc:
        db.rollback()
        raise _failure(target, exc, current, done) from None
    finally:
        db.close()
    return done


class _Diverged(Exception):
    def __init__(self, table: str, rows: int, why: str = "") -> None:
        super().__init__(why or f"a change to {table} found {rows} rows where the source had one")


def _failure(target: ConnectionInfo, exc: BaseException, txn: dict[str, Any] | None,
             done: Replayed) -> ReplayFailed:
    detail = target.error_line(exc)
    where = (f"transaction {txn.get('xid') or '?'} (commit LSN {txn['commit_lsn']}, committed "
             f"{txn['commit_time']})" if txn else "setting up the replay")
    holds = (f"the base and {done.transactions} transaction(s), through the one committed "
             f"{done.last_commit_time}" if done.transactions else "the base only")
    return ReplayFailed(f"replaying into {target.display()} failed at {where}: {detail}",
                        f"the target holds {holds}; it is not the database as of the time "
                        "asked for: drop it, and restore an earlier time or a backup")


# Whether table c has a replica identity, as PostgreSQL decides it: FULL, an index, or by
# default its primary key, unless that key is DEFERRABLE (PostgreSQL then skips it).
HAS_REPLICA_IDENTITY = """(c.relreplident IN ('f', 'i') OR (c.relreplident = 'd' AND EXISTS (
    SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND i.indimmediate)))"""


def _shapes(cur: Any) -> dict[tuple[str, str], TableShape]:
    cur.execute(f"""
        SELECT n.nspname, c.relname, c.relkind = 'p', c.relreplident = 'f',
               NOT {HAS_REPLICA_IDENTITY},
               coalesce(array_agg(a.attname) FILTER (WHERE a.attgenerated <> ''), '{{}}'),
               coalesce(json_object_agg(a.attname, format_type(a.atttypid, a.atttypmod))
                        FILTER (WHERE a.attname IS NOT NULL), '{{}}')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p') GROUP BY 1, 2, 3, 4, 5""")
    return {(s, t): TableShape(full, frozenset(gen), dict(types), partitioned, keyless)
            for s, t, partitioned, full, keyless, gen, types in cur.fetchall()}


# (ALTER TABLE clause for the replay, clause to put it back), per table: names quoted by
# the server itself (regclass text, quote_ident).
Toggle = tuple[str, str, str]
_MODES = {"A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}  # pg_trigger.tgenabled, ev_enabled


def _firing_triggers(cur: Any) -> list[Toggle]:
    """User triggers that fire in replica mode, ALWAYS ('A') and REPLICA ('R'): off for the
    replay. A partition's clone follows its parent's trigger."""
    cur.execute("""
        SELECT t.tgrelid::regclass::text, quote_ident(t.tgname), t.tgenabled FROM pg_trigger t
        WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgenabled IN ('A', 'R')
        ORDER BY 1, 2""")
    return [(table, f"DISABLE TRIGGER {name}", f"{_MODES[mode]} TRIGGER {name}")
            for table, name, mode in cur.fetchall()]


def _firing_rules(cur: Any) -> list[Toggle]:
    """Rules set ENABLE ALWAYS or ENABLE REPLICA fire in replica mode, as such triggers do:
    off for the replay (the stream holds what they did)."""
    cur.execute("""
        SELECT r.ev_class::regclass::text, quote_ident(r.rulename), r.ev_enabled
        FROM pg_rewrite r WHERE r.rulename <> '_RETURN' AND r.ev_enabled IN ('A', 'R')
        ORDER BY 1, 2""")
    return [(table, f"DISABLE RULE {name}", f"{_MODES[mode]} RULE {name}")
            for table, name, mode in cur.fetchall()]


def _always_identities(cur: Any) -> list[Toggle]:
    """Identity columns GENERATED ALWAYS: BY DEFAULT for the replay, which must set them to
    the source's values in UPDATE as in INSERT (OVERRIDING serves INSERT only)."""
    cur.execute("""
        SELECT a.attrelid::regclass::text, quote_ident(a.attname) FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attidentity = 'a' AND NOT a.attisdropped AND a.attnum > 0
          AND NOT c.relispartition ORDER BY 1, 2""")
    return [(table, f"ALTER COLUMN {column} SET GENERATED BY DEFAULT",
             f"ALTER COLUMN {column} SET GENERATED ALWAYS") for table, column in cur.fetchall()]


def _toggle(cur: Any, toggles: list[Toggle], replaying: bool) -> None:
    for table, during, after in toggles:
        cur.execute(f"ALTER TABLE {table} {during if replaying else after}")


def _statements(txn: dict[str, Any], shapes: dict[tuple[str, str], TableShape],
                done: Replayed, held: set[tuple[str, str]] | None
                ) -> Iterator[tuple[sql.Composable, str, bool]]:
    """(statement, table, whether it must touch exactly one row) for each change."""
    truncate: list[dict[str, Any]] = []
    for change in [*txn["changes"], {"action": "end"}]:
        if change["action"] == "T":
            if held is None or (change["schema"], change["table"]) in held:
                truncate.append(change)
            continue
        if truncate:  # ONLY: the stream names every table it emptied, children too
            yield (sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(
                sql.SQL("{}{}").format(
                    sql.SQL("" if _shape(shapes, c).partitioned else "ONLY "),
                    sql.Identifier(c["schema"], c["table"])) for c in truncate)), "", False)
            truncate = []
        if change["action"] == "end":
            return
        name = f"{change['schema']}.{change['table']}"
        if held is not None and (change["schema"], change["table"]) not in held:
            continue  # not in the backup (see replay)
        shape = _shape(shapes, change)
        if change["action"] in ("U", "D") and shape.keyless:
            done.skipped[name] = done.skipped.get(name, 0) + 1
            continue
        if change.get("ambiguous"):
            done.ambiguous.add(name)
        yield _row_statement(change, shape), name, True


def _shape(shapes: dict[tuple[str, str], TableShape], change: dict[str, Any]) -> TableShape:
    shape = shapes.get((change["schema"], change["table"]))
    if shape is None:
        raise _Diverged(f"{change['schema']}.{change['table']} (not in the target)", 0)
    return shape


def _row_statement(change: dict[str, Any], shape: TableShape) -> sql.Composable:
    table = sql.Identifier(change["schema"], change["table"])
    columns = [c for c in change.get("columns", []) if c["name"] not in shape.generated]
    if change["action"] == "I":
        return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})").format(
            table, sql.SQL(", ").join(sql.Identifier(c["name"]) for c in columns),
            sql.SQL(", ").join(_value(c, shape) for c in columns))
    identity = change.get("identity") or []
    if not identity:
        raise _Diverged(f"{change['schema']}.{change['table']} (no replica identity)", 0)
    where = _where(table, identity, shape, frozenset(change.get("ambiguous", ())))
    if change["action"] == "D":
        return sql.SQL("DELETE FROM ONLY {} WHERE {}").format(table, where)
    # Key columns that keep their value stay out of SET: an identity column GENERATED
    # ALWAYS may not be assigned at all, and it cannot have changed at the source either.
    old = {c["name"]: c["value"] for c in identity}
    sets = [sql.SQL("{} = {}").format(sql.Identifier(c["name"]), _value(c, shape))
            for c in columns if c["name"] not in old or old[c["name"]] != c["value"]]
    if not sets:  # nothing but the key, and it kept its value: still one row must match
        return sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(table, where)
    return sql.SQL("UPDATE ONLY {} SET {} WHERE {}").format(table, sql.SQL(", ").join(sets),
                                                            where)


def _where(table: sql.Composable, identity: list[dict[str, Any]], shape: TableShape,
           unsure: frozenset[str]) -> sql.Composable:
    if not shape.full_identity:  # a key: NOT NULL and unique, and its index serves `=`
        return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(c["name"]),
                                                               _value(c, shape)) for c in identity)
    same = sql.SQL(" AND ").join(
        sql.SQL("{}::text IS NOT DISTINCT FROM ({})::text").format(sql.Identifier(c["name"]),
                                                                   _value(c, shape))
        for c in identity if c["name"] not in shape.generated and c["name"] not in unsure)
    return sql.SQL("ctid = (SELECT ctid FROM ONLY {} WHERE {} LIMIT 1)").format(table, same)


def _value(column: dict[str, Any], shape: TableShape) -> sql.Composable:
    """The column's value as a literal of the target's own column type: the type names a
    plugin gives are not always exact (wal2json's "char" is character(1)), and the
    target's are qualified (format_type under an empty search_path)."""
    value = column["value"]
    if column["name"] not in shape.types:  # never a type name from the stream in the SQL
        raise _Diverged("", 0, f"column {column['name']!r} of a captured change is not in the "
                               "target's table")
    type_name = sql.SQL(shape.types[column["name"]])  # format_type's own text
    if value is None:
        return sql.SQL("NULL::{}").format(type_name)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return sql.SQL("{}::{}").format(sql.Literal(str(value)), type_name)
