"""Restores into real PostgreSQL 15 and 17: round trips, refusals, damaged archives."""

from __future__ import annotations

from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.catalog import select_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import BackupNotFound, RestoreFailed, StoreError
from supabackup.restore import RestoreOptions, run_restore
from supabackup.store import Store

from devkit.compare import differences, table_fingerprints
from devkit.pg import Cluster

from .helpers import BUCKET, SQL


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _user_relations(cluster: Cluster, db: str) -> int:
    return cluster.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%'", db)[0][0]


def test_every_common_kind_of_object_round_trips_to_an_identical_dump(
        cluster: Cluster, new_db: Any, store: Store) -> None:
    # GIVEN a database with every common kind of object (see devkit/sql/all_kinds.sql)
    source, target = new_db(cluster), new_db(cluster)
    cluster.psql_file(SQL / "all_kinds.sql", source)
    # WHEN it is backed up and restored into an empty database
    manifest = run_backup(_conn(cluster, source), store, BackupRequest())
    report = run_restore(store, manifest, _conn(cluster, target))
    # THEN a pg_dump of each is the same, apart from order
    assert differences(cluster.url(source), cluster.url(target)) == []
    assert report.bytes == sum(o.size for o in manifest.objects if o.kind != "roles")
    assert "sb_test_reader" in report.roles_existing


def test_supabase_shaped_database_round_trips_on_the_same_server(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    source, target = new_db(pg15), new_db(pg15)
    for name in ("supabase_platform.sql", "supabase_sample.sql"):
        pg15.psql_file(SQL / name, source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="postgres"))
    run_restore(store, manifest, _conn(pg15, target))
    assert differences(pg15.url(source), pg15.url(target)) == []


def test_restore_creates_missing_roles_and_reports_existing_ones(
        pg17: Cluster, new_db: Any, store: Store) -> None:
    source, target = new_db(pg17), new_db(pg17)
    pg17.execute("CREATE ROLE sb_restore_only; CREATE TABLE t (id int);"
                 "GRANT SELECT ON t TO sb_restore_only", source)
    manifest = run_backup(_conn(pg17, source), store, BackupRequest())
    pg17.execute("DROP TABLE t", source)
    pg17.execute("DROP ROLE sb_restore_only")  # as if restoring on another server
    try:
        report = run_restore(store, manifest, _conn(pg17, target))
        assert report.roles_created == ["sb_restore_only"]
        assert "postgres" in report.roles_existing
        assert pg17.execute("SELECT has_table_privilege('sb_restore_only', 't', 'SELECT')",
                            target) == [(True,)]
    finally:
        pg17.drop_database(target)
        pg17.execute("DROP ROLE IF EXISTS sb_restore_only")


def test_restore_refuses_a_target_that_is_not_empty_and_leaves_it_alone(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", source)
    pg15.execute("CREATE TABLE precious (id int); INSERT INTO precious VALUES (7)", target)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest())
    with pytest.raises(RestoreFailed, match=r"is not empty \(it has public.precious"):
        run_restore(store, manifest, _conn(pg15, target))
    assert pg15.execute("SELECT * FROM precious", target) == [(7,)]
    assert _user_relations(pg15, target) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_damaged_archive_is_refused_and_the_target_stays_empty(
        pg17: Cluster, new_db: Any, store: Store, s3: Any, damage: str) -> None:
    source, target = new_db(pg17), new_db(pg17)
    pg17.psql_file(SQL / "all_kinds.sql", source)
    manifest = run_backup(_conn(pg17, source), store, BackupRequest())
    _damage(s3, store.backup_key(manifest.database_id, manifest.backup_id, "schema.dump"), damage)
    with pytest.raises((StoreError, RestoreFailed), match="schema.dump does not match"):
        run_restore(store, manifest, _conn(pg17, target))
    assert _user_relations(pg17, target) == 0


def _damage(s3: Any, key: str, damage: str) -> None:
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        del data[-100:]
    else:
        data += b"trailing garbage"
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_damaged_table_part_loads_none_of_its_rows_and_the_restore_says_what_it_did(
        pg15: Cluster, new_db: Any, store: Store, s3: Any, damage: str) -> None:
    """The part's sha256 is checked before its COPY may end: the COPY is aborted, and the
    error names the part, says how far the restore got and that the target is incomplete.
    The same restore into a new database from an undamaged backup then succeeds."""
    source, target, again = new_db(pg15), new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE big (id int PRIMARY KEY, body text);"
                 "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 50000) g;"
                 "CREATE TABLE small (id int); INSERT INTO small VALUES (1)", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest())
    [big] = [t for t in manifest.tables if t.name == "big"]
    key = store.backup_key(manifest.database_id, manifest.backup_id, big.parts[0].name)
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    _damage(s3, key, damage)
    with pytest.raises(RestoreFailed) as failed:
        run_restore(store, manifest, _conn(pg15, target), RestoreOptions(jobs=2))
    message = str(failed.value)
    assert f"{big.parts[0].name} does not match its manifest" in message or (
        "zstd" in message and big.parts[0].name in message), message
    assert "table parts loaded" in message and "the target is incomplete" in message
    assert pg15.execute("SELECT count(*) FROM big", target) == [(0,)]
    s3.put_object(Bucket=BUCKET, Key=key, Body=original)
    run_restore(store, manifest, _conn(pg15, again), RestoreOptions(jobs=2))
    assert differences(pg15.url(source), pg15.url(again)) == []


