"""Draining the slot of the running epoch: check, store, confirm, record how far it covers.

One flush, whether a run peeks the slot once (`drain_once`) or streams it (stream.py):

    check: the time, the flushed WAL position L, the definitions, the sequences
           (everything committed before L is in the slot)
    -> read the slot up to L at least
    -> store the whole transactions read as one segment, then its index entry (the commit
       marker)
    -> confirm the slot's position (the slot frees the WAL before it)
    -> record the epoch's progress: restores reach the check's time

Each transaction is stored once. A run that dies after the index entry but before the
confirm leaves its transactions in the slot; the next run reads them again and skips
every transaction that ends at or before where the epoch's stored chain reaches
(`Drain.reach`: the newest index entry, found from the progress record and the few
entries stored after it). So replay never sees a transaction twice from one slot, and a
segment's `after` always names where the chain reached: a hole shows (state.py).

A flush finds reasons to end the epoch (DDL: the definitions changed; a table rewritten
outside the stream); the caller (lifecycle.run) starts the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg2.errors
from psycopg2 import sql

from .. import output
from ..db import USER_SCHEMAS, connect
from ..dburl import ConnectionInfo
from ..definitions import definitions_fingerprint
from ..errors import CaptureError, ConfigError, StoreError
from ..manifest import iso, parse_time, utcnow
from ..store import Store
from .slot import MAX_CHANGES, peek, slot_status, whole_transactions
from .state import (
    Batch,
    CaptureState,
    Check,
    Progress,
    Segment,
    lsn_int,
    progress_key,
    put_json,
    reach_of,
    read_progress,
    read_state,
    record_slot,
    segments,
    segments_of,
    write_segment,
)

log = logging.getLogger(__name__)

# How the reasons open_drain gives for a lost slot begin: the changes since the last run
# are lost (a reason that resumes an ended epoch's restart keeps its first words).
LOSSES = ("the replication slot", "the slot held")


@dataclass
class CaptureRun:
    """What one capture run did (a streaming run: over all its flushes)."""

    segment: Segment | None = None  # the newest segment it stored
    slot: dict[str, Any] = field(default_factory=dict)  # the slot's health as the run began
    restarted: str = ""           # why it started a new epoch ("" when it did not)
    lost: bool = False            # the slot was gone: changes since the last run are lost
    covered_through: datetime | None = None  # restores now reach times up to this one
    segments: int = 0             # how many segments it stored
    transactions: int = 0         # how many transactions they hold
    left: str = ""                # why it did nothing: another drainer holds the lease
    lost_window: str = ""         # with `lost`: the times no restore can reach now
    rebased: bool = False         # it handed the epoch over to a new base (no gap)
    rebase_error: str = ""        # a rebase it tried failed (capture went on)

    def absorb(self, other: CaptureRun) -> None:
        """Count what `other` (a later part of this run) did."""
        self.segment = other.segment or self.segment
        self.slot = self.slot or other.slot
        self.restarted = "; ".join(filter(None, [self.restarted, other.restarted]))
        self.lost = self.lost or other.lost
        self.lost_window = "; ".join(filter(None, [self.lost_window, other.lost_window]))
        self.covered_through = other.covered_through or self.covered_through
        self.segments += other.segments
        self.transactions += other.transactions
        self.rebased = self.rebased or other.rebased
        self.rebase_error = self.rebase_error or other.rebase_error

    def add(self, segment: Segment | None, covered: datetime | None) -> None:
        if segment is not None:
            self.segment = segment
            self.segments += 1
            self.transactions += segment.transactions
        if covered is not None:
            self.covered_through = covered


@dataclass
class Drain:
    """A run's hold on the running epoch: its state, a normal connection (checks are read
    on it; values decode in its session, as replay will read them), and how far the
    epoch's stored chain reaches."""

    conn: ConnectionInfo
    store: Store
    database_id: str
    state: CaptureState
    db: Any
    health: dict[str, Any]
    progress: Progress | None
    reach: str
    after_upload: Callable[[Segment], None] = lambda segment: None

    def close(self) -> None:
        self.db.close()

    def is_new(self, txn: dict[str, Any]) -> bool:
        """Whether `txn` ends past the stored chain (else it is stored already)."""
        return lsn_int(txn["end_lsn"]) > lsn_int(self.reach)

    def flush(self, check: Check, batch: Batch, complete: bool, read_through: str,
              confirm: Callable[[str], None]) -> tuple[Segment | None, str]:
        """Store `batch`, confirm the slot through `read_through` (the end of the last whole
        transaction read, stored or skipped), record the progress; (the segment stored,
        why the epoch must end: "" when it goes on). `complete`: everything committed
        before the check was read."""
        segment = None
        if batch.meta:
            segment = write_segment(self.store, self.database_id, batch, self.state,
                                    self.reach, check)
            self.after_upload(segment)
            self.reach = segment.end_lsn
        if read_through:
            confirm(read_through)
        if segment is not None:
            log.info("captured %d transaction(s) up to %s into %s", segment.transactions,
                     segment.end_lsn, segment.key)
        rewritten, unsure = _rewritten(self.progress, check, batch.meta, complete)
        if rewritten:
            return segment, (f"{', '.join(rewritten)} rewritten outside the change stream "
                             "(ALTER TABLE ... USING, VACUUM FULL or CLUSTER)")
        progress = _progress_after(self.progress, check, batch.meta, complete, self.reach,
                                   unsure)
        put_json(self.store, progress_key(self.store, self.database_id, self.state),
                 asdict(progress))
        self.progress = progress
        return segment, ""


