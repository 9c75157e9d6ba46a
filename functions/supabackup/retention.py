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
    returns to its own class once the last such dependent has gone.

`plan_retention` is a pure function of the catalog, as in barman, so it can be tested
over months of simulated backups without S3; `apply_retention` re-tags the objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .manifest import Manifest, parse_time
from .store import Store

log = logging.getLogger(__name__)

KEEP_WEEKLY = 4
FOREVER = datetime.max.replace(tzinfo=UTC)


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


def plan_retention(entries: list[Entry], days: dict[str, int]) -> dict[str, str]:
    """The class each backup should carry now: {backup_id: daily|weekly|monthly|pinned}.

    `days` is how many days lifecycle keeps each class; a class it does not name never
    expires.
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

    # How long each backup is needed: until it expires, or until the last backup that
    # relies on it does. Dependents first (newest), so a need propagates down a chain of
    # any length; a hold lasts as long as the dependent's need, not for ever, so a chain
    # of daily incrementals never pins its monthly base or itself for good.
    needed_until = {e.backup_id: expires(e.backup_id) for e in entries}
    for e in sorted(entries, key=lambda e: e.taken_at, reverse=True):
        for needed in e.depends_on & needed_until.keys():
            needed_until[needed] = max(needed_until[needed], needed_until[e.backup_id])
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


def apply_retention(store: Store, manifests: list[Manifest]) -> list[Change]:
    """Re-tag every object of each backup whose class should change; return the changes."""
    plan = plan_retention([Entry.of(m) for m in manifests], store.expiration_days())
    changes = []
    for manifest in manifests:
        current = store.retention_tag(manifest)
        wanted = plan[manifest.backup_id]
        if current != wanted:
            store.retag(manifest, wanted)
            changes.append(Change(manifest.backup_id, current, wanted))
            log.info("retention: %s", changes[-1])
    return changes
