"""Change capture through a logical replication slot: the groundwork of point-in-time restore.

    cdc start: create the slot with an exported snapshot -> take the base full backup in
               that very snapshot (no gap, no overlap) -> record the epoch
    cdc run:   check the schema (every object's definition) and read the sequences, at a
               WAL position L -> peek the slot's committed transactions -> write them as one
               gzip'd segment -> write its index entry (the commit marker, like a manifest)
               -> advance the slot -> record that the epoch covers everything committed
               before L (its progress)
    restore:   the base, then every captured transaction committed at or before the time,
               each atomically, in commit order, each once (by commit LSN) (replay.py), then
               sequences as the run before the time read them

Delivery is at least once: a run that dies after writing its segment but before advancing
the slot leaves those transactions in the slot, and the next run stores them again.
Replay de-duplicates by commit LSN, so a transaction is applied once whatever the store
holds twice.

What a restore to a time can and cannot give exactly:
- A time later than the epoch's progress (what capture has stored and checked) is refused:
  capture has not seen it yet.
- DDL is not in the stream. A run that finds the definitions changed ends the epoch at its
  last check and starts a new one (a new slot and base); a time between the two cannot be
  rebuilt (the DDL's moment is unknown) and is refused, naming the times on either side.
- Values are decoded and replayed under one set of output settings (output.py), so the
  source's DateStyle, extra_float_digits, search_path and the like cannot change them.
- What the stream does not carry is named in the restore's output, never silently old:
  tables without a replica identity (their updates and deletes), unlogged tables, large
  objects, and sequences when the time falls after the last read of them.
- pgoutput needs a publication. FOR ALL TABLES publishing updates and deletes would make
  the source reject the application's UPDATE and DELETE on tables without a replica
  identity, so capture publishes inserts and truncates of all tables, and updates and
  deletes only of the tables that have an identity: starting capture never changes what
  the application can write.

Store layout, under <database-id>/cdc/:
    state.json                          the epoch now running (slot, plugin, base)
    epochs/<start-lsn>.json             every epoch ever started
    progress/<start-lsn>.json           how far each epoch is covered, and why it ended
    segments/<end-lsn>.jsonl.gz         one JSON line per transaction
    index/<end-lsn>.json                commit times, LSNs, size and sha256 of a segment,
                                        and the check of the run that stored it
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras
from psycopg2 import sql

from . import output, pgoutput
from .backup import BackupRequest, run_backup
from .dburl import ConnectionInfo
from .definitions import USER_SCHEMAS, definitions_fingerprint
from .errors import ConfigError, StoreError, SupabackupError
from .manifest import Manifest, iso, parse_time, utcnow
from .replay import HAS_REPLICA_IDENTITY, ReplayFailed, replay
from .snapshot import connect, run_statement
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["CaptureError", "ReplayFailed", "restore_to_time", "run", "start"]

# wal2json 2.6+: numbers as strings. Without it wal2json writes NaN and +-Infinity of
# float and numeric columns as JSON null, which cannot be told from NULL (see _peek).
EXACT_NUMBERS = ", 'numeric-data-types-as-string', '1'"
AMBIGUOUS_NULL_TYPES = ("real", "double precision", "numeric")
MAX_CHANGES = 100_000  # per run: bounded memory; the next run goes on from there
# wal2json where the server has it; else pgoutput, built in, which needs a publication.
PLUGINS = ("wal2json", "pgoutput")
PEEK = {
    "wal2json": "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes(%s, NULL,"
                " %s, 'format-version', '2', 'include-timestamp', '1', 'include-lsn', '1',"
                " 'include-xids', '1', 'include-transaction', '1'{})",
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
    publication: str = ""  # pgoutput's publications, comma-separated; wal2json needs none
    base_at: str = ""      # the base's snapshot time
    schema: str = ""       # definitions fingerprint when the base was taken


@dataclass(frozen=True)
class Check:
    """What a run read before peeking: everything committed before `lsn` is in the slot,
    and was committed under the definitions `schema`."""

    lsn: str
    at: str
    schema: str
    sequences: dict[str, list[Any]] = field(default_factory=dict)  # name: [last_value, is_called]
    large_objects: int = 0
    files: dict[str, int] = field(default_factory=dict)  # schema.table: relfilenode


@dataclass(frozen=True)
class Progress:
    """How far an epoch is covered: restores reach times up to `verified_at`."""

    verified_lsn: str
    verified_at: str
    sequences: dict[str, list[Any]] = field(default_factory=dict)
    sequences_at: str = ""
    large_objects: int = 0
    ended: str = ""   # why the epoch ended ("" while it runs)
    files: dict[str, int] = field(default_factory=dict)      # the check's (see _rewritten)
    truncated_after: list[str] = field(default_factory=list)  # by stored commits after it


def _key(store: Store, database_id: str, *parts: str) -> str:
    return store.key(database_id, "cdc", *parts)


def _read_json(store: Store, key: str, what: str) -> dict[str, Any] | None:
    raw = store.read_small(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("not an object")
        return value
    except ValueError as exc:
        raise StoreError(f"{what} {key} is damaged ({exc})",
                         "restore from a backup, or `supabackup cdc drop` and start again"
                         ) from None


def read_state(store: Store, database_id: str) -> CaptureState | None:
    """The capture now running, if any."""
    raw = _read_json(store, _key(store, database_id, "state.json"), "capture state")
    return CaptureState(**raw) if raw else None


def epochs(store: Store, database_id: str) -> list[CaptureState]:
    """Every capture ever started (a base and the changes after it), oldest first.

    A new epoch begins with `cdc start`, and by itself when the definitions changed (DDL
    is not in the stream) or the slot was lost; restores pick the epoch that covers their
    time.
    """
    prefix = _key(store, database_id, "epochs") + "/"
    return [CaptureState(**(_read_json(store, k, "capture epoch") or {}))
            for k in sorted(store.list_keys(prefix))]


def read_progress(store: Store, database_id: str, epoch: CaptureState) -> Progress | None:
    raw = _read_json(store, _progress_key(store, database_id, epoch), "capture progress")
    return Progress(**raw) if raw else None


def _progress_key(store: Store, database_id: str, epoch: CaptureState) -> str:
    return _key(store, database_id, "progress", f"{lsn_key(epoch.start_lsn)}.json")


def _put_json(store: Store, key: str, value: dict[str, Any]) -> None:
    store.put_small(key, json.dumps(value).encode(), "application/json")


def _checked(db: Any) -> Check:
    """The run's check, read at one WAL position (see Check)."""
    with db.cursor() as cur:
        # The time first, then the flushed WAL position (decoding reads up to it), then the
        # definitions. A transaction committed by then is in the slot when the run peeks;
        # one that sees a DDL the definitions below do not show started after they were
        # read, so its commit time is later than `at`.
        cur.execute("SELECT clock_timestamp()")
        at = cur.fetchone()[0]
        lsn = _flushed_through_insert(cur)
        schema = definitions_fingerprint(cur)
        sequences = _sequences(cur)
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        large_objects = int(cur.fetchone()[0])
        files = _files(cur)
    return Check(lsn=lsn, at=iso(at), schema=schema, sequences=sequences,
                 large_objects=large_objects, files=files)


