"""Supabase Storage files, backed up with the database and restored with it.

The source and the target Storage are moto's server, each in its own process, behind
devkit.storage_peer: every upload, overwrite and delete also writes storage.objects as
Supabase Storage's own code does (an overwrite keeps the row's id and takes a new
version, its trigger stamps updated_at, a DELETE needs storage.allow_delete_query). The
databases have Supabase's storage schema (devkit/sql/supabase_platform.sql).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from supabackup import backup as backup_module
from supabackup import cli
from supabackup.backup import BackupRequest, run_backup
from supabackup.catalog import RestorePoint
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError, StoreError
from supabackup.files import CopyRequest, StorageEndpoint, instep
from supabackup.files.copy import FileCopier, blob_key, stored_blobs
from supabackup.files.retain import sweep_files
from supabackup.manifest import Manifest, parse_time, utcnow
from supabackup.notify import Notifier
from supabackup.report import backup_and_report
from supabackup.restore import RestoreOptions, run_restore
from supabackup.store import MIB, Store
from supabackup.verify import verify_database

from devkit.pg import Cluster
from devkit.s3 import MotoProcess
from devkit.storage_peer import StoragePeer, attach

from .helpers import BUCKET, SQL, Inbox, open_uploads, stored_keys

ROWS = ("SELECT bucket_id, name, id, owner, owner_id, created_at, updated_at, "
        "last_accessed_at, metadata, user_metadata FROM storage.objects ORDER BY 1, 2")


@dataclass
class Project:
    """A Supabase-shaped database and its Storage."""

    cluster: Cluster
    db: str
    server: MotoProcess
    peer: StoragePeer

    @property
    def conn(self) -> ConnectionInfo:
        return ConnectionInfo.from_url(self.cluster.url(self.db))

    @property
    def endpoint(self) -> StorageEndpoint:
        return StorageEndpoint(self.server.endpoint, "us-east-1", "testing", "testing")

    def rows(self, versions: bool = False) -> list[tuple[Any, ...]]:
        query = ROWS.replace("user_metadata", "user_metadata, version") if versions else ROWS
        return self.cluster.execute(query, self.db)

    def files(self) -> dict[str, tuple[bytes, str, str, dict[str, str]]]:
        """{bucket/key: (bytes, content type, cache control, user metadata)}"""
        client, out = self.server.client(), {}
        for bucket in (b["Name"] for b in client.list_buckets()["Buckets"]):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    got = client.get_object(Bucket=bucket, Key=item["Key"])
                    out[f"{bucket}/{item['Key']}"] = (got["Body"].read(), got["ContentType"],
                                                      got.get("CacheControl", ""),
                                                      got["Metadata"])
        return out


def _project(cluster: Cluster, new_db: Any, server: MotoProcess) -> Project:
    db = new_db(cluster)
    cluster.psql_file(SQL / "supabase_platform.sql", db)
    return Project(cluster, db, server, StoragePeer(server.client(), cluster.url(db)))


@pytest.fixture
def source(pg15: Cluster, new_db: Any, storage_servers: tuple[MotoProcess, MotoProcess]
           ) -> Project:
    project = _project(pg15, new_db, storage_servers[0])
    project.peer.create_bucket("avatars", public=True)
    project.peer.create_bucket("documents")
    return project


@pytest.fixture
def target(pg15: Cluster, new_db: Any, storage_servers: tuple[MotoProcess, MotoProcess],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A fresh project: its Storage writes rows on upload, as Supabase's does."""
    project = _project(pg15, new_db, storage_servers[1])
    made = StorageEndpoint.client

    def client(self: StorageEndpoint) -> Any:
        made_client = made(self)
        if self.url == project.server.endpoint:
            attach(made_client, project.cluster.url(project.db))
        return made_client
    monkeypatch.setattr(StorageEndpoint, "client", client)
    yield project


def _backup(project: Project, store: Store, kind: str = "full",
            buckets: tuple[str, ...] = ()) -> Manifest:
    return run_backup(project.conn, store, BackupRequest(
        kind=kind, profile="supabase", files=CopyRequest(project.endpoint, buckets)))


def _restore(store: Store, manifest: Manifest, target: Project) -> Any:
    report = run_restore(store, manifest, target.conn,
                         RestoreOptions(profile="supabase", storage=target.endpoint))
    return report


