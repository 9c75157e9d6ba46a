"""`supabackup status`: real backups, verifies, drills and capture, then the screen, the JSON
and the exit status; and each thing that needs a person, from a store made to show it.

The store is moto (in-process for the engine, its server on loopback for the CLI), the
databases real PostgreSQL. Ages are judged at a `now` of the test's choosing
(status.store_status takes one): the backups are real, and only the clock moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from supabackup import capture
from supabackup.backup import BackupRequest, run_backup
from supabackup.capture.drain import open_drain
from supabackup.capture.state import read_slot
from supabackup.capture.window import window
from supabackup.dburl import ConnectionInfo
from supabackup.errors import StoreError
from supabackup.manifest import Manifest, parse_time, utcnow
from supabackup.retention import KEEP_DAYS
from supabackup.status import Limits, age, screen, store_status
from supabackup.store import Store
from supabackup.verify import verify_database

from devkit.pg import SUPERUSER_PASSWORD, Cluster
from devkit.s3 import LocalS3

from .helpers import BUCKET, PASSWORD
from .test_cli import run

NO_CREATEDB = "sb_status_nocreatedb"


def _conn(cluster: Cluster, db: str = "postgres") -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _chain(cluster: Cluster, db: str, store: Store) -> tuple[Manifest, Manifest]:
    """A real full backup and an incremental on it (ids a second apart: they sort by time)."""
    cluster.execute("CREATE TABLE orders (id int PRIMARY KEY, note text);"
                    "INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 200) g", db)
    full = run_backup(_conn(cluster, db), store, BackupRequest())
    time.sleep(1.1)
    cluster.execute("INSERT INTO orders VALUES (201, 'later')", db)
    incr = run_backup(_conn(cluster, db), store, BackupRequest(kind="incremental"))
    assert (full.kind, incr.kind, incr.base) == ("full", "incremental", full.backup_id)
    return full, incr


def _status(store: Store, later: timedelta = timedelta(), limits: Limits | None = None,
            database_id: str | None = None) -> dict[str, Any]:
    return store_status(store, database_id, KEEP_DAYS, limits or Limits(),
                        now=utcnow() + later)


def _needs(store: Store, later: timedelta = timedelta(), limits: Limits | None = None
           ) -> list[str]:
    [database] = _status(store, later, limits)["databases"]
    return list(database["needs_attention"])


@pytest.fixture
def no_createdb(pg17: Cluster) -> Iterator[str]:
    """A drill URL whose user may log in but not create the drill's scratch database."""
    pg17.execute(f"DROP ROLE IF EXISTS {NO_CREATEDB}; "
                 f"CREATE ROLE {NO_CREATEDB} LOGIN PASSWORD '{PASSWORD}'")
    yield pg17.url(user=NO_CREATEDB, password=PASSWORD)
    pg17.execute(f"DROP ROLE IF EXISTS {NO_CREATEDB}")


# --- the whole picture, by the command line --------------------------------------------

def test_a_healthy_store_on_the_screen_and_as_json_exits_0(
        pg17: Cluster, new_db: Any, local_s3: LocalS3) -> None:
    local_s3.create_bucket("status-healthy")
    store = "s3://status-healthy/team"
    db = new_db(pg17)
    pg17.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 300)",
                 db)
    full = run(local_s3, "backup", "full", "--database-url", pg17.url(db), "--store", store)
    assert full.returncode == 0, full.stderr
    time.sleep(1.1)
    pg17.execute("INSERT INTO t VALUES (301)", db)
    incr = run(local_s3, "backup", "incremental", "--database-url", pg17.url(db),
               "--store", store)
    assert incr.returncode == 0, incr.stderr
    full_id, incr_id = full.stdout.split(":")[0], incr.stdout.split(":")[0]
    drilled = run(local_s3, "verify", "--store", store, "--drill-url", pg17.url())
    assert drilled.returncode == 0, drilled.stderr

    shown = run(local_s3, "status", "--store", store)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stderr == ""
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"{store} at ")
    assert lines[-1] == "healthy"
    text = shown.stdout
    assert f"  full         {full_id}  " in text and f"  incremental  {incr_id}  " in text
    assert f"  chain        {full_id} + 1 incremental(s)" in text
    assert "  capture      off" in text
    assert "  verify       ok, " in text and "(every backup: 2 verified, 0 problem(s))" in text
    assert "  drill        passed, " in text and f"({incr_id} on postgres@127.0.0.1:" in text
    assert "NEEDS A PERSON" not in text
    assert SUPERUSER_PASSWORD not in text

    as_json = run(local_s3, "status", "--json", SUPABACKUP_STORE=store)
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)
    assert found["healthy"] is True and found["needs_attention"] == []
    [database] = found["databases"]
    assert set(database) == {"database_id", "backups", "newest_full", "newest_incremental",
                             "chain", "capture", "verify", "drill", "needs_attention",
                             "healthy"}
    assert database["backups"] == 2 and database["capture"] is None
    assert database["newest_full"]["backup_id"] == full_id
    assert database["newest_incremental"]["backup_id"] == incr_id
    assert database["chain"] == {**database["chain"], "base": full_id, "newest": incr_id,
                                 "incrementals": 1, "missing": []}
    assert database["chain"]["span_seconds"] >= 1
    assert database["verify"]["ok"] is True and database["verify"]["verified"] == 2
    drill = database["drill"]
    assert (drill["ok"], drill["ran"], drill["backup_id"], drill["tables"], drill["rows"]) == (
        True, True, incr_id, 1, 301)
    assert drill["target"] == f"postgres@127.0.0.1:{pg17.port}/postgres"


