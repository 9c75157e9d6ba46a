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
from dataclasses import dataclass
from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.files import CopyRequest, StorageEndpoint
from supabackup.files.copy import blob_key
from supabackup.manifest import Manifest
from supabackup.restore import RestoreOptions, run_restore
from supabackup.store import MIB, Store

from devkit.pg import Cluster
from devkit.s3 import MotoProcess
from devkit.storage_peer import StoragePeer, attach

from .helpers import SQL

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
