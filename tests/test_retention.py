"""Retention as a pure function, simulated over months of schedules and lifecycle runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from supabackup.retention import Entry, apply_retention, plan_retention

from .helpers import lifecycle_rules, retention_days

START = datetime(2026, 1, 4, 3, tzinfo=UTC)  # a Sunday
DAYS = retention_days()  # as the template deploys them by default


def _simulate(days: int, skip: set[int] = frozenset()) -> tuple[list[dict[str, Any]], dict]:  # type: ignore[assignment]
    """Run the schedule (full on Sundays, incrementals otherwise) with lifecycle each day.

    Returns, for each day, the retained catalog, and the classes last planned.
    """
    kept: dict[str, Entry] = {}
    classes: dict[str, str] = {}
    history = []
    base = None
    for day in range(days):
        now = START + timedelta(days=day)
        if day not in skip:
            if now.weekday() == 6 or base is None or base not in kept:
                entry = Entry(f"{now:%Y%m%dT%H%M%SZ}-full", "full", "weekly", now, frozenset())
                base = entry.backup_id
            else:
                entry = Entry(f"{now:%Y%m%dT%H%M%SZ}-incr", "incremental", "daily", now,
                              frozenset({base}))
            kept[entry.backup_id] = entry
            classes = plan_retention(list(kept.values()), DAYS)  # the pass after each backup
        # S3 lifecycle: objects older than their tag's days go
        for backup_id, entry in list(kept.items()):
            cls = classes.get(backup_id, entry.retention)
            if cls != "pinned" and now - entry.taken_at > timedelta(days=DAYS[cls]):
                del kept[backup_id]
        history.append({"now": now, "kept": dict(kept), "classes": dict(classes)})
    return history, classes


def test_over_120_days_no_chain_breaks_and_monthly_fulls_stay() -> None:
    history, _ = _simulate(120)
    for day in history:
        for entry in day["kept"].values():
            missing = entry.depends_on - day["kept"].keys()
            assert not missing, f"{day['now']:%F}: {entry.backup_id} lost {missing}"
    last = history[-1]
    fulls = sorted(b for b, e in last["kept"].items() if e.kind == "full")
    monthly = [b for b in fulls if last["classes"][b] == "monthly"]
    assert [b[:6] for b in monthly] == ["202601", "202602", "202603", "202604", "202605"]
    weekly_like = [b for b in fulls if last["classes"][b] in ("weekly", "pinned", "monthly")]
    assert len(weekly_like) >= 4
    # daily incrementals do not pile up: at most two weeks of them, plus the week still open
    incrementals = [b for b, e in last["kept"].items() if e.kind == "incremental"]
    assert len(incrementals) <= 14 + 6


def test_four_weekly_fulls_survive_when_backups_stop() -> None:
    # Backups stop after day 60 for 70 days: lifecycle must not take the last four fulls.
    history, classes = _simulate(130, skip=set(range(60, 130)))
    last = history[-1]
    fulls = [b for b, e in last["kept"].items() if e.kind == "full"]
    assert len(fulls) >= 4
    assert all(classes[b] in ("pinned", "monthly") for b in fulls)


def test_a_pinned_incremental_holds_its_base_forever() -> None:
    full = Entry("20260104T030000Z-full", "full", "weekly", START, frozenset())
    incr = Entry("20260105T030000Z-incr", "incremental", "pinned",
                 START + timedelta(days=1), frozenset({full.backup_id}))
    later = [Entry(f"2026{m:02d}01T030000Z-full", "full", "weekly",
                   datetime(2026, m, 1, 3, tzinfo=UTC), frozenset()) for m in range(2, 8)]
    plan = plan_retention([full, incr, *later], DAYS)
    assert plan[full.backup_id] == "pinned" and plan[incr.backup_id] == "pinned"


def test_a_base_returns_to_its_class_once_no_dependent_needs_it() -> None:
    full = Entry("20260104T030000Z-full", "full", "weekly", START, frozenset())
    other = Entry("20260111T030000Z-full", "full", "weekly", START + timedelta(days=7),
                  frozenset())
    assert plan_retention([full, other], DAYS) == {full.backup_id: "monthly",
                                             other.backup_id: "weekly"}


def test_apply_retention_retags_every_object_and_reports_changes(
        pg15: Any, new_db: Any, store: Any, s3: Any) -> None:
    from supabackup.backup import BackupRequest, run_backup
    from supabackup.dburl import ConnectionInfo
    from supabackup.manifest import new_backup_id
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    conn = ConnectionInfo.from_url(pg15.url(db))
    at = datetime(2026, 11, 22, 3, tzinfo=UTC)
    full = run_backup(conn, store, BackupRequest(retention="weekly",
                                                 backup_id=new_backup_id(at, "full")))
    changes = apply_retention(store, store.manifests(full.database_id))
    assert [str(c) for c in changes] == [f"{full.backup_id}: weekly -> monthly"]
    for name in ("roles.sql", "schema.dump", "manifest.json",
                 *(o.name for o in full.objects if o.kind == "table-data")):
        tags = s3.get_object_tagging(Bucket=store.url.bucket,
                                     Key=store.backup_key(full.database_id, full.backup_id,
                                                          name))["TagSet"]
        assert {"Key": "retention", "Value": "monthly"} in tags
    assert apply_retention(store, store.manifests(full.database_id)) == []


@pytest.mark.parametrize("days", [1, 45, 400])
def test_nothing_is_ever_deleted_by_the_plan(days: int) -> None:
    history, classes = _simulate(days)
    assert set(classes) >= set(history[-1]["kept"])


def test_120_days_with_failed_runs_keep_every_listed_backup_restorable_and_classes_right(
) -> None:
    """Daily and weekly runs on a clock the test controls, one in six failing (no backup that
    day), with lifecycle each day. Incrementals rely on their base and on the previous
    incremental (which holds the data of tables that changed then)."""
    import random
    rng = random.Random(20261129)  # noqa: S311 - a reproducible schedule, not a secret
    failed = {day for day in range(120) if rng.random() < 1 / 6}
    kept: dict[str, Entry] = {}
    classes: dict[str, str] = {}
    fulls_taken: list[Entry] = []
    previous: Entry | None = None
    for day in range(120):
        now = START + timedelta(days=day)
        if day not in failed:
            chain_ok = previous is not None and previous.backup_id in kept and all(
                d in kept for d in previous.depends_on)
            if now.weekday() == 6 or not chain_ok:
                entry = Entry(f"{now:%Y%m%dT%H%M%SZ}-full", "full", "weekly", now, frozenset())
                fulls_taken.append(entry)
            else:
                assert previous is not None
                base = next(iter(previous.depends_on), previous.backup_id) \
                    if previous.kind == "incremental" else previous.backup_id
                needs = {base} | ({previous.backup_id} if previous.kind == "incremental" else set())
                entry = Entry(f"{now:%Y%m%dT%H%M%SZ}-incr", "incremental", "daily", now,
                              frozenset(needs))
            kept[entry.backup_id] = entry
            previous = entry
            classes = plan_retention(list(kept.values()), DAYS)
        for backup_id, entry in list(kept.items()):  # S3 lifecycle
            cls = classes.get(backup_id, entry.retention)
            if cls != "pinned" and now - entry.taken_at > timedelta(days=DAYS[cls]):
                del kept[backup_id]

        # every listed backup can be restored: all it relies on is still there
        for entry in kept.values():
            assert entry.depends_on <= kept.keys(), f"{now:%F}: {entry.backup_id} broken"
        # monthly: the first full of each month of the last year, exactly one per month
        months = {}
        for full in fulls_taken:
            if now - full.taken_at <= timedelta(days=DAYS["monthly"]):
                months.setdefault(full.taken_at.strftime("%Y-%m"), full.backup_id)
        monthly = sorted(b for b in kept if classes[b] == "monthly")
        assert monthly == sorted(months.values()), f"{now:%F}"
        # weekly: the four newest fulls are kept, whatever their age
        assert {f.backup_id for f in fulls_taken[-4:]} <= kept.keys(), f"{now:%F}"
        # daily: an incremental older than 14 days is kept only when pinned
        for entry in kept.values():
            if entry.kind == "incremental" and now - entry.taken_at > timedelta(days=14):
                assert classes[entry.backup_id] == "pinned", f"{now:%F}: {entry.backup_id}"
    assert len(failed) > 10 and len(fulls_taken) > 10  # the simulation did exercise both


def _two_fulls(cluster: Any, new_db: Any, store: Any) -> list[Any]:
    """Two weekly fulls of a month: the first becomes monthly; the second stays weekly
    unless lifecycle would expire it before four newer weekly fulls exist."""
    from supabackup.backup import BackupRequest, run_backup
    from supabackup.dburl import ConnectionInfo
    from supabackup.notify import Notifier
    from supabackup.report import backup_and_report
    db = new_db(cluster)
    cluster.execute("CREATE TABLE t (id int)", db)
    conn = ConnectionInfo.from_url(cluster.url(db))
    from supabackup.manifest import new_backup_id, utcnow
    first = run_backup(conn, store, BackupRequest(
        retention="weekly", backup_id=new_backup_id(utcnow() - timedelta(minutes=1), "full")))
    second, outcome = backup_and_report(conn, store, BackupRequest(retention="weekly"),
                                        Notifier(None))
    return [first, second, outcome]


@pytest.mark.parametrize("weekly_days, second", [(35, "weekly"), (1, "pinned")])
def test_the_retention_pass_reckons_by_the_days_the_stack_deployed(
        pg15: Any, new_db: Any, store: Any, s3: Any, weekly_days: int, second: str) -> None:
    """A stack deployed with WeeklyRetentionDays=1 deletes a weekly full a day after it is
    taken; with fewer than four newer weekly fulls, the pass must hold it. By a built-in
    35 days it would leave it weekly, and lifecycle would take it the next day."""
    s3.put_bucket_lifecycle_configuration(
        Bucket=store.url.bucket,
        LifecycleConfiguration={"Rules": lifecycle_rules({"WeeklyRetentionDays": weekly_days})})
    assert store.expiration_days() == {**DAYS, "weekly": weekly_days}  # capture's too
    first, full, outcome = _two_fulls(pg15, new_db, store)
    assert store.retention_tag(first) == "monthly"
    assert store.retention_tag(full) == second
    assert (f"{full.backup_id}: weekly -> pinned" in outcome.retention) == (second == "pinned")


def test_expiration_days_read_only_the_rules_that_expire_this_store(store: Any, s3: Any
                                                                     ) -> None:
    """Rules for another prefix, disabled ones and ones on other tags do not count; a
    bucket without rules expires nothing, so nothing is held against expiry."""
    assert store.expiration_days() == {}
    tag = {"Key": "retention", "Value": "daily"}
    s3.put_bucket_lifecycle_configuration(Bucket=store.url.bucket, LifecycleConfiguration={
        "Rules": [
            {"ID": "other-prefix", "Status": "Enabled", "Expiration": {"Days": 1},
             "Filter": {"And": {"Prefix": "elsewhere/", "Tags": [tag]}}},
            {"ID": "off", "Status": "Disabled", "Expiration": {"Days": 2},
             "Filter": {"Tag": tag}},
            {"ID": "other-tag", "Status": "Enabled", "Expiration": {"Days": 3},
             "Filter": {"Tag": {"Key": "team", "Value": "daily"}}},
            {"ID": "ours", "Status": "Enabled", "Expiration": {"Days": 9},
             "Filter": {"And": {"Prefix": "backups/", "Tags": [
                 {"Key": "retention", "Value": "weekly"}]}}},
        ]})
    assert store.expiration_days() == {"weekly": 9}