def _sample_files(source: Project) -> None:
    peer = source.peer
    peer.put("avatars", "u1/avatar.png", b"\x89PNG" + os.urandom(3000), "image/png",
             "max-age=3600", {"uploaded-by": "app"})
    peer.put("documents", "reports/2024/q1 summary.pdf", b"%PDF" + os.urandom(50_000),
             "application/pdf")
    peer.put("documents", "deep/" + "/".join(f"level{i}" for i in range(12)) + "/leaf.txt",
             b"deep", "text/plain")
    peer.put("documents", "unicodé/日本語 ファイル.txt", "héllo".encode(), "text/plain; charset=utf-8")
    peer.put("documents", "big/video.bin", os.urandom(17 * MIB), "video/mp4")


def test_a_backup_copies_every_file_and_a_restore_gives_back_files_and_rows(
        source: Project, target: Project, store: Store) -> None:
    _sample_files(source)
    manifest = _backup(source, store)
    assert manifest.files is not None and manifest.files.complete
    assert manifest.files.out_of_step() == []
    listed = {f.path: f for f in manifest.files.files}
    expected = source.files()
    assert set(listed) == set(expected)
    for path, (body, content_type, cache_control, metadata) in expected.items():
        stored = listed[path]
        assert stored.sha256 == hashlib.sha256(body).hexdigest()
        assert (stored.size, stored.content_type, stored.cache_control, stored.metadata) == (
            len(body), content_type, cache_control, metadata)
        blob = store.s3.get_object(Bucket=store.url.bucket,
                                   Key=blob_key(store, manifest.database_id, stored.sha256))
        assert blob["Body"].read() == body
    report = _restore(store, manifest, target)
    assert target.files() == expected
    assert target.rows() == source.rows()  # every column but version, which is the target's
    assert any("version" in line for line in report.inexact), report.inexact
    assert report.files is not None and report.files.files == len(expected)


def _only_files(project: Project) -> dict[str, bytes]:
    return {path: body for path, (body, *_rest) in project.files().items()}


def test_files_replaced_and_deleted_between_backups_restore_as_each_backup_had_them(
        source: Project, target: Project, store: Store, pg15: Cluster, new_db: Any,
        storage_servers: tuple[MotoProcess, MotoProcess]) -> None:
    peer = source.peer
    for i in range(20):
        peer.put("documents", f"notes/n{i:02d}.txt", os.urandom(2000), "text/plain")
    first = _backup(source, store)
    first_files, first_rows = _only_files(source), source.rows()
    peer.put("documents", "notes/n03.txt", b"replaced", "text/plain")
    peer.delete("documents", "notes/n07.txt")
    peer.put("avatars", "new.png", b"\x89PNG new", "image/png")
    second = _backup(source, store, "incremental")
    assert second.files is not None and second.files.out_of_step() == []
    changes = second.files.changes
    assert (changes["added"], changes["changed"], changes["deleted"]) == (1, 1, 1)
    # only what is new is stored: the replaced file's and the new file's bytes
    assert changes["stored_bytes"] == len(b"replaced") + len(b"\x89PNG new")
    assert changes["stored_files"] == 2
    _restore(store, second, target)
    assert _only_files(target) == _only_files(source)
    assert target.rows() == source.rows()
    # the first backup, into another fresh project, gives back the first state exactly
    storage_servers[1].reset()
    older = _project(pg15, new_db, storage_servers[1])
    _restore(store, first, older)
    assert _only_files(older) == first_files
    assert older.rows() == first_rows


