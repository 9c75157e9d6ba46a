"""The supabase profile: what a backup of a Supabase-shaped database holds.

It must keep everything a user owns, including what users add to the platform's
schemas, and leave out the platform's internals, its migration bookkeeping and its
reserved roles (see supabackup/profiles.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError
from supabackup.pgtools import find_tools
from supabackup.profiles import resolve_profile
from supabackup.roles import drop_reserved, plan_roles
from supabackup.store import Store

from devkit.pg import Cluster

from .helpers import BUCKET, SQL


@pytest.fixture(scope="module")
def supabase_backup(pg15: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A supabase-profile backup of the sample project: its listing and roles script."""
    import boto3
    from moto import mock_aws
    from supabackup.store import StoreURL
    db = "supabase_profile_src"
    pg15.drop_database(db)
    pg15.create_database(db)
    for name in ("supabase_platform.sql", "supabase_sample.sql"):
        pg15.psql_file(SQL / name, db)
    pg15.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='app_analyst')"
                 " THEN CREATE ROLE app_analyst; END IF; END$$;"
                 "GRANT authenticated TO app_analyst", db)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        store = Store(StoreURL.parse(f"s3://{BUCKET}/b"), s3)
        manifest = run_backup(ConnectionInfo.from_url(pg15.url(db)), store,
                                   BackupRequest(profile="supabase"))
        prefix = store.backup_key(manifest.database_id, manifest.backup_id)
        archive = tmp_path_factory.mktemp("supabase") / "schema.dump"
        archive.write_bytes(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/schema.dump")["Body"].read())
        roles = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/roles.sql")["Body"].read().decode()
    listing = subprocess.run([find_tools(15).path("pg_restore"), "--list", str(archive)],
                             capture_output=True, text=True, check=True).stdout
    # A table's rows are parts of their own (format 2): the manifest's tables with parts are
    # the backup's table data, as the archive's TABLE DATA entries were.
    data = [f"TABLE DATA {t.schema} {t.name} " for t in manifest.tables if t.parts]
    return manifest, _entries(listing) + data, roles


def _entries(listing: str) -> list[str]:
    """'TYPE schema name owner' of each TOC line, without ids."""
    return [line.split(" ", 3)[-1] for line in listing.splitlines()
            if line and not line.startswith(";")]


def _has(entries: list[str], text: str) -> bool:
    return any(e.startswith(text) for e in entries)


def test_supabase_profile_keeps_user_data_in_platform_schemas(supabase_backup: Any) -> None:
    _, entries, _ = supabase_backup
    assert _has(entries, "TABLE DATA auth users ")
    assert _has(entries, "TABLE DATA auth identities ")
    assert _has(entries, "TABLE DATA storage objects ")
    assert _has(entries, "TABLE DATA storage buckets ")
    assert _has(entries, "TABLE DATA supabase_migrations schema_migrations ")


def test_supabase_profile_keeps_what_users_add_to_platform_schemas(supabase_backup: Any) -> None:
    _, entries, _ = supabase_backup
    assert _has(entries, "POLICY storage objects Avatar images are publicly accessible ")
    assert _has(entries, "POLICY storage objects Users can upload their own avatar ")
    assert _has(entries, "TRIGGER auth users on_auth_user_created ")
    assert _has(entries, "FUNCTION public handle_new_user()")
    assert _has(entries, "ACL public TABLE private_notes ")
    assert _has(entries, "ACL public FUNCTION handle_new_user() ")
    assert _has(entries, "MATERIALIZED VIEW DATA public todo_stats ")


def test_supabase_profile_leaves_out_platform_internals_and_bookkeeping(
        supabase_backup: Any) -> None:
    manifest, entries, _ = supabase_backup
    for schema in ("realtime", "graphql_public", "pgbouncer"):
        assert not [e for e in entries if f" {schema} " in f" {e} "], schema
    assert not _has(entries, "TABLE DATA auth schema_migrations ")
    assert not _has(entries, "TABLE DATA storage migrations ")
    assert not _has(entries, "TABLE DATA supabase_functions migrations ")
    assert _has(entries, "TABLE auth schema_migrations ")  # the definition stays
    assert manifest.profile == "supabase"
    assert {"auth", "storage", "extensions"} <= set(manifest.platform_schemas)


def test_supabase_profile_drops_reserved_roles_and_keeps_the_users(supabase_backup: Any) -> None:
    _, _, roles = supabase_backup
    for reserved in ("anon", "authenticated", "service_role", "supabase_admin",
                     "supabase_auth_admin", "authenticator", "postgres"):
        assert f"CREATE ROLE {reserved};" not in roles
        assert f"ALTER ROLE {reserved} " not in roles
    assert "CREATE ROLE app_analyst;" in roles
    assert "GRANT authenticated TO app_analyst" in roles


def test_default_profile_follows_the_host() -> None:
    pooler = ConnectionInfo.from_url(
        "postgresql://postgres.abcdefghijklmnop:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres")
    assert resolve_profile(None, pooler).name == "supabase"
    direct = ConnectionInfo.from_url("postgresql://postgres:pw@db.abcdefghijklmnop.supabase.co/postgres")
    assert resolve_profile(None, direct).name == "supabase"
    plain = ConnectionInfo.from_url("postgresql://app:pw@db.internal.example:5432/app")
    assert resolve_profile(None, plain).name == "postgres"
    assert resolve_profile("postgres", pooler).name == "postgres"


def test_unknown_profile_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'supa'; choose one of: supabase, postgres"):
        resolve_profile("supa", None)


def test_role_plan_leaves_existing_roles_alone_and_strips_unknown_grantors() -> None:
    script = "\n".join([
        "SET default_transaction_read_only = off;",
        "CREATE ROLE alice;",
        "ALTER ROLE alice WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN;",
        "CREATE ROLE postgres;",
        "ALTER ROLE postgres WITH SUPERUSER;",
        'CREATE ROLE "Mixed Case";',
        'GRANT alice TO "Mixed Case" WITH INHERIT TRUE GRANTED BY gone_admin;',
        "GRANT pg_read_all_data TO postgres GRANTED BY postgres;",
    ])
    plan = plan_roles(script, existing_roles={"postgres", "pg_read_all_data"})
    assert plan.create == ["alice", "Mixed Case"]
    assert plan.existing == ["postgres"]
    assert plan.statements == [
        "CREATE ROLE alice;",
        "ALTER ROLE alice WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN;",
        'CREATE ROLE "Mixed Case";',
        'GRANT alice TO "Mixed Case" WITH INHERIT TRUE;',
    ]
    filtered = drop_reserved(script, lambda r: r in {"postgres"})
    assert "ALTER ROLE postgres" not in filtered and "CREATE ROLE alice;" in filtered


def test_archive_round_trips_through_pg_restore_list(supabase_backup: Any, tmp_path: Path) -> None:
    _, entries, _ = supabase_backup
    assert _has(entries, "TABLE public profiles ")
    assert _has(entries, "FK CONSTRAINT public profiles ")
