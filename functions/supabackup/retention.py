"""Retention: which class each backup's objects should carry now. Lifecycle does the deleting.

S3 lifecycle rules expire objects by their `retention` tag and age (by default daily 14
days, weekly 35, monthly 365, pinned never: the template's DailyRetentionDays,
WeeklyRetentionDays and MonthlyRetentionDays). This pass reads those days from the
bucket's own rules (Store.expiration_days), so it reckons by the clock that deletes; it
runs after each backup and only re-tags, so it can never delete anything itself:

  - the first full backup of each calendar month is promoted to `monthly`;
  - the four newest weekly fulls are kept by count, not only by age: one that lifecycle
    would expire while fewer than four newer weekly fulls exist is held (`pinned`);
  - the base of a live chain never expires first: a backup whose data a retained
    backup relies on is held (`pinned`) while that dependent would outlive it, and
    returns to its own class once the last such dependent has gone;
  - the point-in-time window holds: a restore to any time of the last `keep_days` days
    (K, default 7) replays change capture onto the base of the epoch that covers the
    time, so every base such a time needs is held (`pinned`), whatever its tag says,
    while its epoch covers any time in [now - K, now]: the running epoch always, an
    ended one until its end is K days old (`capture_needs`). Then it returns to its own
    class (a weekly full, or the month's monthly) and lifecycle takes it in its time.

`plan_retention` and `capture_needs` are pure functions of the catalog, as in barman, so
they can be tested over months of simulated backups and epochs without S3;
`apply_retention` reads both from the store and re-tags the objects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .capture.state import CaptureState, Progress, epochs, read_progress
from .errors import ConfigError
from .manifest import Manifest, parse_time, utcnow
from .store import Store

log = logging.getLogger(__name__)

KEEP_WEEKLY = 4
KEEP_DAYS = 7  # how far back a restore to a time must reach, by default
KEEP_DAYS_ENV = "SUPABACKUP_KEEP_DAYS"
FOREVER = datetime.max.replace(tzinfo=UTC)


def checked_keep_days(value: str | int | None, what: str = "--keep-days") -> int:
    """`value` as a number of days (KEEP_DAYS when unset or empty), or a clear ConfigError
    naming `what` when it is not a whole number of at least 1."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return KEEP_DAYS
    try:
        days = int(value.strip()) if isinstance(value, str) else int(value)
    except ValueError:
        days = 0
    if isinstance(value, bool) or days < 1:
        raise ConfigError(f"{what} must be a whole number of days, 1 or more, not "
                          f"{str(value)[:40]!r}",
                          f"how far back a restore to a time must reach (default {KEEP_DAYS})")
    return days


def capture_needs(history: list[tuple[CaptureState, Progress | None]], now: datetime,
                  keep_days: int = KEEP_DAYS) -> dict[str, datetime]:
    """The epoch bases the point-in-time window needs at `now`: {base backup id: until
    when it is needed}, for every epoch that covers some time in [now - keep_days, now].

    `history` is every epoch (oldest first) with its progress record. The running epoch
    (one that has not ended) is needed for as long as it runs (FOREVER). An ended one
    reaches to its end: its progress (`verified_at`), or the next epoch's base if that is
    later (a time between the two is answered by the epoch begun before it, so the base
    must stay as long as such a time is in the window); it is needed until that end is
    `keep_days` old. A base two epochs share (none do today) is needed the longer.
    """
    horizon = timedelta(days=keep_days)
    needs: dict[str, datetime] = {}
    for i, (epoch, progress) in enumerate(history):
        following = history[i + 1][0] if i + 1 < len(history) else None
        running = not progress.ended if progress is not None else following is None
        if running:  # (an epoch without a progress record is kept while it is the last)
            until = FOREVER
        else:
            ends = [parse_time(epoch.base_at)]
            if progress is not None:
                ends.append(parse_time(progress.verified_at))
            if following is not None:
                ends.append(parse_time(following.base_at))
            until = max(ends) + horizon
        if until > now:
            needs[epoch.base] = max(needs.get(epoch.base, until), until)
    return needs