def _files(cur: Any) -> dict[str, int]:
    """Each logged table's relfilenode: a new one means its rows were written anew."""
    cur.execute(f"""
        SELECT n.nspname || '.' || c.relname, c.relfilenode FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMAS}""")
    return {name: int(node) for name, node in cur.fetchall()}


def _rewritten(previous: Progress | None, check: Check,
               transactions: list[dict[str, Any]]) -> list[str]:
    """Tables whose rows were written anew since the previous check without a TRUNCATE in
    the stream: ALTER TABLE ... ALTER COLUMN ... TYPE with USING (even to the same type,
    so no definition changes), VACUUM FULL, CLUSTER. A rewrite is not decoded, so what it
    changed is not in the stream (the last two change nothing, and cost a new base)."""
    if previous is None or not previous.files:
        return []
    truncated = set(previous.truncated_after) | _truncated(transactions, below=check.lsn)
    return sorted(name for name, node in check.files.items()
                  if previous.files.get(name, node) != node and name not in truncated)


def _truncated(transactions: list[dict[str, Any]], below: str = "", since: str = "") -> set[str]:
    """schema.table of every table the transactions truncated, committed before `below`
    or at or after `since`."""
    return {f"{c['schema']}.{c['table']}" for t in transactions for c in t["changes"]
            if c["action"] == "T"
            and (not below or lsn_int(t["commit_lsn"]) < lsn_int(below))
            and (not since or lsn_int(t["commit_lsn"]) >= lsn_int(since))}


