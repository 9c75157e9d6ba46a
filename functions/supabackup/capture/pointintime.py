"""Restore to a time: the base of the epoch that covers it, then every captured
transaction committed at or before it (replay.py), then sequences as the run before the
time read them.

What a restore to a time can and cannot give exactly:
- A time later than the epoch's progress (what capture has stored and checked) is refused:
  capture has not seen it yet.
- A time between two epochs (the definitions changed: the DDL's moment is unknown) is
  refused, naming the times on either side.
- A time before the window (before capture began, or in an ended epoch whose base
  retention let go) is refused, naming the window: `--at TIME` then restores the newest
  backup at or before it (catalog.restore_point). So is a time whose captured changes
  are gone (a hole in the epoch's chain): replaying around it would be no state the
  database had.
- Values are decoded and replayed under one set of output settings (output.py), so the
  source's DateStyle, extra_float_digits, search_path and the like cannot change them.
- What the stream does not carry is named in the restore's output, never silently old:
  tables without a replica identity (their updates and deletes), unlogged tables, large
  objects, and sequences when the time falls after the last read of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg2 import sql

from .. import output
from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import CaptureError, ConfigError, StoreError, SupabackupError
from ..manifest import Manifest, parse_time
from ..restore import run_restore
from ..store import Store
from .replay import replay
from .slot import not_replayable
from .state import (
    CaptureState,
    Progress,
    Segment,
    epochs,
    lsn_int,
    read_progress,
    read_state,
    segments,
    segments_of,
    transactions_until,
)
from .window import stored_backups, window

log = logging.getLogger(__name__)

DROPPED = "capture dropped"  # why an epoch ended that `cdc drop` stopped


@dataclass
class PointInTimeReport:
    """What a restore to a time did, and what it could not bring to that time."""

    when: datetime
    base: Manifest
    transactions: int = 0
    covered_through: str = ""
    inexact: list[str] = field(default_factory=list)  # "what: why", each named for the user
    notes: list[str] = field(default_factory=list)

    @property
    def backup_id(self) -> str:
        return self.base.backup_id

    def lines(self) -> list[str]:
        out = [f"restored {self.base.database_id} as of {self.when.isoformat()} by replaying "
               f"change capture: base {self.base.backup_id} and {self.transactions} captured "
               "transaction(s)"]
        out += self.notes
        out += [f"NOT AS OF {self.when.isoformat()}: {line}" for line in self.inexact]
        return out


@dataclass(frozen=True)
class Covering:
    """The epoch whose base and captured changes give the database as of a time."""

    epoch: CaptureState
    progress: Progress
    base: Manifest
    until_lsn: str  # the next epoch's start ("" for the epoch that runs now)
    # every index entry, read once (a day of streaming is some 17,000 of them)
    listed: list[Segment] = field(default_factory=list)


def covering(store: Store, database_id: str, when: datetime) -> Covering:
    """The epoch that covers `when`, or a refusal that names the window capture can reach:
    a time before it (before capture began, or in an epoch whose base retention let go),
    between two epochs, or later than capture has reached."""
    history = epochs(store, database_id)
    index = _begun_by(history, when)
    if index is None:
        raise ConfigError(f"no change capture of {database_id} covers {when.isoformat()}: "
                          f"it reaches {_reach(store, database_id, history)}",
                          "restore a backup instead, or a time in the window")
    epoch = history[index]
    base = next((m for m in store.manifests(database_id) if m.backup_id == epoch.base), None)
    if base is None and not _running(store, database_id, epoch):
        raise ConfigError(f"change capture of {database_id} reaches "
                          f"{_reach(store, database_id, history)}; {when.isoformat()} is "
                          f"outside it (the base backup {epoch.base} of the epoch that "
                          "covered it is gone: retention let it go)",
                          "restore a backup taken at or before that time instead "
                          "(`supabackup list`), or a time in the window")
    progress = read_progress(store, database_id, epoch)
    if progress is None:
        raise StoreError(f"the progress record of the capture epoch {epoch.start_lsn} is "
                         "missing", "restore a backup, or a time in another epoch")
    following = history[index + 1:index + 2]
    _refuse_uncovered(store, database_id, history, when, progress, following)
    if base is None:
        raise StoreError(f"the capture's base backup {epoch.base} is gone, though its "
                         "epoch runs", "restore a backup; `supabackup cdc drop`, then "
                         "`cdc start` takes a new base")
    until_lsn = following[0].start_lsn if following else ""
    listed = segments(store, database_id)
    _refuse_broken_chain(listed, database_id, epoch, progress, when, until_lsn)
    return Covering(epoch, progress, base, until_lsn, listed)


def _reach(store: Store, database_id: str, history: list[CaptureState]) -> str:
    """"from A to B": the window as stored, for a refusal."""
    return window(store, database_id,
                  history=[(e, read_progress(store, database_id, e)) for e in history]
                  ).describe()


def _running(store: Store, database_id: str, epoch: CaptureState) -> bool:
    """Whether `epoch` runs now: the state's, or the one a rebase hands over to."""
    running = read_state(store, database_id)
    return running is not None and epoch.start_lsn in (running.start_lsn, running.handover)


