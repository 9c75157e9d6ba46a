"""The restore drill: a backup restored on a scratch server equals what its snapshot held.

Checksums cannot tell a whole archive from one that holds the wrong data; the drill can.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from supabackup import backup
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import VerifyFailed
from supabackup.inventory import Scanned
from supabackup.manifest import Manifest, TableState, new_backup_id
from supabackup.notify import Notifier
from supabackup.pgtools import child_env, find_tools
from supabackup.report import verify_and_report
from supabackup.store import Store
from supabackup.verify import verify_database

from devkit.pg import Cluster

from .helpers import BUCKET, SQL, Inbox

START = datetime(2026, 11, 22, 3, tzinfo=UTC)


def _conn(cluster: Cluster, db: str = "postgres") -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _scratch_databases(cluster: Cluster) -> list[str]:
    return [r[0] for r in cluster.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'supabackup\\_drill\\_%'")]


def _full_and_incremental(cluster: Cluster, db: str, store: Store) -> tuple[Manifest, Manifest]:
    conn = _conn(cluster, db)
    full = run_backup(conn, store, BackupRequest(backup_id=new_backup_id(START, "full")))
    cluster.execute("CREATE TABLE added_later (id int, note text);"
                    "INSERT INTO added_later SELECT g, 'n' || g FROM generate_series(1, 50) g",
                    db)
    incr = run_backup(conn, store, BackupRequest(
        kind="incremental", backup_id=new_backup_id(START + timedelta(days=1), "incremental")))
    assert incr.kind == "incremental"
    return full, incr


def test_drill_restores_the_newest_backup_and_every_table_matches(
        cluster: Cluster, new_db: Any, store: Store) -> None:
    # GIVEN a chain of every common kind of object, and data whose text depends on settings
    db = new_db(cluster)
    cluster.psql_file(SQL / "all_kinds.sql", db)
    full, incr = _full_and_incremental(cluster, db, store)
    # WHEN verify drills on the same server (as a scratch server)
    report = verify_database(store, full.database_id, drill=_conn(cluster))
    # THEN every table of the incremental matches, including those held in the full
    assert report.ok, report.findings
    assert report.drill is not None and report.drill.backup_id == incr.backup_id
    assert report.drill.tables == len(incr.tables) > 10
    assert report.drill.unfingerprinted == 0
    # both ways of hashing rows are exercised: binary where it survives a restore, text
    # where it does not (enums, composites, ranges, json, ...)
    assert {t.fingerprint.split(":")[0] for t in incr.tables} == {"r", "t"}
    assert report.drill.restore is not None
    assert report.drill.restore.backups == [full.backup_id, incr.backup_id]
    # every table's fingerprint was read afresh, and no type of all_kinds hashes
    # differently twice in a row: only the new table was dumped
    assert {t.name: t.reason for t in incr.tables if t.reason} == {
        "added_later": "new table"}
    assert report.drill.rows == sum(t.rows for t in incr.tables) > 0
    # AND the scratch database is gone
    assert _scratch_databases(cluster) == []


def _replace_part_with_a_copy_of_now(cluster: Cluster, db: str, store: Store, s3: Any,
                                     manifests: list[Manifest], table: str) -> None:
    """Store a real, whole COPY of `table` as it is now in place of its (one) part, and make
    the manifests (its holder's, and those relying on it) describe it: every checksum
    agrees."""
    import zstandard
    [state] = [t for t in manifests[0].tables if t.name == table]
    [part] = state.parts
    rows = subprocess.run([find_tools(cluster.major).path("psql"), "-X", "-q", "-c",
                           f"COPY public.{table} ({', '.join(state.columns)}) TO STDOUT"],
                          env=child_env(_conn(cluster, db)), capture_output=True,
                          check=True).stdout
    body = zstandard.ZstdCompressor().compress(rows)
    s3.put_object(Bucket=BUCKET, Key=store.backup_key(manifests[0].database_id, state.held_in,
                                                     part.name), Body=body)
    for manifest in manifests:
        key = store.backup_key(manifest.database_id, manifest.backup_id, "manifest.json")
        doc = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        for record in doc["objects"] + [p for t in doc["tables"] for p in t["parts"]]:
            if record["name"] == part.name:
                record["size"], record["sha256"] = len(body), hashlib.sha256(body).hexdigest()
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(doc).encode())


def test_drill_fails_when_one_tables_data_was_altered_after_the_backup(
        pg17: Cluster, new_db: Any, store: Store, s3: Any, inbox: Inbox) -> None:
    # GIVEN a chain whose stored part holds one table as it was altered after the snapshot
    # (the incremental, which leaves it in the full's folder, fingerprinted it in its own)
    db = new_db(pg17)
    # (a column named like the scan's row alias: the whole row is still what is hashed)
    pg17.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric, sb_row text);"
                 "INSERT INTO accounts SELECT g, g * 10, 'same' FROM generate_series(1, 100) g;"
                 "CREATE TABLE audit (id int, note text);"
                 "INSERT INTO audit SELECT g, 'x' FROM generate_series(1, 10) g", db)
    full = run_backup(_conn(pg17, db), store, BackupRequest(
        backup_id=new_backup_id(START, "full")))
    incr = run_backup(_conn(pg17, db), store, BackupRequest(
        kind="incremental", backup_id=new_backup_id(START + timedelta(days=1), "incremental")))
    assert {t.held_in for t in incr.tables} == {full.backup_id}
    pg17.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 42", db)
    _replace_part_with_a_copy_of_now(pg17, db, store, s3, [full, incr], "accounts")
    # WHEN verify checks the objects only, every checksum agrees
    assert verify_database(store, full.database_id).ok
    # THEN the drill names the altered table, and only it
    with pytest.raises(VerifyFailed, match="public.accounts: content differs"):
        verify_and_report(store, full.database_id, Notifier(inbox.topic_arn, inbox.sns),
                          drill=_conn(pg17))
    (message,) = inbox.messages()
    assert message["MessageAttributes"]["status"]["Value"] == "failed"
    assert "verify of" in message["Subject"] and "public.accounts" in message["Subject"]
    assert message["Message"]["details"]["problems"] == [
        p for p in message["Message"]["details"]["problems"] if "public.accounts" in p]
    assert message["Message"]["details"]["drill"]["tables"] == 2
    assert _scratch_databases(pg17) == []


def test_the_drill_of_a_full_backup_compares_each_restored_table_with_its_stored_parts(
        pg15: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full backup records rows but no fingerprint (tabledata.py): its drill proves the
    restore by reading each restored table back against the lines its parts hold. A
    restore that changed one value is named."""
    from supabackup import drill
    db = new_db(pg15)
    pg15.execute("CREATE TABLE prices (id int PRIMARY KEY, amount float8, label text);"
                 "INSERT INTO prices SELECT g, g / 3.0, 'p' || g FROM generate_series(1, 200) g;"
                 "CREATE TABLE other (id int); INSERT INTO other VALUES (1)", db)
    full = run_backup(_conn(pg15, db), store, BackupRequest())
    assert {t.fingerprint for t in full.tables} == {""}
    assert verify_database(store, full.database_id, drill=_conn(pg15)).ok
    restore = drill.run_restore

    def lossy(store: Store, manifest: Manifest, target: ConnectionInfo) -> Any:
        report = restore(store, manifest, target)  # then "rounds" one float, as a lossy
        pg15.execute("UPDATE prices SET amount = round(amount::numeric, 6) WHERE id = 7",
                     target.dbname)                # restore would
        return report

    monkeypatch.setattr(drill, "run_restore", lossy)
    report = verify_database(store, full.database_id, drill=_conn(pg15))
    assert [str(f).split(" (")[0] for f in report.findings] == [
        f"{full.backup_id}/public.prices: content differs from its stored parts"]


def test_drill_names_a_table_whose_rows_went_missing(pg15: Cluster, new_db: Any,
                                                     store: Store, s3: Any) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 9)",
                 db)
    full = run_backup(_conn(pg15, db), store, BackupRequest())
    pg15.execute("DELETE FROM orders WHERE id > 6", db)
    _replace_part_with_a_copy_of_now(pg15, db, store, s3, [full], "orders")
    report = verify_database(store, full.database_id, drill=_conn(pg15))
    assert [str(f) for f in report.findings] == [
        f"{full.backup_id}/public.orders: 6 rows restored, the backup's snapshot held 9"]


