"""`supabackup status`: each database of a store at a glance, and what needs a person.

From the store alone (no database connection, so it runs from any machine that can read
the bucket, from cron or CI): per database, the newest backup of each kind with its age
and size, the chain the newest backup belongs to, the point-in-time window and capture's
lag when capture is on (capture/window.py computes the window; this reads it), the slot's
last reading (what a capture run kept: state.SlotReading), and the last verify and the
last drill (the CheckRecords verify.py stores). Then one line for each thing that needs a
person, and the exit status says whether there is any.

Two parts: `read_store` reads (thin, every S3 call is here), `facts` judges (pure: what
was read and `now` in, a dict of facts out, the same dict `--json` prints and `screen`
turns into lines), so any moment can be asked about and tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .capture.state import CaptureState, SlotReading, epochs, read_progress, read_slot, read_state
from .capture.window import Window, window
from .errors import StoreError
from .manifest import Manifest, iso, parse_time, utcnow
from .notify import human_bytes
from .store import MANIFEST, Store
from .verify import CHECKS, CheckRecord

NEEDS_A_PERSON = 1  # the exit status when anything does (0: healthy)
GIB, MIB = 1 << 30, 1 << 20


@dataclass(frozen=True)
class Limits:
    """When an age or a reading needs a person. The defaults are what the stack's
    schedules promise, each with the two hours of room MissedBackupHours gives the daily
    schedule (26 = 24 + 2: a late or retried run is no alarm), so status agrees with the
    alarms; a stack deployed with other schedules or thresholds passes its own (the CLI's
    flags)."""

    backup: timedelta = timedelta(hours=26)        # MissedBackupHours: the daily incremental
    full: timedelta = timedelta(days=7, hours=2)   # the weekly full (ScheduleExpression)
    verify: timedelta = timedelta(days=7, hours=2)  # the weekly verify, and its drill
    # Capture runs every 5 minutes and its progress advances every 10 s even when nothing
    # commits: 15 minutes behind is three runs that did not store.
    capture_lag: timedelta = timedelta(minutes=15)
    retained_wal: int = GIB        # RetainedWalAlarmBytes: WAL held on the database's disk
    safe_wal: int = 128 * MIB      # SafeWalAlarmBytes: what the slot may take before it is lost


# --- reading ------------------------------------------------------------------------------

@dataclass
class CaptureRead:
    """What the store says of a database's change capture."""

    state: CaptureState | None     # None: stopped (dropped); its window may still reach back
    window: Window
    slots: dict[str, SlotReading | None] = field(default_factory=dict)  # each slot holding WAL


@dataclass
class DatabaseRead:
    """Everything status reads of one database."""

    database_id: str
    manifests: list[Manifest] = field(default_factory=list)  # readable ones, oldest first
    stored: set[str] = field(default_factory=set)  # ids of every stored manifest
    unreadable: list[str] = field(default_factory=list)   # why each manifest cannot be read
    verify: tuple[str, CheckRecord] | None = None   # the newest check record, and its key
    drill: tuple[str, CheckRecord] | None = None    # the newest one with a drill
    damaged_checks: list[str] = field(default_factory=list)
    capture: CaptureRead | None = None  # None: capture never ran
    capture_error: str = ""


def read_store(store: Store, database_id: str | None, keep_days: int,
               now: datetime) -> list[DatabaseRead]:
    """Every database of the store (or the one named). A store that cannot be listed
    raises StoreError; a record that cannot be read is a finding of its database."""
    ids = [database_id] if database_id else store.database_ids()
    return [read_database(store, db, keep_days, now) for db in ids]


