"""Verify: each way a backup can be damaged is caught and named, as pg_verifybackup's tests do."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import VerifyFailed
from supabackup.manifest import Manifest, new_backup_id
from supabackup.notify import Notifier
from supabackup.report import verify_and_report
from supabackup.store import Store
from supabackup.verify import CheckRecord, verify_database

from devkit.pg import Cluster

from .helpers import BUCKET, SQL


@pytest.fixture
def chain(pg17: Cluster, new_db: Any, store: Store) -> tuple[Manifest, Manifest]:
    """A full backup of all_kinds.sql and an incremental on top of it."""
    from datetime import UTC, datetime, timedelta
    db = new_db(pg17)
    pg17.psql_file(SQL / "all_kinds.sql", db)
    conn = ConnectionInfo.from_url(pg17.url(db))
    start = datetime(2026, 11, 22, 3, tzinfo=UTC)
    full = run_backup(conn, store, BackupRequest(backup_id=new_backup_id(start, "full")))
    pg17.execute("CREATE TABLE added_later (id int); INSERT INTO added_later VALUES (1)", db)
    incr = run_backup(conn, store, BackupRequest(
        kind="incremental", backup_id=new_backup_id(start + timedelta(days=1), "incremental")))
    assert incr.kind == "incremental"
    return full, incr


def _key(store: Store, manifest: Manifest, name: str) -> str:
    return store.backup_key(manifest.database_id, manifest.backup_id, name)


def _problems(store: Store, manifest: Manifest, backup_id: str | None = None) -> list[str]:
    return [str(f) for f in verify_database(store, manifest.database_id, backup_id).findings]


def test_intact_backups_verify_and_every_byte_is_read(chain: Any, store: Store) -> None:
    full, incr = chain
    report = verify_database(store, full.database_id)
    assert report.ok, report.findings
    assert report.verified == [full.backup_id, incr.backup_id]
    assert report.bytes_read == full.total_bytes + incr.total_bytes


def _rewrite(s3: Any, key: str, change: Any) -> None:
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(change(data)))


def test_a_missing_object_is_named(chain: Any, store: Store, s3: Any) -> None:
    full, _ = chain
    s3.delete_object(Bucket=BUCKET, Key=_key(store, full, "roles.sql"))
    assert _problems(store, full) == [f"{full.backup_id}/roles.sql: missing"]


def test_an_extra_object_is_named(chain: Any, store: Store, s3: Any) -> None:
    _, incr = chain
    s3.put_object(Bucket=BUCKET, Key=_key(store, incr, "stray.bin"), Body=b"x")
    assert _problems(store, incr) == [
        f"{incr.backup_id}/stray.bin: extra object, not in the manifest"]


def _largest_part(manifest: Manifest) -> str:
    return max((o for o in manifest.objects if o.kind == "table-data"), key=lambda o: o.size).name


@pytest.mark.parametrize("which", ["schema.dump", "a table part"])
@pytest.mark.parametrize("damage, expected", [
    (lambda d: d[:-200], "size"),
    (lambda d: d + b"appended", "size"),
    (lambda d: d[:len(d) // 2] + bytes([d[len(d) // 2] ^ 0x01]) + d[len(d) // 2 + 1:],
     "sha256 does not match the manifest (same size: the content was altered)"),
])
def test_a_damaged_archive_is_named(chain: Any, store: Store, s3: Any, damage: Any,
                                    expected: str, which: str) -> None:
    full, _ = chain
    name = which if which == "schema.dump" else _largest_part(full)
    _rewrite(s3, _key(store, full, name), damage)
    problems = _problems(store, full)
    assert problems and all(p.startswith(f"{full.backup_id}/{name}: ") for p in problems)
    assert expected in problems[0]


@pytest.mark.parametrize("which, reader", [("schema.dump", "pg_restore"),
                                           ("a table part", "zstd")])
def test_a_truncated_archive_fails_the_read_through_too(chain: Any, store: Store,
                                                       s3: Any, which: str, reader: str) -> None:
    full, _ = chain
    name = which if which == "schema.dump" else _largest_part(full)
    _rewrite(s3, _key(store, full, name), lambda d: d[: len(d) * 3 // 4])
    problems = _problems(store, full)
    assert any(p.startswith(f"{full.backup_id}/{name}: {reader} cannot read it through")
               for p in problems), problems


def test_a_part_an_incremental_relies_on_is_checked_against_its_holder(
        chain: Any, store: Store, s3: Any) -> None:
    """The incremental names parts in the full's folder: verify of the incremental alone
    reads the full too, and a part the full no longer lists as recorded is named."""
    import json
    full, incr = chain
    held = next(t for t in incr.tables if t.held_in == full.backup_id and t.parts)
    key = _key(store, full, "manifest.json")
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    for obj in doc["objects"]:
        if obj["name"] == held.parts[0].name:
            obj["sha256"] = "0" * 64
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(doc).encode())
    problems = _problems(store, incr, incr.backup_id)
    assert f"{incr.backup_id}/chain: {held.qualified}'s part {held.parts[0].name} is not in " \
           f"{full.backup_id} as recorded" in problems, problems


def test_a_damaged_manifest_is_named(chain: Any, store: Store, s3: Any) -> None:
    full, incr = chain
    _rewrite(s3, _key(store, full, "manifest.json"), lambda d: d[: len(d) // 2])
    problems = _problems(store, full)
    assert problems[0].startswith(f"{full.backup_id}/manifest.json: ")
    assert "damaged" in problems[0]
    assert f"{incr.backup_id}/chain: its base {full.backup_id} is missing" in problems


def test_the_missing_base_of_a_chain_is_named(chain: Any, store: Store, s3: Any) -> None:
    full, incr = chain
    s3.delete_object(Bucket=BUCKET, Key=_key(store, full, "manifest.json"))
    assert _problems(store, incr, incr.backup_id) == [
        f"{incr.backup_id}/chain: its base {full.backup_id} is missing"]


# --- the record of each run's result (what `supabackup status` reads) -----------------------

def _records(store: Store, s3: Any, manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """Each stored check record of the database: its key and its JSON, oldest first."""
    keys = store.list_keys(store.key(manifest.database_id, "checks") + "/")
    return [(k, json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in keys]


def test_a_verify_records_its_result_tagged_for_the_daily_rule(chain: Any, store: Store,
                                                               s3: Any) -> None:
    full, incr = chain
    report = verify_database(store, full.database_id)
    [(key, found)] = _records(store, s3, full)
    assert re.fullmatch(rf"backups/{full.database_id}/checks/\d{{8}}T\d{{6}}Z\.json", key)
    assert report.record == key and report.summary()["record"] == key
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]
    assert tags == [{"Key": "retention", "Value": "daily"}]
    assert (found["ok"], found["problems"], found["verified"], found["backup"]) == (
        True, [], [full.backup_id, incr.backup_id], "")
    assert found["bytes_read"] == report.bytes_read and found["drill"] is None
    assert found["started_at"] <= found["finished_at"] and found["error"] == ""
    assert CheckRecord.from_json(json.dumps(found).encode(), key).ok


def test_a_failed_verify_records_its_problems(chain: Any, store: Store, s3: Any) -> None:
    full, incr = chain
    s3.delete_object(Bucket=BUCKET, Key=_key(store, full, "roles.sql"))
    with pytest.raises(VerifyFailed):
        verify_and_report(store, full.database_id, Notifier(None), incr.backup_id)
    [(_, found)] = _records(store, s3, full)
    assert (found["ok"], found["problems"], found["backup"]) == (
        False, [f"{full.backup_id}/roles.sql: missing"], incr.backup_id)


def _refuse_check_records(s3: Any) -> list[str]:
    """S3 refuses every put under checks/ as IAM would without the grant (AccessDenied),
    before anything is sent (moto would store what reaches it); the keys it refused."""
    refused: list[str] = []

    def deny(params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]] | None:
        if "/checks/" not in params["url_path"]:
            return None
        refused.append(params["url_path"])
        return (AWSResponse(params["url_path"], 403, {}, None),
                {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                 "ResponseMetadata": {"HTTPStatusCode": 403}})
    s3.meta.events.register_first("before-call.s3.PutObject", deny)
    return refused


def test_a_record_that_cannot_be_written_leaves_the_verify_result_as_it_is(
        chain: Any, store: Store, s3: Any, caplog: pytest.LogCaptureFixture) -> None:
    full, incr = chain
    refused = _refuse_check_records(s3)
    report = verify_and_report(store, full.database_id, Notifier(None))  # no VerifyFailed
    assert report.ok and refused
    assert report.record == "" and report.record_error.startswith(
        f"the result could not be recorded at backups/{full.database_id}/checks/")
    assert "AccessDenied" in report.record_error
    assert report.summary()["record_error"] == report.record_error
    assert any("the verify's own result stands" in r.message and r.levelname == "ERROR"
               for r in caplog.records)
    # and a failed verify stays failed, naming the record it could not write too
    s3.delete_object(Bucket=BUCKET, Key=_key(store, incr, "roles.sql"))
    with pytest.raises(VerifyFailed) as failed:
        verify_and_report(store, full.database_id, Notifier(None))
    assert str(failed.value).startswith(f"{incr.backup_id}/roles.sql: missing")
    assert failed.value.report.record_error.startswith("the result could not be recorded")
    assert _records(store, s3, full) == []
