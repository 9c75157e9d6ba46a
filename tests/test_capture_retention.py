"""A point-in-time window retention cannot break: every epoch base a restore to a time of
the last keep_days days needs is held (pinned), and older ones go back to their class.

First as pure functions over a simulated month of backups, epochs and lifecycle runs
(as test_retention.py does for backups); then on a real PostgreSQL with capture, the
moto bucket carrying the stack's lifecycle rules.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from supabackup import capture, cli
from supabackup.backup import BackupRequest
from supabackup.capture.pointintime import covering
from supabackup.capture.state import CaptureState, Progress, read_progress, segments_of
from supabackup.capture.window import window, window_of
from supabackup.catalog import restore_point
from supabackup.dburl import ConnectionInfo
from supabackup.errors import BackupNotFound, CaptureError, ConfigError, StoreError
from supabackup.manifest import iso, parse_time
from supabackup.notify import Notifier
from supabackup.report import capture_and_report
from supabackup.retention import (
    FOREVER,
    KEEP_DAYS,
    Entry,
    apply_retention,
    capture_needs,
    checked_keep_days,
    plan_retention,
)
from supabackup.store import Store

from devkit.compare import table_fingerprints
from devkit.pg import Cluster

from .helpers import FakeContext, lifecycle_rules, retention_days
from .helpers import restore_at as _restore_at
from .helpers import server_now as _now

K = 7
DAYS = retention_days()  # as the template deploys them by default
START = datetime(2026, 3, 1, tzinfo=UTC)  # a Sunday


# --- pure: a simulated month -------------------------------------------------------------

def _epoch(n: int, base: Entry) -> CaptureState:
    return CaptureState(slot="s", plugin="wal2json", base=base.backup_id,
                        start_lsn=f"0/{n:X}000000", base_at=iso(base.taken_at))


def _full(at: datetime) -> Entry:
    return Entry(f"{at:%Y%m%dT%H%M%SZ}-full", "full", "weekly", at, frozenset())


def _covering(history: list[tuple[CaptureState, Progress]], when: datetime) -> CaptureState:
    return [e for e, _ in history if parse_time(e.base_at) <= when][-1]


def _end(history: list[tuple[CaptureState, Progress]], i: int) -> datetime:
    """Where an ended epoch reaches: its progress, or the next base if that is later."""
    progress = history[i][1]
    return max(parse_time(progress.verified_at), parse_time(history[i + 1][0].base_at))


def test_over_a_simulated_month_every_time_of_the_last_k_days_keeps_its_base() -> None:
    """Daily incrementals, weekly fulls on Sundays, and change capture whose epochs end
    every few days by a schema change, and hand over to a new base (a rebase, no gap) once
    their base is a day old; each new epoch's base a weekly full of its own. The
    retention pass after each backup and each new epoch, lifecycle every midnight. At
    every simulated day, each hour of [now - K, now] has its epoch's base stored, and the
    bases of epochs that ended more than K days ago are released to their own class."""
    lengths = itertools.cycle([3, 2, 4, 5, 1, 3, 2])  # days between schema changes
    kept: dict[str, Entry] = {}
    classes: dict[str, str] = {}
    history: list[tuple[CaptureState, Progress]] = []
    lsns = itertools.count(1)
    released: set[str] = set()
    rebases = 0

    def backup(entry: Entry) -> None:
        kept[entry.backup_id] = entry

    def retention_pass(now: datetime) -> None:
        nonlocal classes
        epoch, progress = history[-1]  # capture runs on: the running epoch reaches now
        history[-1] = (epoch, replace(progress, verified_at=iso(now)))
        needs = capture_needs(history, now, K)
        classes = plan_retention(list(kept.values()), DAYS, needs)
        plain = plan_retention(list(kept.values()), DAYS)
        for i, (epoch, _) in enumerate(history):
            if epoch.base not in kept:
                continue
            if i + 1 < len(history) and _end(history, i) + timedelta(days=K) <= now:
                # ended more than K days ago: back to its own class, no longer pinned
                assert epoch.base not in needs, f"{now}: {epoch.base}"
                assert classes[epoch.base] == plain[epoch.base] != "pinned", f"{now}"
                released.add(epoch.base)
            else:
                assert classes[epoch.base] == "pinned", f"{now}: {epoch.base} is needed"

    def new_epoch(at: datetime) -> None:
        base = _full(at)
        backup(base)
        history.append((_epoch(next(lsns), base), Progress(verified_lsn="0/0",
                                                           verified_at=iso(at))))
        retention_pass(at)

    new_epoch(START + timedelta(hours=1))  # cdc start
    next_change = START + timedelta(days=next(lengths), hours=14)
    for day in range(45):
        midnight = START + timedelta(days=day)
        # S3 lifecycle at midnight: objects older than their tag's days go
        for backup_id, entry in list(kept.items()):
            cls = classes.get(backup_id, entry.retention)
            if cls != "pinned" and midnight - entry.taken_at > timedelta(days=DAYS[cls]):
                del kept[backup_id]
        # every hour of [now - K, now] that capture has begun: its epoch's base is stored
        first = parse_time(history[0][0].base_at)
        for hours in range(K * 24 + 1):
            when = midnight - timedelta(hours=hours)
            if when >= first:
                assert _covering(history, when).base in kept, f"{midnight}: {when}"
        # the scheduled backup: a full on Sundays, else an incremental on the newest chain
        at = midnight + timedelta(hours=3)
        parent = max(kept.values(), key=lambda e: e.taken_at)
        if at.weekday() == 6:
            backup(_full(at))
        else:
            base = next(iter(parent.depends_on - {parent.backup_id}), parent.backup_id) \
                if parent.kind == "incremental" else parent.backup_id
            backup(Entry(f"{at:%Y%m%dT%H%M%SZ}-incr", "incremental", "daily", at,
                         frozenset({base, parent.backup_id})))
        retention_pass(at)
        # a rebase: the old epoch drains past the new base, then hands over
        rebase = midnight + timedelta(hours=4)
        if rebase - parse_time(history[-1][0].base_at) >= timedelta(days=1):
            epoch, progress = history[-1]
            history[-1] = (epoch, replace(progress, ended="handed over to the epoch",
                                          verified_at=iso(rebase + timedelta(minutes=1))))
            new_epoch(rebase)
            rebases += 1
        # a schema change ends the epoch at its last check; the next run takes a new base
        if next_change.date() == midnight.date():
            epoch, progress = history[-1]
            history[-1] = (epoch, replace(progress, ended="the schema changed",
                                          verified_at=iso(next_change)))
            new_epoch(next_change + timedelta(minutes=5))
            next_change += timedelta(days=next(lengths))
    # the simulation did exercise it: many epochs, bases released, and lifecycle took some
    bases = {e.base for e, _ in history}
    assert len(history) > 30 and rebases > 15 and len(released) > 20
    assert bases - kept.keys(), "lifecycle never took a released base"
    assert not (bases - kept.keys()) - released, "a base went that was never released"


def test_capture_needs_holds_the_running_epoch_and_an_ended_one_for_k_days() -> None:
    first, second = _full(START), _full(START + timedelta(days=2))
    one, two = _epoch(1, first), _epoch(2, second)
    ended = Progress("0/0", iso(START + timedelta(days=1)), ended="the schema changed")
    running = Progress("0/0", iso(START + timedelta(days=3)))
    history = [(one, ended), (two, running)]
    # the first epoch reaches to the second's base (later than its own progress)
    assert capture_needs(history, START + timedelta(days=3), K) == {
        first.backup_id: START + timedelta(days=2 + K), second.backup_id: FOREVER}
    assert capture_needs(history, START + timedelta(days=2 + K), K) == {
        second.backup_id: FOREVER}
    # a dropped capture (no epoch runs) is held until its end is K days old, then let go
    dropped = [(one, ended), (two, replace(running, ended="capture dropped"))]
    assert capture_needs(dropped, START + timedelta(days=3 + K - 1), K) == {
        second.backup_id: START + timedelta(days=3 + K)}
    assert capture_needs(dropped, START + timedelta(days=3 + K), K) == {}
    # an epoch without a progress record is kept while it is the last
    assert capture_needs([(one, None)], START + timedelta(days=400), K) == {
        first.backup_id: FOREVER}
    # a needed base is pinned whatever its class; no longer needed, it is its own again
    plan = plan_retention([first, second], DAYS, {first.backup_id: FOREVER})
    assert plan == {first.backup_id: "pinned", second.backup_id: "weekly"}
    assert plan_retention([first, second], DAYS, {})[first.backup_id] == "monthly"


def test_the_window_leaves_out_epochs_whose_base_is_gone_and_says_where_the_promise_starts(
) -> None:
    first, second, third = (_full(START + timedelta(days=d)) for d in (0, 2, 4))
    history = [(_epoch(1, first), Progress("0/0", iso(START + timedelta(days=1)),
                                           ended="the schema changed")),
               (_epoch(2, second), Progress("0/0", iso(START + timedelta(days=3)),
                                            ended="the schema changed")),
               (_epoch(3, third), Progress("0/0", iso(START + timedelta(days=5))))]
    now = START + timedelta(days=5)
    whole = window_of(history, keep_days=K, now=now)
    assert whole.earliest == START and len(whole.gaps) == 2
    assert whole.promised_from == now - timedelta(days=K)
    shown = whole.as_dict()
    assert {"earliest", "latest", "gaps", "keep_days", "promised_from"} <= shown.keys()
    assert shown["keep_days"] == K
    gone = window_of(history, {first.backup_id})
    assert gone.earliest == START + timedelta(days=2) and len(gone.gaps) == 1
    assert gone.as_dict()["promised_from"] is None
    middle = window_of(history, {second.backup_id})
    assert [g.why for g in middle.gaps] == [f"the base backup {second.backup_id} is gone"]
    assert window_of(history, {first.backup_id, second.backup_id, third.backup_id}
                     ).describe().startswith("no time")


# --- keep-days: validated where it is read ------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3", "1.5", "seven", " ", None, 7, "14"])
def test_keep_days_is_a_whole_number_of_at_least_one(value: Any) -> None:
    if value in (" ", None):
        assert checked_keep_days(value) == KEEP_DAYS
    elif value in (7, "14"):
        assert checked_keep_days(value) == int(value)
    else:
        with pytest.raises(ConfigError, match=r"--keep-days must be a whole number of days, "
                                              r"1 or more"):
            checked_keep_days(value)


@pytest.mark.parametrize("argv, env", [
    (["backup", "full", "--keep-days", "0"], {}),
    (["cdc", "status", "--keep-days", "x"], {}),
    (["cdc", "run"], {"SUPABACKUP_KEEP_DAYS": "-1"}),
], ids=["backup flag", "cdc flag", "cdc environment"])
def test_the_command_line_refuses_a_bad_keep_days_with_one_line(
        argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main([*argv, "--database-url", "postgresql://u@db.invalid/app",
                     "--store", "s3://nowhere/prefix"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--keep-days (or $SUPABACKUP_KEEP_DAYS) must be a whole number" in err


@pytest.mark.parametrize("handler", ["backup", "capture"])
def test_the_functions_refuse_a_bad_keep_days_in_their_environment(
        handler: str, aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from supabackup.handlers import common

    from .helpers import load_event
    monkeypatch.setattr(common, "clients", {})
    monkeypatch.setenv("SUPABACKUP_KEEP_DAYS", "0")
    module = importlib.import_module(f"supabackup.handlers.{handler}")
    event = load_event("backup-full-manual.json" if handler == "backup"
                       else "capture-scheduled.json")
    with pytest.raises(ConfigError, match="SUPABACKUP_KEEP_DAYS must be a whole number"):
        module.handler(event, FakeContext())


# --- real: capture on PostgreSQL, three epochs --------------------------------------------


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


SCHEMA = """
    CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2));
    CREATE TABLE scratch (k text PRIMARY KEY, v int);
    INSERT INTO accounts SELECT g, 'owner ' || g, g * 10.5 FROM generate_series(1, 20) g;