def test_files_changed_while_the_backup_ran_are_named_in_the_manifest_sns_and_restore(
        source: Project, target: Project, store: Store, inbox: Inbox,
        monkeypatch: pytest.MonkeyPatch) -> None:
    peer = source.peer
    peer.put("documents", "a.txt", b"a as of the snapshot", "text/plain")
    peer.put("documents", "b.txt", b"b, deleted during the backup", "text/plain")
    peer.put("documents", "c.txt", b"c, unchanged", "text/plain")
    read = backup_module.SnapshotRows.read

    def rows_then_writes(*args: Any, **kwargs: Any) -> Any:
        rows = read(*args, **kwargs)  # the snapshot's rows; then the app goes on writing
        peer.put("documents", "a.txt", b"a, replaced during the backup", "text/plain")
        peer.delete("documents", "b.txt")
        peer.put("documents", "d.txt", b"d, written during the backup", "text/plain")
        return rows
    monkeypatch.setattr(backup_module.SnapshotRows, "read", rows_then_writes)
    manifest, _ = backup_and_report(
        source.conn, store, BackupRequest(profile="supabase",
                                          files=CopyRequest(source.endpoint)),
        Notifier(inbox.topic_arn))
    assert manifest.files is not None
    lines = manifest.files.out_of_step()
    assert sorted(lines) == sorted([f"documents/a.txt: {instep.REPLACED}",
                                    f"documents/b.txt: {instep.DELETED}",
                                    f"documents/d.txt: {instep.WRITTEN}"])
    message = inbox.messages()[-1]
    assert message["Message"]["backup"]["files"]["out_of_step"] == 3
    assert "out of" in message["Subject"]
    assert sorted(message["Message"]["backup"]["files"]["out_of_step_first"]) == sorted(lines)
    report = _restore(store, manifest, target)
    for line in lines:
        assert f"file {line}" in report.inexact
    # the database is the snapshot's: a.txt's row, no row for d.txt, b.txt's row
    assert [r[1] for r in target.rows()] == ["a.txt", "b.txt", "c.txt"]


def test_a_damaged_or_missing_stored_file_is_named_by_verify_and_not_restored(
        source: Project, target: Project, store: Store) -> None:
    peer = source.peer
    peer.put("documents", "good.txt", b"good", "text/plain")
    peer.put("documents", "bad.txt", b"will be damaged", "text/plain")
    peer.put("documents", "gone.txt", b"will be lost", "text/plain")
    manifest = _backup(source, store)
    assert manifest.files is not None
    by_path = {f.path: f for f in manifest.files.files}
    assert verify_database(store, manifest.database_id).ok
    bad = blob_key(store, manifest.database_id, by_path["documents/bad.txt"].sha256)
    store.s3.put_object(Bucket=store.url.bucket, Key=bad, Body=b"will be damagee")
    store.delete_key(blob_key(store, manifest.database_id, by_path["documents/gone.txt"].sha256))
    report = verify_database(store, manifest.database_id)
    problems = sorted(str(f) for f in report.findings)
    assert problems == [
        f"{manifest.backup_id}/files/documents/bad.txt: its stored content does not hash to "
        "its sha256 (damaged)",
        f"{manifest.backup_id}/files/documents/gone.txt: its stored content is missing"]
    restored = _restore(store, manifest, target)
    assert _only_files(target) == {"documents/good.txt": b"good"}
    assert any(line.startswith("file documents/bad.txt: its stored content is damaged")
               for line in restored.inexact)
    assert any(line.startswith("file documents/gone.txt: its stored content is missing")
               for line in restored.inexact)


def test_a_drill_restores_a_sample_of_files_and_compares_them(
        source: Project, store: Store, pg15: Cluster) -> None:
    for i in range(30):
        source.peer.put("documents", f"d/{i}.txt", os.urandom(100 + i), "text/plain",
                        "max-age=60", {"n": str(i)})
    manifest = _backup(source, store)
    drill = ConnectionInfo.from_url(pg15.url("postgres"))
    report = verify_database(store, manifest.database_id, drill=drill)
    assert report.ok, report.findings
    assert report.drill is not None and report.drill.files == 20
    assert not [k for k in stored_keys(store.s3) if "/drill/" in k]  # the scratch is gone