def _flushed_through_insert(cur: Any, patience: float = 2.0) -> str:
    """The WAL position inserted by now, once it is flushed (decoding reads only flushed
    WAL). With synchronous_commit off a commit is visible before it is flushed; the WAL
    writer flushes it within a few hundred milliseconds. Past `patience`, the flushed
    position as it is (the run then covers less)."""
    cur.execute("SELECT pg_current_wal_insert_lsn()::text")
    inserted = cur.fetchone()[0]
    deadline = time.monotonic() + patience
    while True:
        cur.execute("SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_flush_lsn() >= %s",
                    (inserted,))
        flushed, done = cur.fetchone()
        if done:
            return str(inserted)
        if time.monotonic() > deadline:
            return str(flushed)
        time.sleep(0.01)


def _sequences(cur: Any) -> dict[str, list[Any]]:
    """[last_value, is_called] of every sequence the user may read: the stream has none."""
    cur.execute(f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND c.relpersistence = 'p' AND {USER_SCHEMAS}
          AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT') END
        ORDER BY 1""")
    names = [r[0] for r in cur.fetchall()]
    if not names:
        return {}
    cur.execute(sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}, last_value, is_called FROM {}").format(sql.Literal(n), sql.SQL(n))
        for n in names))  # regclass text: names the server quoted itself
    return {name: [int(value), bool(called)] for name, value, called in cur.fetchall()}


def _schema_in(conn: ConnectionInfo, snapshot: str) -> tuple[str, list[str], dict[str, int]]:
    """The definitions fingerprint as the base sees it, the tables with a replica identity
    and the tables' relfilenodes: read in the slot's exported snapshot."""
    db = connect(conn)
    try:
        db.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with db.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            output.pin(cur, local=True)
            return definitions_fingerprint(cur), _identity_tables(cur), _files(cur)
    finally:
        db.close()


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
    plugin, repl, start_lsn, snapshot, published = _create_slot(conn, slot)
    try:
        # The exported snapshot lives while this connection stays idle: the base is taken
        # in it, so it holds exactly the transactions before the slot's first change.
        schema, identity, files = _schema_in(conn, snapshot)
        if plugin == "pgoutput" and identity != published:
            raise CaptureError("tables changed while capture started (the publication of "
                               "updates and deletes does not match them)", "run cdc start again")
        base = run_backup(conn, store, replace(request, kind="full", snapshot=snapshot))
        repl.close()
        state = CaptureState(slot=slot, plugin=plugin, base=base.backup_id,
                             start_lsn=start_lsn,
                             publication=",".join(_publications(slot)) if plugin == "pgoutput"
                             else "", base_at=base.snapshot_at, schema=schema)
        _put_json(store, _key(store, database_id, "epochs", f"{lsn_key(start_lsn)}.json"),
                  asdict(state))
        _put_json(store, _progress_key(store, database_id, state),
                  asdict(Progress(verified_lsn=start_lsn, verified_at=base.snapshot_at,
                                  files=files)))
        _put_json(store, _key(store, database_id, "state.json"), asdict(state))
    except BaseException:
        # A slot nobody reads holds WAL on the database: a start that fails leaves none.
        repl.close()
        _abandon(conn, slot, plugin)
        raise
    log.info("change capture of %s started: slot %s at %s, base %s", database_id, slot,
             start_lsn, base.backup_id)
    return state, base


def _publications(slot: str) -> tuple[str, str]:
    """(inserts and truncates of every table, updates and deletes of tables with an identity)."""
    return f"{slot}_all", f"{slot}_keyed"


def _identity_tables(cur: Any) -> list[str]:
    """Tables whose updates and deletes can be published: they have a replica identity."""
    cur.execute(f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMAS}
          AND {HAS_REPLICA_IDENTITY}
        ORDER BY 1""")
    return [r[0] for r in cur.fetchall()]


