"""Change capture's life: start (the slot and its aligned base), run (drain the slot, once
or streaming), a new epoch when one must end, status, drop.

    start: create the slot with an exported snapshot -> take the base full backup in that
           very snapshot (no gap, no overlap) -> record the epoch
    run:   under the capture lease: drain the slot, once (a peek) or streaming for a while
           (drain.py, stream.py) -> when the epoch must end, a new slot and base

DDL is not in the stream: a run that finds the definitions changed ends the epoch at its
last check and starts a new one (a new slot and base). So does a slot that was lost, and
a table rewritten outside the stream; the times between the two epochs cannot be
restored exactly, and restores refuse them, naming both sides.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

from .. import locks, output
from ..backup import BackupRequest, run_backup
from ..db import connect
from ..dburl import ConnectionInfo
from ..definitions import definitions_fingerprint
from ..errors import CaptureError, ConfigError, RunInProgress, StoreError, SupabackupError
from ..manifest import Manifest, parse_time, utcnow
from ..store import Store
from .drain import LOSSES, CaptureRun, drain_once, open_drain, table_files
from .pointintime import DROPPED
from .slot import (
    abandon,
    create_slot,
    drop_publications,
    drop_slot,
    identity_tables,
    not_replayable,
    publications,
    require_direct,
    slot_name,
    slot_status,
)
from .state import (
    CaptureState,
    Progress,
    Segment,
    epochs,
    lsn_int,
    lsn_key,
    progress_key,
    put_json,
    read_progress,
    read_state,
    segments,
    store_key,
)
from .stream import FINAL_MARGIN, FlushPolicy, stream_epoch
from .window import window

log = logging.getLogger(__name__)

MAX_SECONDS = 24 * 3600     # the longest --for
MAX_WAIT = 60.0             # seconds a stream waits for the drainer before it to end
LEASE_MARGIN = 90           # seconds a stream's lease outlives its last renewal
RENEW_EVERY = 30.0          # seconds between a stream's renewals of its lease (a GET, a PUT)
# A new base this often, handed over without a gap: a restore to a time replays at most
# about this much, and captured changes older than the window plus this can expire.
REBASE_EVERY = timedelta(days=1)
HANDED_OVER = "handed over to the epoch"  # how an epoch that was rebased ended


def _schema_in(conn: ConnectionInfo, snapshot: str) -> tuple[str, list[str], dict[str, int]]:
    """The definitions fingerprint as the base sees it, the tables with a replica identity
    and the tables' relfilenodes: read in the slot's exported snapshot."""
    db = connect(conn)
    try:
        db.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with db.cursor() as cur:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            output.pin(cur, local=True)
            return definitions_fingerprint(cur), identity_tables(cur), table_files(cur)
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
    state, base = _begin_epoch(conn, store, database_id, slot_name(conn), request)
    try:
        put_json(store, store_key(store, database_id, "state.json"), asdict(state))
    except BaseException:
        abandon(conn, state.slot, state.plugin)
        raise
    log.info("change capture of %s started: slot %s at %s, base %s", database_id, state.slot,
             state.start_lsn, base.backup_id)
    return state, base


def _begin_epoch(conn: ConnectionInfo, store: Store, database_id: str, slot: str,
                 request: BackupRequest) -> tuple[CaptureState, Manifest]:
    """A new slot and the base backup in its exported snapshot, recorded as an epoch (its
    record and its first progress); the caller makes it the running one."""
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
    except BaseException:
        # A slot nobody reads holds WAL on the database: a start that fails leaves none.
        repl.close()
        abandon(conn, slot, plugin)
        raise
    return state, base


def _next_slot(conn: ConnectionInfo, slot: str) -> str:
    """The slot a rebase creates beside `slot`: capture alternates between two names."""
    first = slot_name(conn)
    return f"{first}_next" if slot == first else first


def _base_request(store: Store, database_id: str, state: CaptureState,
                  label: str) -> BackupRequest:
    """A new epoch's base: a full with the profile of the base before it, of the daily
    class: retention pins it while the point-in-time window needs it, and it does not
    count among the four newest weekly fulls the schedule's backups keep."""
    profile = next((m.profile for m in store.manifests(database_id)
                    if m.backup_id == state.base), None)
    return BackupRequest(database_id=database_id, retention="daily", profile=profile,
                         label=label[:200], trigger="schedule")