def test_select_backup_by_id_time_and_latest(pg15: Cluster, new_db: Any, store: Store) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int)", db)
    first = run_backup(_conn(pg15, db), store,
                            BackupRequest(backup_id="20261101T030000Z-full"))
    second = run_backup(_conn(pg15, db), store,
                             BackupRequest(backup_id="20261108T030000Z-full"))
    assert select_backup(store, first.database_id).backup_id == second.backup_id
    assert select_backup(store, first.database_id, first.backup_id).backup_id == first.backup_id
    with pytest.raises(BackupNotFound, match="no backup 'nope'"):
        select_backup(store, first.database_id, "nope")
    with pytest.raises(BackupNotFound, match="no committed backup"):
        select_backup(store, "unknown-db")


def test_backup_of_postgresql_15_restores_into_postgresql_17(
        pg15: Cluster, pg17: Cluster, new_db: Any, store: Store) -> None:
    # The upgrade path: Supabase projects move from 15 to 17.
    source, target = new_db(pg15), new_db(pg17)
    pg15.psql_file(SQL / "all_kinds.sql", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest())
    run_restore(store, manifest, _conn(pg17, target))
    restored = table_fingerprints(pg17.url(target))
    assert restored == table_fingerprints(pg15.url(source))
    assert len(restored) >= 10 and all(count for count, _ in restored.values())


def test_script_filter_adapts_statements_and_never_touches_copy_data() -> None:
    import io

    from supabackup.restore.pipeline import ScriptFilter
    script = b"".join([
        b"SET transaction_timeout = 0;\n",
        b"ALTER TABLE ONLY public.t ALTER COLUMN id SET (pg_attver=26490784);\n",
        b"ALTER TABLE ONLY public.t ALTER COLUMN v SET (n_distinct=5, pg_attver=26490784);\n",
        b"COPY public.t (id, v) FROM stdin;\n",
        b"1\tSET transaction_timeout = 0;\n",
        b"2\tALTER TABLE ONLY public.t ALTER COLUMN id SET (pg_attver=1);\n",
        b"\\.\n",
        b"SELECT 1;\n",
    ])
    out_15, out_17 = io.BytesIO(), io.BytesIO()
    ScriptFilter(150020).pump(io.BytesIO(script), out_15)
    ScriptFilter(170011).pump(io.BytesIO(script), out_17)
    assert out_15.getvalue() == b"".join([
        b"ALTER TABLE ONLY public.t ALTER COLUMN v SET (n_distinct=5);\n",
        b"COPY public.t (id, v) FROM stdin;\n",
        b"1\tSET transaction_timeout = 0;\n",
        b"2\tALTER TABLE ONLY public.t ALTER COLUMN id SET (pg_attver=1);\n",
        b"\\.\n",
        b"SELECT 1;\n",
    ])
    assert out_17.getvalue() == b"SET transaction_timeout = 0;\n" + out_15.getvalue()


def test_dry_run_names_every_archive_a_chain_restore_reads_and_touches_nothing(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    from supabackup.backup import run_backup
    from supabackup.manifest import new_backup_id
    from supabackup.restore import describe_plan
    db = new_db(pg15)
    pg15.execute("CREATE TABLE kept (id int); CREATE TABLE moved (id int);"
                 "INSERT INTO kept VALUES (1); INSERT INTO moved VALUES (1)", db)
    start = datetime(2026, 11, 22, 3, tzinfo=UTC)
    full = run_backup(_conn(pg15, db), store,
                      BackupRequest(backup_id=new_backup_id(start, "full")))
    pg15.execute("INSERT INTO moved VALUES (2)", db)
    incr = run_backup(_conn(pg15, db), store, BackupRequest(
        kind="incremental", backup_id=new_backup_id(start + timedelta(days=1), "incremental")))
    lines = describe_plan(store, incr)
    assert lines[0].startswith(f"restore of {incr.backup_id} (incremental")
    parts = {line.split()[-1]: line.split()[0] for line in lines if "/tables/" in line}
    assert {table: where.split("/")[0] for table, where in parts.items()} == {
        "public.kept": full.backup_id, "public.moved": incr.backup_id}
    assert any(line.startswith(f"  {incr.backup_id}/schema.dump ") for line in lines)


def test_at_a_time_capture_does_not_cover_restores_the_newest_backup_before_it_and_says_so(
        pg15: Cluster, new_db: Any, store: Store, inbox: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`restore --at TIME` with no change capture: the newest backup taken at or before
    the time, and the output and the SNS message say that is what it was (not a replay)."""
    from datetime import timedelta

    from supabackup import cli
    from supabackup.manifest import iso, new_backup_id, parse_time, utcnow
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", source)
    before = run_backup(_conn(pg15, source), store, BackupRequest(
        backup_id=new_backup_id(utcnow() - timedelta(minutes=1), "full")))
    when = parse_time(before.snapshot_at) + timedelta(milliseconds=1)
    pg15.execute("INSERT INTO t VALUES (2)", source)
    run_backup(_conn(pg15, source), store, BackupRequest())
    code = cli.main(["restore", "--store", str(store.url), "--target-url", pg15.url(target),
                     "--at", iso(when), "--sns-topic-arn", inbox.topic_arn])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"no change capture covers {when.isoformat()}: restoring the newest backup taken "
            f"at or before it, {before.backup_id}") in out
    assert pg15.execute("SELECT id FROM t", target) == [(1,)]
    (message,) = inbox.messages()
    assert message["Message"]["details"]["method"] == "backup"
    assert message["Message"]["details"]["backup_id"] == before.backup_id
