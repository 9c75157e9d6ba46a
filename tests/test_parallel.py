"""Parallel backups and restores (format 2): tables as parts of their own, big ones in page
ranges, dumped by N workers in one snapshot, and restored over N connections.

A table split into ranges must restore with no row lost or doubled at an edge, whatever
its pages hold: dead tuples, empty pages, a last page, rows written while it is read.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from supabackup import tabledata
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError, RestoreFailed
from supabackup.inventory import Listed
from supabackup.restore import RestoreOptions, run_restore
from supabackup.store import Store
from supabackup.tabledata import MIB, plan_slices

from devkit.compare import differences, dump_lines
from devkit.pg import Cluster

from .helpers import stored_keys


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _table(oid: int, size: int) -> Listed:
    return Listed(oid, "public", f"t{oid}", oid, "d", 0, size // 8192, [], ["id"], size)


# --- the plan: pure, no server ------------------------------------------------------------

def test_ranges_cover_every_page_once_and_the_last_is_open_ended() -> None:
    big, small = _table(1, 1000 * 8192), _table(2, 3 * 8192)
    slices = plan_slices([small, big], jobs=4, split_ranges=True, range_bytes=64 * 8192)
    ranges = sorted((s.first_page, s.end_page) for s in slices if s.table.oid == 1)
    assert ranges[0][0] == 0 and ranges[-1][1] == -1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # no gap, no overlap
    assert len(ranges) == 16
    assert [s.whole for s in slices if s.table.oid == 2] == [True]
    assert [s.bytes for s in slices] == sorted((s.bytes for s in slices), reverse=True)
    assert len({s.name for s in slices}) == len(slices)


def test_no_ranges_without_tid_range_scans_and_none_for_one_worker_below_a_gib() -> None:
    big = _table(1, 512 * MIB)
    assert [s.whole for s in plan_slices([big], 4, split_ranges=False)] == [True]
    assert [s.whole for s in plan_slices([big], 1, split_ranges=True)] == [True]
    # 512 MiB over 4 workers: ranges of 512 / (4 x 4) = 32 MiB, raised to the 64 MiB least
    assert len(plan_slices([big], 4, split_ranges=True)) == 8
    assert len(plan_slices([_table(1, 3 * 1024 * MIB)], 1, split_ranges=True)) == 3


@pytest.mark.parametrize("value", ["0", "x", "-1", "17", "2.5", True])
def test_a_number_of_workers_that_is_not_one_is_refused_by_name(value: Any) -> None:
    with pytest.raises(ConfigError, match="--jobs must be a whole number of workers from 1"):
        BackupRequest(jobs=value)
    with pytest.raises(ConfigError, match="must be a whole number of workers"):
        RestoreOptions(jobs=value)


def test_the_cli_refuses_bad_jobs_before_touching_the_database_or_the_store(
        store: Store, s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from supabackup import cli
    code = cli.main(["backup", "full", "--database-url", "postgresql://u:p@127.0.0.1:1/db",
                     "--store", str(store.url), "--jobs", "many"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs (or $SUPABACKUP_JOBS) must be a whole number" in err[0]
    assert stored_keys(s3) == []


def test_the_default_workers_follow_the_lambda_functions_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tabledata.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3},
                        raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
    assert tabledata.default_jobs() == 1
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
    assert tabledata.default_jobs() == 2
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    assert tabledata.default_jobs() == 8
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
    assert tabledata.default_jobs() == 7


# --- page ranges on a real server -----------------------------------------------------------

def _split_table(cluster: Cluster, db: str) -> None:
    """About 60 pages: dead tuples everywhere, whole pages emptied in the middle, a last
    page half full, a TOASTed column, a NULL and a row with every byte that COPY escapes."""
    cluster.execute("""
        CREATE TABLE wide (id int PRIMARY KEY, body text, big text);
        ALTER TABLE wide SET (autovacuum_enabled = off);
        INSERT INTO wide SELECT g, md5(g::text) || repeat('x', 60),
               CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 400) END
          FROM generate_series(1, 6000) g;
        DELETE FROM wide WHERE id % 3 = 0;                 -- dead tuples on every page
        DELETE FROM wide WHERE id BETWEEN 2000 AND 3500;   -- whole pages with no live row
        UPDATE wide SET body = body || '!' WHERE id % 7 = 0;  -- new versions, later pages
        INSERT INTO wide VALUES (900001, E'tab\\there\\nnewline \\\\ backslash \\r', NULL),
                                (900002, NULL, '');
        CREATE TABLE small (id int); INSERT INTO small VALUES (1), (2);
        CREATE TABLE empty (id int);
    """, db)


def test_a_table_split_into_ranges_restores_every_row_once(
        cluster: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(cluster), new_db(cluster)
    _split_table(cluster, source)
    monkeypatch.setenv(tabledata.SPLIT_ENV, str(4 * 8192))  # ranges of 4 pages
    manifest = run_backup(_conn(cluster, source), store, BackupRequest(jobs=4))
    [wide] = [t for t in manifest.tables if t.name == "wide"]
    assert len(wide.parts) >= 10, "the table must really be split"
    assert wide.parts[-1].end_page == -1
    assert [p.first_page for p in wide.parts[1:]] == [p.end_page for p in wide.parts[:-1]]
    assert any(p.rows == 0 for p in wide.parts), "an empty range must be among them"
    expected = cluster.execute("SELECT count(*) FROM wide", source)[0][0]
    assert wide.rows == sum(p.rows for p in wide.parts) == expected
    run_restore(store, manifest, _conn(cluster, target), RestoreOptions(jobs=3))
    assert differences(cluster.url(source), cluster.url(target)) == []


def test_rows_written_while_the_workers_read_are_not_in_the_backup(
        pg17: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes that commit after the snapshot (inserts, updates that move rows to later
    pages, deletes) while a split table is being read: the restore is the snapshot's."""
    source, target = new_db(pg17), new_db(pg17)
    _split_table(pg17, source)
    before = dump_lines(pg17.url(source))
    monkeypatch.setenv(tabledata.SPLIT_ENV, str(4 * 8192))
    stop = threading.Event()
    writes: list[int] = []

    def write() -> None:
        conn = pg17.connect(source)
        conn.autocommit = True
        with conn.cursor() as cur:
            n = 0
            while not stop.is_set():
                n += 1
                cur.execute("INSERT INTO wide VALUES (%s, 'during', NULL)", (1_000_000 + n,))
                cur.execute("UPDATE wide SET body = body || '#' WHERE id = %s", (1 + n % 6000,))
                cur.execute("DELETE FROM wide WHERE id = %s", (6000 - n % 6000,))
                writes.append(n)
        conn.close()

    run = tabledata.TableDumper.run

    def run_while_writing(self: Any, slices: Any, *args: Any) -> Any:
        writer = threading.Thread(target=write, daemon=True)  # the snapshot is taken and
        writer.start()                                        # the tables are locked
        while not writes:
            time.sleep(0.01)
        try:
            return run(self, slices, *args)
        finally:
            stop.set()
            writer.join()

    monkeypatch.setattr(tabledata.TableDumper, "run", run_while_writing)
    manifest = run_backup(_conn(pg17, source), store, BackupRequest(jobs=4))
    assert writes, "the writer must have committed while the backup ran"
    assert pg17.execute("SELECT count(*) FROM wide WHERE body = 'during'", source)[0][0] > 0
    run_restore(store, manifest, _conn(pg17, target), RestoreOptions(jobs=4))
    assert dump_lines(pg17.url(target)) == before