@dataclass(frozen=True)
class Entry:
    """What retention needs to know about one backup."""

    backup_id: str
    kind: str
    retention: str              # the class it was taken with
    taken_at: datetime          # when its objects were written (lifecycle counts from here)
    depends_on: frozenset[str]  # Manifest.depends_on

    @classmethod
    def of(cls, manifest: Manifest) -> Entry:
        return cls(manifest.backup_id, manifest.kind, manifest.retention,
                   parse_time(manifest.snapshot_at), manifest.depends_on)


def plan_retention(entries: list[Entry], days: dict[str, int],
                   needed: Mapping[str, datetime] | None = None) -> dict[str, str]:
    """The class each backup should carry now: {backup_id: daily|weekly|monthly|pinned}.

    `days` is how many days lifecycle keeps each class; a class it does not name never
    expires. `needed` holds the bases change capture needs now ({backup_id: until},
    capture_needs): each is pinned, and what it relies on is held as long.
    """
    by_id = {e.backup_id: e for e in entries}
    classes = {e.backup_id: e.retention for e in entries}

    seen_months: set[str] = set()
    for e in sorted(entries, key=lambda e: e.taken_at):
        month = e.taken_at.strftime("%Y-%m")
        if e.kind == "full" and month not in seen_months:
            seen_months.add(month)
            if classes[e.backup_id] in ("daily", "weekly"):
                classes[e.backup_id] = "monthly"

    def expires(backup_id: str) -> datetime:
        cls = classes[backup_id]
        if cls not in days:  # pinned, or a class no rule expires
            return FOREVER
        return by_id[backup_id].taken_at + timedelta(days=days[cls])

    weekly = sorted((e for e in entries if e.kind == "full" and classes[e.backup_id] == "weekly"),
                    key=lambda e: e.taken_at, reverse=True)
    newest = max((e.taken_at for e in entries), default=None)
    for e in weekly[:KEEP_WEEKLY]:
        if newest is not None and expires(e.backup_id) <= newest + timedelta(days=2):
            classes[e.backup_id] = "pinned"  # too few newer weekly fulls to let it go
    for backup_id in (needed or {}).keys() & by_id.keys():
        classes[backup_id] = "pinned"  # a restore to a time in the window replays onto it

    # How long each backup is needed: until it expires, or until the last backup that
    # relies on it does. Dependents first (newest), so a need propagates down a chain of
    # any length; a hold lasts as long as the dependent's need, not for ever, so a chain
    # of daily incrementals never pins its monthly base or itself for good.
    needed_until = {e.backup_id: expires(e.backup_id) for e in entries}
    for e in sorted(entries, key=lambda e: e.taken_at, reverse=True):
        for relied_on in e.depends_on & needed_until.keys():
            needed_until[relied_on] = max(needed_until[relied_on], needed_until[e.backup_id])
    for backup_id, until in needed_until.items():
        if until > expires(backup_id):
            classes[backup_id] = "pinned"
    return classes


@dataclass(frozen=True)
class Change:
    backup_id: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.backup_id}: {self.before} -> {self.after}"


def apply_retention(store: Store, manifests: list[Manifest], keep_days: int = KEEP_DAYS,
                    now: datetime | None = None) -> list[Change]:
    """Re-tag every object of each backup whose class should change; return the changes.

    The bases change capture needs are read from its epochs in the store (a database
    without capture has none); `now` is the clock the window is reckoned by.
    """
    if not manifests:
        return []
    database_id = manifests[0].database_id
    history = [(e, read_progress(store, database_id, e)) for e in epochs(store, database_id)]
    needed = capture_needs(history, now or utcnow(), keep_days)
    days = store.expiration_days()
    if history and "capture" in days and days["capture"] <= keep_days:
        log.warning("retention: lifecycle keeps captured changes %d days, not more than the "
                    "%d a restore to a time must reach back: such restores lose their "
                    "oldest changes", days["capture"], keep_days)
    plan = plan_retention([Entry.of(m) for m in manifests], days, needed)
    changes = []
    for manifest in manifests:
        current = store.retention_tag(manifest)
        wanted = plan[manifest.backup_id]
        if current != wanted:
            store.retag(manifest, wanted)
            changes.append(Change(manifest.backup_id, current, wanted))
            log.info("retention: %s", changes[-1])
    return changes
