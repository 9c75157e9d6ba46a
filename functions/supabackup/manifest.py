"""The manifest: the one object whose existence makes a backup exist.

It is written last, with a conditional put, and records the sha256 and size of every
object of the backup, so that verify and restore can trust nothing else.

Formats (`format`):
  1  one custom-format pg_dump archive (`database.dump`) holds the schema and all the data;
     tables an incremental did not dump are read from the archive of the backup holding them.
  2  `schema.dump` (still of kind "database") holds everything but the data of the backup's
     tables: pre-data, sequence values, large objects, post-data. Each table's rows are one
     or more objects of their own (`TablePart`: COPY text, zstd-compressed; a big table is
     split into page ranges), listed both in `objects` (what this backup's folder holds) and
     in its `TableState.parts`, which an incremental copies from its parent for a table it
     did not dump: those name objects in the folder of `held_in`.
This supabackup writes format 2 and reads both.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from .errors import StoreError

FORMAT = 2
READABLE_FORMATS = (1, 2)
RETENTION_CLASSES = ("daily", "weekly", "monthly", "pinned")
R = TypeVar("R")
_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


@dataclass(frozen=True)
class StoredObject:
    name: str      # file name inside the backup's folder
    kind: str      # "roles" | "database" (the pg_dump archive) | "table-data"
    size: int
    sha256: str
    format: str    # "sql" | "custom" | "copy" (COPY text)
    compression: str = "none"


@dataclass(frozen=True)
class TablePart:
    """One object holding some of a table's rows (format 2): COPY text of the columns in
    `TableState.columns`, in the backup's snapshot, of heap pages [first_page, end_page)
    (end_page -1: to the end of the table; 0, -1: the whole table)."""

    name: str        # file name inside the folder of the backup that holds the table
    size: int
    sha256: str
    rows: int
    first_page: int = 0
    end_page: int = -1
    compression: str = "zstd"


@dataclass(frozen=True)
class TableState:
    """A table as one backup saw it, and which backup holds its data."""

    oid: int
    schema: str
    name: str
    relfilenode: int
    definition: str      # sha256 of the kind, the columns (names, types, order), dropped ones
    rows: int            # exact count in the backup's snapshot
    counters: int        # n_tup_ins + n_tup_upd + n_tup_del (a hint only)
    held_in: str         # backup id whose archive holds this table's data
    reason: str = ""     # why this backup dumped it ("" when unchanged)
    fingerprint: str = ""  # content hash in this backup's own snapshot (fingerprint.ROW_HASHES)
    # Format 2: the columns the parts hold, in order (not the generated ones), and the parts.
    columns: list[str] = field(default_factory=list)
    parts: list[TablePart] = field(default_factory=list)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class StoredFile:
    """One Supabase Storage file as a backup holds it: content-addressed in the store
    (`<database-id>/files/<sha256[:2]>/<sha256>`), shared by every backup that has the
    same bytes, with what the restore gives back besides the bytes."""

    bucket: str
    key: str
    size: int
    sha256: str
    etag: str                # the source's, without quotes
    last_modified: str = ""  # the source's
    content_type: str = ""
    cache_control: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (x-amz-meta-*)
    # "" when the file agrees with its row in the backup's snapshot; else why not
    # (files.instep: "replaced while the backup ran", "a file without a row", ...)
    out_of_step: str = ""

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"


@dataclass(frozen=True)
class FileSet:
    """A backup's Storage files: what it copied, and how they compare with its rows."""

    endpoint: str                 # where they came from (no credentials)
    buckets: list[str]
    files: list[StoredFile]
    complete: bool = True         # False: the run ran out of time; `missing` were not copied
    missing: list[str] = field(default_factory=list)   # bucket/key, listed but not copied
    # Rows of the snapshot's storage.objects without a file (bucket/key: why); the files
    # out of step say so themselves (StoredFile.out_of_step).
    rows_without_files: list[str] = field(default_factory=list)
    compared: bool = True         # False: the database has no storage.objects to compare
    # Against the previous backup with files: counts and bytes added, changed, deleted,
    # and the bytes this run stored (new content only).
    changes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def out_of_step(self) -> list[str]:
        """Every file and row not in step with the snapshot, a line each."""
        return ([f"{f.path}: {f.out_of_step}" for f in self.files if f.out_of_step]
                + self.rows_without_files)

    def summary(self) -> dict[str, Any]:
        lines = self.out_of_step()
        return {"endpoint": self.endpoint, "buckets": self.buckets, "files": len(self.files),
                "bytes": self.total_bytes, "complete": self.complete,
                "missing": len(self.missing), "changes": self.changes,
                "out_of_step": len(lines), "out_of_step_first": lines[:20]}


