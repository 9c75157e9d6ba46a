"""Change capture and point-in-time restore, against a real logical replication slot.

Both plugins: wal2json on PostgreSQL 15 from Debian (postgresql-15-wal2json), and pgoutput
on the pinned PostgreSQL 17, which has no wal2json (the fallback). wal_level=logical.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from supabackup import capture
from supabackup.backup import BackupRequest
from supabackup.capture.replay import ReplayFailed
from supabackup.catalog import restore_point
from supabackup.dburl import ConnectionInfo
from supabackup.errors import CaptureError, ConfigError
from supabackup.manifest import parse_time
from supabackup.notify import Notifier
from supabackup.report import restore_and_report
from supabackup.store import Store

from devkit.compare import table_fingerprints
from devkit.pg import Cluster

from .helpers import restore_at as _restore_at
from .helpers import server_now as _now
from .helpers import stored_commits as _stored_commits


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


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
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    assert state.base == base.backup_id and base.kind == "full"
    assert state.plugin == logical.plugin  # type: ignore[attr-defined]
    # WHEN writers commit in rounds, captured after each, and the time after each is noted
    expected: list[tuple[datetime, dict[str, Any]]] = []
    for statements in ROUNDS:
        logical.execute(statements, db)
        expected.append((_now(logical, db), table_fingerprints(logical.url(db))))
        time.sleep(0.05)
        assert capture.run(_conn(logical, db), store, base.database_id).segment is not None
    # THEN a restore at each time equals the source at that time, table by table
    for i, (when, tables) in enumerate(expected):
        assert _restore_at(logical, store, base.database_id, when, f"cdc_at_{i}") == tables, i
    # and a time before the first round gives the base
    first = parse_time(capture.segments(store, base.database_id)[0].first_commit_time)
    before = _restore_at(logical, store, base.database_id, first - timedelta(microseconds=1),
                         "cdc_at_base")
    assert before["public.scratch"][0] == 0 and before["public.events"][0] == 0


@pytest.mark.parametrize("seconds", [None, 3.0], ids=["once", "streaming"])
def test_a_run_killed_between_storing_and_confirming_stores_nothing_twice_and_loses_nothing(
        logical: Cluster, store: Store, seconds: float | None) -> None:
    db = "cdc_crash"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(SCHEMA, db)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)

    def crash(segment: capture.Segment) -> None:
        raise RuntimeError("killed after the upload, before the slot advanced")

    # GIVEN a run killed after its segment and index entry were stored, before the confirm
    with pytest.raises(RuntimeError):
        capture.run(_conn(logical, db), store, base.database_id, after_upload=crash,
                    seconds=seconds, policy=capture.FlushPolicy(interval=0.5))
    crashed = capture.segments(store, base.database_id)
    assert len(crashed) == 1 and crashed[0].transactions == 1
    assert logical.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                           f"WHERE slot_name = 'supabackup_{db}'", db)[0][0] != crashed[0].end_lsn
    logical.execute(ROUNDS[1], db)
    # WHEN the next run reads the slot, which still holds the first round
    again = capture.run(_conn(logical, db), store, base.database_id, seconds=seconds,
                        policy=capture.FlushPolicy(interval=0.5))
    # THEN it stores only the second round, chained to the crashed run's segment
    assert again.segment is not None and again.transactions == 1
    assert again.segment.after == crashed[0].end_lsn
    stored = _stored_commits(store, base.database_id)
    assert len(stored) == len(set(stored)) == 2
    last = capture.run(_conn(logical, db), store, base.database_id)
    assert last.segment is None and last.covered_through is not None  # advanced
    # each stored transaction carries its xid, commit LSN and commit time
    raw = store.read_small(again.segment.key)
    assert raw is not None
    first = json.loads(gzip.decompress(raw).splitlines()[0])
    assert int(first["xid"]) > 0 and "/" in first["commit_lsn"] and first["commit_time"]
    # and a restore to the latest time is the source, exactly
    assert _restore_at(logical, store, base.database_id, last.covered_through,
                       "cdc_crash_restored") == table_fingerprints(logical.url(db))


def _as_the_stack(cluster: Cluster, db: str, variable: str, s3: Any, inbox: Any,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a deployed function has: the store, SNS, and a secret naming `db`
    in `variable`; the handlers' clients are moto's."""
    import boto3
    from supabackup.handlers import common

    from .helpers import BUCKET
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name=f"supabackup/{variable.lower()}", SecretString=json.dumps({
        "host": "127.0.0.1", "port": cluster.port, "username": "postgres",
        "password": "devkit-superuser-pw", "dbname": db, "sslmode": "disable"}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_STORE", f"s3://{BUCKET}/prod")
    monkeypatch.setenv(variable, arn)
    monkeypatch.setenv("SUPABACKUP_SNS_TOPIC_ARN", inbox.topic_arn)
    monkeypatch.setattr(common, "clients", {"s3": s3, "secretsmanager": secrets,
                                            "sns": inbox.sns})


def _fresh(cluster: Cluster, name: str) -> str:
    cluster.drop_database(name)
    cluster.create_database(name)
    cluster.execute(SCHEMA, name)
    return name


def test_a_schema_change_starts_a_new_epoch_and_restores_work_on_both_sides(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_ddl")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)
    checked = capture.run(_conn(logical, db), store, base.database_id).covered_through
    assert checked is not None
    before_ddl = (checked, table_fingerprints(logical.url(db)))
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    # DDL in the middle of the stream, rows that use it, and a capture run
    logical.execute("ALTER TABLE scratch ADD COLUMN note text DEFAULT 'new';"
                    "INSERT INTO scratch VALUES ('with note', 4, 'hello')", db)
    in_window = _now(logical, db)
    captured = capture.run(_conn(logical, db), store, base.database_id)
    assert captured.restarted == "the schema changed" and not captured.lost
    # a time between the last check and the new base: the DDL's moment is unknown
    with pytest.raises(CaptureError, match="cannot be restored exactly") as refused:
        _restore_at(logical, store, base.database_id, in_window, "cdc_ddl_window")
    assert "choose a time at or before" in refused.value.hint
    epochs = capture.epochs(store, base.database_id)
    assert len(epochs) == 2 and epochs[1].base != base.backup_id
    logical.execute(ROUNDS[1], db)
    after = (_now(logical, db), table_fingerprints(logical.url(db)))
    time.sleep(0.05)
    assert capture.run(_conn(logical, db), store, base.database_id).segment is not None
    for i, (when, tables) in enumerate([before_ddl, after]):
        assert _restore_at(logical, store, base.database_id, when, f"cdc_ddl_{i}") == tables, i


def test_a_lost_slot_starts_a_new_base_and_says_changes_were_lost(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_lost")
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)
    logical.execute(f"SELECT pg_drop_replication_slot('{state.slot}')", db)  # by hand
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    lost = capture.run(_conn(logical, db), store, base.database_id)
    assert lost.lost and "is gone" in lost.restarted
    after = capture.read_state(store, base.database_id)
    assert after is not None and after.base != base.backup_id
    # the new base holds the first round; later changes are captured again
    logical.execute(ROUNDS[1], db)
    when = _now(logical, db)
    time.sleep(0.05)
    assert capture.run(_conn(logical, db), store, base.database_id).segment is not None
    assert _restore_at(logical, store, base.database_id, when, "cdc_lost_restored") == \
        table_fingerprints(logical.url(db))


def test_status_reports_retained_wal_and_tables_that_cannot_be_replayed(
        logical: Cluster, store: Store) -> None:
    db = _fresh(logical, "cdc_status")
    logical.execute("CREATE TABLE no_key (v int)", db)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute("INSERT INTO no_key SELECT generate_series(1, 1000)", db)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    found = capture.status(_conn(logical, db), store, base.database_id)
    assert found["started"] and found["tables_without_identity"] == ["public.no_key"]
    assert found["slot"]["retained_wal_bytes"] > 0
    assert found["slot"]["wal_status"] in ("reserved", "extended")
    # over the hard limit, the slot is dropped before it can fill the disk, and a new base taken
    limited = capture.run(_conn(logical, db), store, base.database_id, max_retained_wal=1)
    assert limited.lost and "over the limit of 1" in limited.restarted
    assert capture.drop(_conn(logical, db), store, base.database_id) is not None
    assert capture.status(_conn(logical, db), store, base.database_id)["slot"] == {}


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
    assert "transaction(s)" in cli("cdc", "run", "--database-url", url, "--for", "2",
                                   "--flush-interval", "0.5")
    status = json.loads(cli("cdc", "status", "--database-url", url, "--json"))
    assert status["slot"]["wal_status"] and status["tables_without_identity"] == []
    assert status["wal_status"] == status["slot"]["wal_status"]
    assert "safe_wal_size" in status and status["retained_wal_bytes"] >= 0
    assert status["epoch"]["start_lsn"] and status["not_replayable"] == []
    # captured_through is the newest stored commit; the window reaches from the base on
    assert parse_time(status["captured_through"]) > when
    window = status["window"]
    assert parse_time(window["earliest"]) < when < parse_time(window["latest"])
    assert window["gaps"] == []
    plain = cli("cdc", "status", "--database-url", url)
    assert f"captured through: {status['captured_through']}" in plain
    assert f"reach: {window['earliest']} to {window['latest']}" in plain
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
        capture.require_direct(conn)


def test_the_capture_function_starts_runs_and_reports_the_slot(
        logical: Cluster, s3: Any, inbox: Any, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    from supabackup.handlers import capture as capture_handler

    from .helpers import FakeContext, load_event
    db = _fresh(logical, "cdc_lambda")
    _as_the_stack(logical, db, "SUPABACKUP_CAPTURE_SECRET_ARN", s3, inbox, monkeypatch)
    started = capture_handler.handler(load_event("capture-start.json"), FakeContext())
    assert started["plugin"] == logical.plugin  # type: ignore[attr-defined]
    logical.execute(ROUNDS[0], db)
    capfd.readouterr()

    class EndingSoon(FakeContext):
        def get_remaining_time_in_millis(self) -> int:
            return 26_000  # the schedule's run streams until 20 s before its end

    began = time.monotonic()
    ran = capture_handler.handler(load_event("capture-scheduled.json"), EndingSoon())
    assert ran["transactions"] == 1 and not ran["lost"]  # one statement string, one commit
    assert ran["covered_through"] and not ran["left"]
    if "for" in load_event("capture-scheduled.json"):  # it streamed, until its deadline
        assert 3 <= time.monotonic() - began < 20
    emf = [json.loads(line) for line in capfd.readouterr().out.splitlines()
           if line.startswith('{"_aws"')][-1]
    assert emf["kind"] == "capture"
    assert emf["RetainedWalBytes"] == [float(ran["slot"]["retained_wal_bytes"])]
    assert emf["CapturedTransactions"] == [1.0]
    # how far restores to a time lag behind now: from what this run covered, just now
    [lag] = emf["CaptureLagSeconds"]
    assert 0 <= lag <= (datetime.now(UTC) - parse_time(ran["covered_through"])).total_seconds()
    assert lag < 10  # the stream stored what committed every 5 s, until its deadline
    assert {"Name": "CaptureLagSeconds", "Unit": "Seconds"} in emf["_aws"][
        "CloudWatchMetrics"][0]["Metrics"]
    status = capture_handler.handler(load_event("capture-status.json"), FakeContext())
    assert status["started"] and status["last_commit_captured"]
    assert inbox.messages() == []  # a good run sends nothing


def test_the_capture_lag_grows_from_the_stored_progress_while_runs_leave_or_fail(
        logical: Cluster, s3: Any, inbox: Any, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A run that stores nothing of its own (it left to the run holding the lease, or it
    failed) still emits the lag, from the running epoch's stored progress: an outage
    shows as a lag that grows, not as a gap in the graph."""
    from supabackup import locks
    from supabackup.handlers import capture as capture_handler
    from supabackup.handlers import common
    from supabackup.store import StoreURL

    from .helpers import BUCKET, FakeContext, load_event
    db = _fresh(logical, "cdc_lag")
    _as_the_stack(logical, db, "SUPABACKUP_CAPTURE_SECRET_ARN", s3, inbox, monkeypatch)
    capture_handler.handler(load_event("capture-start.json"), FakeContext())
    covered = parse_time(capture_handler.handler({"action": "run"}, FakeContext())[
        "covered_through"])
    inbox.messages(), capfd.readouterr()

    def lag_emitted() -> tuple[float, dict[str, Any]]:
        emf = [json.loads(line) for line in capfd.readouterr().out.splitlines()
               if line.startswith('{"_aws"')][-1]
        [lag] = emf["CaptureLagSeconds"]
        return lag, emf

    backups = Store(StoreURL.parse(f"s3://{BUCKET}/prod"), s3)
    database_id = capture_handler.handler(load_event("capture-status.json"), FakeContext())[
        "database_id"]
    lease = locks.acquire(backups, database_id, "another run", purpose="capture")
    time.sleep(1.1)
    before = datetime.now(UTC)
    left = capture_handler.handler({"action": "run"}, FakeContext())
    after = datetime.now(UTC)
    assert left["left"] and left["covered_through"] is None
    lag, emf = lag_emitted()
    assert (before - covered).total_seconds() <= lag <= (after - covered).total_seconds()
    assert lag >= 1.1 and "CaptureFailed" not in emf
    locks.release(backups, lease)

    # the direct connection's password is wrong now: the run fails, the lag grows on
    arn = os.environ["SUPABACKUP_CAPTURE_SECRET_ARN"]
    secret = json.loads(common.clients["secretsmanager"].get_secret_value(SecretId=arn)[
        "SecretString"])
    common.clients["secretsmanager"].put_secret_value(
        SecretId=arn, SecretString=json.dumps({**secret, "password": "wrong"}))
    before = datetime.now(UTC)
    with pytest.raises(Exception, match="password authentication failed"):
        capture_handler.handler({"action": "run"}, FakeContext())
    failed_lag, emf = lag_emitted()
    assert emf["CaptureFailed"] == [1.0]
    assert lag < (before - covered).total_seconds() <= failed_lag


def test_a_lost_slot_is_an_alert_on_sns_and_a_good_run_says_nothing(
        logical: Cluster, store: Store, inbox: Any) -> None:
    from supabackup.notify import Notifier
    from supabackup.report import capture_and_report
    db = _fresh(logical, "cdc_alert")
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
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
    # naming the times no restore can reach now: from the last run's check to the new base
    lost = alert["Message"]["details"]["lost_window"]
    old, new = capture.epochs(store, base.database_id)
    assert lost == (f"{capture.state.read_progress(store, base.database_id, old).verified_at}"
                    f" to {new.base_at}") and f"reach the times from {lost}" in \
        alert["Message"]["error"]


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
        capture.start(_conn(logical, db), store, BackupRequest())
    slot = capture.slot_name(_conn(logical, db))
    assert logical.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           f"'{slot}'", db) == [(0,)]
    assert logical.execute("SELECT count(*) FROM pg_publication WHERE pubname = "
                           f"'{slot}_all'", db) == [(0,)]


def test_an_epoch_change_under_concurrent_writers_restores_exactly_or_refuses(
        logical: Cluster, store: Store) -> None:
    # GIVEN a writer committing one row per transaction, without pause, while capture runs,
    # a DDL ends the epoch and the next run takes a new slot and base
    db = _fresh(logical, "cdc_busy")
    logical.execute("CREATE TABLE ticks (id bigint PRIMARY KEY)", db)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    stop = threading.Event()

    def write() -> None:
        conn = logical.connect(db)
        with conn.cursor() as cur:
            for i in itertools.count(1):
                if stop.is_set():
                    break
                cur.execute("INSERT INTO ticks VALUES (%s)", (i,))
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        before = capture.run(_conn(logical, db), store, base.database_id).covered_through
        time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
        logical.execute("ALTER TABLE ticks ADD COLUMN note text", db)
        time.sleep(0.2)
        ended = capture.run(_conn(logical, db), store, base.database_id)
        time.sleep(0.3)
        after = capture.run(_conn(logical, db), store, base.database_id).covered_through
    finally:
        stop.set()
        writer.join()
    assert ended.restarted == "the schema changed" and before and after
    new_base = parse_time(capture.epochs(store, base.database_id)[-1].base_at)
    committed = logical.execute("SELECT id, pg_xact_commit_timestamp(xmin) FROM ticks", db)
    # WHEN times from the first base to the last run are restored, the window included
    first = parse_time(base.snapshot_at)
    times = [first + (after - first) * k / 9 for k in range(10)] + [before, new_base]
    refused, exact = [], []
    for i, when in enumerate(sorted(times)):
        name = f"cdc_busy_{i}"
        try:
            restored = _restore_at(logical, store, base.database_id, when, name)
        except CaptureError as exc:
            refused.append(when)
            assert "cannot be restored exactly" in exc.message
            continue
        # THEN every restored time holds exactly the rows committed by then
        rows = {r[0] for r in logical.execute("SELECT id FROM ticks", name)}
        assert rows == {i for i, at in committed if at <= when}, when
        assert restored["public.ticks"][0] == len(rows)
        exact.append(when)
    # and only times between the last check before the DDL and the new base are refused
    assert refused and all(before < when < new_base for when in refused)
    assert len([w for w in exact if w <= before]) >= 2
    assert len([w for w in exact if w >= new_base]) >= 2


def test_a_replay_that_fails_names_the_transaction_and_what_the_target_holds(
        logical: Cluster, store: Store) -> None:
    # GIVEN captured transactions, the second of which no longer fits the target
    db = _fresh(logical, "cdc_fail")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute("INSERT INTO scratch VALUES ('kept', 1)", db)
    logical.execute("UPDATE scratch SET v = 2 WHERE k = 'kept'", db)
    logical.execute("INSERT INTO scratch VALUES ('never', 3)", db)
    run = capture.run(_conn(logical, db), store, base.database_id)
    assert run.segment is not None and run.covered_through is not None
    lines = gzip.decompress(store.read_small(run.segment.key) or b"").splitlines()
    second = json.loads(lines[1])
    second["changes"][0]["identity"][0]["value"] = "gone"  # its row is not in the target
    body = gzip.compress(b"\n".join([lines[0], json.dumps(second).encode(), *lines[2:]]) + b"\n")
    store.put_small(run.segment.key, body)
    index = run.segment.key.replace("/segments/", "/index/").replace(".jsonl.gz", ".json")
    entry = json.loads(store.read_small(index) or b"{}")
    store.put_small(index, json.dumps({**entry, "size": len(body),
                                       "sha256": hashlib.sha256(body).hexdigest()}).encode())
    # WHEN it is restored
    with pytest.raises(ReplayFailed) as failed:
        _restore_at(logical, store, base.database_id, run.covered_through, "cdc_fail_restored")
    # THEN the error names the transaction, and says what the target holds now
    assert f"transaction {second['xid']}" in failed.value.message
    assert second["commit_lsn"] in failed.value.message
    assert "found 0 rows where the source had one" in failed.value.message
    assert "holds the base and 1 transaction(s)" in failed.value.hint
    assert logical.execute("SELECT k, v FROM scratch", "cdc_fail_restored") == [("kept", 1)]


def test_capture_never_changes_what_the_application_can_write_and_names_what_it_cannot_replay(
        logical: Cluster, store: Store, inbox: Any) -> None:
    # GIVEN a table without a replica identity, and capture started
    db = _fresh(logical, "cdc_keyless")
    logical.execute("CREATE TABLE log (line text); INSERT INTO log VALUES ('a'), ('b')", db)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    # WHEN the application updates and deletes in it, as it did before capture
    logical.execute("UPDATE log SET line = 'changed' WHERE line = 'a';"
                    "DELETE FROM log WHERE line = 'b'; INSERT INTO log VALUES ('c')", db)
    when = capture.run(_conn(logical, db), store, base.database_id).covered_through
    assert when is not None
    # THEN its writes went through, and a restore to that time names the table and why,
    # in its output and on SNS
    target = "cdc_keyless_restored"
    logical.drop_database(target)
    logical.create_database(target)
    report = restore_and_report(store, restore_point(store, base.database_id, when.isoformat()),
                                _conn(logical, target), Notifier(inbox.topic_arn, inbox.sns))
    named = [line for line in report.lines() if "NOT AS OF" in line]
    assert len(named) == 1 and "public.log" in named[0] and "no replica identity" in named[0]
    message = inbox.messages()[-1]["Message"]
    assert any("public.log" in line for line in message["details"]["inexact"])
    # its insert was replayed, the update and delete could not be
    assert sorted(logical.execute("SELECT line FROM log", target)) == [("a",), ("b",), ("c",)]


def test_at_a_time_the_restore_function_replays_capture_as_the_command_line_does(
        logical: Cluster, s3: Any, inbox: Any, new_db: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`"at": TIME` in the restore Lambda means what `--at TIME` means on the command line:
    where capture covers the time, the base and every change captured up to it (not the
    newest backup before it, which is the base, without those changes); the result and
    the SNS message say it was a replay."""
    from supabackup.handlers import restore as restore_handler
    from supabackup.manifest import iso
    from supabackup.store import StoreURL

    from .helpers import BUCKET, FakeContext
    db, target = _fresh(logical, "cdc_at_lambda"), new_db(logical)
    store = Store(StoreURL.parse(f"s3://{BUCKET}/prod"), s3)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute(ROUNDS[0], db)
    when = _now(logical, db)
    capture.run(_conn(logical, db), store, base.database_id)
    expected = table_fingerprints(logical.url(db))
    logical.execute(ROUNDS[1], db)  # after the time: must not be restored
    capture.run(_conn(logical, db), store, base.database_id)
    _as_the_stack(logical, target, "SUPABACKUP_RESTORE_SECRET_ARN", s3, inbox, monkeypatch)
    plan = restore_handler.handler({"at": iso(when), "dry_run": True}, FakeContext())
    assert plan["method"] == "replay" and "by replaying change capture" in plan["plan"][0]
    result = restore_handler.handler({"at": iso(when)}, FakeContext())
    assert result["method"] == "replay" and result["backup_id"] == base.backup_id
    assert table_fingerprints(logical.url(target)) == expected
    (message,) = inbox.messages()
    assert message["Message"]["details"]["method"] == "replay"
    assert "by replaying change capture" in message["Subject"] + json.dumps(message["Message"])


def test_drop_frees_the_slot_from_the_database_alone_and_runs_no_sql_from_the_store(
        logical: Cluster, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """`cdc drop` drops the slot and publications named after the database, whatever the
    store's state says: a state rewritten to carry SQL runs none of it, and a state that
    is gone still frees the slot that holds WAL on the user's database."""
    from supabackup import cli
    db = _fresh(logical, "cdc_drop_alone")
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    key = store.key(base.database_id, "cdc", "state.json")
    tampered = json.loads(store.read_small(key) or b"")
    tampered["publication"] = "x; CREATE TABLE pwned()"
    store.put_small(key, json.dumps(tampered).encode())
    args = ["cdc", "drop", "--database-url", logical.url(db), "--store", str(store.url),
            "--database-id", base.database_id]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert logical.execute("SELECT to_regclass('public.pwned')", db) == [(None,)]
    slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s"
    assert logical.execute(slots.replace("%s", f"'{state.slot}'"), db) == [(0,)]
    assert logical.execute("SELECT count(*) FROM pg_publication", db) == [(0,)]
    # a slot whose state is gone from the store: start again, lose the state, drop
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    capture.start(_conn(logical, db), store, BackupRequest(label="again"))
    store.delete_key(key)
    assert cli.main(args) == 0, capsys.readouterr().err
    assert logical.execute(slots.replace("%s", f"'{state.slot}'"), db) == [(0,)]
    assert logical.execute("SELECT count(*) FROM pg_publication", db) == [(0,)]
