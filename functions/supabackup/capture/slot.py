"""The replication slot: create and drop it (with pgoutput's publications), read its
health, and peek its committed transactions as wal2json format-version 2 records whatever
the plugin.

pgoutput needs a publication. FOR ALL TABLES publishing updates and deletes would make
the source reject the application's UPDATE and DELETE on tables without a replica
identity, so capture publishes inserts and truncates of all tables, and updates and
deletes only of the tables that have an identity: starting capture never changes what
the application can write.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras
from psycopg2 import sql

from .. import output
from ..db import USER_SCHEMAS, connect, run_statement
from ..dburl import ConnectionInfo
from ..errors import CaptureError, ConfigError
from . import pgoutput
from .replay import HAS_REPLICA_IDENTITY
from .state import PLUGINS, CaptureState

log = logging.getLogger(__name__)


# wal2json 2.6+: numbers as strings. Without it wal2json writes NaN and +-Infinity of
# float and numeric columns as JSON null, which cannot be told from NULL (see _peek).
EXACT_NUMBERS = ", 'numeric-data-types-as-string', '1'"


AMBIGUOUS_NULL_TYPES = ("real", "double precision", "numeric")


MAX_CHANGES = 100_000  # per run: bounded memory; the next run goes on from there
PEEK = {
    "wal2json": "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes(%s, NULL,"
                " %s, 'format-version', '2', 'include-timestamp', '1', 'include-lsn', '1',"
                " 'include-xids', '1', 'include-transaction', '1'{})",
    "pgoutput": "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes(%s,"
                " NULL, %s, 'proto_version', '1', 'publication_names', %s)",
}


def slot_name(conn: ConnectionInfo) -> str:
    """One slot per database (slot names are per cluster)."""
    return "supabackup_" + "".join(c if c.isalnum() else "_" for c in conn.dbname.lower())[:40]


def require_direct(conn: ConnectionInfo) -> ConnectionInfo:
    """Replication cannot go through Supabase's poolers: refuse them, naming the host to use."""
    if conn.is_supabase and "pooler." in conn.host:
        ref = conn.project_ref or "<project-ref>"
        raise ConfigError(
            f"{conn.host} is Supabase's connection pooler, which cannot carry logical "
            "replication",
            f"change capture needs the direct connection: db.{ref}.supabase.co:5432, user "
            "postgres (IPv6; from IPv4 networks only with the IPv4 add-on, or from dual-stack "
            "VPC subnets, see the README)")
    return conn


def publications(slot: str) -> tuple[str, str]:
    """(inserts and truncates of every table, updates and deletes of tables with an identity)."""
    return f"{slot}_all", f"{slot}_keyed"