def test_a_failed_drill_and_a_missing_base_need_a_person_and_exit_1(
        pg17: Cluster, new_db: Any, local_s3: LocalS3, no_createdb: str) -> None:
    local_s3.create_bucket("status-failed")
    store = "s3://status-failed/team"
    db = new_db(pg17)
    pg17.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    full = run(local_s3, "backup", "full", "--database-url", pg17.url(db), "--store", store)
    time.sleep(1.1)
    incr = run(local_s3, "backup", "incremental", "--database-url", pg17.url(db),
               "--store", store)
    full_id, incr_id = full.stdout.split(":")[0], incr.stdout.split(":")[0]
    failed = run(local_s3, "verify", "--store", store, "--drill-url", no_createdb)
    assert failed.returncode == 1

    shown = run(local_s3, "status", "--store", store)
    assert shown.returncode == 1, shown.stderr
    drill_line = (f"last drill failed: {incr_id}/drill: the restore failed: the drill could "
                  "not create a scratch database on ")
    assert f"  NEEDS A PERSON: {drill_line}" in shown.stdout
    assert f"  NEEDS A PERSON: last verify failed: {incr_id}/drill: " in shown.stdout
    assert "  drill        FAILED, " in shown.stdout
    assert shown.stdout.splitlines()[-1] == "2 thing(s) need a person"
    assert PASSWORD not in shown.stdout

    local_s3.client().delete_object(
        Bucket="status-failed", Key=f"team/{_only_database(local_s3, store)}/backups/"
                                    f"{full_id}/manifest.json")
    found = json.loads(run(local_s3, "status", "--store", store, "--json").stdout)
    needs = found["databases"][0]["needs_attention"]
    assert "no full backup on record" in needs
    assert (f"the chain's base {full_id} is missing: the newest backup {incr_id} cannot be "
            "restored (the next backup starts a new chain)") in needs


def _only_database(local_s3: LocalS3, store: str) -> str:
    listed = json.loads(run(local_s3, "list", "--store", store, "--json").stdout)
    return str(listed[0]["database_id"])


def test_a_store_that_cannot_be_read_is_one_line_on_stderr(local_s3: LocalS3) -> None:
    result = run(local_s3, "status", "--store", "s3://no-such-bucket-status/p")
    assert result.returncode == StoreError.exit_code
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("supabackup: error: ") and "NoSuchBucket" in line
    bad = run(local_s3, "status", "--store", "ftp://b")
    assert bad.returncode == 2 and "is not an s3://BUCKET/PREFIX address" in bad.stderr
    bad = run(local_s3, "status", "--store", "s3://b/p", "--missed-backup-hours", "0")
    assert bad.returncode == 2 and "--missed-backup-hours must be more than 0" in bad.stderr


def test_an_empty_store_needs_a_person(local_s3: LocalS3) -> None:
    local_s3.create_bucket("status-empty")
    shown = run(local_s3, "status", "--store", "s3://status-empty/nothing")
    assert shown.returncode == 1, shown.stderr
    assert ("NEEDS A PERSON: no backups in s3://status-empty/nothing (none taken yet, or the "
            "wrong --store)") in shown.stdout
    found = json.loads(run(local_s3, "status", "--store", "s3://status-empty/nothing",
                           "--json").stdout)
    assert (found["healthy"], found["databases"]) == (False, [])


# --- the engine: every finding, from a store made to show it ------------------------------

