"""Change capture's life: start (the slot and its aligned base), run (check, store, advance),
status, drop.

    start: create the slot with an exported snapshot -> take the base full backup in that
           very snapshot (no gap, no overlap) -> record the epoch
    run:   check the schema (every object's definition) and read the sequences, at a WAL
           position L -> peek the slot's committed transactions -> write them as one
           gzip'd segment -> write its index entry (the commit marker, like a manifest)
           -> advance the slot -> record that the epoch covers everything committed
           before L (its progress)

Delivery is at least once: a run that dies after writing its segment but before advancing
the slot leaves those transactions in the slot, and the next run stores them again.
Replay de-duplicates by commit LSN, so a transaction is applied once whatever the store
holds twice. DDL is not in the stream: a run that finds the definitions changed ends the
epoch at its last check and starts a new one (a new slot and base).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg2.errors
from psycopg2 import sql

from .. import output
from ..backup import BackupRequest, run_backup
from ..db import USER_SCHEMAS, connect
from ..dburl import ConnectionInfo
from ..definitions import definitions_fingerprint
from ..errors import CaptureError, ConfigError, StoreError
from ..manifest import Manifest, iso, parse_time, utcnow
from ..store import Store
from .pointintime import DROPPED
from .slot import (
    MAX_CHANGES,
    abandon,
    create_slot,
    drop_publications,
    drop_slot,
    identity_tables,
    not_replayable,
    peek,
    publications,
    require_direct,
    slot_name,
    slot_status,
    whole_transactions,
)
from .state import (
    CaptureState,
    Check,
    Progress,
    Segment,
    lsn_int,
    lsn_key,
    progress_key,
    put_json,
    read_progress,
    read_state,
    segments,
    store_key,
    write_segment,
)

log = logging.getLogger(__name__)


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
            return definitions_fingerprint(cur), identity_tables(cur), _files(cur)
    finally:
        db.close()


def start(conn: ConnectionInfo, store: Store, request: BackupRequest) -> tuple[CaptureState,
                                                                             Manifest]:
    """Create the slot and take the aligned base backup; record both."""
    require_direct(conn)
    database_id = request.database_of(conn)
    if read_state(store, database_id) is not None:
        raise ConfigError(f"change capture of {database_id} is already started",
                          "use `supabackup cdc run`, or `supabackup cdc drop` to start over")
    slot = slot_name(conn)
    plugin, repl, start_lsn, snapshot, published = create_slot(conn, slot)
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
                             publication=",".join(publications(slot)) if plugin == "pgoutput"
                             else "", base_at=base.snapshot_at, schema=schema)
        put_json(store, store_key(store, database_id, "epochs", f"{lsn_key(start_lsn)}.json"),
                  asdict(state))
        put_json(store, progress_key(store, database_id, state),
                  asdict(Progress(verified_lsn=start_lsn, verified_at=base.snapshot_at,
                                  files=files)))
        put_json(store, store_key(store, database_id, "state.json"), asdict(state))
    except BaseException:
        # A slot nobody reads holds WAL on the database: a start that fails leaves none.
        repl.close()
        abandon(conn, slot, plugin)
        raise
    log.info("change capture of %s started: slot %s at %s, base %s", database_id, slot,
             start_lsn, base.backup_id)
    return state, base


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
        if max_retained_wal is not None and max_retained_wal < 0:
            raise ConfigError(f"the retained-WAL limit must be 0 (none) or more bytes, not "
                              f"{max_retained_wal}")
        health = slot_status(db, state.slot)
        if health and health["plugin"] != state.plugin:
            raise StoreError(f"capture state of {database_id} says plugin {state.plugin}, but "
                             f"the slot {state.slot} decodes with {health['plugin']}",
                             "the state is damaged: `supabackup cdc drop`, then `cdc start`")
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
        try:
            rows, peeked = peek(db, state)
        except psycopg2.errors.ObjectInUse:
            raise CaptureError(f"another capture run is reading the slot {state.slot}",
                               "this run stored nothing; the other one goes on") from None
        transactions, end_lsn = whole_transactions(rows)
        segment = None
        if transactions:
            segment = write_segment(store, database_id, transactions, end_lsn, check)
            after_upload(segment)
            try:
                with db.cursor() as cur:
                    cur.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                                (state.slot, end_lsn))
            except psycopg2.errors.ObjectInUse:  # stored; the next run de-duplicates
                raise CaptureError(f"another capture run is reading the slot {state.slot}",
                                   "what this run stored counts; the slot advances with the "
                                   "next run") from None
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
    put_json(store, progress_key(store, database_id, state), asdict(progress))
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
    put_json(store, progress_key(store, database_id, state),
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


def drop(conn: ConnectionInfo, store: Store, database_id: str) -> CaptureState | None:
    """Stop capturing: drop the slot (freeing its WAL) and its publications. What was
    captured stays restorable (the epochs and segments remain). Works from the database
    alone when the store's state is missing or damaged: the slot is named after the
    database, so a slot left behind can always be freed."""
    try:
        state = read_state(store, database_id)
    except StoreError as exc:
        log.warning("dropping capture of %s without its state: %s", database_id, exc)
        state = None
    slots = {slot_name(conn)} | ({state.slot} if state else set())
    for slot in sorted(slots):
        drop_slot(conn, slot)
        drop_publications(conn, slot)
    if state is not None:
        try:
            progress = read_progress(store, database_id, state)
        except StoreError:
            progress = None
        if progress is not None and not progress.ended:  # a new epoch says its own why
            put_json(store, progress_key(store, database_id, state),
                     asdict(replace(progress, ended=DROPPED)))
    store.delete_key(store_key(store, database_id, "state.json"))
    return state


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
