"""Change capture and point-in-time restore, against a real logical replication slot.

Both plugins: wal2json on PostgreSQL 15 from Debian (postgresql-15-wal2json), and pgoutput
on the pinned PostgreSQL 17, which has no wal2json (the fallback). wal_level=logical.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from supabackup import cdc
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError
from supabackup.manifest import parse_time
from supabackup.store import Store

from devkit.compare import table_fingerprints
from devkit.pg import Cluster, logical_cluster


@pytest.fixture(scope="module", params=[(15, "wal2json"), (17, "pgoutput")],
                ids=["pg15-wal2json", "pg17-pgoutput"])
def logical(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    major, plugin = request.param
    cluster = logical_cluster(major)  # wal_level=logical, adapted to the server's release
    cluster.plugin = plugin  # type: ignore[attr-defined]
    yield cluster
    cluster.stop()


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _now(cluster: Cluster, db: str) -> datetime:
    (ts,) = cluster.execute("SELECT clock_timestamp()", db)[0]
    return ts  # type: ignore[no-any-return]


def _restore_at(cluster: Cluster, store: Store, database_id: str, when: datetime,
                name: str) -> dict[str, Any]:
    cluster.drop_database(name)
    cluster.create_database(name)
    cdc.restore_to_time(store, database_id, _conn(cluster, name), when)
    return table_fingerprints(cluster.url(name))


SCHEMA = """
    CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2));
    CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         account int REFERENCES accounts, note text, at timestamptz,
                         tags text[], doc jsonb);
    CREATE TABLE scratch (k text PRIMARY KEY, v int);
    CREATE TABLE "O'Brien's items" (id serial PRIMARY KEY, "Label" text);
    INSERT INTO accounts SELECT g, 'owner ' || g, g * 10.5 FROM generate_series(1, 50) g;
