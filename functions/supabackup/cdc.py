"""Change capture through a logical replication slot: the groundwork of point-in-time restore.

    cdc start: create the slot with an exported snapshot -> take the base full backup in
               that very snapshot (no gap, no overlap) -> record the state
    cdc run:   peek the slot's committed transactions (wal2json, format-version 2) -> write
               them as one gzip'd segment -> write its index entry (the commit marker, like
               a manifest) -> only then advance the slot
    restore:   the base, then every captured transaction committed at or before the time,
               each atomically, in commit order, each once (by commit LSN)

Delivery is at least once: a run that dies after writing its segment but before advancing
the slot leaves those transactions in the slot, and the next run stores them again.
Replay de-duplicates by commit LSN, so a transaction is applied once whatever the store
holds twice.

Store layout, under <database-id>/cdc/:
    state.json                          slot, plugin, base backup, the slot's start LSN
    segments/<end-lsn>.jsonl.gz         one JSON line per transaction
    index/<end-lsn>.json                commit times, LSNs, size and sha256 of a segment

What this module does not do yet (issue 7): the pgoutput fallback where wal2json is
missing, schema-change detection (DDL is not in the stream), WAL-retention metrics and
limits, lost-slot recovery, the Lambda function and its schedule.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from . import pgoutput
from .backup import BackupRequest, run_backup
from .dburl import ConnectionInfo
from .errors import ConfigError, StoreError, SupabackupError
from .manifest import Manifest, parse_time
from .snapshot import connect, run_statement
from .store import Store

log = logging.getLogger(__name__)

MAX_CHANGES = 100_000  # per run: bounded memory; the next run goes on from there
# wal2json where the server has it; else pgoutput, built in, which needs a publication.
PLUGINS = ("wal2json", "pgoutput")
PEEK = {
    "wal2json": "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes(%s, NULL,"
                " %s, 'format-version', '2', 'include-timestamp', '1', 'include-lsn', '1',"
                " 'include-xids', '1', 'include-transaction', '1')",
    "pgoutput": "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes(%s,"
                " NULL, %s, 'proto_version', '1', 'publication_names', %s)",
}


class CaptureError(SupabackupError):
    """Change capture could not start, run or replay."""


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_key(lsn: str) -> str:
    """An LSN as 16 hex digits, so keys sort in LSN order."""
    return f"{lsn_int(lsn):016X}"


def slot_name(conn: ConnectionInfo) -> str:
    """One slot per database (slot names are per cluster)."""
    return "supabackup_" + "".join(c if c.isalnum() else "_" for c in conn.dbname.lower())[:40]


@dataclass(frozen=True)
class CaptureState:
    slot: str
    plugin: str
    base: str          # the full backup taken in the slot's exported snapshot
    start_lsn: str     # the slot's consistent point: changes after it are not in the base
    publication: str = ""  # pgoutput's (FOR ALL TABLES); wal2json needs none
    base_at: str = ""      # the base's snapshot time
    schema: str = ""       # fingerprint of the tables' definitions when the base was taken


def _key(store: Store, database_id: str, *parts: str) -> str:
    return store.key(database_id, "cdc", *parts)


def read_state(store: Store, database_id: str) -> CaptureState | None:
    """The capture now running, if any."""
    raw = store.read_small(_key(store, database_id, "state.json"))
    return CaptureState(**json.loads(raw)) if raw else None


def epochs(store: Store, database_id: str) -> list[CaptureState]:
    """Every capture ever started (a base and the changes after it), oldest first.

    A new epoch begins with `cdc start`, and by itself when the schema changed (DDL is not
    in the stream) or the slot was lost; restores pick the epoch that covers their time.
    """
    prefix = _key(store, database_id, "epochs") + "/"
    return [CaptureState(**json.loads(store.read_small(k) or b"{}"))
            for k in sorted(store.list_keys(prefix))]


def _put_json(store: Store, key: str, value: dict[str, Any]) -> None:
    store.s3.put_object(Bucket=store.url.bucket, Key=key, Body=json.dumps(value).encode(),
                        ContentType="application/json")


SCHEMA = """
SELECT md5(coalesce(string_agg(format('%s.%s:%s', n.nspname, c.relname, (
         SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ','
                           ORDER BY a.attnum)
         FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
           AND NOT a.attisdropped)), ';' ORDER BY n.nspname, c.relname), ''))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