def _begin_rebase(conn: ConnectionInfo, store: Store, database_id: str,
                  state: CaptureState) -> None:
    """Start handing the running epoch over to a new one, without a gap: a second slot and
    its base, recorded as the epoch the running one hands over to (`handover` in
    state.json). The old slot keeps being drained until its progress passes the new
    base's time (_finish_rebase); until then both slots hold WAL. A restore to a time
    uses the newest epoch whose base is at or before it, so the times before the new base
    stay the old epoch's, and no time falls between the two."""
    _after_last_base(store, database_id)
    log.info("change capture of %s: rebasing (the base %s is from %s)", database_id,
             state.base, state.base_at)
    new, base = _begin_epoch(conn, store, database_id, _next_slot(conn, state.slot),
                             _base_request(store, database_id, state,
                                           f"change capture base: rebase of {state.base}"))
    put_json(store, store_key(store, database_id, "state.json"),
             asdict(replace(state, handover=new.start_lsn)))
    log.info("change capture of %s: new base %s, slot %s from %s; the old slot drains "
             "past it", database_id, base.backup_id, new.slot, new.start_lsn)


def _finish_rebase(conn: ConnectionInfo, store: Store, database_id: str) -> bool:
    """End a handover whose old epoch now reaches the new base: the new epoch runs, the
    old slot goes. False while the old epoch has not got there yet."""
    state = read_state(store, database_id)
    if state is None or not state.handover:
        return False
    new = next((e for e in epochs(store, database_id) if e.start_lsn == state.handover), None)
    progress = read_progress(store, database_id, state)
    if new is None:
        raise StoreError(f"capture state of {database_id} hands over to the epoch "
                         f"{state.handover}, which is not in the store",
                         "`supabackup cdc drop`, then `cdc start`")
    if progress is None or parse_time(progress.verified_at) < parse_time(new.base_at):
        return False
    put_json(store, progress_key(store, database_id, state),
             asdict(replace(progress, ended=f"{HANDED_OVER} {new.start_lsn} (base {new.base})")))
    put_json(store, store_key(store, database_id, "state.json"), asdict(new))
    drop_slot(conn, state.slot)
    if state.plugin == "pgoutput":
        drop_publications(conn, state.slot)
    log.info("change capture of %s: handed over to the epoch %s (base %s)", database_id,
             new.start_lsn, new.base)
    return True


def _after_last_base(store: Store, database_id: str) -> None:
    """Backup ids have one-second resolution: a base within a second of the last one would
    take its id, fail, and leave capture stopped; wait that second out."""
    newest = max((parse_time(e.base_at) for e in epochs(store, database_id)), default=None)
    wait = 1.1 - (utcnow() - newest).total_seconds() if newest else 0
    if wait > 0:
        time.sleep(wait)


def _rebase_due(state: CaptureState, every: timedelta | None) -> bool:
    return (every is not None and not state.handover
            and utcnow() - parse_time(state.base_at) >= every)


