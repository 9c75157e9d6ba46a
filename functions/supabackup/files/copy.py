"""Copy a Storage endpoint's files into the store, content-addressed.

Each file's bytes are stored once per database, at `<database-id>/files/<aa>/<sha256>`,
whichever bucket, key or backup has them; a manifest lists its files (bucket, key, size,
content type, cache control, user metadata, the source's ETag, our sha256) and so
references them. A backup copies a file only when it is new to it:

  - a file the previous backup with files listed with the same ETag, size and last
    modified time, whose content is stored, is taken from that backup's list (no request
    to the source; a metadata change rewrites the file and so its last modified time);
  - any other is read once, streamed, and hashed as it passes: a small one (at most
    SMALL bytes) is held whole and put at its address unless that exists; a larger one
    streams through a multipart upload into the run's own folder and is then copied
    (server side) to its address, or dropped when the address already holds it.

Nothing is ever whole on local disk; memory is bounded by SMALL times the workers plus
the multipart buffers of LARGE_AT_ONCE large files. Content this run created is recorded
with the backup's writer, so a run that fails removes it with everything else it wrote;
content it found stored is never removed by it (retain.py decides that).

A run with a time limit stops starting copies when `stop()` says so and commits what it
has: the file set is then incomplete, names what it did not copy, and the next backup
copies the rest (it finds the copied ones stored).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import StoreError
from ..manifest import FileSet, StoredFile
from ..store import MIB, BackupWriter, HashingReader, Store, store_error, tagging
from .endpoint import Listed, StorageEndpoint, endpoint_error, unquote

log = logging.getLogger(__name__)

FILE_WORKERS = 8
SMALL = 8 * MIB          # held whole; larger files stream through a multipart upload
LARGE_PART = 8 * MIB
LARGE_AT_ONCE = 2        # large files in flight at once (each: its part buffers)
FILES = "files"


@dataclass(frozen=True)
class CopyRequest:
    """What a backup copies: every bucket of the endpoint, or the ones named."""

    endpoint: StorageEndpoint
    buckets: tuple[str, ...] = ()


def blob_key(store: Store, database_id: str, sha256: str) -> str:
    return store.key(database_id, FILES, sha256[:2], sha256)


@dataclass(frozen=True)
class Blob:
    """One stored file content, as the store lists it."""

    size: int
    modified: datetime


def stored_blobs(store: Store, database_id: str) -> dict[str, Blob]:
    """{sha256: blob} of every file content stored for the database."""
    prefix = store.key(database_id, FILES) + "/"
    found: dict[str, Blob] = {}
    paginator = store.s3.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=store.url.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"].rsplit("/", 1)[-1]] = Blob(int(item["Size"]),
                                                             item["LastModified"])
    except (ClientError, BotoCoreError) as exc:
        raise store_error(exc, prefix) from None
    return found


@dataclass
class Copied:
    """What the copy did, for the file set's `changes`."""

    stored_bytes: int = 0
    stored_files: int = 0
    read_bytes: int = 0


