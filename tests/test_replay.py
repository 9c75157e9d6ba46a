"""Replay in batches (capture/replay.py): many captured transactions in one database
transaction, their statements checked in the server; a batch that fails is applied again
one transaction at a time, so the error still names the very transaction that failed and
says truthfully what the target holds. Captured transactions are written here by hand, in
the stream's format (wal2json format-version 2 records, as both plugins give them), and
replayed into a real server.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import pytest
from supabackup.capture import replay as replay_module
from supabackup.capture.replay import ReplayFailed, replay
from supabackup.dburl import ConnectionInfo

from devkit.pg import Cluster

SCHEMA = """
    CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL);
    CREATE TABLE twins (label text, n int);
    ALTER TABLE twins REPLICA IDENTITY FULL;
    CREATE TABLE log (line text);
    INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
    INSERT INTO twins SELECT 'row ' || g, g FROM generate_series(1, 60) g;
    INSERT INTO twins VALUES ('row 7', 7);
    INSERT INTO log VALUES ('a');
"""


def _col(name: str, kind: str, value: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": None if value is None else str(value)}


def _item(action: str, id_: int, label: str = "") -> dict[str, Any]:
    change: dict[str, Any] = {"action": action, "schema": "public", "table": "items"}
    if action != "D":
        change["columns"] = [_col("id", "integer", id_), _col("label", "text", label)]
    if action != "I":
        change["identity"] = [_col("id", "integer", id_)]
    return change


def _twin(action: str, label: str, n: int, new_n: int | None = None) -> dict[str, Any]:
    row = [_col("label", "text", label), _col("n", "integer", n)]
    change: dict[str, Any] = {"action": action, "schema": "public", "table": "twins",
                              "identity": row}
    if action == "U":
        change["columns"] = [_col("label", "text", label), _col("n", "integer", new_n)]
    return change


def _txns(*changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"xid": str(700 + i), "commit_lsn": f"0/{0x1000 + i:X}",
             "commit_time": f"2026-12-01T10:00:{i:02d}+00:00", "end_lsn": f"0/{0x1001 + i:X}",
             "changes": c} for i, c in enumerate(changes)]


def _target(cluster: Cluster, new_db: Any) -> tuple[str, ConnectionInfo]:
    db = new_db(cluster)
    cluster.execute(SCHEMA, db)
    return db, ConnectionInfo.from_url(cluster.url(db))


def test_a_failure_in_the_middle_of_a_batch_names_it_and_the_target_holds_those_before(
        cluster: Cluster, new_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN batches of 3 captured transactions, the fifth of which no longer fits the
    # target (its row is gone), after inserts gathered into multi-row statements
    monkeypatch.setattr(replay_module, "BATCH_TRANSACTIONS", 3)
    db, target = _target(cluster, new_db)
    txns = _txns([_item("I", 101, "a"), _item("I", 102, "b")], [_item("U", 5, "five")],
                 [_item("D", 6)], [_item("I", 103, "c")], [_item("U", 999, "gone")],
                 [_item("I", 104, "never")])
    # WHEN they are replayed
    with pytest.raises(ReplayFailed) as failed:
        replay(target, txns)
    # THEN the error names the fifth, and the target holds the base and the four before it:
    # the first batch committed, and the fourth, applied alone once its batch failed
    assert "transaction 704" in failed.value.message
    assert txns[4]["commit_lsn"] in failed.value.message
    assert "found 0 rows where the source had one" in failed.value.message
    assert ("holds the base and 4 transaction(s), through the one committed "
            f"{txns[3]['commit_time']}") in failed.value.hint
    assert cluster.execute("SELECT id, label FROM items WHERE id > 100 OR id IN (5, 6) "
                           "ORDER BY id", db) == [(5, "five"), (101, "a"), (102, "b"),
                                                  (103, "c")]


def test_an_error_of_the_server_in_a_gathered_statement_names_its_own_transaction(
        cluster: Cluster, new_db: Any) -> None:
    # GIVEN consecutive inserts of several transactions, one of which collides with a row
    # of the target (they go as one multi-row INSERT, the collision in its middle)
    db, target = _target(cluster, new_db)
    txns = _txns([_item("I", 201, "a")], [_item("I", 202, "b")], [_item("I", 50, "dup")],
                 [_item("I", 203, "c")])
    # WHEN they are replayed
    with pytest.raises(ReplayFailed) as failed:
        replay(target, txns)
    # THEN the error is the server's own, for that transaction, and the two before it hold
    assert "transaction 702" in failed.value.message
    assert "duplicate key" in failed.value.message
    assert "holds the base and 2 transaction(s)" in failed.value.hint
    assert cluster.execute("SELECT id FROM items WHERE id > 200 ORDER BY id", db) == [
        (201,), (202,)]
    assert cluster.execute("SELECT label FROM items WHERE id = 50", db) == [("item 50",)]


def test_a_batch_the_fast_way_cannot_apply_is_applied_one_by_one_and_counted_once(
        cluster: Cluster, new_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a transaction of many deletes from a REPLICA IDENTITY FULL table without a key
    # (gathered into one statement that finds rows by their whole text), one of which
    # deletes one of two twins, and updates of a table without a replica identity
    db, target = _target(cluster, new_db)
    deletes = [_twin("D", f"row {n}", n) for n in range(1, 41)]
    keyless = {"action": "U", "schema": "public", "table": "log",
               "columns": [_col("line", "text", "b")], "identity": []}
    txns = _txns([keyless, *deletes], [_twin("U", "row 50", 50, 500)], [keyless])
    applied_alone = []
    one = replay_module._apply_one
    monkeypatch.setattr(replay_module, "_apply_one",
                        lambda *a: applied_alone.append(a[2]["xid"]) or one(*a))
    # WHEN they are replayed
    done = replay(target, txns)
    # THEN the one statement found two rows for one change, so the batch went one by
    # one, and the target is exactly what the source was: one twin left
    assert applied_alone == ["700", "701", "702"]
    assert cluster.execute("SELECT label, n FROM twins WHERE n <= 40 OR n >= 500 "
                           "ORDER BY n", db) == [("row 7", 7), ("row 50", 500)]
    assert cluster.execute("SELECT count(*) FROM twins", db) == [(21,)]
    # and what it left out is counted once, though the batch was tried twice
    assert done.transactions == 3 and done.skipped == {"public.log": 2}
    assert done.last_commit_time == txns[-1]["commit_time"]


def test_many_changes_found_by_their_whole_row_go_as_one_and_leave_what_the_source_left(
        cluster: Cluster, new_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN many updates and deletes of a REPLICA IDENTITY FULL table without a key, a
    # NULL in a row they find, and changes that must see the one before them (row 9
    # updated twice; rows updated, then deleted)
    db, target = _target(cluster, new_db)
    cluster.execute("UPDATE twins SET n = NULL WHERE label = 'row 3'", db)
    updates = [_twin("U", f"row {n}", n, n + 1000) for n in range(1, 41) if n not in (3, 7)]
    updates[5:5] = [{**_twin("U", "row 3", 0, 3000),
                     "identity": [_col("label", "text", "row 3"), _col("n", "integer", None)]}]
    updates.append(_twin("U", "row 9", 1009, 2009))
    deletes = ([_twin("D", f"row {n}", n) for n in range(41, 61)]
               + [_twin("D", f"row {n}", n + 1000) for n in range(12, 31)])
    alone: list[Any] = []
    monkeypatch.setattr(replay_module, "_apply_one", lambda *a: alone.append(a))
    # WHEN they are replayed
    done = replay(target, _txns(updates, deletes))
    # THEN they went the fast way, and the table is what the source's would be
    assert alone == [] and done.transactions == 2
    assert cluster.execute("SELECT label, n FROM twins ORDER BY n, label", db) == sorted(
        [("row 7", 7), ("row 7", 7), ("row 3", 3000), ("row 9", 2009)]
        + [(f"row {n}", n + 1000) for n in range(1, 41) if n not in (3, 7, 9)
           and not 12 <= n <= 30],
        key=lambda r: (r[1], r[0]))


class _LostAtCommit(psycopg2.extensions.connection):
    """A connection whose server goes away just before its second commit (the first
    sets the replay up; the second is the first batch's)."""

    commits = 0

    def commit(self) -> None:
        type(self).commits += 1
        if type(self).commits == 2:
            with psycopg2.connect(self.dsn, password=self.info.password) as other:
                other.autocommit = True
                with other.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(%s)", (self.info.backend_pid,))
            other.close()
        super().commit()


def test_a_connection_lost_at_a_batch_commit_says_its_outcome_is_unknown(
        cluster: Cluster, new_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a target whose server goes away as the first batch commits
    db, target = _target(cluster, new_db)
    monkeypatch.setattr(_LostAtCommit, "commits", 0)
    monkeypatch.setattr(replay_module, "connect", lambda conn: psycopg2.connect(
        **conn.psycopg_kwargs(), connection_factory=_LostAtCommit))
    txns = _txns([_item("I", 301, "a")], [_item("U", 7, "seven")])
    # WHEN it is replayed
    with pytest.raises(ReplayFailed) as failed:
        replay(target, txns)
    # THEN the error names the batch, and says the target holds the base, or the base and
    # the batch (here the commit never reached the server: the base alone)
    assert "at the commit of 2 transaction(s), from transaction 700" in failed.value.message
    assert "holds the base only, or those 2 as well if the commit reached it" in (
        failed.value.hint)
    assert cluster.execute("SELECT count(*) FROM items WHERE id = 301", db) == [(0,)]