def read_database(store: Store, database_id: str, keep_days: int,
                  now: datetime) -> DatabaseRead:
    read = DatabaseRead(database_id)
    for key in store.manifest_keys(database_id):
        read.stored.add(key.removesuffix("/" + MANIFEST).rsplit("/", 1)[-1])
        try:
            read.manifests.append(store.read_manifest_key(key))
        except StoreError as exc:
            read.unreadable.append(exc.message)
    _read_checks(store, read)
    try:
        read.capture = _read_capture(store, database_id, keep_days, now)
    except StoreError as exc:
        read.capture_error = exc.message
    return read


def _read_checks(store: Store, read: DatabaseRead) -> None:
    """The newest check record, and the newest with a drill (a verify without one may
    come after it): read from the newest back until both are found."""
    prefix = store.key(read.database_id, CHECKS) + "/"
    for key in sorted(store.list_keys(prefix), reverse=True):
        raw = store.read_small(key)
        if raw is None:
            continue  # expired between the listing and the read
        try:
            found = CheckRecord.from_json(raw, key)
        except StoreError as exc:
            read.damaged_checks.append(exc.message)
            continue
        read.verify = read.verify or (key, found)
        if found.drill is not None:
            read.drill = (key, found)
            return


def _read_capture(store: Store, database_id: str, keep_days: int,
                  now: datetime) -> CaptureRead | None:
    state = read_state(store, database_id)
    history = [(e, read_progress(store, database_id, e)) for e in epochs(store, database_id)]
    if state is None and not history:
        return None
    holding = [state.slot] if state else []
    if state is not None and state.handover:  # a rebase: the next epoch's slot holds WAL too
        holding += [e.slot for e, _ in history if e.start_lsn == state.handover]
    return CaptureRead(state, window(store, database_id, keep_days, now, history),
                       {slot: read_slot(store, database_id, slot) for slot in holding})


# --- judging ------------------------------------------------------------------------------

def age(seconds: float) -> str:
    """An age as people say it: 9 days, 30 hours, 2 hours, 14 minutes, 40 seconds."""
    for unit, size, from_ in (("day", 86400, 2 * 86400), ("hour", 3600, 2 * 3600),
                              ("minute", 60, 120)):
        if seconds >= from_:
            return f"{int(seconds // size)} {unit}s"
    return f"{max(0, int(seconds))} seconds"


def _at(text: str) -> str:
    """A stored time to the second: 2026-12-02T03:00:00Z."""
    return parse_time(text).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(now: datetime, text: str) -> float:
    return max(0.0, (now - parse_time(text)).total_seconds())


def facts(read: DatabaseRead, now: datetime, limits: Limits) -> dict[str, Any]:
    """One database's status as `--json` prints it (stable keys), with `needs_attention`:
    a line for each thing that needs a person."""
    found: dict[str, Any] = {
        "database_id": read.database_id,
        "backups": len(read.manifests),
        "newest_full": _newest(read.manifests, "full", now),
        "newest_incremental": _newest(read.manifests, "incremental", now),
        "chain": _chain(read),
        "capture": _capture(read.capture, now),
        "verify": _verify(read.verify, now),
        "drill": _drill(read.drill, now),
    }
    found["needs_attention"] = needs_attention(read, found, limits)
    found["healthy"] = not found["needs_attention"]
    return found


def _newest(manifests: list[Manifest], kind: str, now: datetime) -> dict[str, Any] | None:
    newest = next((m for m in reversed(manifests) if m.kind == kind), None)
    if newest is None:
        return None
    return {"backup_id": newest.backup_id, "snapshot_at": newest.snapshot_at,
            "age_seconds": round(_seconds(now, newest.snapshot_at)),
            "bytes": newest.total_bytes, "label": newest.label}


