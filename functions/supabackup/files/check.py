"""Verify stored files, and drill their restore.

verify re-reads every stored content the verified backups list, once however many
backups share it, and checks its size and sha256: a missing or damaged one is named by
each backup and file that lists it. The drill writes a sample of a backup's files through
the restore's own writer (putback.py) into a scratch folder of the store, reads them
back, compares bytes and headers with the manifest, and removes them.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from botocore.exceptions import BotoCoreError, ClientError

from ..manifest import Manifest, StoredFile
from ..store import MIB, Store, store_error
from .copy import FILE_WORKERS, blob_key, stored_blobs
from .putback import put_file

DRILL_FILES = 20


@dataclass(frozen=True)
class FileProblem:
    backup_id: str
    path: str      # bucket/key
    problem: str


def verify_files(store: Store, manifests: list[Manifest]) -> tuple[list[FileProblem], int]:
    """Problems of the stored files the manifests list, and the bytes read."""
    listing: dict[str, list[tuple[str, StoredFile]]] = {}
    for manifest in manifests:
        for stored in manifest.files.files if manifest.files is not None else []:
            listing.setdefault(stored.sha256, []).append((manifest.backup_id, stored))
    if not listing:
        return [], 0
    database_id = manifests[0].database_id
    present = stored_blobs(store, database_id)

    def check(sha: str) -> tuple[str, int, str]:
        size = listing[sha][0][1].size
        if sha not in present:
            return sha, 0, "its stored content is missing"
        got, digest = _read(store, blob_key(store, database_id, sha))
        if got != size:
            return sha, got, f"its stored content is {got} bytes, the manifest says {size}"
        if digest != sha:
            return sha, got, "its stored content does not hash to its sha256 (damaged)"
        return sha, got, ""

    problems, read = [], 0
    with ThreadPoolExecutor(max_workers=FILE_WORKERS, thread_name_prefix="verify") as pool:
        for sha, size, problem in pool.map(check, sorted(listing)):
            read += size
            if problem:
                problems += [FileProblem(b, f.path, problem) for b, f in listing[sha]]
    return sorted(problems, key=lambda p: (p.backup_id, p.path)), read


def _read(store: Store, key: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    try:
        body = store.s3.get_object(Bucket=store.url.bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(chunk_size=MIB):
            digest.update(chunk)
            size += len(chunk)
    except (ClientError, BotoCoreError) as exc:
        raise store_error(exc, key) from None
    return size, digest.hexdigest()


def drill_files(store: Store, manifest: Manifest, count: int = DRILL_FILES,
                seed: int | None = None) -> tuple[int, list[FileProblem]]:
    """Restore a sample of `manifest`'s files (the largest, and others at random) into a
    scratch folder of the store and compare them; the files checked and the problems."""
    files = manifest.files.files if manifest.files is not None else []
    if not files:
        return 0, []
    largest = max(files, key=lambda f: f.size)
    others = [f for f in files if f is not largest]
    pick = random.Random(seed)  # noqa: S311 - a sample to drill, not a secret
    sample = [largest, *pick.sample(others, min(count - 1, len(others)))]
    scratch = store.key(manifest.database_id, "drill", uuid.uuid4().hex)
    problems = []
    try:
        for stored in sample:
            at = replace(stored, bucket=store.url.bucket, key=f"{scratch}/{stored.path}")
            _, problem = put_file(store, manifest, store.s3, at)
            if not problem:
                problem = _compare(store, at, stored)
            if problem:
                problems.append(FileProblem(manifest.backup_id, stored.path,
                                            f"drill: {problem}"))
    finally:
        for key in store.list_keys(scratch + "/"):
            store.delete_key(key)
    return len(sample), problems


def _compare(store: Store, written: StoredFile, stored: StoredFile) -> str:
    """"" when the file written reads back as the manifest has it, else what differs."""
    try:
        head = store.s3.head_object(Bucket=written.bucket, Key=written.key)
    except (ClientError, BotoCoreError) as exc:
        raise store_error(exc, written.key) from None
    size, digest = _read(store, written.key)
    if (size, digest) != (stored.size, stored.sha256):
        return "the restored bytes differ from the backup's"
    headers = (head.get("ContentType", ""), head.get("CacheControl", ""),
               head.get("Metadata", {}))
    wanted = (stored.content_type or head.get("ContentType", ""), stored.cache_control,
              stored.metadata)
    return "" if headers == wanted else f"restored with headers {headers}, not {wanted}"