def test_ten_thousand_small_files_in_deep_folders_page_through_and_are_not_copied_twice(
        source: Project, store: Store) -> None:
    client = source.server.client()
    names = [f"user{i % 1500:04d}/2024/{i % 7}/file {i}.txt" for i in range(10_000)]

    def put(name: str) -> tuple[str, str]:
        answer = client.put_object(Bucket="documents", Key=name, Body=name.encode(),
                                   ContentType="text/plain")
        return name, answer["ETag"]
    with ThreadPoolExecutor(16) as pool:
        etags = list(pool.map(put, names))
    conn = source.cluster.connect(source.db)
    with conn, conn.cursor() as cur:  # the rows Storage writes, in one statement
        cur.execute("INSERT INTO storage.objects (bucket_id, name, metadata, version) "
                    "SELECT 'documents', n, jsonb_build_object('eTag', e, 'size', length(n)), "
                    "gen_random_uuid()::text FROM unnest(%s::text[], %s::text[]) AS x(n, e)",
                    ([n for n, _ in etags], [e for _, e in etags]))
    conn.close()
    first = _backup(source, store, buckets=("documents",))
    assert first.files is not None and first.files.complete
    assert sorted(f.key for f in first.files.files) == sorted(names)
    assert first.files.out_of_step() == []
    assert first.files.changes["stored_files"] == 10_000
    gets = []
    monkeypatch_copy = FileCopier.copy

    def counting(self: FileCopier, listed: Any) -> Any:
        gets.append(listed.path)
        return monkeypatch_copy(self, listed)
    FileCopier.copy = counting  # type: ignore[method-assign]
    try:
        second = _backup(source, store, "incremental", buckets=("documents",))
    finally:
        FileCopier.copy = monkeypatch_copy  # type: ignore[method-assign]
    assert second.files is not None and len(second.files.files) == 10_000
    assert second.files.changes["stored_bytes"] == 0
    assert len(stored_blobs(store, first.database_id)) == 10_000