def run(conn: ConnectionInfo, store: Store, database_id: str,
        after_upload: Callable[[Segment], None] = lambda segment: None,
        max_retained_wal: int | None = None, seconds: float | None = None,
        policy: FlushPolicy | None = None, owner: str = "",
        rebase_every: timedelta | None = REBASE_EVERY) -> CaptureRun:
    """A capture run: one drain of what the slot holds, or, with `seconds`, a stream of it
    for that long (stream.py); under the capture lease, so a second drainer started at
    the same time waits a little, then leaves and says so (CaptureRun.left).

    A slot that is gone (dropped by hand, or invalidated for holding too much WAL) starts a
    new epoch: a new slot and base, and the run reports the loss. So does a slot that holds
    more than `max_retained_wal` bytes, which is dropped before it fills the disk, and
    definitions that changed since the base (DDL is not in the stream: later changes must
    be replayed onto a base that has it). A stream goes on in the new epoch while its time
    lasts. An epoch whose base is older than `rebase_every` hands over to a new one with
    no gap (_begin_rebase), so restores replay at most about that much. `after_upload`
    runs between a segment's commit and the slot's confirm (tests crash there on purpose).
    """
    require_direct(conn)
    if max_retained_wal is not None and max_retained_wal < 0:
        raise ConfigError(f"the retained-WAL limit must be 0 (none) or more bytes, not "
                          f"{max_retained_wal}")
    if seconds is not None and not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"--for must be more than 0 and at most {MAX_SECONDS} seconds, not "
                          f"{seconds:g}")
    if read_state(store, database_id) is None:
        raise ConfigError(f"change capture of {database_id} is not started",
                          "run `supabackup cdc start` first")
    deadline = time.monotonic() + (seconds or 0)
    hold = timedelta(seconds=LEASE_MARGIN + RENEW_EVERY + (policy or FlushPolicy()).idle_interval)
    try:
        lease = locks.acquire(store, database_id, owner or f"capture {uuid.uuid4().hex[:8]}",
                              purpose="capture", hold=hold if seconds else locks.LEASE,
                              wait=min(seconds / 4, MAX_WAIT) if seconds else 0.0, poll=1.0)
    except RunInProgress as exc:
        log.info("leaving: %s", exc.message)
        return CaptureRun(left=exc.message)
    try:
        renewed = [time.monotonic()]

        def heartbeat() -> None:
            if time.monotonic() - renewed[0] >= RENEW_EVERY:
                locks.renew(store, lease, hold)
                renewed[0] = time.monotonic()

        return _drain(conn, store, database_id, after_upload, max_retained_wal, seconds,
                      deadline, policy or FlushPolicy(), heartbeat,
                      lambda: locks.renew(store, lease, locks.LEASE), rebase_every)
    finally:
        locks.release(store, lease)


def _drain(conn: ConnectionInfo, store: Store, database_id: str,
           after_upload: Callable[[Segment], None], max_retained_wal: int | None,
           seconds: float | None, deadline: float, policy: FlushPolicy,
           heartbeat: Callable[[], None], before_base: Callable[[], None],
           rebase_every: timedelta | None) -> CaptureRun:
    """Drain epoch after epoch while the run's time lasts: a new one after a reason to
    end one, a handover when the base is older than `rebase_every`. While a handover is
    under way the old slot is drained once at a time (a peek), which reaches past the new
    base at once; then the new epoch streams."""
    total = CaptureRun()
    _tidy(conn, store, database_id)
    while True:
        state = read_state(store, database_id)
        if state is not None and not total.rebased and _rebase_due(state, rebase_every):
            before_base()
            total.rebase_error = _try_rebase(conn, store, database_id, state)
        drain, reason, health = open_drain(conn, store, database_id, max_retained_wal,
                                           after_upload)
        total.slot = total.slot or health
        lost = drain is None and reason.startswith(LOSSES)
        handing_over = drain is not None and bool(drain.state.handover)
        if drain is not None:
            try:
                done, reason = (stream_epoch(drain, deadline, policy, heartbeat)
                                if seconds and not handing_over else drain_once(drain))
            finally:
                drain.close()
            total.absorb(done)
        time_left = bool(seconds) and time.monotonic() < deadline - FINAL_MARGIN
        if not reason:
            if handing_over and _finish_rebase(conn, store, database_id):
                total.rebased = True
            if handing_over and time_left:
                continue
            return total
        before_base()
        total.absorb(_restarted(conn, store, database_id, reason, lost=lost))
        if not time_left:
            return total


def _try_rebase(conn: ConnectionInfo, store: Store, database_id: str,
                state: CaptureState) -> str:
    """Begin a handover; a failure never stops the drain (the old epoch runs on): the
    next run tries again. What went wrong, or ""."""
    try:
        _begin_rebase(conn, store, database_id, state)
    except RunInProgress as exc:  # a backup runs: its turn first
        log.info("rebase postponed: %s", exc.message)
    except SupabackupError as exc:
        log.error("rebase failed (capture goes on in the old epoch): %s", exc)
        _tidy(conn, store, database_id)
        return f"rebase failed: {exc}"
    return ""