class FileCopier:
    """Copies one backup's files; thread-safe over its workers."""

    def __init__(self, request: CopyRequest, store: Store, writer: BackupWriter,
                 tags: dict[str, str], previous: FileSet | None) -> None:
        self.request = request
        self.source = request.endpoint.client()
        self.store = store
        self.writer = writer
        self.tags = tags
        self.before = {f.path: f for f in previous.files} if previous else {}
        self.stored = set(stored_blobs(store, writer.database_id))
        self.copied = Copied()
        self._lock = threading.Lock()
        self._large = threading.Semaphore(LARGE_AT_ONCE)

    def listing(self) -> tuple[list[str], Iterator[Listed]]:
        buckets = self.request.endpoint.buckets(self.source, self.request.buckets)

        def every() -> Iterator[Listed]:
            for bucket in buckets:
                yield from self.request.endpoint.files(self.source, bucket)
        return buckets, every()

    def copy(self, listed: Listed) -> StoredFile | None:
        """The file as stored (copied now, or found stored); None when it is gone."""
        known = self.before.get(listed.path)
        if (known is not None and known.etag == listed.etag and known.size == listed.size
                and known.last_modified == listed.last_modified and known.sha256 in self.stored):
            return replace(known, out_of_step="")
        try:
            got = self.source.get_object(Bucket=listed.bucket, Key=listed.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None  # deleted since the listing
            raise endpoint_error(exc, listed.path) from None
        except BotoCoreError as exc:
            raise endpoint_error(exc, listed.path) from None
        size = int(got["ContentLength"])
        try:
            if size <= SMALL:
                digest = self._small(got["Body"], size, listed)
            else:
                with self._large:
                    digest = self._large_file(got["Body"], size, listed)
        except (ClientError, BotoCoreError) as exc:  # the source's body failed mid-read
            raise endpoint_error(exc, listed.path) from None
        with self._lock:
            self.copied.read_bytes += size
        return StoredFile(bucket=listed.bucket, key=listed.key, size=size, sha256=digest,
                          etag=unquote(got.get("ETag", "")),
                          # the listing's (Supabase lists a row's updated_at; its
                          # GetObject sends the backend's time): what the next run compares
                          last_modified=listed.last_modified,
                          content_type=got.get("ContentType", "") or "",
                          cache_control=got.get("CacheControl", "") or "",
                          metadata=dict(got.get("Metadata") or {}))

    def _small(self, body: Any, size: int, listed: Listed) -> str:
        data = body.read()
        _check_length(len(data), size, listed)
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.stored:
            key = blob_key(self.store, self.writer.database_id, digest)
            if self.store.create_exclusive(key, data, "application/octet-stream"):
                self._created(key, digest, size)
        return digest

    def _large_file(self, body: Any, size: int, listed: Listed) -> str:
        reader = HashingReader(body)
        incoming = self.store.backup_key(self.writer.database_id, self.writer.backup_id,
                                         f"incoming/{uuid.uuid4().hex}")
        self.writer.written.append(incoming)
        config = TransferConfig(multipart_threshold=LARGE_PART, multipart_chunksize=LARGE_PART,
                                max_concurrency=2)
        s3, bucket = self.store.s3, self.store.url.bucket
        try:
            s3.upload_fileobj(reader, bucket, incoming, Config=config,
                              ExtraArgs={"ContentType": "application/octet-stream",
                                         "Tagging": tagging(self.tags)})
            _check_length(reader.size, size, listed)
            digest = reader.hexdigest
            if digest not in self.stored and not self._exists(digest):
                key = blob_key(self.store, self.writer.database_id, digest)
                self.writer.written.append(key)  # a copy can land though its answer is lost
                s3.copy({"Bucket": bucket, "Key": incoming}, bucket, key, Config=config,
                        ExtraArgs={"TaggingDirective": "REPLACE"})  # untagged: kept
                self._created(key, digest, size, listed_already=True)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, incoming) from None
        finally:
            self._forget(incoming)
        return digest

    def _exists(self, digest: str) -> bool:
        key = blob_key(self.store, self.writer.database_id, digest)
        try:
            self.store.s3.head_object(Bucket=self.store.url.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _created(self, key: str, digest: str, size: int, listed_already: bool = False) -> None:
        with self._lock:
            if not listed_already:
                self.writer.written.append(key)
            self.stored.add(digest)
            self.copied.stored_bytes += size
            self.copied.stored_files += 1

    def _forget(self, incoming: str) -> None:
        """Remove the upload area of a large file (the content is at its address now)."""
        try:
            self.store.s3.delete_object(Bucket=self.store.url.bucket, Key=incoming)
        except (ClientError, BotoCoreError) as exc:  # the writer's discard retries it
            log.warning("could not remove %s: %s", incoming, exc)
            return
        with self._lock:
            self.writer.written.remove(incoming)


def copy_files(request: CopyRequest, store: Store, writer: BackupWriter,
               tags: dict[str, str], previous: FileSet | None,
               stop: Callable[[], bool] = lambda: False,
               workers: int = FILE_WORKERS) -> tuple[list[str], list[StoredFile], list[str],
                                                     Copied]:
    """Copy every file of the request's buckets; return the buckets, the files as stored
    (in bucket and key order), the bucket/key of each one not copied because `stop()`
    said so, and what was copied. Any other failure raises: the backup then fails whole."""
    copier = FileCopier(request, store, writer, tags, previous)
    buckets, listing = copier.listing()
    done: list[StoredFile] = []
    missing: list[str] = []
    running: dict[Future[StoredFile | None], Listed] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="files") as pool:
        try:
            for listed in listing:
                if stop():
                    missing.append(listed.path)
                    continue
                while len(running) >= workers * 2:
                    done += _collect(running, FIRST_COMPLETED)
                running[pool.submit(copier.copy, listed)] = listed
            done += _collect(running, None)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    done.sort(key=lambda f: (f.bucket, f.key))
    log.info("files: %d listed in %d bucket(s), %d copied (%d bytes new), %d not copied",
             len(done) + len(missing), len(buckets), copier.copied.stored_files,
             copier.copied.stored_bytes, len(missing))
    return buckets, done, missing, copier.copied


def _collect(running: dict[Future[StoredFile | None], Listed],
             when: str | None) -> list[StoredFile]:
    finished, _ = wait(list(running), return_when=when or "ALL_COMPLETED")
    out = []
    for future in finished:
        running.pop(future)
        stored = future.result()  # raises the worker's error
        if stored is not None:
            out.append(stored)
    return out


def _check_length(got: int, expected: int, listed: Listed) -> None:
    if got != expected:
        raise StoreError(f"{listed.path}: the Storage endpoint sent {got} bytes of "
                         f"{expected}", "run the backup again")