def test_drill_is_not_run_on_a_backup_that_failed_to_verify(pg15: Cluster, new_db: Any,
                                                            store: Store, s3: Any) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    full = run_backup(_conn(pg15, db), store, BackupRequest())
    s3.delete_object(Bucket=BUCKET, Key=store.backup_key(full.database_id, full.backup_id,
                                                         "schema.dump"))
    problems = [str(f) for f in verify_database(store, full.database_id,
                                                drill=_conn(pg15)).findings]
    assert problems == [f"{full.backup_id}/schema.dump: missing",
                        f"{full.backup_id}/drill: not run: the backup relies on "
                        f"{full.backup_id}, which failed to verify"]
    assert _scratch_databases(pg15) == []


def test_drill_succeeds_on_sns_with_what_it_compared(pg15: Cluster, new_db: Any, store: Store,
                                                     inbox: Inbox) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE ROLE sb_drill_only; CREATE TABLE t (id int);"
                 "GRANT SELECT ON t TO sb_drill_only; INSERT INTO t VALUES (1), (2)", db)
    try:
        full = run_backup(_conn(pg15, db), store, BackupRequest())
        pg15.execute("DROP TABLE t", db)
        pg15.execute("DROP ROLE sb_drill_only")  # the drill server lacks the role
        report = verify_and_report(store, full.database_id, Notifier(inbox.topic_arn, inbox.sns),
                                   drill=_conn(pg15))
        assert report.drill is not None and report.drill.restore is not None
        assert report.drill.restore.roles_created == ["sb_drill_only"]
        # the drill drops the roles its restore created
        assert pg15.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'sb_drill_only'") == [
            (0,)]
        (message,) = inbox.messages()
        assert message["Subject"] == (f"supabackup: verify of {full.database_id} succeeded: "
                                      "1 backup(s) whole; drill: 1 tables match")
        details = message["Message"]["details"]
        assert details["drill"]["backup_id"] == full.backup_id
        assert details["drill"]["rows"] == 2 and details["problems"] == []
    finally:
        pg15.execute("DROP ROLE IF EXISTS sb_drill_only")


