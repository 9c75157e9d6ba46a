"""Retention of stored files over a simulated year: lifecycle expires backups by their
class (plan_retention re-tags them after each backup, as the engine does), and the sweep
after each backup removes what no live manifest lists (files.retain.unreferenced)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from supabackup.files.copy import Blob
from supabackup.files.retain import GRACE, unreferenced
from supabackup.retention import Entry, plan_retention

DAYS = {"daily": 14, "weekly": 35, "monthly": 365}  # the template's defaults
START = datetime(2026, 1, 4, 3, tzinfo=UTC)  # a Sunday


@dataclass
class World:
    """The store: backups (their classes and the contents they list) and stored contents."""

    entries: dict[str, Entry] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    lists: dict[str, set[str]] = field(default_factory=dict)
    stored: dict[str, Blob] = field(default_factory=dict)
    made: int = 0

    def content(self, now: datetime) -> str:
        self.made += 1
        sha = f"{self.made:064x}"
        self.stored[sha] = Blob(1000, now)
        return sha

    def expire(self, now: datetime) -> None:
        """What lifecycle deletes: a backup whose class's days have passed since it was
        written (a pinned one, or one of a class no rule expires, stays)."""
        for backup_id in list(self.entries):
            days = DAYS.get(self.classes[backup_id])
            if days is not None and self.entries[backup_id].taken_at + timedelta(days) <= now:
                del self.entries[backup_id], self.classes[backup_id], self.lists[backup_id]

    def live_references(self) -> set[str]:
        return set().union(*self.lists.values()) if self.lists else set()


def test_a_year_of_backups_never_loses_a_listed_file_and_keeps_no_unlisted_one() -> None:
    rng = random.Random(16)  # noqa: S311 - a workload, not a secret
    world = World()
    files = {f"f{i}": world.content(START) for i in range(200)}  # the project's Storage
    orphans: dict[str, datetime] = {}
    peak = 0
    for day in range(366):
        now = START + timedelta(days=day)
        # the app: some files replaced, some added, some deleted
        for name in rng.sample(sorted(files), 4):
            files[name] = world.content(now)
        for _ in range(2):
            files[f"n{day}-{rng.random()}"] = world.content(now)
        for name in rng.sample(sorted(files), 1):
            del files[name]
        if day % 29 == 5:  # a run killed after copying a file: content no manifest lists
            orphan = world.content(now)
            orphans[orphan] = now
        kind = "full" if now.weekday() == 6 else "incremental"
        backup_id = now.strftime("%Y%m%dT%H%M%SZ") + ("-full" if kind == "full" else "-incr")
        base = max((b for b, e in world.entries.items() if e.kind == "full"), default="")
        world.entries[backup_id] = Entry(backup_id, kind, "weekly" if kind == "full" else
                                         "daily", now, frozenset({base} - {""})
                                         if kind == "incremental" else frozenset())
        world.classes[backup_id] = world.entries[backup_id].retention
        world.lists[backup_id] = set(files.values())
        # the retention pass: re-tag, lifecycle takes what has expired, then the sweep
        world.classes.update(plan_retention(list(world.entries.values()), DAYS))
        world.expire(now)
        for sha in unreferenced(world.live_references(), world.stored, now):
            del world.stored[sha]
        # THEN every file of every live backup is stored: each one restores whole
        assert world.live_references() <= set(world.stored), day
        # and nothing is stored that no live backup lists, but for the grace period
        extra = set(world.stored) - world.live_references()
        assert all(now - world.stored[sha].modified <= GRACE for sha in extra), day
        peak = max(peak, len(world.stored))
    # a killed run's content goes after the grace period; the year's peak stays bounded
    # by what the live backups list (about a year of monthly fulls' changes)
    assert not set(orphans) & set(world.stored)
    assert len(world.live_references()) <= len(world.stored) <= peak
    monthly = [b for b, c in world.classes.items() if c == "monthly"]
    assert len(monthly) >= 12  # the monthly archives of the year are all there


def test_an_unlisted_content_within_the_grace_period_is_kept() -> None:
    now = START
    stored = {"a" * 64: Blob(1, now - GRACE - timedelta(seconds=1)),
              "b" * 64: Blob(1, now - timedelta(hours=1)), "c" * 64: Blob(1, now - GRACE * 9)}
    assert unreferenced({"c" * 64}, stored, now) == ["a" * 64]