def test_an_incremental_references_the_parts_of_unchanged_tables_and_copies_none(
        pg15: Cluster, new_db: Any, store: Store, s3: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(pg15), new_db(pg15)
    _split_table(pg15, source)
    monkeypatch.setenv(tabledata.SPLIT_ENV, str(4 * 8192))
    full = run_backup(_conn(pg15, source), store, BackupRequest(
        backup_id="20261122T030000Z-full", jobs=2))
    pg15.execute("INSERT INTO small VALUES (3)", source)
    incr = run_backup(_conn(pg15, source), store, BackupRequest(
        kind="incremental", backup_id="20261123T030000Z-incr", jobs=2))
    by_name = {t.name: t for t in incr.tables}
    full_wide = next(t for t in full.tables if t.name == "wide")
    assert by_name["wide"].held_in == full.backup_id
    assert by_name["wide"].parts == full_wide.parts
    assert by_name["small"].held_in == incr.backup_id
    own = [k.rsplit("/", 2)[-2:] for k in stored_keys(s3) if f"/{incr.backup_id}/tables/" in k]
    assert [name for _, name in own] == [p.name.split("/")[-1] for p in by_name["small"].parts]
    run_restore(store, incr, _conn(pg15, target), RestoreOptions(jobs=4))
    assert differences(pg15.url(source), pg15.url(target)) == []


# --- a restore that fails part way ----------------------------------------------------------

def test_a_restore_whose_target_fails_part_way_says_what_it_did_and_a_rerun_succeeds(
        pg15: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's backends are terminated while parts load: one clear error that says how
    far it got and that the target is incomplete; the same restore into a new database
    then gives back the source."""
    source, broken, again = new_db(pg15), new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE a (id int PRIMARY KEY, body text); CREATE TABLE b (id int);"
                 "INSERT INTO a SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g;"
                 "INSERT INTO b SELECT generate_series(1, 100)", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(jobs=2))
    killed: list[int] = []

    def terminate_a_copy() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            killed.extend(r[0] for r in pg15.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                f"{_literal(broken)} AND query LIKE 'COPY %FROM STDIN' AND state = 'active'"))
            time.sleep(0.005)

    watcher = threading.Thread(target=terminate_a_copy, daemon=True)
    watcher.start()
    with pytest.raises(RestoreFailed) as failed:
        run_restore(store, manifest, _conn(pg15, broken), RestoreOptions(jobs=2))
    watcher.join()
    assert killed, "a COPY into the target must have been terminated"
    message = str(failed.value)
    assert "table parts loaded" in message and "the target is incomplete" in message, message
    assert "terminat" in message and "\n" not in message
    run_restore(store, manifest, _conn(pg15, again), RestoreOptions(jobs=2))
    assert differences(pg15.url(source), pg15.url(again)) == []


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"



def test_a_migration_queued_behind_the_backup_makes_it_fail_soon_and_then_runs(
        pg15: Cluster, new_db: Any, store: Store, s3: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ALTER TABLE waits for the run's lock, and every later lock on the table waits
    behind it, the workers' too. They give up after WORKER_LOCK_TIMEOUT (here 1s), the
    run fails naming the lock and stores nothing, and the migration then goes through."""
    from supabackup import backup
    from supabackup.errors import DumpFailed
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)", db)
    for module in (backup, tabledata):
        monkeypatch.setattr(module, "WORKER_LOCK_TIMEOUT", "1s")
    migrated = threading.Event()

    def migrate() -> None:
        pg15.execute("ALTER TABLE t ADD COLUMN note text DEFAULT 'x'", db)
        migrated.set()

    dump_roles = backup._dump_roles

    def roles_then_a_migration(*args: Any) -> Any:
        threading.Thread(target=migrate, daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pg15.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'ALTER TABLE t %'"
                " AND wait_event_type = 'Lock'"):
            time.sleep(0.01)
        return dump_roles(*args)

    monkeypatch.setattr(backup, "_dump_roles", roles_then_a_migration)
    started = time.monotonic()
    with pytest.raises(DumpFailed, match="queued behind this backup; the backup gave way"):
        run_backup(_conn(pg15, db), store, BackupRequest(jobs=2))
    assert time.monotonic() - started < 30
    assert migrated.wait(30), "the migration must run once the backup gave up"
    assert stored_keys(s3) == []


def test_an_incremental_does_not_chain_from_a_backup_of_another_format() -> None:
    """A chain is of one format: an incremental whose parent is a format-1 backup (one
    archive, no parts to reference) becomes a full backup and says why."""
    from datetime import timedelta

    from supabackup.backup import parent_for
    from supabackup.manifest import Manifest, parse_time
    from supabackup.profiles import PROFILES

    from .helpers import REPO
    [raw] = [p for p in (REPO / "tests" / "data" / "format1").rglob("manifest.json")
             if p.parent.name.endswith("full")]
    old = Manifest.from_json(raw.read_bytes())
    assert old.format == 1
    parent, why = parent_for([old], PROFILES[old.profile],
                              parse_time(old.snapshot_at) + timedelta(days=1))
    assert parent is None and why == (f"{old.backup_id} is of manifest format 1; a chain is "
                                      "of one format (2 now)")


# --- what the breaker found -------------------------------------------------------------

def test_an_extensions_tables_are_left_to_pg_dump_as_pg_dump_leaves_them(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    """A table that belongs to an extension gets its rows from CREATE EXTENSION (and a
    config table's user rows from pg_dump's own filter): a part of its own would load
    them a second time."""
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE EXTENSION IF NOT EXISTS hstore;"
                 "CREATE TABLE member (id int); INSERT INTO member VALUES (1), (2);"
                 "ALTER EXTENSION hstore ADD TABLE member;"
                 "CREATE TABLE own (id int); INSERT INTO own VALUES (1)", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(jobs=2))
    assert [t.name for t in manifest.tables] == ["own"]
    run_restore(store, manifest, _conn(pg15, target), RestoreOptions(jobs=2))
    assert differences(pg15.url(source), pg15.url(target)) == []


@pytest.mark.parametrize("ddl, when", [
    ("ALTER TABLE app.t RENAME TO t_old; CREATE TABLE app.t (a text, b text)", "began"),
    ("ALTER TABLE app.t RENAME COLUMN a TO tmp; ALTER TABLE app.t RENAME COLUMN b TO a;"
     " ALTER TABLE app.t RENAME COLUMN tmp TO b", "began"),
    ("ALTER TABLE app.t DROP COLUMN b; ALTER TABLE app.t ADD COLUMN b text", "began"),
    ("ALTER SCHEMA app RENAME TO app_old; CREATE SCHEMA app; CREATE TABLE app.t (a text, b text)",
     "ran"),
], ids=["table_renamed_and_recreated", "columns_swapped", "column_readded",
        "schema_renamed_mid_run"])
def test_a_table_changed_between_the_snapshot_and_its_copy_is_refused(
        pg15: Cluster, new_db: Any, store: Store, s3: Any, monkeypatch: pytest.MonkeyPatch,
        ddl: str, when: str) -> None:
    """The workers COPY by name. DDL that commits after the snapshot but before the run's
    locks (or, for a schema rename, which locks no table, at any time) would make a name
    find another table or other columns: the run refuses instead of storing it."""
    from supabackup import backup
    from supabackup.errors import DumpFailed
    db = new_db(pg15)
    pg15.execute("CREATE SCHEMA app; CREATE TABLE app.t (a text, b text);"
                 "INSERT INTO app.t SELECT 'A' || g, 'B' || g FROM generate_series(1, 5) g", db)
    if when == "began":
        lock = backup.lock_tables
        monkeypatch.setattr(backup, "lock_tables", lambda conn, listed: (
            pg15.execute(ddl, db), lock(conn, listed))[1])
    else:
        run = tabledata.TableDumper.run
        monkeypatch.setattr(tabledata.TableDumper, "run", lambda self, slices, *rest: (
            pg15.execute(ddl, db), run(self, slices, *rest))[1])
    with pytest.raises(DumpFailed, match=f"app.t changed {'as the backup began' if when == 'began' else 'while the backup ran'}"):
        run_backup(_conn(pg15, db), store, BackupRequest(jobs=2))
    assert stored_keys(s3) == []


def test_a_databases_timeouts_do_not_reach_the_runs_own_sessions(
        pg15: Cluster, new_db: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """statement_timeout and idle_in_transaction_session_timeout set for the database are
    the application's: the snapshot's session idles while the workers run, and a scan of a
    table is one long query."""
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE t (id int, body text);"
                 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 400000) g;"
                 # longer than any query of pg_dumpall's, shorter than a scan of t
                 f"ALTER DATABASE {source} SET statement_timeout = '100ms';"
                 f"ALTER DATABASE {source} SET idle_in_transaction_session_timeout = '500ms'",
                 source)
    run = tabledata.TableDumper.run

    def idle_first(self: Any, slices: Any, *rest: Any) -> Any:
        time.sleep(1.5)  # the snapshot's session idles in its transaction meanwhile
        return run(self, slices, *rest)

    monkeypatch.setattr(tabledata.TableDumper, "run", idle_first)
    full = run_backup(_conn(pg15, source), store, BackupRequest(
        backup_id="20261122T030000Z-full", jobs=1))
    pg15.execute("INSERT INTO t VALUES (0, 'new')", source)
    incr = run_backup(_conn(pg15, source), store, BackupRequest(
        kind="incremental", backup_id="20261123T030000Z-incr", jobs=1))
    assert (full.kind, incr.kind) == ("full", "incremental")
    run_restore(store, incr, _conn(pg15, target), RestoreOptions(jobs=2))
    assert pg15.execute("SELECT count(*) FROM t", target) == [(400001,)]


