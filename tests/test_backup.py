"""Full backups against real PostgreSQL 15 and 17, with moto for S3 and SNS."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.botocore_stubber import MockRawResponse
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import StoreError
from supabackup.notify import Notifier
from supabackup.pgtools import find_tools
from supabackup.report import backup_and_report
from supabackup.store import MIB, Store

from devkit.pg import Cluster

from .helpers import BUCKET, Inbox, open_uploads, stored_keys


def _seed(cluster: Cluster, db: str) -> None:
    cluster.execute("""
        CREATE TABLE item (id int PRIMARY KEY, body text, doc jsonb);
        INSERT INTO item SELECT g, repeat(md5(g::text), 4), jsonb_build_object('n', g)
          FROM generate_series(1, 20000) g;
    """, db)


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def test_full_backup_commits_manifest_whose_checksums_match_the_objects(
        cluster: Cluster, new_db: Any, store: Store, s3: Any) -> None:
    db = new_db(cluster)
    _seed(cluster, db)
    manifest = run_backup(_conn(cluster, db), store, BackupRequest(label="nightly"))

    prefix = f"backups/{manifest.database_id}/backups/{manifest.backup_id}/"
    [item] = manifest.tables
    assert sorted(stored_keys(s3)) == sorted(
        prefix + n for n in ("schema.dump", "manifest.json", "roles.sql",
                             *(p.name for p in item.parts)))
    assert (item.rows, sum(p.rows for p in item.parts)) == (20000, 20000)
    assert manifest.format == 2 and item.columns == ["id", "body", "doc"]
    for obj in manifest.objects:
        body = s3.get_object(Bucket=BUCKET, Key=prefix + obj.name)["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (obj.size, obj.sha256)
    assert manifest.server_version.startswith(str(cluster.major))
    assert manifest.object("database").compression == "zstd"
    assert manifest.label == "nightly"
    assert open_uploads(s3) == []
    for name in ("schema.dump", item.parts[0].name):
        tags = s3.get_object_tagging(Bucket=BUCKET, Key=prefix + name)["TagSet"]
        assert {"Key": "retention", "Value": "daily"} in tags


def test_full_backup_archive_lists_every_table_and_the_roles_script_names_our_roles(
        pg17: Cluster, new_db: Any, store: Store, s3: Any, tmp_path: Path) -> None:
    db = new_db(pg17)
    _seed(pg17, db)
    pg17.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sb_app_reader')"
                 " THEN CREATE ROLE sb_app_reader; END IF; END$$;"
                 "GRANT SELECT ON item TO sb_app_reader", db)
    manifest = run_backup(_conn(pg17, db), store, BackupRequest())
    prefix = f"backups/{manifest.database_id}/backups/{manifest.backup_id}/"
    archive = tmp_path / "db.dump"
    archive.write_bytes(s3.get_object(Bucket=BUCKET, Key=prefix + "schema.dump")["Body"].read())
    listing = subprocess.run([find_tools(17).path("pg_restore"), "--list", str(archive)],
                             capture_output=True, text=True, check=True).stdout
    assert "TABLE public item" in listing
    assert "TABLE DATA public item" not in listing  # its rows are objects of their own
    assert "ACL public TABLE item" in listing
    roles = s3.get_object(Bucket=BUCKET, Key=prefix + "roles.sql")["Body"].read().decode()
    assert "CREATE ROLE sb_app_reader;" in roles
    assert "PASSWORD" not in roles.upper().replace("NO PASSWORD", "")


def test_manual_backup_sends_one_success_message_with_filterable_attributes(
        pg15: Cluster, new_db: Any, store: Store, inbox: Inbox) -> None:
    db = new_db(pg15)
    _seed(pg15, db)
    manifest, _ = backup_and_report(_conn(pg15, db), store,
                                    BackupRequest(label="before migration 42", retention="pinned"),
                                    Notifier(inbox.topic_arn))
    (msg,) = inbox.messages()
    assert msg["Subject"].startswith(f"supabackup: full backup of {manifest.database_id} succeeded: ")
    assert msg["Subject"].endswith(("s", "m"))  # "... 1.2 MiB in 0s"
    assert msg["Message"]["backup"]["backup_id"] == manifest.backup_id
    assert msg["Message"]["backup"]["label"] == "before migration 42"
    assert msg["Message"]["backup"]["retention"] == "pinned"
    attrs = {k: v["Value"] for k, v in msg["MessageAttributes"].items()}
    assert attrs == {"status": "succeeded", "kind": "full", "database": manifest.database_id}


# Failures mid-run (pg_dump killed, connection lost, S3 failing, ...): tests/test_faults.py.


def test_manifest_is_never_overwritten(pg15: Cluster, new_db: Any, store: Store,
                                       s3: Any) -> None:
    db = new_db(pg15)
    _seed(pg15, db)
    first = run_backup(_conn(pg15, db), store, BackupRequest(backup_id="20261124T030000Z-full"))
    before = {k: s3.get_object(Bucket=BUCKET, Key=k)["ETag"] for k in stored_keys(s3)}
    pg15.execute("INSERT INTO item VALUES (-1, 'changed', '{}')", db)
    with pytest.raises(StoreError, match="already exists"):
        run_backup(_conn(pg15, db), store, BackupRequest(backup_id=first.backup_id))
    after = {k: s3.get_object(Bucket=BUCKET, Key=k)["ETag"] for k in stored_keys(s3)}
    assert after == before, "the first backup's objects must be untouched"


def test_part_size_grows_so_no_archive_needs_more_than_10000_parts() -> None:
    from supabackup.store import MAX_PARTS, part_size_for
    for size in (0, 1 * MIB, 10 * 1024 * MIB, 500 * 1024 * MIB, 4 * 1024 * 1024 * MIB):
        part = part_size_for(size)
        assert part >= 8 * MIB and part % MIB == 0
        assert 2 * size / part <= MAX_PARTS


def test_archive_shows_the_instant_of_the_exported_snapshot_not_when_pg_dump_started(
        pg15: Cluster, new_db: Any, store: Store, s3: Any) -> None:
    # GIVEN a row committed after the run exported its snapshot but before pg_dump started
    # (the roles script is uploaded in between)
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute("CREATE TABLE ledger (id int PRIMARY KEY); INSERT INTO ledger VALUES (1)", source)

    def commit_late_row(request: Any, **_: Any) -> None:
        if request.url.split("?")[0].endswith("/roles.sql"):
            pg15.execute("INSERT INTO ledger VALUES (2)", source)

    s3.meta.events.register_first("before-send.s3.PutObject", commit_late_row)
    manifest = run_backup(_conn(pg15, source), store, BackupRequest())
    # THEN the restored database holds the data as of the snapshot only
    from supabackup.restore import run_restore
    run_restore(store, manifest, _conn(pg15, target))
    assert pg15.execute("SELECT id FROM ledger ORDER BY id", source) == [(1,), (2,)]
    assert pg15.execute("SELECT id FROM ledger ORDER BY id", target) == [(1,)]


def test_cleanup_that_fails_too_never_hides_the_original_error(
        pg15: Cluster, new_db: Any, store: Store, s3: Any) -> None:
    # GIVEN S3 refuses the manifest, and then every cleanup request as well
    db = new_db(pg15)
    _seed(pg15, db)

    def refuse(request: Any, **_: Any) -> AWSResponse | None:
        if request.method == "PUT" and not request.url.split("?")[0].endswith("/manifest.json"):
            return None
        if request.method in ("GET", "HEAD"):
            return None
        body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
        return AWSResponse(request.url, 503, {}, MockRawResponse(body))

    s3.meta.events.register_first("before-send.s3", refuse)
    # THEN the run fails with the manifest's error, not the cleanup's
    with pytest.raises(StoreError, match="ServiceUnavailable on .*manifest.json"):
        run_backup(_conn(pg15, db), store, BackupRequest())