def test_two_databases_each_get_their_screen(pg17: Cluster, new_db: Any, store: Store) -> None:
    first, second = new_db(pg17), new_db(pg17)
    _chain(pg17, first, store)
    pg17.execute("CREATE TABLE x (id int)", second)
    only = run_backup(_conn(pg17, second), store, BackupRequest())
    verify_database(store, only.database_id)
    found = _status(store)
    ids = [d["database_id"] for d in found["databases"]]
    assert ids == sorted([_conn(pg17, first).database_id, only.database_id])
    by_id = {d["database_id"]: d for d in found["databases"]}
    assert by_id[only.database_id]["healthy"] is True
    assert by_id[only.database_id]["newest_incremental"] is None
    assert by_id[_conn(pg17, first).database_id]["needs_attention"] == ["no verify on record"]
    assert found["healthy"] is False
    lines = screen(found)
    assert lines.count("") == 3 and lines[-1] == "1 thing(s) need a person"
    assert "  NEEDS A PERSON: no verify on record" in lines
    assert "  incremental  none" in lines
    one = _status(store, database_id=only.database_id)
    assert [d["database_id"] for d in one["databases"]] == [only.database_id]
    assert one["healthy"] is True


def test_old_backups_need_a_person_by_the_schedules_limits(
        pg17: Cluster, new_db: Any, store: Store) -> None:
    full, _ = _chain(pg17, new_db(pg17), store)
    verify_database(store, full.database_id)
    assert _needs(store) == []
    assert _needs(store, timedelta(hours=25)) == []  # the daily schedule, with its margin
    assert _needs(store, timedelta(hours=30)) == ["no backup for 30 hours"]
    assert _needs(store, timedelta(days=9)) == [
        f"no full backup for 9 days (the newest is {full.backup_id})", "no backup for 9 days",
        "no verify for 9 days"]
    # a stack with other schedules passes its own limits
    assert _needs(store, timedelta(days=9), Limits(backup=timedelta(days=30),
                                                   verify=timedelta(days=30))) == [
        f"no full backup for 9 days (the newest is {full.backup_id})"]
    assert _needs(store, timedelta(hours=30), Limits(backup=timedelta(hours=48))) == []


def test_no_verify_a_failed_verify_and_an_old_one(pg17: Cluster, new_db: Any, store: Store,
                                                   s3: Any) -> None:
    full, incr = _chain(pg17, new_db(pg17), store)
    assert _needs(store) == ["no verify on record"]
    for damaged in (full, incr):
        s3.put_object(Bucket=BUCKET, Key=store.backup_key(damaged.database_id, damaged.backup_id,
                                                          "roles.sql"), Body=b"-- tampered\n")
    assert not verify_database(store, full.database_id).ok
    [needs] = _needs(store)
    assert needs.startswith(f"last verify failed: {full.backup_id}/roles.sql: size 12 bytes, "
                            "the manifest says ")
    assert needs.endswith(" (and 1 more problem(s))")
    time.sleep(1.1)  # one record per second
    verify_database(store, incr.database_id, backup_id=incr.backup_id)
    [database] = _status(store)["databases"]
    assert database["verify"]["backup"] == incr.backup_id  # the newest record counts
    assert _needs(store, timedelta(days=8)) == [
        f"no full backup for 8 days (the newest is {full.backup_id})", "no backup for 8 days",
        needs, "no verify for 8 days"]


def test_a_drill_that_failed_needs_a_person_until_one_passes(
        pg17: Cluster, new_db: Any, store: Store, no_createdb: str) -> None:
    _, incr = _chain(pg17, new_db(pg17), store)
    verify_database(store, incr.database_id, drill=ConnectionInfo.from_url(no_createdb))
    needs = _needs(store)
    assert len(needs) == 2 and needs[0].startswith("last verify failed: ")
    assert needs[1].startswith(f"last drill failed: {incr.backup_id}/drill: the restore "
                               "failed: the drill could not create a scratch database on "
                               f"{NO_CREATEDB}@127.0.0.1:{pg17.port}/postgres")
    time.sleep(1.1)
    verify_database(store, incr.database_id)  # no drill: the failed one is still the last
    assert [n.split(":")[0] for n in _needs(store)] == ["last drill failed"]
    time.sleep(1.1)
    verify_database(store, incr.database_id, drill=_conn(pg17))
    assert _needs(store) == []
    assert _needs(store, timedelta(days=8), Limits(backup=timedelta(days=30),
                                                   full=timedelta(days=30))) == [
        "no verify for 8 days", "no restore drill for 8 days"]