def replays(store: Store, database_id: str, when: datetime) -> bool:
    """Whether `--at when` is capture's to answer: the epoch begun last at or before `when`
    reaches it; or that epoch runs now (a time it has not reached yet is refused, naming
    how far it reaches: `cdc run` brings it there); or it ended by itself (a schema change,
    a lost slot, a rewrite), so `when` falls in a gap capture knows it cannot give exactly,
    and is refused naming the times on either side. A time before capture began, after
    capture was dropped, or in an ended epoch whose base is gone (retention lets a base
    go once its epoch ended more than keep_days ago) is not: that is the newest backup at
    or before it."""
    history = epochs(store, database_id)
    index = _begun_by(history, when)
    if index is None:
        return False
    epoch = history[index]
    running = _running(store, database_id, epoch)
    if not running and epoch.base not in stored_backups(store, database_id):
        return False
    progress = read_progress(store, database_id, epoch)
    if progress is not None and (when <= parse_time(progress.verified_at)
                                 or (progress.ended and progress.ended != DROPPED)):
        return True
    return running


def _begun_by(history: list[CaptureState], when: datetime) -> int | None:
    """The index of the last epoch whose base was taken at or before `when`, if any."""
    begun = [i for i, e in enumerate(history) if parse_time(e.base_at) <= when]
    return begun[-1] if begun else None


def restore_to_time(store: Store, database_id: str, target: ConnectionInfo,
                    when: datetime) -> PointInTimeReport:
    """The base of the epoch that covers `when`, then every transaction it captured up to
    `when`; refuses a time capture cannot give exactly, names what it could not bring."""
    found = covering(store, database_id, when)
    progress, base = found.progress, found.base
    report = PointInTimeReport(when=when, base=base, covered_through=progress.verified_at)
    restored = run_restore(store, base, target)
    report.notes += restored.notes
    try:
        _bring_forward(store, database_id, target, when, found, report)
    except SupabackupError as exc:
        if "holds the base" not in exc.hint:  # the replay says so itself
            exc.hint = (f"{exc.hint}; " if exc.hint else "") + (
                f"the target now holds the base {base.backup_id} and part of the changes "
                "after it: drop and recreate it before restoring again")
        raise
    log.info("restored %s to %s: base %s and %d transaction(s)", database_id, when.isoformat(),
             base.backup_id, report.transactions)
    return report


