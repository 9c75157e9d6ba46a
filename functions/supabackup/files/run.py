"""A backup's file step: the rows in the snapshot, the copy, the comparison, the record.

    read the rows of storage.objects in the backup's snapshot (before any file is read)
    -> copy every file (copy.py) -> compare files and rows (instep.py) -> the file set,
    with what changed since the previous backup with files
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..dburl import ConnectionInfo
from ..manifest import FileSet, Manifest, StoredFile
from ..notify import human_bytes
from ..snapshot import connect
from ..store import BackupWriter, Store
from .copy import CopyRequest, copy_files
from .instep import Row, Rows, compare, has_objects_table, read_rows, read_some

log = logging.getLogger(__name__)

# Seconds before a time-limited run's margin at which it starts no more copies: the ones
# in flight finish, the manifest is written, and the next backup copies the rest.
FILES_RESERVE = 60.0


@dataclass
class SnapshotRows:
    """storage.objects as the backup's snapshot has it (None: the database has none)."""

    rows: Rows | None

    @classmethod
    def read(cls, cur: Any, request: CopyRequest, buckets: list[str] | None = None
             ) -> SnapshotRows:
        if not has_objects_table(cur):
            return cls(None)
        if buckets is None and not request.buckets:  # every bucket the rows name
            cur.execute("SELECT DISTINCT bucket_id FROM storage.objects "
                        "WHERE bucket_id IS NOT NULL")
            buckets = [b for (b,) in cur.fetchall()]
        return cls(read_rows(cur, buckets or request.buckets))


def previous_files(history: list[Manifest]) -> FileSet | None:
    """The file set of the newest backup that has one: what this one need not copy."""
    return next((m.files for m in reversed(history) if m.files is not None), None)


def back_up_files(request: CopyRequest, conn: ConnectionInfo, store: Store,
                  writer: BackupWriter, tags: dict[str, str], snapshot: SnapshotRows,
                  previous: FileSet | None, stop: Callable[[], bool] = lambda: False
                  ) -> FileSet:
    """Copy the files and record them with how they compare with the snapshot's rows."""
    buckets, files, missing, copied = copy_files(request, store, writer, tags, previous,
                                                 stop)
    lone: list[str] = []
    if snapshot.rows is not None:
        rows = {p: r for p, r in snapshot.rows.items() if r.bucket in buckets}
        if missing:  # not copied is not "without a file"
            skipped = set(missing)
            rows = {p: r for p, r in rows.items() if p not in skipped}
        fresh = connect(conn)
        fresh.autocommit = True
        try:
            with fresh.cursor() as cur:
                def rows_now(paths: list[Row | StoredFile]) -> Rows:
                    return read_some(cur, paths)
                files, lone = compare(files, rows, rows_now)
        finally:
            fresh.close()
        # rows of buckets the endpoint does not have at all
        lone += [f"{r.path}: its bucket {r.bucket} is not at the Storage endpoint"
                 for r in snapshot.rows.values()
                 if r.bucket not in buckets and not request.buckets]
    file_set = FileSet(endpoint=request.endpoint.display(), buckets=buckets, files=files,
                       complete=not missing, missing=missing, rows_without_files=lone,
                       compared=snapshot.rows is not None,
                       changes=changes(previous, files, missing, copied.stored_bytes,
                                       copied.stored_files))
    for line in file_set.out_of_step()[:20]:
        log.warning("files: out of step with the snapshot: %s", line)
    return file_set


def changes(previous: FileSet | None, files: list[StoredFile], missing: list[str],
            stored_bytes: int, stored_files: int) -> dict[str, int]:
    """Files and bytes added, changed and deleted since `previous` (a file not copied
    this time is not deleted), and what this run stored."""
    before = {f.path: f for f in previous.files} if previous else {}
    now = {f.path: f for f in files}
    before = {p: f for p, f in before.items() if p not in set(missing)}
    added = [f for p, f in now.items() if p not in before]
    changed = [f for p, f in now.items() if p in before and before[p].sha256 != f.sha256]
    deleted = [f for p, f in before.items() if p not in now]
    return {"added": len(added), "added_bytes": sum(f.size for f in added),
            "changed": len(changed), "changed_bytes": sum(f.size for f in changed),
            "deleted": len(deleted), "deleted_bytes": sum(f.size for f in deleted),
            "stored_files": stored_files, "stored_bytes": stored_bytes}


def files_lines(files: FileSet) -> list[str]:
    """What the command line says of a backup's files."""
    c = files.changes
    out = [f"files: {len(files.files)} in {len(files.buckets)} bucket(s), "
           f"{human_bytes(files.total_bytes)}; since the previous backup {c.get('added', 0)} "
           f"added, {c.get('changed', 0)} changed, {c.get('deleted', 0)} deleted; "
           f"{human_bytes(c.get('stored_bytes', 0))} stored"]
    if not files.complete:
        out.append(f"files: INCOMPLETE: {len(files.missing)} file(s) not copied (out of time); "
                   "the next backup copies them")
    if not files.compared:
        out.append("files: the database has no storage.objects to compare them with")
    out += [f"files: out of step with the snapshot: {line}" for line in files.out_of_step()]
    return out