def _create_publications(conn: ConnectionInfo, slot: str) -> list[str]:
    everything, keyed = _publications(slot)
    hint = "pgoutput needs a publication FOR ALL TABLES, which takes a superuser"
    _admin(conn, f"CREATE PUBLICATION {everything} FOR ALL TABLES "
                 "WITH (publish = 'insert, truncate')", hint)
    db = connect(conn)
    try:
        with db.cursor() as cur:
            output.pin(cur)
            tables = _identity_tables(cur)
    finally:
        db.close()
    # A publication cannot be empty of tables: with none to list, it publishes nothing.
    listed = f"FOR TABLE {', '.join(tables)} " if tables else ""
    _admin(conn, f"CREATE PUBLICATION {keyed} {listed}WITH (publish = 'update, delete')", hint)
    return tables


def _drop_publications(conn: ConnectionInfo, slot: str) -> None:
    for name in _publications(slot):
        _admin(conn, f"DROP PUBLICATION IF EXISTS {name}", "")


def _create_slot(conn: ConnectionInfo, slot: str) -> tuple[str, Any, str, str, list[str]]:
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
            failures.append(f"{plugin}: {conn.redact(' '.join(str(exc).split()))}")
            if plugin == "pgoutput":
                _drop_publications(conn, slot)
    raise CaptureError(f"cannot create the replication slot {slot} ({'; '.join(failures)})",
                       "the user needs REPLICATION, the server wal_level=logical, and a free "
                       "replication slot (max_replication_slots)")


def _admin(conn: ConnectionInfo, statement: str, hint: str) -> None:
    run_statement(conn, statement, fail=lambda detail: CaptureError(
        f"{statement.split(' FOR ')[0].split(' WITH ')[0]} on {conn.display()} failed: "
        f"{detail}", hint))


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
            _drop_publications(conn, slot)
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
    checked_at: str = ""     # the run's check (Check): sequences as they were then
    sequences: dict[str, list[Any]] = field(default_factory=dict)
    large_objects: int = 0


@dataclass(frozen=True)
class CaptureRun:
    """What one capture run did."""

    segment: Segment | None       # the transactions it stored, if any
    slot: dict[str, Any]          # the slot's health (slot_status) before the run
    restarted: str = ""           # why it started a new epoch ("" when it did not)
    lost: bool = False            # the slot was gone: changes since the last run are lost
    covered_through: datetime | None = None  # restores now reach times up to this one


def run(conn: ConnectionInfo, store: Store, database_id: str,
        after_upload: Callable[[Segment], None] = lambda segment: None,
        max_retained_wal: int | None = None) -> CaptureRun:
    """One capture run: check, store the slot's committed transactions, advance the slot.

    A slot that is gone (dropped by hand, or invalidated for holding too much WAL) starts a
    new epoch: a new slot and base, and the run reports the loss. So does a slot that holds
    more than `max_retained_wal` bytes, which is dropped before it fills the disk, and
    definitions that changed since the base (DDL is not in the stream: later changes must
    be replayed onto a base that has it). `after_upload` runs between the segment's commit
    and the slot's advance (tests crash there on purpose).
    """
    require_direct(conn)
    state = read_state(store, database_id)
    if state is None:
        raise ConfigError(f"change capture of {database_id} is not started",
                          "run `supabackup cdc start` first")
    db = connect(conn)
    try:
        db.autocommit = True
        with db.cursor() as cur:
            output.pin(cur)  # values decode in this session: as replay will read them
        health = slot_status(db, state.slot)
        reason = ""
        if health.get("wal_status") in (None, "lost"):
            reason = (f"the replication slot {state.slot} is gone" if not health
                      else f"the replication slot {state.slot} was invalidated (wal_status lost)")
        elif max_retained_wal is not None and health["retained_wal_bytes"] > max_retained_wal:
            reason = (f"the slot held {health['retained_wal_bytes']} bytes of WAL, over the "
                      f"limit of {max_retained_wal}")
        check = None if reason else _checked(db)
        if check is not None and check.schema != state.schema:
            reason = "the schema changed"
        if reason:
            db.close()
            return _restarted(conn, store, database_id, state, reason, health,
                              lost=reason != "the schema changed")
        assert check is not None
        rows, peeked = _peek(db, state)
        transactions, end_lsn = _transactions(rows)
        segment = None
        if transactions:
            segment = _write_segment(store, database_id, transactions, end_lsn, check)
            after_upload(segment)
            with db.cursor() as cur:
                cur.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                            (state.slot, end_lsn))
            log.info("captured %d transaction(s) up to %s into %s", segment.transactions,
                     end_lsn, segment.key)
    finally:
        db.close()
    rewritten = _rewritten(read_progress(store, database_id, state), check, transactions)
    if rewritten:
        return replace(_restarted(conn, store, database_id, state,
                                  f"{', '.join(rewritten)} rewritten outside the change stream "
                                  "(ALTER TABLE ... USING, VACUUM FULL or CLUSTER)", health,
                                  lost=False), segment=segment)
    progress = _progress_after(check, transactions, end_lsn, complete=peeked < MAX_CHANGES)
    _put_json(store, _progress_key(store, database_id, state), asdict(progress))
    return CaptureRun(segment, health, covered_through=parse_time(progress.verified_at))


