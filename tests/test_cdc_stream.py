"""Streaming change capture (`cdc run --for`), against a real logical replication slot:
commits stored within the flush interval, exact restores at the last commit, one drainer
at a time, and a stream that goes on across a new epoch. Both plugins, as test_cdc.py."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from supabackup import capture
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.manifest import parse_time
from supabackup.store import Store

from devkit.compare import table_fingerprints
from devkit.pg import Cluster

from .helpers import stored_commits as _stored_commits

FLUSH = 5.0     # the default flush interval
MARGIN = 5.0    # a flush's own time (check, catch-up, three small S3 writes), on a busy CI box


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _started(cluster: Cluster, store: Store, db: str) -> str:
    cluster.drop_database(db)
    cluster.create_database(db)
    cluster.execute("CREATE TABLE ticks (id int PRIMARY KEY, at timestamptz NOT NULL, "
                    "note text)", db)
    state, base = capture.start(_conn(cluster, db), store, BackupRequest())
    assert state.plugin == cluster.plugin  # type: ignore[attr-defined]
    return base.database_id


def _in_background(target: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """Run `target` in a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(target(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the test re-raises it
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def _result(thread: threading.Thread, out: list[Any]) -> Any:
    thread.join(timeout=120)
    assert not thread.is_alive() and out, "the capture run did not end"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_commits_at_a_steady_pace_are_stored_within_the_flush_interval_and_restore_exactly(
        logical: Cluster, store: Store) -> None:
    db = "stream_steady"
    database_id = _started(logical, store, db)
    # GIVEN `cdc run --for 30` streaming at the default flush interval
    thread, out = _in_background(capture.run, _conn(logical, db), store, database_id,
                                 seconds=30.0, policy=capture.FlushPolicy(interval=FLUSH))
    # WHEN a writer commits twice a second for 20 seconds, noting when each committed,
    # and the store's index is watched for when each became stored
    committed: dict[int, tuple[float, datetime]] = {}
    stored: dict[int, float] = {}
    writer = logical.connect(db)
    writer.autocommit = True
    with writer.cursor() as cur:
        for i in range(40):
            cur.execute("INSERT INTO ticks VALUES (%s, clock_timestamp(), %s) "
                        "RETURNING clock_timestamp()", (i, f"tick {i}"))
            committed[i] = (time.monotonic(), cur.fetchone()[0])
            _watch(store, database_id, committed, stored)
            time.sleep(0.5)
        cur.execute("SELECT clock_timestamp()")
        last_commit = cur.fetchone()[0]
    writer.close()
    deadline = time.monotonic() + 2 * (FLUSH + MARGIN)
    while len(stored) < len(committed) and time.monotonic() < deadline:
        _watch(store, database_id, committed, stored)
        time.sleep(0.2)
    result = _result(thread, out)
    # THEN every commit was stored within the flush interval plus a margin, once
    assert set(stored) == set(committed)
    late = {i: round(stored[i] - committed[i][0], 1) for i in committed
            if stored[i] - committed[i][0] > FLUSH + MARGIN}
    assert not late, f"stored later than {FLUSH + MARGIN} s after the commit: {late}"
    assert result.transactions == 40 and result.segments >= 3 and not result.restarted
    commits = _stored_commits(store, database_id)
    assert len(commits) == len(set(commits)) == 40
    # and a restore to the last commit's time is the source, exactly
    assert result.covered_through is not None and result.covered_through >= last_commit
    logical.drop_database("stream_steady_at")
    logical.create_database("stream_steady_at")
    report = capture.restore_to_time(store, database_id, _conn(logical, "stream_steady_at"),
                                     last_commit)
    assert report.transactions == 40
    assert table_fingerprints(logical.url("stream_steady_at")) == \
        table_fingerprints(logical.url(db))


def _watch(store: Store, database_id: str, committed: dict[int, tuple[float, datetime]],
           stored: dict[int, float]) -> None:
    """Note the first moment each commit is in a stored segment (by commit time: the
    segment's last commit is at or after it)."""
    segments = capture.segments(store, database_id)
    if not segments:
        return
    newest = max(parse_time(s.last_commit_time) for s in segments)
    now = time.monotonic()
    for i, (_, at) in committed.items():
        if i not in stored and at <= newest:
            stored[i] = now


def test_two_drainers_started_together_one_drains_the_other_leaves_nothing_stored_twice(
        logical: Cluster, store: Store) -> None:
    db = "stream_two"
    database_id = _started(logical, store, db)
    # GIVEN two streaming runs started at the same moment
    runs = [_in_background(capture.run, _conn(logical, db), store, database_id, seconds=8.0,
                           policy=capture.FlushPolicy(interval=1.0)) for _ in range(2)]
    # WHEN rows commit while they run
    for i in range(10):
        logical.execute(f"INSERT INTO ticks VALUES ({i}, now(), 'two')", db)
        time.sleep(0.3)
    results = [_result(*run) for run in runs]
    # THEN one drained, the other waited, then left saying who holds the lease
    drained = [r for r in results if not r.left]
    left = [r for r in results if r.left]
    assert len(drained) == 1 and len(left) == 1, results
    assert "another capture run of" in left[0].left and left[0].transactions == 0
    assert drained[0].transactions == 10
    # and nothing was stored twice, and the lease is free again
    commits = _stored_commits(store, database_id)
    assert len(commits) == len(set(commits)) == 10
    again = capture.run(_conn(logical, db), store, database_id)
    assert not again.left and again.segment is None


def test_a_stream_goes_on_into_the_new_epoch_a_schema_change_starts(
        logical: Cluster, store: Store) -> None:
    db = "stream_ddl"
    database_id = _started(logical, store, db)
    thread, out = _in_background(capture.run, _conn(logical, db), store, database_id,
                                 seconds=20.0, policy=capture.FlushPolicy(interval=1.0,
                                                                          idle_interval=1.0))
    logical.execute("INSERT INTO ticks VALUES (1, now(), 'before')", db)
    time.sleep(2.5)
    before = logical.execute("SELECT clock_timestamp()", db)[0][0]
    expected_before = table_fingerprints(logical.url(db))
    time.sleep(2)  # a flush (every second here) checks past `before`: the DDL's own moment
    # is not in the stream, so the epoch ends at the last check before it
    # WHEN the schema changes while the stream runs, and rows that use it commit
    logical.execute("ALTER TABLE ticks ADD COLUMN extra int DEFAULT 7", db)
    deadline = time.monotonic() + 12  # the stream finds the change, takes a new base
    while len(capture.epochs(store, database_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    logical.execute("INSERT INTO ticks VALUES (2, now(), 'after', 8)", db)
    after = logical.execute("SELECT clock_timestamp()", db)[0][0]
    result = _result(thread, out)
    # THEN the run started a new epoch and kept streaming in it
    assert result.restarted == "the schema changed" and not result.lost
    assert len(capture.epochs(store, database_id)) == 2
    assert result.covered_through is not None and result.covered_through >= after
    # and restores on both sides are exact
    for name, when, expected in [("stream_ddl_before", before, expected_before),
                                 ("stream_ddl_after", after, table_fingerprints(logical.url(db)))]:
        logical.drop_database(name)
        logical.create_database(name)
        capture.restore_to_time(store, database_id, _conn(logical, name), when)
        assert table_fingerprints(logical.url(name)) == expected, name


@pytest.mark.parametrize("seconds", [None, 6.0], ids=["once", "streaming"])
def test_a_rebase_hands_over_to_a_new_base_without_a_gap_under_concurrent_writers(
        logical: Cluster, store: Store, seconds: float | None) -> None:
    if (seconds is None) != (logical.plugin == "wal2json"):  # type: ignore[attr-defined]
        pytest.skip("a peek's handover on wal2json, a stream's on pgoutput: the suite's time")
    db = "stream_rebase"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute("CREATE TABLE ticks (id bigint PRIMARY KEY)", db)
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    stop = threading.Event()

    def write() -> None:
        conn = logical.connect(db)
        conn.autocommit = True
        with conn.cursor() as cur:
            i = 0
            while not stop.is_set():
                i += 1
                cur.execute("INSERT INTO ticks VALUES (%s)", (i,))
                time.sleep(0.002)  # a busy writer, not one whose replay takes minutes
        conn.close()

    # GIVEN a writer committing one row per transaction without pause, and capture running
    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        assert capture.run(_conn(logical, db), store, database_id).segment is not None
        time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
        # WHEN a run finds the base due for a rebase
        rebased = capture.run(_conn(logical, db), store, database_id, seconds=seconds,
                              policy=capture.FlushPolicy(interval=1.0),
                              rebase_every=timedelta(0))
        time.sleep(0.3)
        last = capture.run(_conn(logical, db), store, database_id)
    finally:
        stop.set()
        writer.join()
    # THEN it handed over to a new epoch: a new base and slot, the old slot gone
    assert rebased.rebased and not rebased.restarted and not rebased.rebase_error
    history = capture.epochs(store, database_id)
    assert len(history) == 2
    running = capture.read_state(store, database_id)
    assert running is not None and running.start_lsn == history[1].start_lsn
    assert not running.handover and running.slot != state.slot
    slots = [r[0] for r in logical.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        " ORDER BY 1", db)]
    assert slots == [running.slot]
    status = capture.status(_conn(logical, db), store, database_id)
    assert status["window"]["gaps"] == []
    # and every time from the first base to the last run restores exactly: none refused,
    # including the moments around the new base
    new_base = parse_time(history[1].base_at)
    assert last.covered_through is not None
    first, end = parse_time(base.snapshot_at), last.covered_through
    times = [first + (end - first) * k / 7 for k in range(8)]
    times += [new_base - timedelta(milliseconds=1), new_base]
    committed = logical.execute("SELECT id, pg_xact_commit_timestamp(xmin) FROM ticks", db)
    for i, when in enumerate(sorted(times)):
        name = f"stream_rebase_{i}"
        logical.drop_database(name)
        logical.create_database(name)
        capture.restore_to_time(store, database_id, _conn(logical, name), when)
        rows = {r[0] for r in logical.execute("SELECT id FROM ticks", name)}
        assert rows == {n for n, at in committed if at <= when}, when


def test_a_stream_decodes_values_under_the_pinned_settings_whatever_the_database_sets(
        logical: Cluster, store: Store) -> None:
    # GIVEN a database whose sessions round floats, write dates day-first and find tables
    # without a schema: the walsender decodes in a session of its own, which inherits them
    db = "stream_settings"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(f"""
        ALTER DATABASE {db} SET extra_float_digits = -3;
        ALTER DATABASE {db} SET DateStyle = 'SQL, DMY';
        ALTER DATABASE {db} SET IntervalStyle = 'sql_standard';
        ALTER DATABASE {db} SET search_path = app, public""", "postgres")
    logical.execute("CREATE SCHEMA app; CREATE TABLE app.holder (id int PRIMARY KEY)", db)
    logical.execute("CREATE TABLE public.vals (id int PRIMARY KEY, f float8, at timestamptz, "
                    "d date, span interval, rel regclass)", db)
    database_id = capture.start(_conn(logical, db), store, BackupRequest())[1].database_id
    logical.execute("INSERT INTO public.vals VALUES (1, 0.1::float8 + 0.2::float8, '2026-03-04 05:06:07.891+00',"
                    " '2026-03-04', '1 day 02:03:04.5', 'app.holder')", db)
    # WHEN it is streamed and restored to the latest time
    result = capture.run(_conn(logical, db), store, database_id, seconds=2.0,
                         policy=capture.FlushPolicy(interval=0.5))
    assert result.transactions == 1 and result.covered_through is not None
    logical.drop_database("stream_settings_at")
    logical.create_database("stream_settings_at")
    capture.restore_to_time(store, database_id, _conn(logical, "stream_settings_at"),
                            result.covered_through)
    # THEN every value is the one written, to the last digit
    query = ("SET extra_float_digits = 3; SELECT f::text, extract(epoch FROM at)::text, d - '2026-01-01'::date, "
             "extract(epoch FROM span)::text, rel::oid = 'app.holder'::regclass::oid "
             "FROM public.vals")
    assert logical.execute(query, "stream_settings_at") == logical.execute(query, db)
    exact = "SELECT f = 0.1::float8 + 0.2::float8 AND f <> 0.3::float8 FROM public.vals"
    assert logical.execute(exact, db) == logical.execute(exact, "stream_settings_at") == [(True,)]


def test_a_rebase_that_fails_leaves_capture_running_and_says_so_on_sns(
        logical: Cluster, store: Store, inbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from supabackup.capture import lifecycle
    from supabackup.errors import DumpFailed
    from supabackup.notify import Notifier
    from supabackup.report import capture_and_report
    db = "stream_rebase_fails"
    database_id = _started(logical, store, db)
    time.sleep(1.1)  # backup ids have one-second resolution

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise DumpFailed("pg_dump exited with status 1: out of disk")

    # GIVEN a rebase due, whose base backup fails
    monkeypatch.setattr(lifecycle, "run_backup", broken)
    logical.execute("INSERT INTO ticks VALUES (1, now(), 'during')", db)
    # WHEN the run goes on
    result = capture_and_report(_conn(logical, db), store, database_id,
                                Notifier(inbox.topic_arn, inbox.sns), rebase_every=timedelta(0))
    # THEN it drained the old epoch all the same, left no new slot, and said why on SNS
    assert result.transactions == 1 and not result.rebased
    assert "rebase failed" in result.rebase_error and "out of disk" in result.rebase_error
    assert len(capture.epochs(store, database_id)) == 1
    slots = logical.execute("SELECT slot_name FROM pg_replication_slots WHERE database = "
                            "current_database()", db)
    assert slots == [(capture.read_state(store, database_id).slot,)]  # type: ignore[union-attr]
    (alert,) = inbox.messages()
    assert alert["MessageAttributes"]["status"]["Value"] == "failed"
    assert "capture goes on in the old epoch" in alert["Message"]["error"]


def test_a_new_epoch_killed_during_its_base_begins_again_on_the_next_run(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from supabackup.capture import lifecycle
    db = "stream_restart_killed"
    database_id = _started(logical, store, db)
    logical.execute("INSERT INTO ticks VALUES (1, now(), 'before')", db)
    assert capture.run(_conn(logical, db), store, database_id).segment is not None
    before = logical.execute("SELECT clock_timestamp()", db)[0][0]
    expected_before = table_fingerprints(logical.url(db))
    covered = capture.run(_conn(logical, db), store, database_id).covered_through
    assert covered is not None and covered >= before
    logical.execute("ALTER TABLE ticks ADD COLUMN extra int", db)
    time.sleep(1.1)  # backup ids have one-second resolution

    class Killed(BaseException):
        """What a Lambda timeout is to the run: nothing after it runs."""

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise Killed

    # GIVEN a run that ends the epoch (DDL) and is killed while it takes the new base:
    # neither its cleanup nor its lease's release runs
    with monkeypatch.context() as patch:
        patch.setattr(lifecycle, "run_backup", killed)
        patch.setattr(lifecycle, "abandon", lambda *args: None)
        patch.setattr(lifecycle.locks, "release", lambda *args: None)
        with pytest.raises(Killed):
            capture.run(_conn(logical, db), store, database_id)
    store.delete_key(store.key(database_id, "locks", "capture.json"))  # as if expired
    # WHEN the next run comes
    logical.execute("INSERT INTO ticks VALUES (2, now(), 'after', 5)", db)
    again = capture.run(_conn(logical, db), store, database_id)
    # THEN it begins the new epoch (not "not started", not a loss), one slot is left
    assert "the schema changed" in again.restarted and not again.lost
    slots = logical.execute("SELECT slot_name FROM pg_replication_slots WHERE database = "
                            "current_database()", db)
    state = capture.read_state(store, database_id)
    assert state is not None and slots == [(state.slot,)]
    assert len(capture.epochs(store, database_id)) == 2
    later = capture.run(_conn(logical, db), store, database_id)
    assert later.covered_through is not None and not later.restarted
    # and restores on both sides are exact
    for name, when, expected in [("stream_rk_before", before, expected_before),
                                 ("stream_rk_after", later.covered_through,
                                  table_fingerprints(logical.url(db)))]:
        logical.drop_database(name)
        logical.create_database(name)
        capture.restore_to_time(store, database_id, _conn(logical, name), when)
        assert table_fingerprints(logical.url(name)) == expected, name