def _chain(read: DatabaseRead) -> dict[str, Any] | None:
    """The chain of the newest backup: its base full and the incrementals on it, and the
    backups it relies on that are not stored (Manifest.depends_on: what a restore reads)."""
    if not read.manifests:
        return None
    newest = read.manifests[-1]
    base_id = newest.base or newest.backup_id
    base = next((m for m in read.manifests if m.backup_id == base_id), None)
    members = ([base] if base else []) + [m for m in read.manifests if m.base == base_id]
    return {"base": base_id, "newest": newest.backup_id,
            "incrementals": sum(1 for m in members if m.kind == "incremental"),
            "span_seconds": round((parse_time(newest.snapshot_at)
                                   - parse_time(base.snapshot_at)).total_seconds())
            if base else None,
            "bytes": sum(m.total_bytes for m in members),
            "missing": sorted(newest.depends_on - read.stored)}


def _capture(read: CaptureRead | None, now: datetime) -> dict[str, Any] | None:
    if read is None:
        return None
    latest = read.window.latest
    return {"running": read.state is not None,
            "epoch": ({"start_lsn": read.state.start_lsn, "base": read.state.base,
                       "base_at": read.state.base_at, "slot": read.state.slot,
                       "plugin": read.state.plugin} if read.state else None),
            "window": read.window.as_dict(),
            "lag_seconds": (round(max(0.0, (now - latest).total_seconds()))
                            if latest is not None and read.state is not None else None),
            "slots": [{"slot": slot, "reading": _reading(reading, now)}
                      for slot, reading in read.slots.items()]}


def _reading(reading: SlotReading | None, now: datetime) -> dict[str, Any] | None:
    if reading is None:
        return None
    return {"read_at": reading.read_at, "age_seconds": round(_seconds(now, reading.read_at)),
            "found": reading.found, "wal_status": reading.wal_status,
            "retained_wal_bytes": reading.retained_wal_bytes,
            "safe_wal_size": reading.safe_wal_size}


def _verify(newest: tuple[str, CheckRecord] | None, now: datetime) -> dict[str, Any] | None:
    if newest is None:
        return None
    key, check = newest
    return {"key": key, "finished_at": check.finished_at,
            "age_seconds": round(_seconds(now, check.finished_at)), "ok": check.ok,
            "backup": check.backup or None, "verified": len(check.verified),
            "problems": len(check.problems), "first_problems": check.problems[:5],
            "error": check.error or None}


def _drill(newest: tuple[str, CheckRecord] | None, now: datetime) -> dict[str, Any] | None:
    if newest is None:
        return None
    key, check = newest
    drill = check.drill
    if drill is None:
        return None
    return {"key": key, "finished_at": check.finished_at,
            "age_seconds": round(_seconds(now, check.finished_at)), "ok": drill.ok,
            "ran": drill.ran, "backup_id": drill.backup_id or None, "target": drill.target,
            "tables": drill.tables, "rows": drill.rows, "files": drill.files,
            "problems": len(drill.problems), "first_problems": drill.problems[:5]}


def needs_attention(read: DatabaseRead, found: dict[str, Any], limits: Limits) -> list[str]:
    """Each thing that needs a person, a line each, most urgent kinds first."""
    return (_backup_findings(read, found, limits) + _capture_findings(read, found, limits)
            + _check_findings(read, found, limits))


def _backup_findings(read: DatabaseRead, found: dict[str, Any], limits: Limits) -> list[str]:
    lines = [f"a manifest cannot be read: {line}" for line in read.unreadable]
    full, incremental = found["newest_full"], found["newest_incremental"]
    if full is None and incremental is None:
        return [*lines, f"no backup of {read.database_id} on record"]
    if full is None:
        lines.append("no full backup on record")
    elif full["age_seconds"] > limits.full.total_seconds():
        lines.append(f"no full backup for {age(full['age_seconds'])} (the newest is "
                     f"{full['backup_id']})")
    newest = min(b["age_seconds"] for b in (full, incremental) if b is not None)
    if newest > limits.backup.total_seconds():
        lines.append(f"no backup for {age(newest)}")
    chain = found["chain"]
    for missing in chain["missing"]:
        what = "the chain's base" if missing == chain["base"] else "a backup the chain relies on"
        lines.append(f"{what} {missing} is missing: the newest backup {chain['newest']} "
                     "cannot be restored (the next backup starts a new chain)")
    return lines