"""

ROUNDS = [
    """INSERT INTO events (account, note, at, tags, doc)
         SELECT g, 'opened', '2026-01-01 00:00+00', ARRAY['a', 'b'], '{"x": 1}'
         FROM generate_series(1, 20) g;
       UPDATE accounts SET balance = balance + 1 WHERE id <= 10;
       INSERT INTO scratch VALUES ('one', 1), ('two', 2);
       INSERT INTO "O'Brien's items" ("Label") VALUES ('a ''quoted'' label'), (NULL);""",
    """DELETE FROM events WHERE account > 15;
       UPDATE accounts SET owner = 'renamed ''quoted''' WHERE id = 3;
       INSERT INTO scratch VALUES ('three', 3);""",
    """TRUNCATE scratch;
       INSERT INTO scratch VALUES ('after truncate', 9);
       UPDATE events SET doc = '{"x": 2, "y": [1, 2]}', tags = NULL WHERE account = 1;""",
]


def test_restore_at_each_time_equals_the_source_as_it_was_then(
        logical: Cluster, new_db: Any, store: Store) -> None:
    # GIVEN capture started on a database (slot and aligned base in one snapshot)
    db = "cdc_source"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(SCHEMA, db)
    state, base = cdc.start(_conn(logical, db), store, BackupRequest())
    assert state.base == base.backup_id and base.kind == "full"
    assert state.plugin == logical.plugin  # type: ignore[attr-defined]
    # WHEN writers commit in rounds, captured after each, and the time after each is noted
    expected: list[tuple[datetime, dict[str, Any]]] = []
    for statements in ROUNDS:
        logical.execute(statements, db)
        expected.append((_now(logical, db), table_fingerprints(logical.url(db))))
        time.sleep(0.05)
        assert cdc.run(_conn(logical, db), store, base.database_id).segment is not None
    # THEN a restore at each time equals the source at that time, table by table
    for i, (when, tables) in enumerate(expected):
        assert _restore_at(logical, store, base.database_id, when, f"cdc_at_{i}") == tables, i
    # and a time before the first round gives the base
    first = parse_time(cdc.segments(store, base.database_id)[0].first_commit_time)
    before = _restore_at(logical, store, base.database_id, first - timedelta(microseconds=1),
                         "cdc_at_base")
    assert before["public.scratch"][0] == 0 and before["public.events"][0] == 0


def test_a_run_that_dies_before_advancing_the_slot_duplicates_nothing(
        logical: Cluster, store: Store) -> None:
    db = "cdc_crash"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(SCHEMA, db)
    _, base = cdc.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)

    def crash(segment: cdc.Segment) -> None:
        raise RuntimeError("killed after the upload, before the slot advanced")

    with pytest.raises(RuntimeError):
        cdc.run(_conn(logical, db), store, base.database_id, after_upload=crash)
    logical.execute(ROUNDS[1], db)
    # the next run stores the first round's transactions again, with the second's
    again = cdc.run(_conn(logical, db), store, base.database_id).segment
    assert again is not None and again.transactions == 2
    assert len(cdc.segments(store, base.database_id)) == 2
    last = cdc.run(_conn(logical, db), store, base.database_id)
    assert last.segment is None and last.covered_through is not None  # advanced
    # each stored transaction carries its xid, commit LSN and commit time
    import gzip
    raw = store.read_small(again.key)
    assert raw is not None
    first = json.loads(gzip.decompress(raw).splitlines()[0])
    assert int(first["xid"]) > 0 and "/" in first["commit_lsn"] and first["commit_time"]
    when = last.covered_through
    assert _restore_at(logical, store, base.database_id, when, "cdc_crash_restored") == \
        table_fingerprints(logical.url(db))


def _fresh(cluster: Cluster, name: str) -> str:
    cluster.drop_database(name)
    cluster.create_database(name)
    cluster.execute(SCHEMA, name)
    return name


def test_a_schema_change_starts_a_new_epoch_and_restores_work_on_both_sides(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_ddl")
    _, base = cdc.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)
    checked = cdc.run(_conn(logical, db), store, base.database_id).covered_through
    assert checked is not None
    before_ddl = (checked, table_fingerprints(logical.url(db)))
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    # DDL in the middle of the stream, rows that use it, and a capture run
    logical.execute("ALTER TABLE scratch ADD COLUMN note text DEFAULT 'new';"
                    "INSERT INTO scratch VALUES ('with note', 4, 'hello')", db)
    in_window = _now(logical, db)
    captured = cdc.run(_conn(logical, db), store, base.database_id)
    assert captured.restarted == "the schema changed" and not captured.lost
    # a time between the last check and the new base: the DDL's moment is unknown
    with pytest.raises(cdc.CaptureError, match="cannot be restored exactly") as refused:
        _restore_at(logical, store, base.database_id, in_window, "cdc_ddl_window")
    assert "choose a time at or before" in refused.value.hint
    epochs = cdc.epochs(store, base.database_id)
    assert len(epochs) == 2 and epochs[1].base != base.backup_id
    logical.execute(ROUNDS[1], db)
    after = (_now(logical, db), table_fingerprints(logical.url(db)))
    time.sleep(0.05)
    assert cdc.run(_conn(logical, db), store, base.database_id).segment is not None
    for i, (when, tables) in enumerate([before_ddl, after]):
        assert _restore_at(logical, store, base.database_id, when, f"cdc_ddl_{i}") == tables, i


def test_a_lost_slot_starts_a_new_base_and_says_changes_were_lost(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_lost")
    state, base = cdc.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)
    logical.execute(f"SELECT pg_drop_replication_slot('{state.slot}')", db)  # by hand
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    lost = cdc.run(_conn(logical, db), store, base.database_id)
    assert lost.lost and "is gone" in lost.restarted
    after = cdc.read_state(store, base.database_id)
    assert after is not None and after.base != base.backup_id
    # the new base holds the first round; later changes are captured again
    logical.execute(ROUNDS[1], db)
    when = _now(logical, db)
    time.sleep(0.05)
    assert cdc.run(_conn(logical, db), store, base.database_id).segment is not None
    assert _restore_at(logical, store, base.database_id, when, "cdc_lost_restored") == \
        table_fingerprints(logical.url(db))


def test_status_reports_retained_wal_and_tables_that_cannot_be_replayed(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_status")
    logical.execute("CREATE TABLE no_key (v int)", db)
    _, base = cdc.start(_conn(logical, db), store, BackupRequest())
    logical.execute("INSERT INTO no_key SELECT generate_series(1, 1000)", db)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    found = cdc.status(_conn(logical, db), store, base.database_id)
    assert found["started"] and found["tables_without_identity"] == ["public.no_key"]
    assert found["slot"]["retained_wal_bytes"] > 0
    assert found["slot"]["wal_status"] in ("reserved", "extended")
    # over the hard limit, the slot is dropped before it can fill the disk, and a new base taken
    limited = cdc.run(_conn(logical, db), store, base.database_id, max_retained_wal=1)
    assert limited.lost and "over the limit of 1" in limited.restarted
    assert cdc.drop(_conn(logical, db), store, base.database_id) is not None
    assert cdc.status(_conn(logical, db), store, base.database_id)["slot"] == {}


def test_the_command_line_captures_and_restores_to_a_point_in_time(
        logical: Cluster, local_s3: Any) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("supabackup"))
    bucket = f"cdc-cli-{logical.plugin}"  # type: ignore[attr-defined]
    local_s3.create_bucket(bucket)
    env = {**os.environ, **local_s3.env(), "SUPABACKUP_STORE": f"s3://{bucket}/pitr"}

    def cli(*args: str) -> str:
        done = subprocess.run([exe, *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    db = _fresh(logical, "cdc_cli")
    url = logical.url(db)
    assert "base backup" in cli("cdc", "start", "--database-url", url)
    logical.execute(ROUNDS[0], db)
    when = _now(logical, db)
    expected = table_fingerprints(url)
    time.sleep(0.05)
    logical.execute(ROUNDS[1], db)  # after the point in time: must not be restored
    assert "transaction(s)" in cli("cdc", "run", "--database-url", url)
    status = json.loads(cli("cdc", "status", "--database-url", url))
    assert status["slot"]["wal_status"] and status["tables_without_identity"] == []
    logical.drop_database("cdc_cli_restored")
    logical.create_database("cdc_cli_restored")
    out = cli("restore", "--target-url", logical.url("cdc_cli_restored"), "--at", when.isoformat())
    assert "captured transaction(s)" in out
    assert table_fingerprints(logical.url("cdc_cli_restored")) == expected
    # a time capture has not reached yet is refused with one line, and nothing restored
    logical.drop_database("cdc_cli_late")
    logical.create_database("cdc_cli_late")
    late = subprocess.run([exe, "restore", "--target-url", logical.url("cdc_cli_late"),
                           "--at", (when + timedelta(hours=1)).isoformat()],
                          capture_output=True, text=True, env=env, timeout=120)
    assert late.returncode != 0 and "covers times up to" in late.stderr, late.stderr
    assert len(late.stderr.strip().splitlines()) == 1
    assert logical.execute("SELECT count(*) FROM pg_class WHERE relnamespace = "
                           "'public'::regnamespace", "cdc_cli_late")[0][0] == 0
    assert "dropped slot" in cli("cdc", "drop", "--database-url", url)


def test_replication_through_a_supabase_pooler_is_refused_naming_the_direct_host() -> None:
    conn = ConnectionInfo.from_url(
        "postgresql://postgres.abcdefghijklmnop:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres")
    with pytest.raises(ConfigError, match="cannot carry logical replication.*"
                                          "db.abcdefghijklmnop.supabase.co"):
        cdc.require_direct(conn)


def test_the_capture_function_starts_runs_and_reports_the_slot(
        logical: Cluster, s3: Any, inbox: Any, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    import boto3
    from supabackup.handlers import capture as capture_handler
    from supabackup.handlers import common

    from .conftest import BUCKET, FakeContext, load_event
    db = _fresh(logical, "cdc_lambda")
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="supabackup/direct", SecretString=json.dumps({
        "host": "127.0.0.1", "port": logical.port, "username": "postgres",
        "password": "devkit-superuser-pw", "dbname": db, "sslmode": "disable"}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_STORE", f"s3://{BUCKET}/prod")
    monkeypatch.setenv("SUPABACKUP_CAPTURE_SECRET_ARN", arn)
    monkeypatch.setenv("SUPABACKUP_SNS_TOPIC_ARN", inbox.topic_arn)
    monkeypatch.setattr(common, "clients", {"s3": s3, "secretsmanager": secrets,
                                            "sns": inbox.sns})
    started = capture_handler.handler(load_event("capture-start.json"), FakeContext())
    assert started["plugin"] == logical.plugin  # type: ignore[attr-defined]
    logical.execute(ROUNDS[0], db)
    capfd.readouterr()
    ran = capture_handler.handler(load_event("capture-scheduled.json"), FakeContext())
    assert ran["transactions"] == 1 and not ran["lost"]  # one statement string, one commit
    emf = [json.loads(line) for line in capfd.readouterr().out.splitlines()
           if line.startswith('{"_aws"')][-1]
    assert emf["kind"] == "capture" and emf["RetainedWalBytes"][0] >= 0
    assert emf["CapturedTransactions"] in ([1.0], 1.0)
    status = capture_handler.handler(load_event("capture-status.json"), FakeContext())
    assert status["started"] and status["last_commit_captured"]
    assert inbox.messages() == []  # a good run sends nothing


def test_a_lost_slot_is_an_alert_on_sns_and_a_good_run_says_nothing(
        logical: Cluster, store: Store, inbox: Any) -> None:
    from supabackup.notify import Notifier
    from supabackup.run import capture_and_report
    db = _fresh(logical, "cdc_alert")
    state, base = cdc.start(_conn(logical, db), store, BackupRequest())
    notifier = Notifier(inbox.topic_arn, inbox.sns)
    logical.execute(ROUNDS[0], db)
    capture_and_report(_conn(logical, db), store, base.database_id, notifier)
    assert inbox.messages() == []
    logical.execute(f"SELECT pg_drop_replication_slot('{state.slot}')", db)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    capture_and_report(_conn(logical, db), store, base.database_id, notifier)
    (alert,) = inbox.messages()
    assert alert["MessageAttributes"]["status"]["Value"] == "failed"
    assert alert["MessageAttributes"]["kind"]["Value"] == "capture"
    assert "failed: changes lost" in alert["Subject"]
    assert "is gone" in alert["Message"]["error"]


def test_a_start_that_fails_leaves_no_slot_holding_wal(logical: Cluster, store: Store,
                                                      s3: Any) -> None:
    from botocore.awsrequest import AWSResponse
    from moto.core.botocore_stubber import MockRawResponse
    from supabackup.errors import StoreError
    db = _fresh(logical, "cdc_failed_start")
    # the slot is made, then the base backup fails: S3 refuses the bucket's access check
    s3.meta.events.register_first("before-send.s3.HeadBucket", lambda request, **_: AWSResponse(
        request.url, 403, {}, MockRawResponse(b"")))
    with pytest.raises(StoreError, match="access to bucket .* is denied"):
        cdc.start(_conn(logical, db), store, BackupRequest())
    slot = cdc.slot_name(_conn(logical, db))
    assert logical.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           f"'{slot}'", db) == [(0,)]
    assert logical.execute("SELECT count(*) FROM pg_publication WHERE pubname = "
                           f"'{slot}_all'", db) == [(0,)]
