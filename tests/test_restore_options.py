"""Restore options: the data of some tables only, and a restore into a fresh Supabase project."""

from __future__ import annotations

from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError, RestoreFailed
from supabackup.restore import RestoreOptions, describe_plan, run_restore
from supabackup.store import Store

from devkit.compare import differences, dump_lines, table_fingerprints
from devkit.pg import Cluster

from .helpers import SQL


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _supabase_project(cluster: Cluster, new_db: Any, sample: bool) -> str:
    db = new_db(cluster)
    cluster.psql_file(SQL / "supabase_platform.sql", db)
    if sample:
        cluster.psql_file(SQL / "supabase_sample.sql", db)
    return db


# --- --tables ---------------------------------------------------------------------------


def test_tables_restores_only_the_named_tables_data_with_the_whole_schema(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    # GIVEN a Supabase-shaped project, backed up
    source, target = _supabase_project(pg15, new_db, sample=True), new_db(pg15)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="postgres"))
    # WHEN only public.todos is restored (todos references auth.users, not restored)
    report = run_restore(store, manifest, _conn(pg15, target),
                         RestoreOptions(tables=("public.todos",)))
    # THEN todos holds exactly its rows, every other table is there and empty
    source_tables, restored = (table_fingerprints(pg15.url(source)),
                               table_fingerprints(pg15.url(target)))
    assert set(restored) == set(source_tables)
    assert restored["public.todos"] == source_tables["public.todos"]
    filled = {t for t, (rows, _) in restored.items() if rows > 0}
    assert filled == {"public.todos"} | {t for t in filled if t.startswith(("public.todo_stats",))}
    # AND its foreign key exists, added NOT VALID since the users it names were not restored
    assert pg15.execute("SELECT convalidated FROM pg_constraint WHERE contype = 'f' AND "
                        "conrelid = 'public.todos'::regclass", target) == [(False,)]
    assert any("table data restored for: public.todos" in line for line in report.lines())


def test_tables_from_an_incremental_takes_held_data_from_the_full(
        pg17: Cluster, new_db: Any, store: Store) -> None:
    source, target = new_db(pg17), new_db(pg17)
    pg17.execute("CREATE TABLE kept (id int PRIMARY KEY); CREATE TABLE busy (id int);"
                 "INSERT INTO kept SELECT generate_series(1, 40);"
                 "INSERT INTO busy SELECT generate_series(1, 5)", source)
    full = run_backup(_conn(pg17, source), store,
                      BackupRequest(backup_id="20261122T030000Z-full"))
    pg17.execute("INSERT INTO busy VALUES (6)", source)
    incr = run_backup(_conn(pg17, source), store, BackupRequest(
        kind="incremental", backup_id="20261123T030000Z-incr"))
    assert {t.name: t.held_in for t in incr.tables} == {
        "kept": full.backup_id, "busy": incr.backup_id}
    plan = describe_plan(store, incr, RestoreOptions(tables=("kept",)))
    assert any(f"{full.backup_id}/tables/" in line and "public.kept" in line
               for line in plan)
    report = run_restore(store, incr, _conn(pg17, target), RestoreOptions(tables=("kept",)))
    assert report.backups == [full.backup_id, incr.backup_id]
    assert pg17.execute("SELECT count(*) FROM kept", target) == [(40,)]
    assert pg17.execute("SELECT count(*) FROM busy", target) == [(0,)]


@pytest.mark.parametrize("name, problem", [("public.nope", "is not in the backup"),
                                           ("t", "is in several schemas")])
def test_tables_refuses_a_name_it_cannot_place_and_restores_nothing(
        pg15: Cluster, new_db: Any, store: Store, name: str, problem: str) -> None:
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE SCHEMA other; CREATE TABLE t (id int); CREATE TABLE other.t (id int)",
                 source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest())
    with pytest.raises(ConfigError, match=f"table '{name}' {problem}.*the backup has: "
                                          "other.t, public.t"):
        run_restore(store, manifest, _conn(pg15, target), RestoreOptions(tables=(name,)))
    assert pg15.execute("SELECT count(*) FROM pg_tables WHERE schemaname IN ('public', 'other')",
                        target) == [(0,)]


