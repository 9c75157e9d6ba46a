"""Retention: which class each backup's objects should carry now. Lifecycle does the deleting.

S3 lifecycle rules expire objects by their `retention` tag and age (daily 14 days, weekly
35, monthly 365, pinned never: see template.yaml). This pass runs after each backup and
only re-tags, so it can never delete anything itself:

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

from botocore.exceptions import BotoCoreError, ClientError

from .manifest import Manifest, parse_time
from .store import Store, store_error

log = logging.getLogger(__name__)

DEFAULT_DAYS = {"daily": 14, "weekly": 35, "monthly": 365}
KEEP_WEEKLY = 4
FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    """What retention needs to know about one backup."""

    backup_id: str
    kind: str
    retention: str              # the class it was taken with
    taken_at: datetime          # when its objects were written (lifecycle counts from here)
    depends_on: frozenset[str]  # backups holding data it needs (its base, held_in)

    @classmethod
    def of(cls, manifest: Manifest) -> Entry:
        needs = {t["held_in"] for t in manifest.tables} | ({manifest.base} - {""})
        return cls(manifest.backup_id, manifest.kind, manifest.retention,
                   parse_time(manifest.snapshot_at), frozenset(needs - {manifest.backup_id}))


def plan_retention(entries: list[Entry], days: dict[str, int] | None = None) -> dict[str, str]:
    """The class each backup should carry now: {backup_id: daily|weekly|monthly|pinned}."""
    days = days or DEFAULT_DAYS
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
        if cls == "pinned":
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


def apply_retention(store: Store, database_id: str, manifests: list[Manifest],
                    days: dict[str, int] | None = None, dry_run: bool = False) -> list[Change]:
    """Re-tag every object of each backup whose class should change; return the changes."""
    plan = plan_retention([Entry.of(m) for m in manifests], days)
    changes = []
    for manifest in manifests:
        current = store_tag(store, manifest)
        wanted = plan[manifest.backup_id]
        if current == wanted:
            continue
        changes.append(Change(manifest.backup_id, current, wanted))
        if not dry_run:
            names = [o.name for o in manifest.objects] + ["manifest.json"]
            for name in names:
                key = store.backup_key(database_id, manifest.backup_id, name)
                try:
                    store.s3.put_object_tagging(
                        Bucket=store.url.bucket, Key=key,
                        Tagging={"TagSet": [{"Key": "retention", "Value": wanted},
                                            {"Key": "kind", "Value": manifest.kind}]})
                except (ClientError, BotoCoreError) as exc:
                    raise store_error(exc, key) from None
    for change in changes:
        log.info("retention: %s", change)
    return changes


def store_tag(store: Store, manifest: Manifest) -> str:
    """The retention class a backup's manifest object carries now."""
    key = store.backup_key(manifest.database_id, manifest.backup_id, "manifest.json")
    try:
        tags = store.s3.get_object_tagging(Bucket=store.url.bucket, Key=key)["TagSet"]
    except (ClientError, BotoCoreError) as exc:
        raise store_error(exc, key) from None
    return next((t["Value"] for t in tags if t["Key"] == "retention"), manifest.retention)

