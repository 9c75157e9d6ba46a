"""Retention of stored files: kept while any live backup references them, no longer.

A stored file (`<database-id>/files/<aa>/<sha256>`) is shared by every backup whose
manifest lists the same bytes, so no lifecycle rule can expire it: its age says nothing
of who needs it. It carries no retention tag (no rule touches it); instead, after each
backup's retention pass, a mark and sweep:

  - mark: the sha256 of every file every manifest in the store lists (lifecycle expires
    backups by their manifests' tags; a backup exists while its manifest does);
  - sweep: remove each stored file no manifest lists that is older than GRACE, which
    spares the content of a run that is still writing (its manifest comes last).

The sweep holds the database's backup lease (locks.py) while it runs, so no backup can
take a file from the previous manifest's list in the moment its last reference goes;
when a backup holds the lease, the sweep is skipped, and the next one does the work. A
manifest that cannot be read stops the sweep (its references are unknown): nothing is
removed. `unreferenced` is a pure function of the catalog, tested over a simulated year.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError

from .. import locks
from ..errors import RunInProgress
from ..manifest import Manifest, utcnow
from ..store import Store, store_error
from .copy import Blob, blob_key, stored_blobs

log = logging.getLogger(__name__)

GRACE = timedelta(days=1)
DELETE_BATCH = 1000  # S3's DeleteObjects limit


def referenced(manifests: list[Manifest]) -> set[str]:
    return {f.sha256 for m in manifests if m.files is not None for f in m.files.files}


def unreferenced(references: set[str], stored: dict[str, Blob], now: datetime,
                 grace: timedelta = GRACE) -> list[str]:
    """The stored contents to remove: listed by no manifest, and older than `grace`."""
    return sorted(sha for sha, blob in stored.items()
                  if sha not in references and now - blob.modified > grace)


@dataclass(frozen=True)
class Swept:
    files: int
    bytes: int

    def __str__(self) -> str:
        return f"files: removed {self.files} stored file(s), {self.bytes} bytes, that no " \
               "backup lists any more"


def sweep_files(store: Store, database_id: str, now: datetime | None = None) -> Swept | None:
    """Remove the stored files no backup references; None when a backup holds the lease
    (the next sweep does it) or there is nothing stored."""
    stored = stored_blobs(store, database_id)
    if not stored:
        return None
    try:
        lease = locks.acquire(store, database_id, f"file sweep {uuid.uuid4().hex[:12]}")
    except RunInProgress as busy:
        log.info("file sweep skipped: %s", busy.message)
        return None
    try:
        # the manifests again, under the lease: a backup may have committed since
        gone = unreferenced(referenced(store.manifests(database_id)), stored,
                            now or utcnow())
        keys = [blob_key(store, database_id, sha) for sha in gone]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            try:
                answer = store.s3.delete_objects(Bucket=store.url.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise store_error(exc, f"{database_id}/files") from None
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise store_error(ClientError({"Error": first}, "DeleteObjects"),
                                  first.get("Key", "files"))
    finally:
        locks.release(store, lease)
    swept = Swept(len(gone), sum(stored[sha].size for sha in gone))
    if gone:
        log.info("retention: %s", swept)
    return swept