def _progress_after(check: Check, transactions: list[dict[str, Any]], end_lsn: str,
                    complete: bool) -> Progress:
    """What the epoch covers after a run: all before the check, or, when the peek stopped
    at MAX_CHANGES, up to the last whole transaction it stored."""
    after = sorted(_truncated(transactions, since=check.lsn))
    if complete or not transactions or lsn_int(end_lsn) >= lsn_int(check.lsn):
        return Progress(verified_lsn=check.lsn, verified_at=check.at, sequences=check.sequences,
                        sequences_at=check.at, large_objects=check.large_objects,
                        files=check.files, truncated_after=after)
    # A later transaction (not stored yet) may share the last stored one's commit time.
    before_last = parse_time(transactions[-1]["commit_time"]) - timedelta(microseconds=1)
    return Progress(verified_lsn=end_lsn, verified_at=iso(before_last),
                    sequences=check.sequences, sequences_at=check.at,
                    large_objects=check.large_objects, files=check.files, truncated_after=after)


def _restarted(conn: ConnectionInfo, store: Store, database_id: str, state: CaptureState,
               reason: str, health: dict[str, Any], lost: bool) -> CaptureRun:
    """End the epoch at its last check, start the next one; the run that did it."""
    log.warning("change capture of %s starts a new epoch: %s", database_id, reason)
    previous = read_progress(store, database_id, state) or Progress(state.start_lsn,
                                                                     state.base_at)
    _put_json(store, _progress_key(store, database_id, state),
              asdict(replace(previous, ended=reason)))
    drop(conn, store, database_id)
    # Backup ids have one-second resolution: a base within a second of the last one would
    # take its id, fail, and leave capture stopped.
    wait = 1.1 - (utcnow() - parse_time(state.base_at)).total_seconds()
    if wait > 0:
        time.sleep(wait)
    profile = next((m.profile for m in store.manifests(database_id)
                    if m.backup_id == state.base), None)
    _, base = start(conn, store, BackupRequest(
        database_id=database_id, retention="weekly", profile=profile,
        label=f"change capture base: {reason}"[:200], trigger="schedule"))
    return CaptureRun(None, health, reason, lost=lost,
                      covered_through=parse_time(base.snapshot_at))


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


def drop(conn: ConnectionInfo, store: Store, database_id: str) -> CaptureState | None:
    """Stop capturing: drop the slot (freeing its WAL) and its publications. What was
    captured stays restorable (the epochs and segments remain)."""
    state = read_state(store, database_id)
    if state is None:
        return None
    _drop_slot(conn, state.slot)
    for name in filter(None, state.publication.split(",")):
        _admin(conn, f"DROP PUBLICATION IF EXISTS {name}", "")
    store.delete_key(_key(store, database_id, "state.json"))
    return state


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


def status(conn: ConnectionInfo, store: Store, database_id: str) -> dict[str, Any]:
    """What `cdc status` prints and the capture function reports as metrics."""
    state = read_state(store, database_id)
    db = connect(conn)
    try:
        db.autocommit = True
        inexact = not_replayable(db)
        found = {"started": state is not None,
                 "slot": slot_status(db, state.slot) if state else {},
                 "tables_without_identity": [line.split(":")[0] for line in inexact
                                             if "no replica identity" in line],
                 "not_replayable": inexact}
    finally:
        db.close()
    if state is not None:
        found.update(plugin=state.plugin, base=state.base, start_lsn=state.start_lsn)
        progress = read_progress(store, database_id, state)
        if progress is not None:
            found["covered_through"] = progress.verified_at
    captured = segments(store, database_id)
    if captured:
        found["last_commit_captured"] = captured[-1].last_commit_time
    return found