def _capture_findings(read: DatabaseRead, found: dict[str, Any], limits: Limits) -> list[str]:
    if read.capture_error:
        return [f"change capture's records cannot be read: {read.capture_error}"]
    capture = found["capture"]
    if capture is None or not capture["running"]:
        return []  # never started, or dropped: nothing holds WAL, nothing falls behind
    lines = []
    if capture["window"]["latest"] is None:
        lines.append("change capture reaches no time (no epoch's base backup is stored)")
    elif capture["lag_seconds"] > limits.capture_lag.total_seconds():
        lines.append(f"capture is {age(capture['lag_seconds'])} behind (restores to a time "
                     f"reach {_at(capture['window']['latest'])}; is `cdc run` running?)")
    for slot in capture["slots"]:
        if slot["reading"] is not None:
            lines += _slot_findings(slot["slot"], slot["reading"], limits)
    return lines


def _slot_findings(slot: str, reading: dict[str, Any], limits: Limits) -> list[str]:
    """The slot's last reading against the limits: WAL it holds on the database's disk,
    and how close it is to max_slot_wal_keep_size (past it, the server invalidates the
    slot and the changes since the last stored segment are lost)."""
    when = f"as of {_at(reading['read_at'])}"
    if not reading["found"] or reading["wal_status"] == "lost":
        return [f"slot {slot} was {'gone' if not reading['found'] else 'lost'} ({when}): "
                "changes since the last stored segment are lost; the next `cdc run` "
                "takes a new base"]
    held, safe = reading["retained_wal_bytes"], reading["safe_wal_size"]
    if safe is None:
        if held <= limits.retained_wal:
            return []
        return [f"slot {slot} holds {human_bytes(held)} of WAL, with no cap "
                f"(max_slot_wal_keep_size is unset: it grows until the disk is full; {when})"]
    if held <= limits.retained_wal and safe >= limits.safe_wal and (
            reading["wal_status"] != "unreserved"):
        return []
    return [f"slot {slot} holds {human_bytes(held)} of {human_bytes(held + max(safe, 0))} "
            f"(max_slot_wal_keep_size; {when}): past it the slot is lost"]


def _check_findings(read: DatabaseRead, found: dict[str, Any], limits: Limits) -> list[str]:
    lines = [f"a check record cannot be read: {line}" for line in read.damaged_checks]
    verify, drill = found["verify"], found["drill"]
    if verify is None:
        return [*lines, "no verify on record"]
    if not verify["ok"]:
        first = verify["error"] or (verify["first_problems"] or ["?"])[0]
        more = verify["problems"] - (0 if verify["error"] else 1)
        lines.append(f"last verify failed: {first}"
                     + (f" (and {more} more problem(s))" if more > 0 else ""))
    if verify["age_seconds"] > limits.verify.total_seconds():
        lines.append(f"no verify for {age(verify['age_seconds'])}")
    if drill is not None and not drill["ok"]:
        first = (drill["first_problems"] or ["it did not run"])[0]
        lines.append(f"last drill failed: {first}")
    if drill is not None and drill["age_seconds"] > limits.verify.total_seconds():
        lines.append(f"no restore drill for {age(drill['age_seconds'])}")
    return lines


def store_status(store: Store, database_id: str | None, keep_days: int, limits: Limits,
                 now: datetime | None = None) -> dict[str, Any]:
    """The whole store's status (what `status --json` prints): each database's facts,
    and `healthy`. A store without any database needs a person too: nothing is backed
    up there, or the address is wrong."""
    now = now or utcnow()
    databases = [facts(r, now, limits) for r in read_store(store, database_id, keep_days, now)]
    empty = [] if databases else [f"no backups in {store.url} (none taken yet, or the "
                                  "wrong --store)"]
    return {"store": str(store.url), "checked_at": iso(now),
            "healthy": not empty and all(d["healthy"] for d in databases),
            "needs_attention": empty, "databases": databases}