def test_drill_of_a_supabase_backup_on_a_plain_server(pg15: Cluster, new_db: Any,
                                                     store: Store) -> None:
    """A drill server is plain PostgreSQL: it lacks anon, authenticated, supabase_admin, ...
    which own the backup's objects and appear in its grants and policies."""
    from devkit.pg import bindir_for
    source = new_db(pg15)
    for name in ("supabase_platform.sql", "supabase_sample.sql"):
        pg15.psql_file(SQL / name, source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="supabase"))
    assert {"anon", "authenticated", "supabase_admin"} <= set(manifest.platform_roles)
    # The same major version as the source, as a drill server should be (extension
    # versions, and the grants on their functions, differ between majors).
    with Cluster(bindir_for(15)) as plain:  # a server no test has put Supabase's roles on
        roles_before = plain.execute("SELECT rolname FROM pg_roles ORDER BY 1")
        report = verify_database(store, manifest.database_id, drill=_conn(plain))
        assert report.ok, report.findings
        assert report.drill is not None and report.drill.restore is not None
        assert report.drill.tables == len(manifest.tables) > 5
        assert "anon" in report.drill.restore.roles_created
        # the drill leaves the server as it found it
        assert plain.execute("SELECT rolname FROM pg_roles ORDER BY 1") == roles_before
        assert _scratch_databases(plain) == []


def test_drill_of_an_incremental_that_wrongly_kept_a_changed_table_fails_naming_it(
        cluster: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an incremental whose decision was wrong: it calls every table unchanged, past
    # both change detection and the fingerprint check, though one table was updated
    db = new_db(cluster)
    cluster.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric);"
                    "INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 100) g;"
                    "CREATE TABLE audit (id int, note text);"
                    "INSERT INTO audit SELECT g, 'x' FROM generate_series(1, 10) g", db)
    conn = _conn(cluster, db)
    full = run_backup(conn, store, BackupRequest(backup_id=new_backup_id(START, "full")))
    cluster.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 42", db)
    decide = backup.decide

    def blind(scanned: Iterable[Scanned], previous: dict[int, TableState] | None,
              backup_id: str) -> list[TableState]:
        return [replace(t, reason="", held_in=previous[t.oid].held_in)
                if previous and t.oid in previous else t
                for t in decide(scanned, previous, backup_id)]

    monkeypatch.setattr(backup, "decide", blind)
    incr = run_backup(conn, store, BackupRequest(
        kind="incremental", backup_id=new_backup_id(START + timedelta(days=1), "incremental")))
    assert incr.kind == "incremental" and incr.tables_dumped == 0
    # WHEN verify drills the incremental: every object is whole, so only the drill can tell
    with pytest.raises(VerifyFailed) as failed:
        verify_and_report(store, full.database_id, Notifier(None), drill=_conn(cluster))
    # THEN it names the stale table, and only it: its restored rows are the full's, and
    # the incremental recorded what its own snapshot held
    assert "public.accounts: content differs" in failed.value.message
    report = failed.value.report
    assert [(f.backup_id, f.name) for f in report.findings] == [(incr.backup_id,
                                                                  "public.accounts")]
    assert report.findings[0].problem.startswith("content differs from the backup's snapshot")
    assert report.drill is not None and report.drill.unfingerprinted == 0
    assert _scratch_databases(cluster) == []