def _tidy(conn: ConnectionInfo, store: Store, database_id: str) -> None:
    """Converge after a run that died half way through a rebase (a Lambda timeout while
    the new base was taken, a failed write): a slot of capture's two names that the state
    does not name is dropped (it holds WAL nobody drains, and would block the next
    rebase), with its publications; an epoch begun after the running one that the state
    does not name as its handover was never drained, and its records go (its base stays,
    an ordinary full backup), so restores never pick it. Best effort: what cannot be
    dropped now is logged and tried again by the next run."""
    state = read_state(store, database_id)
    if state is None:
        return
    history = epochs(store, database_id)
    keep = {state.slot} | {e.slot for e in history if e.start_lsn == state.handover}
    for slot in sorted({slot_name(conn), _next_slot(conn, slot_name(conn))} - keep):
        try:
            if _slot_exists(conn, slot):
                log.warning("dropping the replication slot %s, which no epoch drains (a "
                            "rebase that did not finish)", slot)
                drop_slot(conn, slot)
            if state.plugin == "pgoutput":
                drop_publications(conn, slot)
        except SupabackupError as exc:
            log.error("could not drop the slot %s nobody drains (the next run tries "
                      "again): %s", slot, exc)
    for epoch in history:
        if (lsn_int(epoch.start_lsn) > lsn_int(state.start_lsn)
                and epoch.start_lsn != state.handover):
            log.warning("forgetting the epoch %s (base %s): a rebase that did not finish "
                        "began it, and it was never drained", epoch.start_lsn, epoch.base)
            store.delete_key(progress_key(store, database_id, epoch))
            store.delete_key(store_key(store, database_id, "epochs",
                                       f"{lsn_key(epoch.start_lsn)}.json"))


def _slot_exists(conn: ConnectionInfo, slot: str) -> bool:
    db = connect(conn)
    try:
        return bool(slot_status(db, slot))
    finally:
        db.close()