# --- the screen ---------------------------------------------------------------------------

def screen(status: dict[str, Any]) -> list[str]:
    """`status` for a person: a compact block per database, then what needs a person."""
    lines = [f"{status['store']} at {_at(status['checked_at'])}"]
    lines += [f"NEEDS A PERSON: {line}" for line in status["needs_attention"]]
    for database in status["databases"]:
        lines += ["", *_database_lines(database)]
    problems = len(status["needs_attention"]) + sum(len(d["needs_attention"])
                                                     for d in status["databases"])
    lines += ["", "healthy" if status["healthy"] else f"{problems} thing(s) need a person"]
    return lines


def _database_lines(d: dict[str, Any]) -> list[str]:
    lines = [d["database_id"]]
    for kind in ("full", "incremental"):
        newest = d[f"newest_{kind}"]
        lines.append(f"  {kind:<12} " + (
            f"{newest['backup_id']}  {age(newest['age_seconds'])} ago, "
            f"{human_bytes(newest['bytes'])}" if newest else "none"))
    chain = d["chain"]
    if chain is not None:
        span = f", {age(chain['span_seconds'])}" if chain["span_seconds"] else ""
        lines.append(f"  {'chain':<12} {chain['base']} + {chain['incrementals']} "
                     f"incremental(s){span}, {human_bytes(chain['bytes'])}")
    lines += _capture_lines(d["capture"])
    lines += _check_lines(d["verify"], d["drill"])
    lines += [f"  NEEDS A PERSON: {line}" for line in d["needs_attention"]]
    return lines


def _capture_lines(capture: dict[str, Any] | None) -> list[str]:
    if capture is None:
        return [f"  {'capture':<12} off"]
    window = capture["window"]
    reach = (f"{_at(window['earliest'])} to {_at(window['latest'])}" if window["earliest"]
             else "no time")
    state = (f"{age(capture['lag_seconds'])} behind" if capture["lag_seconds"] is not None
             else "stopped" if not capture["running"] else "")
    lines = [f"  {'point in time':<12} {reach}" + (f" ({state})" if state else "")]
    lines += [f"    gap (refused): {_at(g['from'])} to {_at(g['to'])}: {g['why']}"
              for g in window["gaps"]]
    for slot in capture["slots"]:
        reading = slot["reading"]
        if reading is None:
            lines.append(f"  {'slot':<12} {slot['slot']}: no reading yet")
        elif not reading["found"]:
            lines.append(f"  {'slot':<12} {slot['slot']}: gone as of {_at(reading['read_at'])}")
        else:
            safe = reading["safe_wal_size"]
            cap = (f" of {human_bytes(reading['retained_wal_bytes'] + max(safe, 0))}"
                   if safe is not None else " (no cap)")
            lines.append(f"  {'slot':<12} {slot['slot']}: holds "
                         f"{human_bytes(reading['retained_wal_bytes'])}{cap}, "
                         f"{reading['wal_status']}, as of {_at(reading['read_at'])}")
    return lines


def _check_lines(verify: dict[str, Any] | None, drill: dict[str, Any] | None) -> list[str]:
    lines = [f"  {'verify':<12} " + (
        f"{'ok' if verify['ok'] else 'FAILED'}, {age(verify['age_seconds'])} ago "
        f"({verify['backup'] or 'every backup'}: {verify['verified']} verified, "
        f"{verify['problems']} problem(s))" if verify else "none on record")]
    lines.append(f"  {'drill':<12} " + (
        f"{'passed' if drill['ok'] else 'FAILED'}, {age(drill['age_seconds'])} ago "
        f"({drill['backup_id'] or '-'} on {drill['target']}: {drill['tables']} tables, "
        f"{drill['rows']} rows)" if drill else "none on record"))
    return lines