def test_a_latin1_database_with_a_non_ascii_name_backs_up_restores_and_drills(
        pg17: Cluster, store: Store) -> None:
    from supabackup.verify import verify_database
    source, target = "sb_latin1_src", "sb_latin1_dst"
    for db in (source, target):
        pg17.drop_database(db)
        pg17.execute(f"CREATE DATABASE {db} TEMPLATE template0 ENCODING 'LATIN1'"
                     " LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        pg17.execute('CREATE TABLE "tablé" (id int, t text);'
                     "INSERT INTO \"tablé\" VALUES (1, 'café'), (2, 'naïve')", source)
        run_backup(_conn(pg17, source), store, BackupRequest(
            backup_id="20261122T030000Z-full", jobs=2))
        pg17.execute("INSERT INTO \"tablé\" VALUES (3, 'über')", source)
        incr = run_backup(_conn(pg17, source), store, BackupRequest(
            kind="incremental", backup_id="20261123T030000Z-incr", jobs=2))
        assert (incr.database_encoding, incr.encoding) == ("LATIN1", "UTF8")
        assert incr.tables[0].fingerprint
        from supabackup.restore.toc import read_toc  # its rows are in parts, not in the archive
        assert [e for e in read_toc(store, incr) if e.desc == "TABLE DATA"] == []
        run_restore(store, incr, _conn(pg17, target))
        rows = 'SELECT id, t, convert_to(t, \'LATIN1\') FROM "tablé" ORDER BY id'
        assert pg17.execute(rows, target) == pg17.execute(rows, source)
        assert len(pg17.execute(rows, target)) == 3
        report = verify_database(store, incr.database_id, drill=_conn(pg17, "postgres"))
        assert report.ok, report.findings
    finally:
        for db in (source, target):
            pg17.drop_database(db)
