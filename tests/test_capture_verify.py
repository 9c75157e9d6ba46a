"""Verify checks change capture: each way its records can be damaged is caught and named.

Against a real logical replication slot, both plugins (as tests/test_cdc.py): wal2json on
PostgreSQL 15, pgoutput on 17. Each test captures three rounds of writes (three segments),
damages the store one way and reads what verify says.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from supabackup import capture
from supabackup.backup import BackupRequest, run_backup
from supabackup.capture.audit import Read, Stored, audit
from supabackup.capture.state import CaptureState, Progress, Segment, entry_name, lsn_key
from supabackup.dburl import ConnectionInfo
from supabackup.errors import VerifyFailed
from supabackup.manifest import Manifest
from supabackup.notify import Notifier
from supabackup.report import verify_and_report
from supabackup.store import Store
from supabackup.verify import verify_database

from devkit.pg import Cluster

from .helpers import BUCKET, Inbox

SCHEMA = """
    CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2));
    INSERT INTO accounts SELECT g, 'owner ' || g, g * 10.5 FROM generate_series(1, 50) g;
"""
ROUNDS = [
    "INSERT INTO accounts SELECT g, 'new ' || g, 1 FROM generate_series(51, 80) g",
    "UPDATE accounts SET balance = balance + 1 WHERE id <= 10",
    "DELETE FROM accounts WHERE id > 70; INSERT INTO accounts VALUES (100, 'last', 0)",
]


@dataclass
class Captured:
    database_id: str
    conn: ConnectionInfo  # the source database
    base: Manifest
    epoch: CaptureState
    segments: list[Segment]  # one per round, in LSN order


@pytest.fixture
def captured(logical: Cluster, store: Store, request: pytest.FixtureRequest
             ) -> Iterator[Captured]:
    """Capture started on a fresh database (slot and base), then a run after each round."""
    db = f"cv_{request.node.name.split('[')[0].removeprefix('test_')[:40]}"
    logical.drop_database(db)
    logical.create_database(db)
    logical.execute(SCHEMA, db)
    conn = ConnectionInfo.from_url(logical.url(db))
    state, base = capture.start(conn, store, BackupRequest())
    for statements in ROUNDS:
        logical.execute(statements, db)
        assert capture.run(conn, store, base.database_id).segment is not None
    segments = capture.segments(store, base.database_id)
    assert len(segments) == len(ROUNDS)
    yield Captured(base.database_id, conn, base, state, segments)
    logical.drop_database(db)  # and the slot with it


def _name(segment: Segment) -> str:
    return f"cdc/segments/{entry_name(segment.end_lsn, segment.epoch)}.jsonl.gz"


def _index(segment: Segment) -> str:
    return f"index/{entry_name(segment.end_lsn, segment.epoch)}.json"


def _index_key(store: Store, found: Captured, segment: Segment) -> str:
    return store.key(found.database_id, "cdc", _index(segment))


def _problems(store: Store, found: Captured) -> list[str]:
    return [str(f) for f in verify_database(store, found.database_id).findings]


def test_a_whole_capture_verifies_clean_and_says_what_it_checked(
        captured: Captured, store: Store, inbox: Inbox) -> None:
    report = verify_and_report(store, captured.database_id,
                               Notifier(inbox.topic_arn, inbox.sns))
    assert report.ok, report.findings
    assert report.verified == [captured.base.backup_id]
    assert report.capture is not None
    segment_bytes = sum(s.size for s in captured.segments)
    assert (report.capture.epochs, report.capture.segments, report.capture.bytes_read) == (
        1, 3, segment_bytes)
    assert report.capture.transactions == sum(s.transactions for s in captured.segments) == 3
    assert report.bytes_read == captured.base.total_bytes + segment_bytes
    (message,) = inbox.messages()
    assert message["Message"]["details"]["capture"] == {
        "epochs": 1, "segments": 3, "transactions": 3, "bytes_read": segment_bytes,
        "problems": 0, "released_epochs": 0}


def test_a_store_without_capture_verifies_as_before(logical: Cluster, new_db: Any,
                                                    store: Store) -> None:
    db = new_db(logical)
    logical.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    full = run_backup(ConnectionInfo.from_url(logical.url(db)), store, BackupRequest())
    report = verify_database(store, full.database_id)
    assert report.ok and report.capture is None
    assert report.bytes_read == full.total_bytes
    assert "capture" not in report.summary()


def test_a_deleted_segment_object_is_named_missing(captured: Captured, store: Store,
                                                   s3: Any) -> None:
    gone = captured.segments[1]
    s3.delete_object(Bucket=BUCKET, Key=gone.key)
    assert _problems(store, captured) == [
        f"{_name(gone)}: missing (its index entry {_index(gone)} names it)"]


def test_an_overwritten_segment_is_named_damaged(captured: Captured, store: Store,
                                                 s3: Any) -> None:
    same_size, other_size = captured.segments[0], captured.segments[2]
    s3.put_object(Bucket=BUCKET, Key=same_size.key, Body=b"x" * same_size.size)
    s3.put_object(Bucket=BUCKET, Key=other_size.key, Body=b"other bytes")
    assert _problems(store, captured) == [
        f"{_name(same_size)}: damaged: sha256 does not match its index entry (same size: "
        "the content was altered)",
        f"{_name(other_size)}: damaged: size 11 bytes, its index entry says "
        f"{other_size.size}"]


def test_a_middle_segment_deleted_with_its_index_entry_is_a_gap_naming_the_range(
        captured: Captured, store: Store, s3: Any) -> None:
    before, gone, after = captured.segments
    assert after.after == gone.end_lsn and gone.after == before.end_lsn  # the chain
    s3.delete_object(Bucket=BUCKET, Key=gone.key)
    s3.delete_object(Bucket=BUCKET, Key=_index_key(store, captured, gone))
    epoch = captured.epoch.start_lsn
    assert _problems(store, captured) == [
        f"cdc/epochs/{lsn_key(epoch)}.json: a gap in epoch {epoch}: no stored segment holds "
        f"the changes from {before.end_lsn} to {gone.end_lsn} (the next entry, "
        f"{_index(after)}, begins after {gone.end_lsn})"]


def test_the_newest_index_entry_deleted_is_named_by_the_progress_record(
        captured: Captured, store: Store, s3: Any) -> None:
    newest = captured.segments[-1]
    s3.delete_object(Bucket=BUCKET, Key=_index_key(store, captured, newest))
    epoch = captured.epoch.start_lsn
    assert _problems(store, captured) == [
        f"cdc/progress/{lsn_key(epoch)}.json: names the newest segment of epoch {epoch}, "
        f"ending at {newest.end_lsn}, but its index entry {_index(newest)} is gone "
        "(its segment no longer counts): the epoch's newest changes are lost"]


def test_an_epoch_whose_base_manifest_was_deleted_is_named(
        captured: Captured, store: Store, s3: Any) -> None:
    # another backup, so the database still has one to verify (backup ids have one-second
    # resolution: it needs its own)
    time.sleep(1.1)
    later = run_backup(captured.conn, store, BackupRequest(database_id=captured.database_id))
    base = captured.base.backup_id
    s3.delete_object(Bucket=BUCKET, Key=store.backup_key(captured.database_id, base,
                                                         "manifest.json"))
    epoch = captured.epoch.start_lsn
    report = verify_database(store, captured.database_id)
    assert report.verified == [later.backup_id]
    assert [str(f) for f in report.findings] == [
        f"cdc/epochs/{lsn_key(epoch)}.json: the base of epoch {epoch}, backup {base}, is "
        "missing (it has no manifest): no restore can replay the epoch's changes"]


def test_the_command_line_fails_naming_the_first_problem(
        captured: Captured, store: Store, s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from supabackup import cli
    args = ["verify", "--store", str(store.url), "--database-id", captured.database_id]
    assert cli.main(args) == 0
    whole = capsys.readouterr()
    assert "0 problem(s)" in whole.out and not whole.err
    assert "verified change capture: 3 segment(s) in 1 epoch(s), 3 transaction(s)" in whole.out
    first, second = captured.segments[0], captured.segments[1]
    s3.delete_object(Bucket=BUCKET, Key=first.key)
    s3.delete_object(Bucket=BUCKET, Key=second.key)
    assert cli.main(args) == 1
    failed = capsys.readouterr()
    assert failed.err.startswith(f"supabackup: error: {_name(first)}: missing "), failed.err
    assert "(and 1 more problem(s))" in failed.err and len(failed.err.splitlines()) == 1
    assert f"PROBLEM {_name(first)}: missing" in failed.out
    assert f"PROBLEM {_name(second)}: missing" in failed.out
    with pytest.raises(VerifyFailed):
        verify_and_report(store, captured.database_id, Notifier(None))


# --- the audit alone, over records: what stores written before 0.6 hold ---------------

def _entry(end: str, after: str = "", epoch: str = "") -> Segment:
    return Segment(key=f"db/cdc/segments/{lsn_key(end)}.jsonl.gz", end_lsn=end, transactions=1,
                   first_commit_time="2026-01-01T00:00:00Z",
                   last_commit_time="2026-01-01T00:00:00Z", size=1, sha256="s",
                   epoch=epoch, after=after)


def _epoch(start: str, base: str) -> CaptureState:
    return CaptureState(slot="s", plugin="wal2json", base=base, start_lsn=start,
                        base_at="2026-01-01T00:00:00Z")


def test_entries_that_name_no_epoch_are_assigned_by_lsn_and_not_gap_checked() -> None:
    first, second = _epoch("0/100", "b1"), _epoch("0/500", "b2")
    entries = [_entry("0/200"), _entry("0/300"),                 # before 0.6: no chain
               _entry("0/600", after="0/500", epoch="0/500"),
               _entry("0/900", after="0/700", epoch="0/500")]    # 0/600 to 0/700 is lost
    stored = Stored(epochs=[first, second], entries=entries,
                    progress={"0/100": Progress("0/300", "2026-01-01T00:00:00Z"),
                              "0/500": Progress("0/900", "2026-01-01T00:00:00Z",
                                                last_segment="0/900")})
    objects = {e.key: Read(size=1, sha256="s", transactions=1) for e in entries}
    assert [str(p) for p in audit(stored, {"b1": "", "b2": ""}, objects)] == [
        f"epochs/{lsn_key('0/500')}.json: a gap in epoch 0/500: no stored segment holds the "
        f"changes from 0/600 to 0/700 (the next entry, index/{entry_name('0/900', '0/500')}"
        ".json, "
        "begins after 0/700)"]


def test_an_epoch_retention_let_go_is_not_checked_but_one_the_window_needs_is(
        captured: Captured, logical: Cluster, store: Store, s3: Any) -> None:
    from datetime import timedelta

    from supabackup.capture.audit import audit_store
    from supabackup.manifest import parse_time
    # GIVEN a schema change: a second epoch, and the first one ended
    logical.execute("ALTER TABLE accounts ADD COLUMN note text", captured.conn.dbname)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    assert capture.run(captured.conn, store, captured.database_id).restarted
    first, second = capture.epochs(store, captured.database_id)
    # WHEN lifecycle took the first epoch's changes and retention its base
    for segment in captured.segments:
        s3.delete_object(Bucket=BUCKET, Key=segment.key)
    s3.delete_object(Bucket=BUCKET, Key=store.backup_key(captured.database_id, first.base,
                                                         "manifest.json"))
    manifests = {m.backup_id for m in store.manifests(captured.database_id)}
    # THEN, once the first epoch ended more than keep_days ago, verify leaves it alone
    later = parse_time(second.base_at) + timedelta(days=8)
    found = audit_store(store, captured.database_id, manifests, keep_days=7, now=later)
    assert found is not None and found.problems == [] and found.released == 1
    assert found.summary()["released_epochs"] == 1
    # and while the window still reaches it, each loss is named
    found = audit_store(store, captured.database_id, manifests, keep_days=7,
                        now=parse_time(second.base_at) + timedelta(days=1))
    assert found is not None and found.released == 0
    names = {p.name for p in found.problems}
    assert f"epochs/{lsn_key(first.start_lsn)}.json" in names
    assert all(_name(s).removeprefix("cdc/") in names for s in captured.segments)