"""


def _schema_in(conn: ConnectionInfo, snapshot: str) -> str:
    """The schema fingerprint as the base sees it: read in the slot's exported snapshot."""
    db = connect(conn)
    try:
        db.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with db.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
        return schema_fingerprint(db)
    finally:
        db.close()


def schema_fingerprint(db: Any) -> str:
    """What a replay must find in place: every table's columns, names and types."""
    with db.cursor() as cur:
        cur.execute(SCHEMA)
        return str(cur.fetchone()[0])


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


def start(conn: ConnectionInfo, store: Store, request: BackupRequest) -> tuple[CaptureState,
                                                                             Manifest]:
    """Create the slot and take the aligned base backup; record both."""
    require_direct(conn)
    database_id = request.database_of(conn)
    if read_state(store, database_id) is not None:
        raise ConfigError(f"change capture of {database_id} is already started",
                          "use `supabackup cdc run`, or `supabackup cdc drop` to start over")
    slot = slot_name(conn)
    plugin, repl, start_lsn, snapshot = _create_slot(conn, slot)
    try:
        # The exported snapshot lives while this connection stays idle: the base is taken
        # in it, so it holds exactly the transactions before the slot's first change.
        schema = _schema_in(conn, snapshot)
        base = run_backup(conn, store, replace(request, kind="full", snapshot=snapshot))
        repl.close()
        state = CaptureState(slot=slot, plugin=plugin, base=base.backup_id,
                             start_lsn=start_lsn,
                             publication=_publication(slot) if plugin == "pgoutput" else "",
                             base_at=base.snapshot_at, schema=schema)
        _put_json(store, _key(store, database_id, "epochs", f"{lsn_key(start_lsn)}.json"),
                  asdict(state))
        _put_json(store, _key(store, database_id, "state.json"), asdict(state))
    except BaseException:
        # A slot nobody reads holds WAL on the database: a start that fails leaves none.
        repl.close()
        _abandon(conn, slot, plugin)
        raise
    log.info("change capture of %s started: slot %s at %s, base %s", database_id, slot,
             start_lsn, base.backup_id)
    return state, base


def _publication(slot: str) -> str:
    return f"{slot}_all"


def _create_slot(conn: ConnectionInfo, slot: str) -> tuple[str, Any, str, str]:
    """(plugin, the open replication connection, start LSN, exported snapshot)."""
    failures = []
    for plugin in PLUGINS:
        if plugin == "pgoutput":
            _admin(conn, f"CREATE PUBLICATION {_publication(slot)} FOR ALL TABLES",
                   "pgoutput needs a publication FOR ALL TABLES, which takes a superuser")
        repl = _replication_connection(conn)
        try:
            with repl.cursor() as cur:
                cur.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL {plugin} EXPORT_SNAPSHOT")
                _, start_lsn, snapshot, _ = cur.fetchone()
            return plugin, repl, start_lsn, snapshot
        except psycopg2.Error as exc:
            repl.close()
            failures.append(f"{plugin}: {conn.redact(' '.join(str(exc).split()))}")
            if plugin == "pgoutput":
                _admin(conn, f"DROP PUBLICATION IF EXISTS {_publication(slot)}", "")
    raise CaptureError(f"cannot create the replication slot {slot} ({'; '.join(failures)})",
                       "the user needs REPLICATION, the server wal_level=logical, and a free "
                       "replication slot (max_replication_slots)")


def _admin(conn: ConnectionInfo, statement: str, hint: str) -> None:
    run_statement(conn, statement, fail=lambda detail: CaptureError(
        f"{statement.split(' FOR ')[0]} on {conn.display()} failed: {detail}", hint))