def test_damaged_records_are_named_and_do_not_hide_the_rest(
        pg17: Cluster, new_db: Any, store: Store, s3: Any) -> None:
    full, incr = _chain(pg17, new_db(pg17), store)
    verify_database(store, full.database_id)
    newest = max(store.list_keys(store.key(full.database_id, "checks") + "/"))
    later = newest.replace(newest.rsplit("/", 1)[-1], "29991231T000000Z.json")
    s3.put_object(Bucket=BUCKET, Key=later, Body=b'{"ok": "yes"}')
    manifest = store.backup_key(full.database_id, incr.backup_id, "manifest.json")
    s3.put_object(Bucket=BUCKET, Key=manifest, Body=b"{ not json")
    needs = _needs(store)
    assert needs[0].startswith(f"a manifest cannot be read: {manifest} is damaged")
    assert needs[1].startswith(f"a check record cannot be read: {later} is damaged: the "
                               "check record's ok is str 'yes'")
    assert len(needs) == 2  # the older record still counts as the last verify


def test_age_reads_as_people_say_it() -> None:
    assert [age(s) for s in (40, 119, 14 * 60, 2 * 3600, 30 * 3600, 9 * 86400 + 5)] == [
        "40 seconds", "119 seconds", "14 minutes", "2 hours", "30 hours", "9 days"]


# --- change capture -----------------------------------------------------------------------

def test_capture_window_lag_and_the_slots_reading(logical: Cluster, store: Store,
                                                  request: pytest.FixtureRequest) -> None:
    db = f"st_{request.node.callspec.id.replace('-', '_')}"
    logical.drop_database(db)
    logical.create_database(db)
    try:
        logical.execute("CREATE TABLE accounts (id int PRIMARY KEY, v text);"
                        "INSERT INTO accounts SELECT g, 'v' FROM generate_series(1, 50) g", db)
        conn = _conn(logical, db)
        state, base = capture.start(conn, store, BackupRequest())
        logical.execute("INSERT INTO accounts SELECT g, 'w' FROM generate_series(51, 90) g", db)
        assert capture.run(conn, store, base.database_id).segment is not None
        verify_database(store, base.database_id)
        reading = read_slot(store, base.database_id, state.slot)
        assert reading is not None and reading.found and reading.retained_wal_bytes > 0

        found = _status(store)
        [database] = found["databases"]
        assert database["needs_attention"] == [] and found["healthy"]
        seen = database["capture"]
        stored = window(store, base.database_id, KEEP_DAYS, utcnow())
        assert stored.latest is not None and stored.earliest is not None
        assert seen["window"]["latest"] == stored.latest.isoformat()
        assert seen["window"]["earliest"] == stored.earliest.isoformat()
        assert seen["running"] and seen["epoch"]["slot"] == state.slot
        assert 0 <= seen["lag_seconds"] < 60
        [slot] = seen["slots"]
        assert slot["slot"] == state.slot and slot["reading"]["found"]
        assert slot["reading"]["retained_wal_bytes"] == reading.retained_wal_bytes
        text = "\n".join(screen(found))
        assert f"  slot         {state.slot}: holds " in text
        assert f"  point in time {_at(stored.earliest)} to {_at(stored.latest)} (" in text

        # two hours without a capture run
        lag = _needs(store, timedelta(hours=2))
        assert lag == [f"capture is 2 hours behind (restores to a time reach "
                       f"{_at(stored.latest)}; is `cdc run` running?)"]
        # a slot holding more than the stack's alarm allows (no cap on this server)
        held = _needs(store, limits=Limits(retained_wal=1))
        assert held == [f"slot {state.slot} holds {_human(reading.retained_wal_bytes)} of WAL, "
                        "with no cap (max_slot_wal_keep_size is unset: it grows until the "
                        f"disk is full; as of {_at(parse_time(reading.read_at))})"]

        # a server that caps the slot (Supabase: 512 MB): how much of the cap it holds
        logical.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '512MB'")
        logical.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        capture.run(conn, store, base.database_id)
        capped = read_slot(store, base.database_id, state.slot)
        assert capped is not None and capped.safe_wal_size is not None
        [line] = _needs(store, limits=Limits(safe_wal=1 << 30))
        assert line.startswith(f"slot {state.slot} holds {_human(capped.retained_wal_bytes)} "
                               f"of {_human(capped.retained_wal_bytes + capped.safe_wal_size)} "
                               "(max_slot_wal_keep_size; as of ")
        assert _needs(store) == []  # far from the cap by the stack's own limits

        # a slot that is gone when a run opens it (dropped by hand; the run died after)
        logical.execute(f"SELECT pg_drop_replication_slot('{state.slot}')", db)
        drain, reason, _ = open_drain(conn, store, base.database_id, None)
        assert drain is None and "is gone" in reason
        [gone] = _needs(store)
        assert gone.startswith(f"slot {state.slot} was gone (as of ")
    finally:
        logical.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        logical.execute("SELECT pg_reload_conf()")
        logical.drop_database(db)


def _at(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _human(n: int) -> str:
    from supabackup.notify import human_bytes
    return human_bytes(n)