def open_drain(conn: ConnectionInfo, store: Store, database_id: str,
               max_retained_wal: int | None,
               after_upload: Callable[[Segment], None] = lambda segment: None
               ) -> tuple[Drain | None, str, dict[str, Any]]:
    """(the drain, "", health), or (None, why the epoch must end, health) when the slot is
    gone, invalidated, or over `max_retained_wal` bytes (the changes since the last run are
    lost)."""
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
        _keep_reading(store, database_id, state.slot, health)
        if health and health["plugin"] != state.plugin:
            raise StoreError(f"capture state of {database_id} says plugin {state.plugin}, but "
                             f"the slot {state.slot} decodes with {health['plugin']}",
                             "the state is damaged: `supabackup cdc drop`, then `cdc start`")
        reason = ""
        progress = read_progress(store, database_id, state)
        if progress is not None and progress.ended:
            # a run that ended this epoch died before the next one began: begin it now
            db.close()
            return None, f"{progress.ended} (its new epoch had not begun: begun now)", {}
        if health.get("wal_status") in (None, "lost"):
            reason = (f"the replication slot {state.slot} is gone" if not health
                      else f"the replication slot {state.slot} was invalidated (wal_status lost)")
        elif max_retained_wal is not None and health["retained_wal_bytes"] > max_retained_wal:
            reason = (f"the slot held {health['retained_wal_bytes']} bytes of WAL, over the "
                      f"limit of {max_retained_wal}")
        if reason:
            db.close()
            return None, reason, health
        return (Drain(conn, store, database_id, state, db, health, progress,
                      _reach(store, database_id, state, progress), after_upload), "", health)
    except BaseException:
        db.close()
        raise


def _keep_reading(store: Store, database_id: str, slot: str, health: dict[str, Any]) -> None:
    """Store the slot's health for `supabackup status` (state.SlotReading), as the run
    read it on opening the slot: the most WAL it holds in the run, before the run
    confirms. An observation: a failed write is logged, and capture goes on."""
    try:
        record_slot(store, database_id, slot, health, iso(utcnow()))
    except StoreError as exc:
        log.warning("could not keep the slot's reading for status: %s", exc)


def _reach(store: Store, database_id: str, state: CaptureState,
           progress: Progress | None) -> str:
    """Where the epoch's stored chain reaches: the newest segment the progress record
    names, or a later one stored by a run that died before recording its progress."""
    reach = reach_of(progress, state)
    later = segments_of(segments(store, database_id, after_lsn=reach), state)
    return max([reach] + [s.end_lsn for s in later], key=lsn_int)


def drain_once(drain: Drain) -> tuple[CaptureRun, str]:
    """One flush of what the slot holds (a peek): the run, and why the epoch must end."""
    result = CaptureRun(slot=drain.health)
    check = checked(drain.db)
    if check.schema != drain.state.schema:
        return result, "the schema changed"
    try:
        rows, peeked = peek(drain.db, drain.state)
    except psycopg2.errors.ObjectInUse:
        raise CaptureError(f"another capture run is reading the slot {drain.state.slot}",
                           "this run stored nothing; the other one goes on") from None
    read = whole_transactions(rows)
    batch = Batch()
    for txn in read:
        if drain.is_new(txn):
            batch.add(txn)
    segment, reason = drain.flush(check, batch, complete=peeked < MAX_CHANGES,
                                  read_through=read[-1]["end_lsn"] if read else "",
                                  confirm=lambda end: _advance(drain, end))
    result.add(segment, parse_time(drain.progress.verified_at) if drain.progress and not reason
               else None)
    return result, reason


def _advance(drain: Drain, end_lsn: str) -> None:
    try:
        with drain.db.cursor() as cur:
            cur.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                        (drain.state.slot, end_lsn))
    except psycopg2.errors.ObjectInUse:  # stored; the next run skips what it stored
        raise CaptureError(f"another capture run is reading the slot {drain.state.slot}",
                           "what this run stored counts; the slot advances with the "
                           "next run") from None


