"""Files against rows: is what a backup copied what its snapshot's `storage.objects` says?

Supabase Storage writes a file to its backend and then its row (bucket_id, name, and the
backend's ETag in `metadata.eTag`); it keeps no versions. A backup reads the rows in its
own snapshot and copies the files afterwards, so a file written, replaced or deleted
meanwhile cannot be had as of the snapshot: it is named, never silently mixed in.
Comparing the ETag settles each file; for the ones out of step the rows are read once
more, now, to tell "changed while the backup ran" from a file and row that disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from psycopg2 import sql

from ..manifest import StoredFile
from .endpoint import unquote

REPLACED = "replaced while the backup ran (the file is newer than its row in the snapshot)"
WRITTEN = "written while the backup ran (its row is newer than the snapshot)"
DELETED = "deleted while the backup ran (its row is in the snapshot, the file is gone)"
NO_ROW = "a file without a row in storage.objects"
NO_FILE = "a row in storage.objects without a file"


@dataclass(frozen=True)
class Row:
    bucket: str
    key: str
    etag: str

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"


Rows = dict[str, Row]  # by bucket/key
_SELECT = sql.SQL("SELECT bucket_id, name, coalesce(metadata->>'eTag', '') "
                  "FROM storage.objects WHERE bucket_id = ANY(%s) AND name IS NOT NULL")


def has_objects_table(cur: Any) -> bool:
    cur.execute("SELECT to_regclass('storage.objects') IS NOT NULL")
    return bool(cur.fetchone()[0])


def read_rows(cur: Any, buckets: Iterable[str]) -> Rows:
    """The rows of `buckets` in the cursor's transaction (the backup's snapshot)."""
    cur.execute(_SELECT, (list(buckets),))
    return {f"{b}/{n}": Row(b, n, unquote(e)) for b, n, e in cur.fetchall()}


def read_some(cur: Any, paths: list[Row | StoredFile]) -> Rows:
    """The rows now of just these files (those out of step)."""
    if not paths:
        return {}
    cur.execute("SELECT o.bucket_id, o.name, coalesce(o.metadata->>'eTag', '') "
                "FROM storage.objects o JOIN unnest(%s::text[], %s::text[]) AS w(b, n) "
                "ON o.bucket_id = w.b AND o.name = w.n",
                ([p.bucket for p in paths], [p.key for p in paths]))
    return {f"{b}/{n}": Row(b, n, unquote(e)) for b, n, e in cur.fetchall()}


def compare(files: list[StoredFile], rows: Rows,
            rows_now: Callable[[list[Row | StoredFile]], Rows]
            ) -> tuple[list[StoredFile], list[str]]:
    """The files with why each is out of step ("" when it is not), and a line for each
    row of the snapshot without a file. `rows_now` reads the current rows of some files."""
    copied = {f.path for f in files}
    odd = [f for f in files if f.path not in rows or rows[f.path].etag != f.etag]
    lone = [r for path, r in sorted(rows.items()) if path not in copied]
    now = rows_now([*odd, *lone])
    out = []
    for f in files:
        row = rows.get(f.path)
        if row is not None and row.etag == f.etag:
            out.append(f)
            continue
        fresh = now.get(f.path)
        if row is None:
            why = WRITTEN if fresh is not None else NO_ROW
        elif fresh is not None and fresh.etag == f.etag:
            why = REPLACED
        else:
            why = f"out of step: its row's eTag is {row.etag or 'empty'}, the file's {f.etag}"
        out.append(replace(f, out_of_step=why))
    return out, [f"{r.path}: {DELETED if r.path not in now else NO_FILE}" for r in lone]