def _peek(db: Any, state: CaptureState) -> tuple[list[tuple[str, dict[str, Any]]], int]:
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
            return [(lsn, _from_wal2json(json.loads(data, parse_int=str, parse_float=str,
                                                    parse_constant=str), exact))
                    for lsn, _xid, data in fetched], len(fetched)
        cur.execute(PEEK["pgoutput"], (state.slot, MAX_CHANGES, state.publication))
        rows = cur.fetchall()
        names: dict[tuple[int, int], str] = {}

        def type_name(oid: int, typmod: int) -> str:
            if (oid, typmod) not in names:
                cur.execute("SELECT format_type(%s, %s)", (oid, typmod))
                names[(oid, typmod)] = cur.fetchone()[0]
            return names[(oid, typmod)]

        return pgoutput.changes(rows, type_name), len(rows)


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
                   end_lsn: str, check: Check) -> Segment:
    body = gzip.compress(b"".join(json.dumps(t).encode() + b"\n" for t in transactions))
    key = _key(store, database_id, "segments", f"{lsn_key(end_lsn)}.jsonl.gz")
    segment = Segment(key=key, end_lsn=end_lsn, transactions=len(transactions),
                      first_commit_time=transactions[0]["commit_time"],
                      last_commit_time=transactions[-1]["commit_time"], size=len(body),
                      sha256=hashlib.sha256(body).hexdigest(), checked_at=check.at,
                      sequences=check.sequences, large_objects=check.large_objects)
    store.put_small(key, body)
    # The index entry is written last: a segment without one does not count.
    _put_json(store, _key(store, database_id, "index", f"{lsn_key(end_lsn)}.json"),
              asdict(segment))
    return segment


def segments(store: Store, database_id: str) -> list[Segment]:
    """Every committed segment, in LSN order."""
    prefix = _key(store, database_id, "index") + "/"
    keys = sorted(k for k in store.list_keys(prefix) if k.endswith(".json"))
    return [Segment(**(_read_json(store, k, "capture index entry") or {})) for k in keys]


def transactions_until(store: Store, database_id: str, epoch: CaptureState,
                       when: datetime, until_lsn: str = "") -> Iterator[dict[str, Any]]:
    """The transactions of `epoch` (after its base, before `until_lsn`, the next epoch's
    start) that make up the database as of `when`: once each, in commit (LSN) order, up
    to the first one committed after `when`. That is PostgreSQL's own recovery_target_time
    rule: the state is a prefix of the commit order, which is a state the database had.
    (A commit time is taken just before the commit is written, so two commits may be in
    one order by LSN and the other by time; the prefix rule keeps the state consistent.)"""
    applied: set[str] = set()
    start = lsn_int(epoch.start_lsn)
    end = lsn_int(until_lsn) if until_lsn else None
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


@dataclass
class PointInTimeReport:
    """What a restore to a time did, and what it could not bring to that time."""

    when: datetime
    base: Manifest
    transactions: int = 0
    covered_through: str = ""
    inexact: list[str] = field(default_factory=list)  # "what: why", each named for the user
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"restored {self.base.database_id} as of {self.when.isoformat()}: base "
               f"{self.base.backup_id} and {self.transactions} captured transaction(s)"]
        out += self.notes
        out += [f"NOT AS OF {self.when.isoformat()}: {line}" for line in self.inexact]
        return out