def _replication_connection(conn: ConnectionInfo) -> Any:
    try:
        return psycopg2.connect(**conn.psycopg_kwargs(),
                                connection_factory=psycopg2.extras.LogicalReplicationConnection)
    except psycopg2.OperationalError as exc:
        raise CaptureError(f"cannot open a replication connection to {conn.display()}: "
                           f"{conn.redact(' '.join(str(exc).split()))}",
                           "replication needs a direct connection (not a pooler) and a user "
                           "with REPLICATION") from None


def _abandon(conn: ConnectionInfo, slot: str, plugin: str) -> None:
    """Drop what a failed start created (best effort: the start's own error is the one
    to report)."""
    try:
        _drop_slot(conn, slot)
        if plugin == "pgoutput":
            _admin(conn, f"DROP PUBLICATION IF EXISTS {_publication(slot)}", "")
    except Exception as exc:  # noqa: BLE001 - never hide why the start failed
        log.error("could not drop the slot %s of a failed start (drop it by hand): %s",
                  slot, exc)


def _drop_slot(conn: ConnectionInfo, slot: str) -> None:
    run_statement(conn, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name = %s", (slot,))


@dataclass(frozen=True)
class Segment:
    key: str
    end_lsn: str
    transactions: int
    first_commit_time: str
    last_commit_time: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CaptureRun:
    """What one capture run did."""

    segment: Segment | None       # the transactions it stored, if any
    slot: dict[str, Any]          # the slot's health (slot_status) before the run
    restarted: str = ""           # why it started a new epoch ("" when it did not)
    lost: bool = False            # the slot was gone: changes since the last run are lost


def run(conn: ConnectionInfo, store: Store, database_id: str,
        after_upload: Callable[[Segment], None] = lambda segment: None,
        max_retained_wal: int | None = None) -> CaptureRun:
    """One capture run: store the slot's committed transactions, then advance the slot.

    A slot that is gone (dropped by hand, or invalidated for holding too much WAL) starts a
    new epoch: a new slot and base, and the run reports the loss. So does a slot that holds
    more than `max_retained_wal` bytes, which is dropped before it fills the disk. After
    storing, a schema that changed since the base starts a new epoch too: DDL is not in
    the stream, and later changes must be replayed onto a base that has it.
    `after_upload` runs between the segment's commit and the slot's advance (tests crash
    there on purpose).
    """
    require_direct(conn)
    state = read_state(store, database_id)
    if state is None:
        raise ConfigError(f"change capture of {database_id} is not started",
                          "run `supabackup cdc start` first")
    db = connect(conn)
    try:
        db.autocommit = True
        health = slot_status(db, state.slot)
        if health.get("wal_status") in (None, "lost"):
            reason = (f"the replication slot {state.slot} is gone" if not health
                      else f"the replication slot {state.slot} was invalidated (wal_status lost)")
            return CaptureRun(None, health, _restart(conn, store, database_id, state, reason),
                              lost=True)
        if max_retained_wal is not None and health["retained_wal_bytes"] > max_retained_wal:
            reason = (f"the slot held {health['retained_wal_bytes']} bytes of WAL, over the "
                      f"limit of {max_retained_wal}")
            return CaptureRun(None, health, _restart(conn, store, database_id, state, reason),
                              lost=True)
        transactions, end_lsn = _transactions(_peek(db, state))
        segment = None
        if transactions:
            segment = _write_segment(store, database_id, transactions, end_lsn)
            after_upload(segment)
            with db.cursor() as cur:
                cur.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                            (state.slot, end_lsn))
            log.info("captured %d transaction(s) up to %s into %s", segment.transactions,
                     end_lsn, segment.key)
        schema_now = schema_fingerprint(db)
    finally:
        db.close()
    if schema_now != state.schema:
        return CaptureRun(segment, health, _restart(conn, store, database_id, state,
                                                    "the schema changed"))
    return CaptureRun(segment, health)