def _restarted(conn: ConnectionInfo, store: Store, database_id: str, reason: str,
               lost: bool) -> CaptureRun:
    """End the epoch at its last check, start the next one; what that did. No restore can
    reach the times between the two (`lost_window`): the ended epoch's changes after its
    last check were lost (`lost`), or cannot be replayed onto either base (DDL, a
    rewrite).

    The ended epoch stays the one `state.json` names until the new one is recorded, and
    the new slot takes capture's other name: a run killed half way (during the new base)
    leaves the state naming an ended epoch whose slot is gone, and the next run starts the
    new epoch again (after _tidy drops the half-made slot), never "not started"."""
    log.warning("change capture of %s starts a new epoch: %s", database_id, reason)
    state = read_state(store, database_id)
    assert state is not None  # the drain that found the reason read it
    previous = read_progress(store, database_id, state) or Progress(state.start_lsn,
                                                                     state.base_at)
    if not previous.ended:  # a restart tried again keeps the first reason
        put_json(store, progress_key(store, database_id, state),
                 asdict(replace(previous, ended=reason)))
    pending = next((e for e in epochs(store, database_id) if e.start_lsn == state.handover),
                   None) if state.handover else None
    if pending is not None:  # a handover under way ends with the epoch it hands from
        begun = read_progress(store, database_id, pending)
        if begun is not None:
            put_json(store, progress_key(store, database_id, pending),
                     asdict(replace(begun, ended=reason)))
    for slot in {state.slot} | ({pending.slot} if pending is not None else set()):
        drop_slot(conn, slot)
        drop_publications(conn, slot)
    _after_last_base(store, database_id)
    new, base = _begin_epoch(conn, store, database_id, _next_slot(conn, state.slot),
                             _base_request(store, database_id, state,
                                           f"change capture base: {reason}"))
    try:
        put_json(store, store_key(store, database_id, "state.json"), asdict(new))
    except BaseException:
        abandon(conn, new.slot, new.plugin)  # the next run starts it again
        raise
    log.info("change capture of %s: new epoch from %s, slot %s, base %s", database_id,
             new.start_lsn, new.slot, base.backup_id)
    return CaptureRun(restarted=reason, lost=lost,
                      lost_window=f"{previous.verified_at} to {base.snapshot_at}",
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
    slots = {slot_name(conn), _next_slot(conn, slot_name(conn))} | (
        {state.slot} if state else set())
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


def status(conn: ConnectionInfo, store: Store, database_id: str,
           keep_days: int | None = None) -> dict[str, Any]:
    """What `cdc status` prints and the capture function reports as metrics: the slot's
    health, how far capture has stored (`captured_through`, the commit time of the newest
    stored transaction), the window a restore can reach as retention leaves it (epochs
    whose base is gone left out; with `keep_days`, where the promised window starts), and
    what it cannot replay."""
    state = read_state(store, database_id)
    db = connect(conn)
    try:
        db.autocommit = True
        inexact = not_replayable(db)
        health = slot_status(db, state.slot) if state else {}
    finally:
        db.close()
    history = [(e, read_progress(store, database_id, e)) for e in epochs(store, database_id)]
    found: dict[str, Any] = {
        "started": state is not None, "database_id": database_id,
        "epoch": ({"start_lsn": state.start_lsn, "base": state.base, "base_at": state.base_at,
                   "slot": state.slot, "plugin": state.plugin} if state else None),
        "slot": health,
        "retained_wal_bytes": health.get("retained_wal_bytes"),
        "wal_status": health.get("wal_status"), "safe_wal_size": health.get("safe_wal_size"),
        "captured_through": _captured_through(store, database_id, history),
        "window": window(store, database_id, keep_days, utcnow(), history).as_dict(),
        "tables_without_identity": [line.split(":")[0] for line in inexact
                                    if "no replica identity" in line],
        "not_replayable": inexact}
    if state is not None:  # the names of 0.5, kept for scripts that read them
        found.update(plugin=state.plugin, base=state.base, start_lsn=state.start_lsn)
        progress = dict(history).get(state) if history else None
        if progress is not None:
            found["covered_through"] = progress.verified_at
    if found["captured_through"]:
        found["last_commit_captured"] = found["captured_through"]
    return found


def _captured_through(store: Store, database_id: str,
                      history: list[tuple[CaptureState, Progress | None]]) -> str | None:
    """The commit time of the newest stored transaction: the newest segment an epoch's
    progress names, or (a store written before 0.6) the newest in the index."""
    named = [p.last_segment for _, p in history if p is not None and p.last_segment]
    if named:
        newest = max(named, key=lsn_int)
        entry = segments(store, database_id, after_lsn=_just_before(newest))
        found = [s for s in entry if s.end_lsn == newest]
        if found:
            return found[0].last_commit_time
    captured = segments(store, database_id)
    return captured[-1].last_commit_time if captured else None


def _just_before(lsn: str) -> str:
    value = lsn_int(lsn) - 1
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def status_lines(found: dict[str, Any]) -> list[str]:
    """`cdc status` for a person."""
    if not found["started"] and not found["window"]["earliest"]:
        return [f"change capture of {found['database_id']} is not started "
                "(`supabackup cdc start`)"]
    lines = []
    epoch = found["epoch"]
    if epoch:
        lines.append(f"capturing {found['database_id']} through slot {epoch['slot']} "
                     f"({epoch['plugin']}); epoch from {epoch['start_lsn']}, base "
                     f"{epoch['base']} at {epoch['base_at']}")
    else:
        lines.append(f"change capture of {found['database_id']} is stopped (dropped); what "
                     "it captured stays restorable")
    lines.append(f"captured through: {found['captured_through'] or 'nothing yet'} "
                 "(the newest stored transaction's commit)")
    window = found["window"]
    lines.append(f"restores to a time reach: {window['earliest']} to {window['latest']}"
                 if window["earliest"] else "restores to a time reach: nothing yet")
    lines += [f"  gap (refused): {g['from']} to {g['to']}: {g['why']}" for g in window["gaps"]]
    if window.get("promised_from"):
        lines.append(f"kept for restores: from {window['promised_from']} on (the last "
                     f"{window['keep_days']} days, --keep-days)")
    if found["slot"]:
        safe = found["safe_wal_size"]
        lines.append(f"slot: {found['wal_status']}, holds {found['retained_wal_bytes']} bytes "
                     "of WAL" + (f", {safe} bytes more before it is lost (safe_wal_size)"
                                 if safe is not None else ", no limit (max_slot_wal_keep_size)"))
    elif epoch:
        lines.append("slot: GONE (the next `cdc run` starts a new epoch; changes since the "
                     "last run are lost)")
    lines += [f"not replayable: {line}" for line in found["not_replayable"]]
    return lines