"""

ROUNDS = [
    "UPDATE accounts SET balance = balance + 1 WHERE id <= 5;"
    "INSERT INTO scratch VALUES ('one', 1), ('two', 2)",
    "DELETE FROM accounts WHERE id > 15; INSERT INTO scratch (k, v, a) VALUES ('three', 3, 'x')",
    "UPDATE scratch SET v = v * 10, b = 'y' WHERE k <> 'one'; TRUNCATE accounts",
]
DDL = ["ALTER TABLE scratch ADD COLUMN a text", "ALTER TABLE scratch ADD COLUMN b text"]


def test_retention_releases_the_epoch_outside_the_window_and_restores_in_it_stay_exact(
        logical: Cluster, store: Store, s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the stack's lifecycle rules on the bucket, and capture through three epochs
    # (each schema change starts one: capture_and_report runs the retention pass then)
    s3.put_bucket_lifecycle_configuration(
        Bucket=store.url.bucket, LifecycleConfiguration={"Rules": lifecycle_rules()})
    db = "cdc_keep"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(SCHEMA, db)
    _, first = capture.start(_conn(logical, db), store, BackupRequest(retention="weekly"))
    database_id = first.database_id
    states: list[tuple[datetime, dict[str, Any]]] = []
    for i, statements in enumerate(ROUNDS):
        logical.execute(statements, db)
        states.append((_now(logical, db), table_fingerprints(logical.url(db))))
        time.sleep(0.05)
        assert capture.run(_conn(logical, db), store, database_id).segment is not None
        if i < len(DDL):
            time.sleep(1.1)  # backup ids have one-second resolution: a base needs its own
            logical.execute(DDL[i], db)
            ran = capture_and_report(_conn(logical, db), store, database_id, Notifier(None),
                                     keep_days=K)
            assert ran.restarted == "the schema changed"
    history = [(e, read_progress(store, database_id, e))
               for e in capture.epochs(store, database_id)]
    assert len(history) == 3
    bases = {m.backup_id: m for m in store.manifests(database_id)}
    assert all(store.retention_tag(bases[e.base]) == "pinned" for e, _ in history)

    # WHEN retention runs at a time that puts the first epoch just outside the window
    first_end = max(parse_time(history[0][1].verified_at), parse_time(history[1][0].base_at))
    now = first_end + timedelta(days=K, milliseconds=1)
    changes = apply_retention(store, list(bases.values()), keep_days=K, now=now)

    # THEN its base goes back to its own class (the month's first full: monthly); the
    # bases the window needs stay pinned
    released = store.retention_tag(bases[history[0][0].base])
    assert released in ("monthly", "weekly")
    assert [str(c) for c in changes] == [f"{history[0][0].base}: pinned -> {released}"]
    assert [store.retention_tag(bases[e.base]) for e, _ in history[1:]] == ["pinned"] * 2
    assert apply_retention(store, list(bases.values()), keep_days=K, now=now) == []
    # and times inside the window restore exactly
    promised = window(store, database_id, keep_days=K, now=now)
    assert promised.promised_from == now - timedelta(days=K)
    inside = [(when, tables) for when, tables in states[1:]]
    assert all(when + timedelta(days=K) > now for when, _ in inside)
    for i, (when, tables) in enumerate(inside):
        assert restore_point(store, database_id, iso(when)).replay
        assert _restore_at(logical, store, database_id, when, f"cdc_keep_{i}") == tables, i

    # WHEN lifecycle deletes the released base's objects
    prefix = store.backup_key(database_id, history[0][0].base) + "/"
    for key in store.list_keys(prefix):
        store.delete_key(key)
    # THEN the window starts at the next epoch's base, and a time in the first epoch is
    # refused with one line naming the window
    left = window(store, database_id)
    assert left.earliest == parse_time(history[1][0].base_at)
    reach = f"reaches from {left.earliest.isoformat()} to {left.latest.isoformat()}"
    with pytest.raises(ConfigError) as refused:
        _restore_at(logical, store, database_id, states[0][0], "cdc_keep_gone")
    assert reach in refused.value.message and "is outside it" in refused.value.message
    assert "\n" not in str(refused.value)
    # `--at` that time: no longer capture's, and no backup at or before it is left
    with pytest.raises(BackupNotFound) as none_left:
        restore_point(store, database_id, iso(states[0][0]))
    assert reach in none_left.value.message and "\n" not in str(none_left.value)
    # a time later than capture reached names the window too
    with pytest.raises(CaptureError, match=r"covers times up to .* \(from "
                                           + re.escape(left.earliest.isoformat())):
        _restore_at(logical, store, database_id, states[-1][0] + timedelta(hours=1),
                    "cdc_keep_late")
    # and `cdc status` shows the window as retention left it, with the promise
    code = cli.main(["cdc", "status", "--json", "--database-url", logical.url(db),
                     "--store", str(store.url), "--database-id", database_id,
                     "--keep-days", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    shown = json.loads(out)["window"]
    assert parse_time(shown["earliest"]) == left.earliest and shown["keep_days"] == 3
    assert parse_time(shown["promised_from"]) < parse_time(shown["latest"])

    # WHEN lifecycle expires the oldest captured changes of an epoch (by age, as the
    # capture rule does) while later ones stay
    logical.execute("INSERT INTO scratch (k, v) VALUES ('four', 4)", db)
    latest = capture.run(_conn(logical, db), store, database_id).covered_through
    assert latest is not None
    oldest = segments_of(capture.segments(store, database_id), history[2][0])[0]
    store.delete_key(oldest.key)
    store.delete_key(oldest.key.replace("/segments/", "/index/").replace(".jsonl.gz", ".json"))
    # THEN a restore that would replay around the hole refuses, naming it, restoring nothing
    with pytest.raises(StoreError, match="cannot be restored exactly: captured changes of "
                                         ".* are gone from the store") as holed:
        covering(store, database_id, latest)
    assert "\n" not in str(holed.value)
    capture.drop(_conn(logical, db), store, database_id)