@dataclass
class Manifest:
    backup_id: str
    database_id: str
    kind: str
    profile: str
    retention: str
    started_at: str
    finished_at: str
    snapshot_at: str
    snapshot_id: str
    server_version: str
    database: str
    database_size: int
    pg_dump: str           # path of the binary used
    pg_dump_version: str
    objects: list[StoredObject]
    label: str | None = None
    trigger: str = "manual"
    platform_schemas: list[str] = field(default_factory=list)
    # Roles the profile left out of roles.sql (the platform's own: anon, authenticated, ...).
    platform_roles: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The chain: an incremental's base full and parent; empty for a full backup.
    base: str = ""
    parent: str = ""
    # Why a requested incremental became a full backup ("" when it did not).
    escalation: str = ""
    snapshot_xmin: int = -1
    tables: list[TableState] = field(default_factory=list)  # every table, dumped or not
    format: int = FORMAT
    # Format 2: the COPY text's encoding (UTF8; SQL_ASCII, unconverted, for a SQL_ASCII
    # database) and the database's own, which a drill's scratch database takes.
    encoding: str = ""
    database_encoding: str = ""
    jobs: int = 0          # workers the run used (format 2)
    files: FileSet | None = None  # Supabase Storage files, with --storage-endpoint

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def duration_seconds(self) -> float:
        return (parse_time(self.finished_at) - parse_time(self.started_at)).total_seconds()

    @property
    def tables_by_oid(self) -> dict[int, TableState]:
        return {t.oid: t for t in self.tables}

    @property
    def depends_on(self) -> frozenset[str]:
        """The other backups whose objects a restore of this one reads: the chain's base
        (its roles and schema are this backup's own, but retention keeps a chain whole)
        and every backup that holds a table this one did not dump. The one place that
        says what a backup needs: backup, retention and verify all ask it."""
        return frozenset({t.held_in for t in self.tables} | {self.base}) - {"", self.backup_id}

    def held_in(self, backup_id: str) -> list[TableState]:
        """The tables whose data the backup `backup_id` holds for this one."""
        return [t for t in self.tables if t.held_in == backup_id]

    @property
    def pg_dump_major(self) -> int:
        """The major version of the pg_dump that made the archives: restore and verify
        need a pg_restore at least as new."""
        return int(self.pg_dump_version.split(".")[0])

    @property
    def tables_dumped(self) -> int:
        return sum(1 for t in self.tables if t.reason)

    def object(self, kind: str) -> StoredObject:
        return next(o for o in self.objects if o.kind == kind)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, key: str = "manifest") -> Manifest:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if isinstance(data.get("format"), int) and data["format"] > max(READABLE_FORMATS):
                raise StoreError(f"{key} is of manifest format {data['format']}, newer than "
                                 f"this supabackup reads ({FORMAT})",
                                 "restore it with a newer supabackup (pip install -U, or "
                                 "redeploy the stack)")
            if data.get("format") not in READABLE_FORMATS:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            if not isinstance(data.get("objects"), list) or not isinstance(
                    data.get("tables", []), list):
                raise ValueError("objects and tables must be lists")
            data["objects"] = [record(StoredObject, o, "an object") for o in data["objects"]]
            data["tables"] = [record(TableState, _with_parts(t), "a table")
                              for t in data.get("tables", [])]
            if data.get("files") is not None:
                data["files"] = _file_set(data["files"])
            manifest = record(cls, data, "the manifest")  # parses the times it has
            if not (manifest.started_at and manifest.finished_at and manifest.snapshot_at):
                raise ValueError("it lacks a time")
            if [o.kind for o in manifest.objects].count("database") != 1:
                raise ValueError("it does not list one database archive")
            return manifest
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{key} is damaged: {' '.join(str(exc).split())[:300]}",
                             "run `supabackup verify`; restore from another backup") from None

    def summary(self) -> dict[str, Any]:
        """What `list` and SNS show: no object list, nothing secret."""
        return {
            "backup_id": self.backup_id, "database_id": self.database_id, "kind": self.kind,
            "profile": self.profile, "retention": self.retention, "label": self.label,
            "trigger": self.trigger, "snapshot_at": self.snapshot_at,
            "server_version": self.server_version, "bytes": self.total_bytes,
            "duration_seconds": round(self.duration_seconds, 1),
            "pg_dump_version": self.pg_dump_version, "warnings": self.warnings,
            "base": self.base, "parent": self.parent, "escalation": self.escalation,
            "tables_dumped": self.tables_dumped, "tables_total": len(self.tables),
            **({"files": self.files.summary()} if self.files is not None else {}),
        }


def _file_set(files: Any) -> FileSet:
    """A manifest's file set from JSON, its files built as StoredFiles (type-checked)."""
    if not isinstance(files, dict) or not isinstance(files.get("files"), list):
        raise ValueError("files is not a file set")
    return record(FileSet, {**files, "files": [record(StoredFile, f, "a file")
                                               for f in files["files"]]}, "the file set")


def _with_parts(table: Any) -> Any:
    """A table record from JSON with its parts built as TableParts (type-checked)."""
    if isinstance(table, dict) and isinstance(table.get("parts"), list):
        return {**table, "parts": [record(TablePart, p, "a table part") for p in table["parts"]]}
    return table


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


SUFFIXES = {"full": "full", "incremental": "incr"}


def new_backup_id(ts: datetime, kind: str) -> str:
    """Sorts by time: 20261124T030000Z-full."""
    return ts.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{SUFFIXES[kind]}"


def with_kind(backup_id: str, kind: str) -> str:
    """The same id with the suffix of the kind the run turned out to be (escalation)."""
    return backup_id.rsplit("-", 1)[0] + f"-{SUFFIXES[kind]}"


def record(cls: type[R], data: Any, what: str) -> R:
    """`cls` built from a JSON object read back from the store, each field checked against
    its annotation, and each time (a field named *_at or *_time) and WAL position (*_lsn)
    parsed: a value of the wrong kind is a ValueError here, naming the field, not a
    TypeError three calls later. Raises ValueError or TypeError (unknown, missing fields)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} is not a JSON object")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and not _fits(value, hints[name]):
            raise ValueError(f"{what}'s {name} is {type(value).__name__} {str(value)[:40]!r}")
        if isinstance(value, str) and value:
            if name.endswith(("_at", "_time")):
                parse_time(value)
            elif name.endswith("lsn") and not _LSN.match(value):
                raise ValueError(f"{what}'s {name} is not a WAL position: {value[:40]!r}")
    return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the annotated type (str, int, float, bool, None, list[X],
    dict[str, X], X | Y, Any, or a record already built). JSON's true is no number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, args[1])
                                               for k, v in value.items())
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)  # str, bool, or a record already built