def slot_status(db: Any, slot: str) -> dict[str, Any]:
    """The slot's health: {} when there is no such slot."""
    with db.cursor() as cur:
        cur.execute("""
            SELECT active, wal_status, safe_wal_size,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                   confirmed_flush_lsn::text
            FROM pg_replication_slots WHERE slot_name = %s""", (slot,))
        row = cur.fetchone()
    if row is None:
        return {}
    active, wal_status, safe, retained, flushed = row
    return {"active": active, "wal_status": wal_status, "safe_wal_size": safe,
            "retained_wal_bytes": int(retained or 0), "confirmed_flush_lsn": flushed}


def _restart(conn: ConnectionInfo, store: Store, database_id: str, state: CaptureState,
             reason: str) -> str:
    """End the epoch (its slot and publication), start the next one; return the reason."""
    log.warning("change capture of %s starts a new epoch: %s", database_id, reason)
    drop(conn, store, database_id)
    start(conn, store, BackupRequest(database_id=database_id, retention="weekly",
                                     label=f"change capture base: {reason}"[:200],
                                     trigger="schedule"))
    return reason


def drop(conn: ConnectionInfo, store: Store, database_id: str) -> CaptureState | None:
    """Stop capturing: drop the slot (freeing its WAL) and its publication. What was
    captured stays restorable (the epochs and segments remain)."""
    state = read_state(store, database_id)
    if state is None:
        return None
    _drop_slot(conn, state.slot)
    if state.publication:
        _admin(conn, f"DROP PUBLICATION IF EXISTS {state.publication}", "")
    store.delete_key(_key(store, database_id, "state.json"))
    return state


def tables_without_identity(db: Any) -> list[str]:
    """Tables whose UPDATE and DELETE cannot be replayed: no primary key and no replica
    identity (or REPLICA IDENTITY NOTHING)."""
    with db.cursor() as cur:
        cur.execute("""
            SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%'
              AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (
                   SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
            ORDER BY 1""")
        return [r[0] for r in cur.fetchall()]


def status(conn: ConnectionInfo, store: Store, database_id: str) -> dict[str, Any]:
    """What `cdc status` prints and the capture function reports as metrics."""
    state = read_state(store, database_id)
    db = connect(conn)
    try:
        db.autocommit = True
        found = {"started": state is not None,
                 "slot": slot_status(db, state.slot) if state else {},
                 "tables_without_identity": tables_without_identity(db)}
    finally:
        db.close()
    if state is not None:
        found.update(plugin=state.plugin, base=state.base, start_lsn=state.start_lsn)
    captured = segments(store, database_id)
    if captured:
        found["last_commit_captured"] = captured[-1].last_commit_time
    return found


def _peek(db: Any, state: CaptureState) -> list[tuple[str, dict[str, Any]]]:
    """(lsn, change) of what the slot holds, in wal2json's format-version 2 whatever the
    plugin; the slot does not move."""
    with db.cursor() as cur:
        if state.plugin == "wal2json":
            cur.execute(PEEK["wal2json"], (state.slot, MAX_CHANGES))
            return [(lsn, json.loads(data, parse_int=str, parse_float=str))
                    for lsn, _xid, data in cur.fetchall()]
        cur.execute(PEEK["pgoutput"], (state.slot, MAX_CHANGES, state.publication))
        rows = cur.fetchall()
        names: dict[tuple[int, int], str] = {}

        def type_name(oid: int, typmod: int) -> str:
            if (oid, typmod) not in names:
                cur.execute("SELECT format_type(%s, %s)", (oid, typmod))
                names[(oid, typmod)] = cur.fetchone()[0]
            return names[(oid, typmod)]

        return pgoutput.changes(rows, type_name)