def identity_tables(cur: Any) -> list[str]:
    """Tables whose updates and deletes can be published: they have a replica identity."""
    cur.execute(f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMAS}
          AND {HAS_REPLICA_IDENTITY}
        ORDER BY 1""")
    return [r[0] for r in cur.fetchall()]


def _create_publications(conn: ConnectionInfo, slot: str) -> list[str]:
    everything, keyed = publications(slot)
    hint = "pgoutput needs a publication FOR ALL TABLES, which takes a superuser"
    admin(conn, f"CREATE PUBLICATION {everything} FOR ALL TABLES "
                 "WITH (publish = 'insert, truncate')", hint)
    db = connect(conn)
    try:
        with db.cursor() as cur:
            output.pin(cur)
            tables = identity_tables(cur)
    finally:
        db.close()
    # A publication cannot be empty of tables: with none to list, it publishes nothing.
    listed = f"FOR TABLE {', '.join(tables)} " if tables else ""
    admin(conn, f"CREATE PUBLICATION {keyed} {listed}WITH (publish = 'update, delete')", hint)
    return tables


def drop_publications(conn: ConnectionInfo, slot: str) -> None:
    """Drop the slot's publications (names quoted: a slot name read back from the store is
    never SQL)."""
    for name in publications(slot):
        run_statement(conn, sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)),
                      fail=lambda detail: CaptureError(
                          f"DROP PUBLICATION on {conn.display()} failed: {detail}"))


def create_slot(conn: ConnectionInfo, slot: str) -> tuple[str, Any, str, str, list[str]]:
    """(plugin, the open replication connection, start LSN, exported snapshot, and the
    tables published for updates and deletes)."""
    failures = []
    for plugin in PLUGINS:
        published = _create_publications(conn, slot) if plugin == "pgoutput" else []
        repl = _replication_connection(conn)
        try:
            with repl.cursor() as cur:
                cur.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL {plugin} EXPORT_SNAPSHOT")
                _, start_lsn, snapshot, _ = cur.fetchone()
            return plugin, repl, start_lsn, snapshot, published
        except psycopg2.Error as exc:
            repl.close()
            failures.append(f"{plugin}: {conn.error_line(exc)}")
            if plugin == "pgoutput":
                drop_publications(conn, slot)
    raise CaptureError(f"cannot create the replication slot {slot} ({'; '.join(failures)})",
                       "the user needs REPLICATION, the server wal_level=logical, and a free "
                       "replication slot (max_replication_slots)")


def admin(conn: ConnectionInfo, statement: str, hint: str) -> None:
    run_statement(conn, statement, fail=lambda detail: CaptureError(
        f"{statement.split(' FOR ')[0].split(' WITH ')[0]} on {conn.display()} failed: "
        f"{detail}", hint))


STREAM_OPTIONS = {
    "wal2json": {"format-version": "2", "include-timestamp": "1", "include-lsn": "1",
                 "include-xids": "1", "include-transaction": "1"},
    "pgoutput": {"proto_version": "1"},
}


def start_stream(conn: ConnectionInfo, state: CaptureState) -> tuple[Any, Any, bool]:
    """(replication connection, its cursor streaming the slot from where it was confirmed,
    whether numbers come as strings: see EXACT_NUMBERS). The slot is the guard against a
    second reader: one that is active refuses, as a peek does."""
    options = dict(STREAM_OPTIONS[state.plugin])
    if state.plugin == "pgoutput":
        options["publication_names"] = state.publication
    tries = [True, False] if state.plugin == "wal2json" else [True]
    for exact in tries:
        repl = _replication_connection(conn)
        cur = repl.cursor()
        try:
            # The walsender decodes values in its own session: under the settings a peek
            # decodes them under (and replay parses them under), whatever the database or
            # role sets for its sessions.
            output.pin(cur)
            cur.start_replication(slot_name=state.slot, decode=False, status_interval=10,
                                  options={**options, "numeric-data-types-as-string": "1"}
                                  if exact and state.plugin == "wal2json" else options)
            return repl, cur, exact or state.plugin == "pgoutput"
        except psycopg2.errors.InvalidParameterValue:  # wal2json before 2.6
            repl.close()
            if state.plugin != "wal2json" or not exact:
                raise
        except psycopg2.errors.ObjectInUse:
            repl.close()
            raise CaptureError(f"another capture run is reading the slot {state.slot}",
                               "this run stored nothing; the other one goes on") from None
        except BaseException:
            repl.close()
            raise
    raise AssertionError("unreachable")  # the last try either returns or raises


def _replication_connection(conn: ConnectionInfo) -> Any:
    try:
        return psycopg2.connect(**conn.psycopg_kwargs(),
                                connection_factory=psycopg2.extras.LogicalReplicationConnection)
    except psycopg2.OperationalError as exc:
        raise CaptureError(f"cannot open a replication connection to {conn.display()}: "
                           f"{conn.error_line(exc)}",
                           "replication needs a direct connection (not a pooler) and a user "
                           "with REPLICATION") from None


def abandon(conn: ConnectionInfo, slot: str, plugin: str) -> None:
    """Drop what a failed start created (best effort: the start's own error is the one
    to report)."""
    try:
        drop_slot(conn, slot)
        if plugin == "pgoutput":
            drop_publications(conn, slot)
    except Exception as exc:  # noqa: BLE001 - never hide why the start failed
        log.error("could not drop the slot %s of a failed start (drop it by hand): %s",
                  slot, exc)


def drop_slot(conn: ConnectionInfo, slot: str) -> None:
    run_statement(conn, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name = %s", (slot,))


def slot_status(db: Any, slot: str) -> dict[str, Any]:
    """The slot's health: {} when there is no such slot."""
    with db.cursor() as cur:
        cur.execute("""
            SELECT active, wal_status, safe_wal_size,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                   confirmed_flush_lsn::text, plugin
            FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()
            """, (slot,))
        row = cur.fetchone()
    if row is None:
        return {}
    active, wal_status, safe, retained, flushed, plugin = row
    return {"active": active, "wal_status": wal_status, "safe_wal_size": safe,
            "retained_wal_bytes": int(retained or 0), "confirmed_flush_lsn": flushed,
            "plugin": plugin}