# --- --profile supabase -------------------------------------------------------------------


def test_supabase_backup_restores_into_a_fresh_project_as_the_same_database(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    # GIVEN a project with user data in auth and storage, a policy on storage.objects, a
    # trigger on auth.users, revoked default grants and a populated materialized view
    source = _supabase_project(pg15, new_db, sample=True)
    pg15.execute("CREATE POLICY \"Admins see everything\" ON storage.buckets FOR SELECT"
                 " TO service_role USING (true);"
                 "GRANT SELECT ON auth.users TO authenticated", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="supabase"))
    # WHEN it is restored into a fresh project (which has its own platform and defaults)
    target = _supabase_project(pg15, new_db, sample=False)
    report = run_restore(store, manifest, _conn(pg15, target),
                         RestoreOptions(profile="supabase"))
    # THEN a pg_dump of the two is the same, grants and policies included
    assert differences(pg15.url(source), pg15.url(target)) == []
    assert table_fingerprints(pg15.url(source)) == table_fingerprints(pg15.url(target))
    lines = "\n".join(report.lines())
    assert "platform definition(s) the project already has" in lines
    assert "trigger auth.users on_auth_user_created" in lines
    assert "policy storage.objects Avatar images are publicly accessible" in lines


def test_supabase_restore_keeps_the_sources_revoked_grants_despite_default_privileges(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    source = _supabase_project(pg15, new_db, sample=False)
    pg15.execute("CREATE TABLE public.ledger (id int);"
                 "REVOKE ALL ON public.ledger FROM anon, authenticated;"
                 "CREATE FUNCTION public.secret() RETURNS int LANGUAGE sql AS 'SELECT 1';"
                 "REVOKE EXECUTE ON FUNCTION public.secret() FROM anon, PUBLIC", source)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="supabase"))
    target = _supabase_project(pg15, new_db, sample=False)
    run_restore(store, manifest, _conn(pg15, target), RestoreOptions(profile="supabase"))
    check = ("SELECT has_table_privilege('anon', 'public.ledger', 'SELECT'),"
             " has_table_privilege('service_role', 'public.ledger', 'SELECT'),"
             " has_function_privilege('anon', 'public.secret()', 'EXECUTE'),"
             " has_function_privilege('authenticated', 'public.secret()', 'EXECUTE')")
    assert pg15.execute(check, target) == pg15.execute(check, source) == [
        (False, True, False, True)]


def test_supabase_restore_refuses_a_project_that_already_has_user_tables(
        pg15: Cluster, new_db: Any, store: Store) -> None:
    source = _supabase_project(pg15, new_db, sample=True)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest(profile="supabase"))
    target = _supabase_project(pg15, new_db, sample=False)
    pg15.execute("CREATE TABLE public.mine (id int)", target)
    before = dump_lines(pg15.url(target))
    with pytest.raises(RestoreFailed, match=r"is not empty \(it has public.mine"):
        run_restore(store, manifest, _conn(pg15, target), RestoreOptions(profile="supabase"))
    assert dump_lines(pg15.url(target)) == before


def test_supabase_restore_of_an_incremental(pg17: Cluster, new_db: Any, store: Store) -> None:
    source = _supabase_project(pg17, new_db, sample=True)
    conn = _conn(pg17, source)
    run_backup(conn, store, BackupRequest(profile="supabase",
                                          backup_id="20261122T030000Z-full"))
    pg17.execute("INSERT INTO public.posts (author_id, title, body) SELECT id, 'later', 'b'"
                 " FROM auth.users LIMIT 1; REFRESH MATERIALIZED VIEW public.todo_stats", source)
    incr = run_backup(conn, store, BackupRequest(kind="incremental", profile="supabase",
                                                 backup_id="20261123T030000Z-incr"))
    assert incr.kind == "incremental"
    target = _supabase_project(pg17, new_db, sample=False)
    run_restore(store, incr, _conn(pg17, target), RestoreOptions(profile="supabase"))
    assert differences(pg17.url(source), pg17.url(target)) == []