def _transactions(changes: list[tuple[str, dict[str, Any]]]
                  ) -> tuple[list[dict[str, Any]], str]:
    """Whole transactions (B ... C) from the peeked changes, and where the last one ends."""
    done: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    end_lsn = ""
    for _lsn, change in changes:
        action = change["action"]
        if action == "B":
            current = {"xid": str(change.get("xid", "")), "commit_lsn": change["lsn"],
                       "commit_time": change["timestamp"], "changes": []}
        elif action == "C":
            if current is not None:
                current["end_lsn"] = change["nextlsn"]
                done.append(current)
                end_lsn = change["nextlsn"]
            current = None
        elif current is not None and action in ("I", "U", "D", "T"):
            current["changes"].append(change)
    return done, end_lsn


def _write_segment(store: Store, database_id: str, transactions: list[dict[str, Any]],
                   end_lsn: str) -> Segment:
    body = gzip.compress(b"".join(json.dumps(t).encode() + b"\n" for t in transactions))
    key = _key(store, database_id, "segments", f"{lsn_key(end_lsn)}.jsonl.gz")
    segment = Segment(key=key, end_lsn=end_lsn, transactions=len(transactions),
                      first_commit_time=transactions[0]["commit_time"],
                      last_commit_time=transactions[-1]["commit_time"], size=len(body),
                      sha256=hashlib.sha256(body).hexdigest())
    store.s3.put_object(Bucket=store.url.bucket, Key=key, Body=body)
    # The index entry is written last: a segment without one does not count.
    store.s3.put_object(Bucket=store.url.bucket,
                        Key=_key(store, database_id, "index", f"{lsn_key(end_lsn)}.json"),
                        Body=json.dumps(asdict(segment)).encode(),
                        ContentType="application/json")
    return segment


def segments(store: Store, database_id: str) -> list[Segment]:
    """Every committed segment, in LSN order."""
    prefix = _key(store, database_id, "index") + "/"
    keys = sorted(k for k in store.list_keys(prefix) if k.endswith(".json"))
    return [Segment(**json.loads(store.read_small(k) or b"{}")) for k in keys]


def transactions_until(store: Store, database_id: str, epoch: CaptureState,
                       when: datetime, until_lsn: str = "") -> Iterator[dict[str, Any]]:
    """Each transaction captured in `epoch` (after its base, before `until_lsn`, the next
    epoch's start) and committed at or before `when`: once each, in commit order."""
    applied: set[str] = set()
    start, end = lsn_int(epoch.start_lsn), lsn_int(until_lsn) if until_lsn else None
    for segment in segments(store, database_id):
        if lsn_int(segment.end_lsn) <= start:
            continue
        if parse_time(segment.first_commit_time) > when:
            break
        raw = store.read_small(segment.key)
        if raw is None or hashlib.sha256(raw).hexdigest() != segment.sha256:
            raise StoreError(f"change segment {segment.key} is missing or damaged",
                             "restore to a time before it, or from the base alone")
        for line in gzip.decompress(raw).splitlines():
            txn = json.loads(line)
            commit = lsn_int(txn["commit_lsn"])
            if txn["commit_lsn"] in applied or commit < start:
                continue  # delivered twice (a run that died before advancing), or in the base
            if parse_time(txn["commit_time"]) > when or (end is not None and commit >= end):
                return
            applied.add(txn["commit_lsn"])
            yield txn


def replay(target: ConnectionInfo, transactions: Iterator[dict[str, Any]]) -> int:
    """Apply captured transactions to `target`, each in its own transaction.

    Triggers stay off (session_replication_role = replica): the stream already holds
    what they did at the source, and firing them again would do it twice.
    """
    db = connect(target)
    count = 0
    try:
        with db.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            db.commit()
            for txn in transactions:
                for change in txn["changes"]:
                    cur.execute(_statement(change))
                db.commit()
                count += 1
    except psycopg2.Error as exc:
        db.rollback()
        raise CaptureError(f"replaying the captured changes into {target.display()} failed: "
                           f"{target.redact(' '.join(str(exc).split()))}",
                           "the target holds the base and the transactions before the one "
                           "named; check it") from None
    finally:
        db.close()
    return count