def peek(db: Any, state: CaptureState) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """(lsn, change) of what the slot holds, in wal2json's format-version 2 whatever the
    plugin, and how many rows the server returned (MAX_CHANGES of them: it stopped early;
    pgoutput's Relation messages are rows but no change); the slot does not move."""
    with db.cursor() as cur:
        if state.plugin == "wal2json":
            try:
                cur.execute(PEEK["wal2json"].format(EXACT_NUMBERS), (state.slot, MAX_CHANGES))
                exact = True
            except psycopg2.errors.InvalidParameterValue:  # wal2json before 2.6
                cur.execute(PEEK["wal2json"].format(""), (state.slot, MAX_CHANGES))
                exact = False
            fetched = cur.fetchall()
            return ([(lsn, wal2json_change(data, exact)) for lsn, _xid, data in fetched],
                    len(fetched))
        cur.execute(PEEK["pgoutput"], (state.slot, MAX_CHANGES, state.publication))
        rows = cur.fetchall()
        return pgoutput.changes(rows, type_namer(db)), len(rows)


def type_namer(db: Any) -> Callable[[int, int], str]:
    """format_type of a pgoutput column's type, asked of the database once per type."""
    names: dict[tuple[int, int], str] = {}

    def type_name(oid: int, typmod: int) -> str:
        if (oid, typmod) not in names:
            with db.cursor() as cur:
                cur.execute("SELECT format_type(%s, %s)", (oid, typmod))
                names[(oid, typmod)] = cur.fetchone()[0]
        return names[(oid, typmod)]

    return type_name


def _from_wal2json(change: dict[str, Any], exact_numbers: bool) -> dict[str, Any]:
    """wal2json's change as the text each value's output function gave.

    wal2json writes a bytea value without its leading \\x, and (before 2.6) NaN and
    +-Infinity of float and numeric columns as null: the first is put back, the second
    marked "ambiguous" by column, since it cannot be told from NULL. (Type names are not
    wal2json's to give either: it names "char" char, which is character(1); replay takes
    the target's own column types.)
    """
    unsure = set()
    for part in ("columns", "identity"):
        for column in change.get(part, []):
            if column["type"] == "bytea" and column["value"] is not None:
                column["value"] = "\\x" + column["value"]
            elif (column["value"] is None and not exact_numbers
                  and column["type"].startswith(AMBIGUOUS_NULL_TYPES)):
                unsure.add(column["name"])
    return {**change, "ambiguous": sorted(unsure)} if unsure else change


class Assembler:
    """Changes (B, I/U/D/T..., C) into whole transactions, one at a time."""

    def __init__(self) -> None:
        self.current: dict[str, Any] | None = None

    def feed(self, change: dict[str, Any]) -> dict[str, Any] | None:
        """The transaction `change` completes, if it is a commit."""
        action = change["action"]
        if action == "B":
            self.current = {"xid": str(change.get("xid", "")), "commit_lsn": change["lsn"],
                            "commit_time": change["timestamp"], "changes": []}
        elif action == "C":
            done, self.current = self.current, None
            if done is not None:
                done["end_lsn"] = change["nextlsn"]
                return done
        elif self.current is not None and action in ("I", "U", "D", "T"):
            self.current["changes"].append(change)
        return None


def whole_transactions(changes: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Whole transactions (B ... C) from the peeked changes."""
    assembler = Assembler()
    return [t for _lsn, change in changes if (t := assembler.feed(change)) is not None]


def wal2json_change(data: bytes | str, exact_numbers: bool) -> dict[str, Any]:
    """One wal2json format-version 2 message as a change (see _from_wal2json)."""
    return _from_wal2json(json.loads(data, parse_int=str, parse_float=str, parse_constant=str),
                          exact_numbers)


def cannot_replay(conn: ConnectionInfo) -> list[str]:
    """`not_replayable` on a connection of its own (what `cdc start` warns about)."""
    db = connect(conn)
    try:
        db.autocommit = True
        return not_replayable(db)
    finally:
        db.close()


def not_replayable(db: Any) -> list[str]:
    """What a restore to a time cannot bring to that time, one line each with why:
    `cdc start` and `cdc status` warn about it, and restores name it."""
    with db.cursor() as cur:
        cur.execute(f"""
            SELECT format('%I.%I', n.nspname, c.relname), c.relpersistence,
                   NOT {HAS_REPLICA_IDENTITY}
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {USER_SCHEMAS}
            ORDER BY 1""")
        tables = cur.fetchall()
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        large_objects = int(cur.fetchone()[0])
    lines = [f"{name}: unlogged, so not in the change stream" for name, persistence, _ in tables
             if persistence == "u"]
    lines += [f"{name}: no replica identity, so its updates and deletes are not in the change "
              "stream (give it a primary key, or REPLICA IDENTITY FULL)"
              for name, persistence, keyless in tables if keyless and persistence == "p"]
    if large_objects:
        lines.append(f"large objects ({large_objects}): not in the change stream")
    return lines