def restore_to_time(store: Store, database_id: str, target: ConnectionInfo,
                    when: datetime) -> PointInTimeReport:
    """The base of the epoch that covers `when`, then every transaction it captured up to
    `when`; refuses a time capture cannot give exactly, names what it could not bring."""
    from .restore import run_restore  # restore.py does not need cdc; this one needs it late
    history = epochs(store, database_id)
    covering = [i for i, e in enumerate(history) if parse_time(e.base_at) <= when]
    if not covering:
        raise ConfigError(f"no change capture of {database_id} covers {when.isoformat()}",
                          "restore a backup instead, or a later time"
                          + (f" (capture starts at {history[0].base_at})" if history else ""))
    index = covering[-1]
    epoch = history[index]
    progress = read_progress(store, database_id, epoch)
    if progress is None:
        raise StoreError(f"the progress record of the capture epoch {epoch.start_lsn} is "
                         "missing", "restore a backup, or a time in another epoch")
    _refuse_uncovered(database_id, when, progress, history[index + 1:index + 2])
    base = next((m for m in store.manifests(database_id) if m.backup_id == epoch.base), None)
    if base is None:
        raise StoreError(f"the capture's base backup {epoch.base} is gone",
                         "restore a later time, or a backup")
    report = PointInTimeReport(when=when, base=base, covered_through=progress.verified_at)
    restored = run_restore(store, base, target)
    report.notes += restored.notes
    report.inexact += _not_replayable_in(target, _large_objects_seen(store, database_id,
                                                                     epoch, progress))
    following = history[index + 1:index + 2]
    # Only the tables whose data the base holds: what the profile leaves out stays out
    # (Supabase's realtime.subscription, say), and a table created and dropped between two
    # runs has no rows to bring back (what it did to other tables is in the stream).
    held = {(t.schema, t.name) for t in base.table_states.values()} or None
    replayed = replay(target, transactions_until(store, database_id, epoch, when,
                                                 following[0].start_lsn if following else ""),
                      held)
    report.transactions = replayed.transactions
    report.inexact += [f"{table}: a float or numeric value that wal2json decoded as null may "
                       "have been NaN or +-Infinity (wal2json before 2.6 cannot tell them "
                       "apart; it was restored as NULL)" for table in sorted(replayed.ambiguous)]
    read = _sequences_for(store, database_id, epoch, progress, when)
    report.inexact += _set_sequences(target, read, when, replayed.transactions)
    checked_then = bool(read[0]) and parse_time(read[0]) == when
    if (not checked_then and when > parse_time(base.snapshot_at)
            and not any(line.startswith("large objects") for line in report.inexact)):
        # no run saw one, but one made and removed between two runs would be missed
        report.inexact.append("large objects: none at the base or at any capture run, but "
                              "they are not in the change stream: one created after the "
                              "run before this time would not be here")
    report.notes += _refresh_matviews(target)
    log.info("restored %s to %s: base %s and %d transaction(s)", database_id, when.isoformat(),
             base.backup_id, report.transactions)
    return report


def _refuse_uncovered(database_id: str, when: datetime, progress: Progress,
                      following: list[CaptureState]) -> None:
    if when <= parse_time(progress.verified_at):
        return
    if following:
        raise CaptureError(
            f"{when.isoformat()} cannot be restored exactly: change capture of {database_id} "
            f"has no record between {progress.verified_at} and {following[0].base_at} "
            f"({progress.ended or 'a new epoch began'})",
            f"choose a time at or before {progress.verified_at}, or at or after "
            f"{following[0].base_at}")
    raise CaptureError(
        f"change capture of {database_id} covers times up to {progress.verified_at}; "
        f"{when.isoformat()} is later",
        "run `supabackup cdc run` and try again, or choose an earlier time")


def _not_replayable_in(target: ConnectionInfo, large_objects_later: int) -> list[str]:
    """What the restored base holds that replay cannot bring forward (see not_replayable),
    and large objects when capture saw some after the base."""
    db = connect(target)
    try:
        db.autocommit = True
        lines = [line.replace(": ", ": as of the base; ", 1) for line in not_replayable(db)]
    finally:
        db.close()
    if large_objects_later and not any(line.startswith("large objects") for line in lines):
        lines.append(f"large objects: as of the base, which had none; capture saw "
                     f"{large_objects_later} since (they are not in the change stream)")
    return lines


def _large_objects_seen(store: Store, database_id: str, epoch: CaptureState,
                        progress: Progress) -> int:
    """The most large objects any run of `epoch` saw."""
    start = lsn_int(epoch.start_lsn)
    return max([progress.large_objects] + [s.large_objects for s in segments(store, database_id)
                                           if lsn_int(s.end_lsn) > start])