def _statement(change: dict[str, Any]) -> sql.Composed:
    table = sql.Identifier(change["schema"], change["table"])
    action = change["action"]
    if action == "T":
        return sql.SQL("TRUNCATE {}").format(table)
    if action == "I":
        cols = change["columns"]
        # the row's own values, identity columns included (GENERATED ALWAYS too)
        return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})").format(
            table, sql.SQL(", ").join(sql.Identifier(c["name"]) for c in cols),
            sql.SQL(", ").join(_value(c) for c in cols))
    identity = change.get("identity")
    if not identity:
        raise CaptureError(f"{change['schema']}.{change['table']} has no replica identity",
                           "give the table a primary key (or REPLICA IDENTITY FULL)")
    where = sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT DISTINCT FROM {}").format(sql.Identifier(c["name"]), _value(c))
        for c in identity)
    if action == "D":
        return sql.SQL("DELETE FROM {} WHERE {}").format(table, where)
    # Key columns that keep their value are left out of SET: an identity column GENERATED
    # ALWAYS may not be assigned at all, and it cannot have changed at the source either.
    keys = {c["name"]: c["value"] for c in identity}
    sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c["name"]), _value(c))
                              for c in change["columns"]
                              if keys.get(c["name"], object()) != c["value"])
    if not sets.seq:
        return sql.Composed([sql.SQL("SELECT 1")])  # nothing but the key, and it kept its value
    return sql.SQL("UPDATE {} SET {} WHERE {}").format(table, sets, where)


def _value(column: dict[str, Any]) -> sql.Composed:
    value = column["value"]
    if isinstance(value, bool):
        value = "true" if value else "false"
    # The type name is the server's own (format_type), as wal2json wrote it.
    return sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(column["type"]))


def restore_to_time(store: Store, database_id: str, target: ConnectionInfo,
                    when: datetime) -> tuple[Manifest, int]:
    """The base of the epoch that covers `when`, then every transaction it captured up to
    `when`. Returns the base and how many transactions were replayed."""
    from .restore import run_restore  # restore.py does not need cdc; this one needs it late
    history = epochs(store, database_id)
    covering = [i for i, e in enumerate(history) if parse_time(e.base_at) <= when]
    if not covering:
        raise ConfigError(f"no change capture of {database_id} covers {when.isoformat()}",
                          "restore a backup instead, or a later time"
                          + (f" (capture starts at {history[0].base_at})" if history else ""))
    index = covering[-1]
    epoch = history[index]
    until = history[index + 1].start_lsn if index + 1 < len(history) else ""
    base = next((m for m in store.manifests(database_id) if m.backup_id == epoch.base), None)
    if base is None:
        raise StoreError(f"the capture's base backup {epoch.base} is gone",
                         "restore a later time, or a backup")
    run_restore(store, base, target)
    count = replay(target, transactions_until(store, database_id, epoch, when, until))
    _bump_sequences(target)
    log.info("restored %s to %s: base %s and %d transaction(s)", database_id, when.isoformat(),
             base.backup_id, count)
    return base, count


def _bump_sequences(target: ConnectionInfo) -> None:
    """Sequences are not in the change stream: move each column's sequence past the
    largest value replayed into it, so the restored database can take new rows."""
    db = connect(target)
    try:
        db.autocommit = True
        with db.cursor() as cur:
            cur.execute("""
                SELECT s.oid::regclass::text, quote_ident(a.attname), c.oid::regclass::text
                FROM pg_depend d
                JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                JOIN pg_class c ON c.oid = d.refobjid
                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
                WHERE d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')""")
            for seq, column, table in cur.fetchall():
                # regclass text and quote_ident: names the server quoted itself
                cur.execute(sql.SQL(
                    "SELECT setval({}, greatest((SELECT last_value FROM {}),"
                    " (SELECT max({}) FROM {})))").format(
                    sql.Literal(seq), sql.SQL(seq), sql.SQL(column), sql.SQL(table)))
    finally:
        db.close()