def _bring_forward(store: Store, database_id: str, target: ConnectionInfo, when: datetime,
                   found: Covering, report: PointInTimeReport) -> None:
    """Onto the restored base: the captured transactions up to `when`, then sequences and
    materialized views; `report` names what could not be brought to that time."""
    epoch, progress, base = found.epoch, found.progress, found.base
    report.inexact += _not_replayable_in(target, _large_objects_seen(found.listed, epoch,
                                                                     progress))
    # Only the tables whose data the base holds: what the profile leaves out stays out
    # (Supabase's realtime.subscription, say), and a table created and dropped between two
    # runs has no rows to bring back (what it did to other tables is in the stream).
    held = {(t.schema, t.name) for t in base.tables} or None
    replayed = replay(target, transactions_until(store, database_id, epoch, when,
                                                 found.until_lsn, found.listed), held)
    report.transactions = replayed.transactions
    report.inexact += [f"{table}: a float or numeric value that wal2json decoded as null may "
                       "have been NaN or +-Infinity (wal2json before 2.6 cannot tell them "
                       "apart; it was restored as NULL)" for table in sorted(replayed.ambiguous)]
    read = _sequences_for(found.listed, epoch, progress, when)
    report.inexact += _set_sequences(target, read, when, replayed.transactions)
    checked_then = bool(read[0]) and parse_time(read[0]) == when
    if (not checked_then and when > parse_time(base.snapshot_at)
            and not any(line.startswith("large objects") for line in report.inexact)):
        # no run saw one, but one made and removed between two runs would be missed
        report.inexact.append("large objects: none at the base or at any capture run, but "
                              "they are not in the change stream: one created after the "
                              "run before this time would not be here")
    report.notes += _refresh_matviews(target)


def _refuse_uncovered(store: Store, database_id: str, history: list[CaptureState],
                      when: datetime, progress: Progress,
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
    found = window(store, database_id,
                   history=[(e, read_progress(store, database_id, e)) for e in history])
    raise CaptureError(
        f"change capture of {database_id} covers times up to {progress.verified_at}"
        + (f" (from {found.earliest.isoformat()})" if found.earliest else "")
        + f"; {when.isoformat()} is later",
        "run `supabackup cdc run` and try again, or choose an earlier time")


def _refuse_broken_chain(listed: list[Segment], database_id: str, epoch: CaptureState,
                         progress: Progress, when: datetime, until_lsn: str) -> None:
    """Refuse when a stored change a restore to `when` must replay is gone: the epoch's
    chain of index entries (state.py) has a hole before `when`, at its start (lifecycle
    expires captured changes by age, the oldest first) or anywhere up to the newest entry
    its progress names. Replaying around a hole would give a state the database never
    had. Entries stored before 0.6 name no chain and are not checked."""
    reach, reached_at = epoch.start_lsn, parse_time(epoch.base_at)
    for segment in segments_of(listed, epoch, until_lsn):
        if reached_at > when:
            return  # the replay stops before the hole
        if segment.epoch and segment.after and lsn_int(segment.after) > lsn_int(reach):
            _refuse_hole(database_id, epoch, reach, reached_at, when)
        if lsn_int(segment.end_lsn) > lsn_int(reach):
            reach, reached_at = segment.end_lsn, parse_time(segment.last_commit_time)
    if (progress.last_segment and lsn_int(progress.last_segment) > lsn_int(reach)
            and reached_at <= when):
        _refuse_hole(database_id, epoch, reach, reached_at, when)


def _refuse_hole(database_id: str, epoch: CaptureState, reach: str, reached_at: datetime,
                 when: datetime) -> None:
    raise StoreError(
        f"{when.isoformat()} cannot be restored exactly: captured changes of "
        f"{database_id} after {reach} (committed after {reached_at.isoformat()}, in the "
        f"epoch of the base {epoch.base}) are gone from the store",
        f"choose a time before {reached_at.isoformat()}, or restore a backup; "
        "lifecycle may have expired them (the capture rule's days)")


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


def _large_objects_seen(listed: list[Segment], epoch: CaptureState,
                        progress: Progress) -> int:
    """The most large objects any run since `epoch` began saw."""
    start = lsn_int(epoch.start_lsn)
    return max([progress.large_objects] + [s.large_objects for s in listed
                                           if lsn_int(s.end_lsn) > start])


def _sequences_for(listed: list[Segment], epoch: CaptureState, progress: Progress,
                   when: datetime) -> tuple[str, dict[str, list[Any]]]:
    """(when they were read, values) of the newest read of the sequences at or before
    `when` in `epoch`; ("", {}) when no run read them since the base, which holds them."""
    reads = [(s.checked_at, s.sequences) for s in listed
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