def _sequences_for(store: Store, database_id: str, epoch: CaptureState, progress: Progress,
                   when: datetime) -> tuple[str, dict[str, list[Any]]]:
    """(when they were read, values) of the newest read of the sequences at or before
    `when` in `epoch`; ("", {}) when no run read them since the base, which holds them."""
    reads = [(s.checked_at, s.sequences) for s in segments(store, database_id)
             if lsn_int(s.end_lsn) > lsn_int(epoch.start_lsn) and s.checked_at]
    if progress.sequences_at:
        reads.append((progress.sequences_at, progress.sequences))
    earlier = [r for r in reads if parse_time(r[0]) <= when]
    return max(earlier, key=lambda r: parse_time(r[0])) if earlier else ("", {})


def _set_sequences(target: ConnectionInfo, read: tuple[str, dict[str, list[Any]]],
                   when: datetime, replayed: int) -> list[str]:
    """Set every sequence as the newest read before `when` found it. When that read is
    not at `when` itself, the values are older than the time asked for: each sequence a
    column uses is moved past the largest value replayed into it (so the next insert does
    not collide), and the sequences are named. Returns the lines that name them."""
    read_at, values = read
    # Read at the very time; or nothing replayed onto the base, whose values are pg_dump's
    # own, as in any restore of a backup.
    exact = (bool(read_at) and parse_time(read_at) == when) or (not read_at and not replayed)
    moved = []
    db = connect(target)
    try:
        db.autocommit = True
        with db.cursor() as cur:
            output.pin(cur)
            for name, (value, called) in values.items():
                cur.execute("SELECT to_regclass(%s)", (name,))
                if cur.fetchone()[0] is not None:
                    cur.execute("SELECT setval(%s, %s, %s)", (name, value, called))
            for seq, column, table in ([] if exact else _column_sequences(cur)):
                # regclass text and quote_ident: names the server quoted itself
                cur.execute(sql.SQL(
                    "SELECT setval({seq}, x.m) FROM (SELECT max({col}) AS m FROM {table}) x,"
                    " {relation} s WHERE x.m > s.last_value"
                    " OR (x.m = s.last_value AND NOT s.is_called)").format(
                    seq=sql.Literal(seq), col=sql.SQL(column), table=sql.SQL(table),
                    relation=sql.SQL(seq)))
                if cur.fetchall():
                    moved.append(seq)
    finally:
        db.close()
    if exact:
        return []
    source = f"as a capture run read them at {read_at}" if read_at else "as of the base"
    return [f"sequences: {source}, not at the time asked for (the change stream does not "
            "carry them)" + (f"; moved past the values replayed into their columns: "
                             f"{', '.join(moved)}" if moved else "")]


def _column_sequences(cur: Any) -> list[tuple[str, str, str]]:
    """(sequence, column, table) for every integer column whose default or identity uses
    one (a text column may use one too, 'INV-' || nextval(...): there is no "past" it)."""
    cur.execute("""
        SELECT DISTINCT s.oid::regclass::text, quote_ident(a.attname), c.oid::regclass::text
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
        JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
        JOIN pg_class c ON c.oid = ad.adrelid
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ad.adnum
        WHERE a.atttypid IN (20, 21, 23)
        UNION
        SELECT s.oid::regclass::text, quote_ident(a.attname), c.oid::regclass::text
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_class c ON c.oid = d.refobjid
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
          AND a.atttypid IN (20, 21, 23)""")
    return list(cur.fetchall())


def _refresh_matviews(target: ConnectionInfo) -> list[str]:
    """Materialized views rebuilt from the replayed tables, as a restore of a backup does."""
    db = connect(target)
    try:
        db.autocommit = True
        with db.cursor() as cur:
            output.pin(cur)
            cur.execute("SELECT oid::regclass::text FROM pg_class WHERE relkind = 'm'"
                        " AND relispopulated ORDER BY oid")
            names = [r[0] for r in cur.fetchall()]
            for name in names:
                cur.execute(f"REFRESH MATERIALIZED VIEW {name}")  # quoted by the server
    finally:
        db.close()
    return ([f"materialized views rebuilt from the restored tables: {', '.join(names)}"]
            if names else [])