def checked(db: Any) -> Check:
    """The run's check, read at one WAL position (see Check)."""
    with db.cursor() as cur:
        # The time first, then the flushed WAL position (decoding reads up to it), then the
        # definitions. A transaction committed by then is in the slot when the run reads
        # it; one that sees a DDL the definitions below do not show started after they
        # were read, so its commit time is later than `at`.
        cur.execute("SELECT clock_timestamp()")
        at = cur.fetchone()[0]
        lsn = _flushed_through_insert(cur)
        schema = definitions_fingerprint(cur)
        sequences = _sequences(cur)
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        large_objects = int(cur.fetchone()[0])
        files = table_files(cur)
        # A TRUNCATE committed after L but before the files were read shows a new file:
        # the read goes on to here, so its TRUNCATE is read too (see _rewritten).
        files_lsn = _flushed_through_insert(cur)
    return Check(lsn=lsn, at=iso(at), schema=schema, sequences=sequences,
                 large_objects=large_objects, files=files, files_lsn=files_lsn)


def table_files(cur: Any) -> dict[str, int]:
    """Each logged table's relfilenode: a new one means its rows were written anew."""
    cur.execute(f"""
        SELECT n.nspname || '.' || c.relname, c.relfilenode FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMAS}""")
    return {name: int(node) for name, node in cur.fetchall()}


def _rewritten(previous: Progress | None, check: Check, transactions: list[dict[str, Any]],
               complete: bool) -> tuple[list[str], set[str]]:
    """(tables whose rows were written anew since the previous check without a TRUNCATE in
    the stream, tables whose new file is not explained yet). A rewrite is ALTER TABLE ...
    ALTER COLUMN ... TYPE with USING (even to the same type, so no definition changes),
    VACUUM FULL, CLUSTER: it is not decoded, so what it changed is not in the stream (the
    last two change nothing, and cost a new base). A TRUNCATE gives a table a new file
    too, and is in the stream: one committed before the files were read (check.files_lsn)
    explains it. When the read stopped short of that position (a peek's MAX_CHANGES, a
    stream that did not catch up), its TRUNCATE may not be read yet: the judgement waits
    for a flush that reads that far (the table is left `unsure`)."""
    if previous is None or not previous.files:
        return [], set()
    truncated = set(previous.truncated_after) | _truncated(
        transactions, below=check.files_lsn or check.lsn)
    changed = sorted(name for name, node in check.files.items()
                     if previous.files.get(name, node) != node and name not in truncated)
    return ([], set(changed)) if not complete else (changed, set())


def _truncated(transactions: list[dict[str, Any]], below: str = "", since: str = "") -> set[str]:
    """schema.table of every table the transactions (Batch.meta) truncated, committed
    before `below` or at or after `since`."""
    return {name for t in transactions for name in t["truncated"]
            if (not below or lsn_int(t["commit_lsn"]) < lsn_int(below))
            and (not since or lsn_int(t["commit_lsn"]) >= lsn_int(since))}


def _progress_after(previous: Progress | None, check: Check,
                    transactions: list[dict[str, Any]], complete: bool,
                    reach: str, unsure: set[str]) -> Progress:
    """What the epoch covers after a flush: all before the check, or, when the read stopped
    short of it (a peek's MAX_CHANGES, a stream that did not catch up in time), up to the
    last whole transaction it stored; never less than before. The files of `unsure`
    tables stay as the previous check had them, and the TRUNCATEs read so far stay
    counted, so the next flush judges them (_rewritten)."""
    since = check.files_lsn or check.lsn
    after = _truncated(transactions, since=since)
    files = dict(check.files)
    if unsure and previous is not None:
        files.update({name: previous.files[name] for name in unsure if name in previous.files})
        after |= (set(previous.truncated_after) | _truncated(transactions)) & unsure
    last = transactions[-1] if transactions else None
    if complete or (last is not None and lsn_int(last["end_lsn"]) >= lsn_int(check.lsn)):
        verified_lsn, verified_at = check.lsn, check.at
    elif last is not None:
        # A later transaction (not stored yet) may share the last stored one's commit time.
        verified_lsn = last["end_lsn"]
        verified_at = iso(parse_time(last["commit_time"]) - timedelta(microseconds=1))
    else:
        verified_lsn = previous.verified_lsn if previous else check.lsn
        verified_at = previous.verified_at if previous else check.at
    if previous is not None and lsn_int(verified_lsn) < lsn_int(previous.verified_lsn):
        verified_lsn, verified_at = previous.verified_lsn, previous.verified_at
    return Progress(verified_lsn=verified_lsn, verified_at=verified_at,
                    sequences=check.sequences, sequences_at=check.at,
                    large_objects=check.large_objects, files=files,
                    truncated_after=sorted(after), last_segment=reach)


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
