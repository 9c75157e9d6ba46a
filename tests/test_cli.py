"""The `supabackup` command line, run as a user runs it, against moto's S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.compare import differences
from devkit.pg import Cluster
from devkit.s3 import LocalS3

EXE = str(Path(sys.executable).with_name("supabackup"))


def run(local_s3: LocalS3, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **local_s3.env(), **env})


@pytest.fixture
def bucket(local_s3: LocalS3, request: pytest.FixtureRequest) -> str:
    name = f"cli-{abs(hash(request.node.name)) % 10**8}"
    local_s3.create_bucket(name)
    return name


def test_backup_list_and_restore_round_trip(pg15: Cluster, new_db: Any, local_s3: LocalS3,
                                            bucket: str) -> None:
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g", source)
    store = f"s3://{bucket}/team"
    backup = run(local_s3, "backup", "full", "--database-url", pg15.url(source),
                 "--store", store, "--label", "before migration 42")
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.split(":")[0]
    assert backup_id.endswith("-full")

    table = run(local_s3, "list", "--store", store)
    assert table.returncode == 0
    assert backup_id in table.stdout and "before migration 42" in table.stdout
    listed = json.loads(run(local_s3, "list", "--store", store, "--json").stdout)
    assert [b["backup_id"] for b in listed] == [backup_id]

    restored = run(local_s3, "restore", "--target-url", pg15.url(target), "--at", backup_id,
                   SUPABACKUP_STORE=store)
    assert restored.returncode == 0, restored.stderr
    assert f"restored {backup_id}" in restored.stdout
    assert differences(pg15.url(source), pg15.url(target)) == []


def test_environment_variables_stand_in_for_the_flags(pg17: Cluster, new_db: Any,
                                                      local_s3: LocalS3, bucket: str) -> None:
    db = new_db(pg17)
    result = run(local_s3, "backup", "full", SUPABACKUP_DATABASE_URL=pg17.url(db),
                 SUPABACKUP_STORE=f"s3://{bucket}/env")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["backup", "full", "--store", "s3://b/p", "--database-url",
      "postgresql://postgres.ref:pw@aws-0-us-east-1.pooler.supabase.com:6543/postgres"],
     2, "is Supabase's transaction pooler"),
    (["backup", "full", "--store", "s3://b/p"], 2, "--database-url is required"),
    (["backup", "full", "--store", "ftp://b", "--database-url", "postgresql://u@h/d"],
     2, "is not an s3://BUCKET/PREFIX address"),
    (["list", "--store", "s3://no-such-bucket-cli/p"], 1, "NoSuchBucket"),
])
def test_errors_are_one_line_on_stderr_with_an_exit_status(
        local_s3: LocalS3, args: list[str], code: int, message: str) -> None:
    result = run(local_s3, *args)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supabackup: error: ")
    assert message in lines[0]


def test_wrong_password_exits_1_and_never_prints_the_password(
        pg17: Cluster, local_s3: LocalS3, bucket: str) -> None:
    result = run(local_s3, "backup", "full", "--store", f"s3://{bucket}/x",
                 "--database-url", pg17.url(password="Cli-Secret-77"))
    assert result.returncode == 1
    assert "password authentication failed" in result.stderr
    assert "Cli-Secret-77" not in result.stderr + result.stdout


def test_restore_without_backups_says_so(local_s3: LocalS3, bucket: str, pg15: Cluster) -> None:
    result = run(local_s3, "restore", "--store", f"s3://{bucket}/empty",
                 "--target-url", pg15.url("postgres"))
    assert result.returncode == 1
    assert "no backups in s3://" in result.stderr


def test_incremental_from_the_command_line_chains_to_the_full(
        pg17: Cluster, new_db: Any, local_s3: LocalS3, bucket: str) -> None:
    db = new_db(pg17)
    pg17.execute("CREATE TABLE a (id int); CREATE TABLE b (id int); INSERT INTO a VALUES (1)", db)
    store = f"s3://{bucket}/incr"
    assert run(local_s3, "backup", "full", "--database-url", pg17.url(db), "--store",
               store).returncode == 0
    time.sleep(1.1)  # backup ids have one-second resolution
    pg17.execute("INSERT INTO b VALUES (1)", db)
    result = run(local_s3, "backup", "incremental", "--database-url", pg17.url(db),
                 "--store", store)
    assert result.returncode == 0, result.stderr
    assert "-incr: " in result.stdout and "1 of 2 tables dumped" in result.stdout
    listed = json.loads(run(local_s3, "list", "--store", store, "--json").stdout)
    assert [b["kind"] for b in listed] == ["full", "incremental"]
    assert listed[1]["parent"] == listed[0]["backup_id"]


def test_verify_exits_0_when_whole_and_1_naming_the_damaged_object(
        pg15: Cluster, new_db: Any, local_s3: LocalS3, bucket: str) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)", db)
    store = f"s3://{bucket}/verify"
    backup = run(local_s3, "backup", "full", "--database-url", pg15.url(db), "--store", store)
    backup_id = backup.stdout.split(":")[0]
    good = run(local_s3, "verify", "--store", store)
    assert good.returncode == 0, good.stderr
    assert "verified 1 backup(s)" in good.stdout and "0 problem(s)" in good.stdout
    key = next(k["Key"] for k in local_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
               if k["Key"].endswith("roles.sql"))
    local_s3.client().put_object(Bucket=bucket, Key=key, Body=b"-- tampered\n")
    bad = run(local_s3, "verify", "--store", store, "--backup", backup_id)
    assert bad.returncode == 1
    assert f"PROBLEM {backup_id}/roles.sql: size 12 bytes" in bad.stdout
    assert bad.stderr.startswith(f"supabackup: error: {backup_id}/roles.sql: size 12 bytes")


def test_verify_with_a_drill_restores_and_compares_every_table(
        pg17: Cluster, new_db: Any, local_s3: LocalS3, bucket: str) -> None:
    db = new_db(pg17)
    pg17.execute("CREATE TABLE t (id int, at timestamptz DEFAULT now(), f float8 DEFAULT pi());"
                 "INSERT INTO t (id) SELECT generate_series(1, 100)", db)
    store = f"s3://{bucket}/drill"
    assert run(local_s3, "backup", "full", "--database-url", pg17.url(db),
               "--store", store).returncode == 0
    drilled = run(local_s3, "verify", "--store", store, SUPABACKUP_DRILL_URL=pg17.url())
    assert drilled.returncode == 0, drilled.stderr
    assert "compared 1 tables, 100 rows: 0 mismatch(es)" in drilled.stdout
    from devkit.pg import SUPERUSER_PASSWORD
    assert SUPERUSER_PASSWORD not in drilled.stdout + drilled.stderr


def test_help_says_what_the_tool_does_and_how_at_reads() -> None:
    shown = subprocess.run([EXE, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    description = shown.stdout.split("\n\n")[1]
    assert description.startswith("Verifiable backups of Supabase and PostgreSQL databases")
    assert "parse flags" not in shown.stdout
    assert "replaying change capture where capture covers the time" in shown.stdout
