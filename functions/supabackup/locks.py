"""One backup run at a time per database, and one backup per schedule tick; one capture
drainer at a time.

Two guards, because either alone can fail:

- a **lease** in the store, `<database-id>/locks/backup.json`, created with a conditional
  put (If-None-Match: *) so that only one run can hold it. It names its holder, the
  schedule tick it serves, and when it expires. A run releases it when it ends; one that
  was killed (Lambda's time limit, a crash) cannot, so the lease expires after LEASE, a
  little more than Lambda's 15 minutes, and the next run takes it over;
- an **advisory lock** in PostgreSQL (`pg_try_advisory_lock`), held by the run's snapshot
  session for the whole run (see snapshot.py): no two runs dump one database at once,
  whichever stores they write to.

A second delivery of the same schedule tick (EventBridge delivers at least once) finds
the tick's lease or the tick's backup and stops, as a DuplicateRun: the first delivery
does the work and reports it. Any other run that finds the lease held waits up to
`wait` seconds, then fails and says who holds it.

Change capture holds a lease of its own, `<database-id>/locks/capture.json` (purpose
"capture"), for as long as it streams plus a margin, renewed as it goes (`renew`): a
drainer that was killed blocks the next one for that margin only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .errors import DuplicateRun, RunInProgress
from .manifest import iso, parse_time, utcnow
from .store import Store

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=20)
POLL_SECONDS = 5.0
RUNS = {"backup": "backup", "capture": "capture run"}  # what a lease's holder is called


@dataclass(frozen=True)
class Lease:
    key: str
    owner: str
    tick: str | None


def acquire(store: Store, database_id: str, owner: str, tick: str | None = None,
            wait: float = 0.0, now: Callable[[], datetime] = utcnow,
            sleep: Callable[[float], None] = time.sleep, purpose: str = "backup",
            hold: timedelta = LEASE, poll: float = POLL_SECONDS) -> Lease:
    """Take the database's lease for `purpose` (held for `hold`), or raise DuplicateRun or
    RunInProgress."""
    key = store.key(database_id, "locks", f"{purpose}.json")
    waited = 0.0
    while True:
        taken = now()
        body = _body(owner, tick, taken, hold)
        if store.create_exclusive(key, body):
            return Lease(key, owner, tick)
        held = _read(store, key)
        if held is None:
            continue  # released between our put and our read: try again at once
        if parse_time(held["expires_at"]) <= taken:
            log.warning("taking over the expired lease of %s (taken at %s): that run ended "
                        "without releasing it", held["owner"], held["taken_at"])
            store.delete_key(key)
            continue
        if tick is not None and held.get("tick") == tick:
            raise DuplicateRun(f"schedule tick {tick} is already being backed up by "
                               f"{held['owner']} (since {held['taken_at']})",
                               "nothing to do: that run reports its outcome")
        if waited >= wait:
            raise RunInProgress(
                f"another {RUNS.get(purpose, purpose)} of {database_id} is in progress: "
                f"{held['owner']}, since {held['taken_at']}",
                "let it finish (its SNS message says how it ended) and run again; if it was "
                f"killed, its lease expires at {held['expires_at']}")
        sleep(poll)
        waited += poll


def renew(store: Store, lease: Lease, hold: timedelta, now: Callable[[], datetime] = utcnow
          ) -> None:
    """Hold the lease for `hold` from now (a long run's heartbeat), if it is still ours."""
    held = _read(store, lease.key)
    if held is not None and held.get("owner") == lease.owner:
        store.put_small(lease.key, _body(lease.owner, lease.tick, now(), hold),
                        "application/json")


class Renewer:
    """Renews a lease every quarter of LEASE in a thread of its own while a run lasts
    (`with Renewer(store, lease):`). A run longer than LEASE (a Fargate task's, for
    hours) would else look killed to the next run, which would take its lease over and
    then fail on the database's own lock. A renewal that fails is logged: the lease then
    expires as a killed run's does, which is the worst that can happen."""

    def __init__(self, store: Store, lease: Lease, hold: timedelta = LEASE,
                 every: float | None = None) -> None:
        self.store, self.lease, self.hold = store, lease, hold
        self.every = hold.total_seconds() / 4 if every is None else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supabackup-lease",
                                        daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                renew(self.store, self.lease, self.hold)
            except Exception as exc:  # noqa: BLE001 - the run goes on; the lease may lapse
                log.warning("could not renew the lease %s: %s", self.lease.key, exc)


def _body(owner: str, tick: str | None, taken: datetime, hold: timedelta) -> bytes:
    return json.dumps({"owner": owner, "tick": tick, "taken_at": iso(taken),
                       "expires_at": iso(taken + hold)}).encode()


def release(store: Store, lease: Lease) -> None:
    """Give the lease back, unless it expired and another run has taken it over since."""
    held = _read(store, lease.key)
    if held is not None and held.get("owner") == lease.owner:
        store.delete_key(lease.key)


def _read(store: Store, key: str) -> dict[str, str] | None:
    """The lease as stored, its fields as text; an unreadable one reads as expired, so a
    damaged lease cannot block backups for ever."""
    raw = store.read_small(key)
    if raw is None:
        return None
    try:
        held = json.loads(raw)
        if not isinstance(held, dict) or not isinstance(held.get("expires_at"), str):
            raise ValueError("not a lease")
        parse_time(held["expires_at"])
    except ValueError:
        return {"owner": "unknown", "taken_at": "?", "tick": "",
                "expires_at": iso(utcnow() - LEASE)}
    return {"owner": str(held.get("owner", "unknown")), "taken_at": str(held.get("taken_at", "?")),
            "tick": str(held.get("tick") or ""), "expires_at": held["expires_at"]}