def test_a_run_out_of_time_commits_the_files_it_copied_and_the_next_copies_the_rest(
        source: Project, target: Project, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(40):
        source.peer.put("documents", f"f{i:02d}", os.urandom(1000), "text/plain")
    copy = FileCopier.copy
    calls = []

    def slow_clock(self: FileCopier, listed: Any) -> Any:
        calls.append(listed.path)
        if len(calls) == 5:  # the time left falls under the margin and the reserve
            monkeypatch.setattr(backup_module, "FILES_RESERVE", 1e9)
        return copy(self, listed)
    monkeypatch.setattr(FileCopier, "copy", slow_clock)
    partial = run_backup(source.conn, store, BackupRequest(
        profile="supabase", files=CopyRequest(source.endpoint), time_limit=900))
    files = partial.files
    assert files is not None and not files.complete
    assert 5 <= len(files.files) < 40 and len(files.files) + len(files.missing) == 40
    report = _restore(store, partial, target)
    assert any("were not copied by this backup" in line for line in report.inexact)
    monkeypatch.setattr(backup_module, "FILES_RESERVE", 60.0)
    rest = _backup(source, store, "incremental")
    assert rest.files is not None and rest.files.complete and len(rest.files.files) == 40
    assert rest.files.changes["stored_files"] == len(files.missing)


def test_a_backup_that_fails_while_copying_files_leaves_nothing(
        source: Project, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    source.peer.put("documents", "big.bin", os.urandom(9 * MIB), "application/octet-stream")
    for i in range(10):
        source.peer.put("documents", f"f{i}", os.urandom(500), "text/plain")
    copy = FileCopier.copy
    calls = []

    def failing(self: FileCopier, listed: Any) -> Any:
        calls.append(listed.path)
        if len(calls) == 8:
            raise StoreError("injected: the Storage endpoint broke", "try again")
        return copy(self, listed)
    monkeypatch.setattr(FileCopier, "copy", failing)
    with pytest.raises(StoreError, match="injected"):
        _backup(source, store)
    assert stored_keys(store.s3) == []  # no manifest, no archive, no file content
    assert open_uploads(store.s3) == []


def test_a_restore_of_named_buckets_names_the_rows_of_the_others(
        source: Project, target: Project, store: Store) -> None:
    source.peer.put("avatars", "u1/a.png", b"\x89PNG", "image/png")
    source.peer.put("documents", "d.txt", b"doc", "text/plain")
    manifest = _backup(source, store, buckets=("documents",))
    report = _restore(store, manifest, target)
    assert set(_only_files(target)) == {"documents/d.txt"}
    assert any(line.startswith("bucket avatars: 1 row(s) of storage.objects came back")
               and "did not copy" in line for line in report.inexact), report.inexact
    assert not any("bucket documents" in line for line in report.inexact)


def test_bad_storage_input_fails_clearly_and_stores_nothing(
        source: Project, store: Store) -> None:
    with pytest.raises(ConfigError, match="not an http"):
        StorageEndpoint.from_env("ftp://example.com", environ={})
    with pytest.raises(ConfigError, match="plain http"):
        StorageEndpoint.from_env("http://example.com/storage/v1/s3", environ={})
    with pytest.raises(ConfigError, match="SUPABACKUP_STORAGE_SECRET_ACCESS_KEY"):
        StorageEndpoint.from_env("https://x.storage.supabase.co/storage/v1/s3",
                                 environ={"SUPABACKUP_STORAGE_ACCESS_KEY_ID": "k",
                                          "SUPABACKUP_STORAGE_REGION": "eu-west-1"})
    with pytest.raises(ConfigError, match="no bucket nope"):
        _backup(source, store, buckets=("nope",))
    wrong = StorageEndpoint(source.server.endpoint, "us-east-1", "testing", "testing")
    assert "secret" not in repr(wrong).lower() or "testing" not in repr(wrong).split("secret")[-1]
    assert stored_keys(store.s3) == []


def test_a_restore_with_files_of_a_backup_without_refuses_before_touching_the_database(
        source: Project, target: Project, store: Store) -> None:
    manifest = run_backup(source.conn, store, BackupRequest(profile="supabase"))
    before = target.cluster.execute("SELECT count(*) FROM pg_class", target.db)
    with pytest.raises(ConfigError, match="holds no Storage files"):
        _restore(store, manifest, target)
    assert target.cluster.execute("SELECT count(*) FROM pg_class", target.db) == before
    point = RestorePoint(database_id=manifest.database_id, at="2026-01-01T00:00:00Z",
                         when=parse_time("2026-01-01T00:00:00Z"))
    with pytest.raises(ConfigError, match="Storage keeps no versions"):
        point.check(RestoreOptions(storage=target.endpoint))


def test_stored_files_no_backup_lists_are_removed_and_shared_ones_kept(
        source: Project, store: Store) -> None:
    peer = source.peer
    peer.put("documents", "kept.txt", b"in both backups", "text/plain")
    peer.put("documents", "old.txt", b"only in the first", "text/plain")
    first = _backup(source, store)
    peer.delete("documents", "old.txt")
    second = _backup(source, store, "incremental")
    database_id = first.database_id
    assert len(stored_blobs(store, database_id)) == 2
    later = utcnow() + timedelta(days=2)
    assert sweep_files(store, database_id, now=later).files == 0  # both still referenced
    # lifecycle expires the first backup (its manifest goes)
    store.delete_key(store.backup_key(database_id, first.backup_id, "manifest.json"))
    swept = sweep_files(store, database_id, now=later)
    assert swept is not None and (swept.files, swept.bytes) == (1, len(b"only in the first"))
    assert set(stored_blobs(store, database_id)) == {f.sha256 for f in second.files.files}
    # a content newer than the grace period is kept even unreferenced (a run writing it)
    store.delete_key(store.backup_key(database_id, second.backup_id, "manifest.json"))
    assert sweep_files(store, database_id).files == 0


def test_the_command_line_backs_up_and_restores_files(
        source: Project, target: Project, store: Store, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    source.peer.put("documents", "cli/one.txt", b"one", "text/plain")
    for prefix in ("SUPABACKUP_STORAGE", "SUPABACKUP_TARGET_STORAGE"):
        monkeypatch.setenv(f"{prefix}_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv(f"{prefix}_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv(f"{prefix}_REGION", "us-east-1")
    url = f"s3://{BUCKET}/backups"
    assert cli.main(["backup", "full", "--database-url", source.cluster.url(source.db),
                     "--store", url, "--profile", "supabase",
                     "--storage-endpoint", source.server.endpoint]) == 0
    out = capsys.readouterr().out
    assert "files: 1 in 2 bucket(s)" in out, out
    args = ["restore", "--store", url, "--target-url", target.cluster.url(target.db),
            "--profile", "supabase", "--target-storage-endpoint", target.server.endpoint]
    assert cli.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would write 1 file(s)" in out and "documents/cli/one.txt (3 bytes, text/plain)" in out
    assert _only_files(target) == {}
    assert cli.main(args) == 0
    assert "files: wrote 1 file(s)" in capsys.readouterr().out
    assert _only_files(target) == {"documents/cli/one.txt": b"one"}
