"""Verify backups: every object re-read against its manifest, every archive read through.

A backup nobody has read back is a hope. For each backup, verify
  - lists the objects under its folder: a missing one and an extra one are both named;
  - re-reads every object and checks its size and sha256 against the manifest;
  - reads every archive through to its end with pg_restore (into /dev/null), which
    decompresses every data block: a truncated or damaged archive fails there even when
    `pg_restore --list` (which reads only the table of contents) would not; and every
    table part (format 2) through zstd;
  - checks the chain: an incremental's base, and every backup holding data it relies on,
    must exist and itself be readable, and list every part it relies on as recorded.
A manifest that cannot be parsed is a finding of its own, named by its key.

Verifying every backup of a database verifies its change capture too (capture/audit.py):
every epoch's base backup has a manifest; every index entry's segment exists with the
size and sha256 the entry records; each epoch's entries form a chain without gaps; each
progress record's newest segment is still indexed. Those findings are named by the key
under <database-id>/cdc/ ("cdc/segments/<end-lsn>.jsonl.gz: missing"). A store without
capture verifies as before; `--backup` verifies that backup's chain only.

With a drill server, verify then restores the chosen backup (or the newest) into a
scratch database there and compares every table with what the backup recorded in its own
snapshot (drill.py); each mismatch is a finding that names the table.

Supabase Storage files (files/check.py): every stored content the verified backups list
is re-read and re-hashed once; a missing or damaged one is a finding named
`files/<bucket>/<key>` for each backup that lists it. The drill also restores a sample of
the backup's files into a scratch folder of the store and compares them.

Every run that found backups to verify records its result in the store (a CheckRecord at
<database-id>/checks/<YYYYmmddTHHMMSSZ>.json, tagged retention=daily so the daily
lifecycle rule expires it): what was verified, ok or the problems, the drill's target
and result, the time. `supabackup status` reads these; nothing else does. The record is
an observation of the run, not part of it: a record that cannot be written is logged and
named in the run's outcome (`record_error`), and the verify's own result stands, good or
bad. Status then finds no fresh record and says so, which is what a person must see.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import zstandard

from .capture.audit import CaptureAudit, audit_store
from .dburl import ConnectionInfo
from .drill import DrillReport, run_drill
from .errors import BackupNotFound, RestoreFailed, StoreError, SupabackupError
from .files.check import drill_files, verify_files
from .manifest import Manifest, iso, record, utcnow
from .pgtools import Child, exit_reason, find_tools
from .retention import KEEP_DAYS_ENV, checked_keep_days
from .store import MANIFEST, Store

log = logging.getLogger(__name__)
CAPTURE = "cdc"  # the folder change capture keeps its records in: its findings' first part
CHECKS = "checks"  # the folder of each database where verify records its results
CHECK_TAGS = {"retention": "daily"}  # the daily lifecycle rule expires old results
CHECK_FORMAT = 1
STAMP = "%Y%m%dT%H%M%SZ"  # a check record's key: its time, so keys sort by time


@dataclass(frozen=True)
class Finding:
    backup_id: str
    name: str      # the object (or table, or "chain") the problem is about
    problem: str

    def __str__(self) -> str:
        return f"{self.backup_id}/{self.name}: {self.problem}"


@dataclass
class VerifyReport:
    database_id: str
    verified: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    bytes_read: int = 0
    drill: DrillReport | None = None
    capture: CaptureAudit | None = None  # what was checked of change capture, if any
    drill_target: str = ""   # the drill server (user@host:port/db), "" when none was asked
    drill_problems: list[Finding] = field(default_factory=list)  # the drill's, or why not run
    error: str = ""          # the run stopped before it finished: why
    record: str = ""         # the key its CheckRecord was stored at
    record_error: str = ""   # why the record could not be stored ("" when it was)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.error

    @property
    def drill_passed(self) -> bool:
        """The drill ran and found the backup as recorded: it restored, every table
        matched, and no later problem (a Storage file) names the drilled backup."""
        return self.drill is not None and not self.drill_problems

    def summary(self) -> dict[str, Any]:
        """What the CLI's last line and the SNS message say (with change capture: what
        was checked of it)."""
        found = {"database_id": self.database_id, "verified": self.verified,
                 "bytes_read": self.bytes_read, "problems": [str(f) for f in self.findings],
                 "drill": self.drill.summary() if self.drill else None}
        if self.capture is not None:
            found["capture"] = self.capture.summary()
        found["record"] = self.record or None
        if self.record_error:
            found["record_error"] = self.record_error
        return found


def verify_database(store: Store, database_id: str, backup_id: str | None = None,
                    drill: ConnectionInfo | None = None) -> VerifyReport:
    """Verify every backup of a database, or one backup and the chain it relies on.

    With `drill`, the backup (or the newest one) is then restored on that server and
    compared with what it recorded, unless its objects already failed to verify.
    Verifying every backup verifies the database's change capture too, when it has any.
    The run's result, also one that stopped half way, is recorded (record_check).
    """
    started = utcnow()
    keys = store.manifest_keys(database_id)
    if not keys:  # a typo in the database id must not make a weekly verify pass for ever
        raise BackupNotFound(f"no backup of {database_id} in {store.url} to verify",
                             "check --database-id (or SUPABACKUP_DATABASE_ID); `supabackup "
                             "list` shows the ids")
    report = VerifyReport(database_id=database_id)
    scrub = drill.redact if drill is not None else str
    try:
        _verify(store, keys, backup_id, drill, report)
    except SupabackupError as exc:  # a run that stops is a result too: the last one
        report.error = str(exc)
        record_check(store, report, backup_id, started, scrub)
        raise
    record_check(store, report, backup_id, started, scrub)
    return report


def _verify(store: Store, keys: list[str], backup_id: str | None,
            drill: ConnectionInfo | None, report: VerifyReport) -> None:
    """The checks themselves, their findings into `report`."""
    database_id = report.database_id
    manifests: dict[str, Manifest] = {}
    for key in keys:
        found_id = key.rsplit("/", 2)[-2]
        try:
            manifests[found_id] = store.read_manifest_key(key)
        except StoreError as exc:
            report.findings.append(Finding(found_id, MANIFEST, exc.message))
    wanted = sorted(manifests) if backup_id is None else _with_chain(backup_id, manifests)
    if backup_id is not None and backup_id not in manifests:
        report.findings.append(Finding(backup_id, MANIFEST, "no readable manifest"))
    for bid in wanted:
        manifest = manifests.get(bid)
        if manifest is None:
            continue
        report.findings += _check_chain(manifest, manifests)
        report.findings += _check_held_parts(manifest, manifests)
        report.findings += _check_objects(store, manifest, report)
        report.verified.append(bid)
    problems, read = verify_files(store, [manifests[b] for b in wanted if b in manifests])
    report.bytes_read += read
    report.findings += [Finding(p.backup_id, f"files/{p.path}", p.problem) for p in problems]
    if backup_id is None:
        _check_capture(store, database_id, manifests, keys, report)
    if drill is not None:
        report.drill_target = drill.display()
        before = len(report.findings)
        _drill(store, manifests, backup_id or max(manifests, default=""), drill, report)
        report.drill_problems = report.findings[before:]


@dataclass(frozen=True)
class DrillRecord:
    """A drill's result as a CheckRecord keeps it."""

    target: str          # the drill server, user@host:port/db (never a password)
    backup_id: str       # the backup it restored ("" when there was none to restore)
    ran: bool            # False: not run (the backup failed to verify), or the restore failed
    ok: bool
    problems: list[str] = field(default_factory=list)
    tables: int = 0
    rows: int = 0
    files: int = 0


@dataclass(frozen=True)
class CheckRecord:
    """One verify run's result, as the store keeps it for `supabackup status`."""

    database_id: str
    started_at: str
    finished_at: str
    backup: str          # the backup asked for (it and its chain verified); "" every backup
    verified: list[str]
    ok: bool
    problems: list[str]
    error: str = ""      # the run stopped before it finished: why
    bytes_read: int = 0
    capture: dict[str, Any] | None = None   # what was checked of change capture
    drill: DrillRecord | None = None        # None: no drill was asked for
    format: int = CHECK_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, key: str) -> CheckRecord:
        """A stored record, every field checked (manifest.record); a StoreError naming
        the key when it is not one."""
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and data.get("drill") is not None:
                data["drill"] = record(DrillRecord, data["drill"], "the drill")
            return record(cls, data, "the check record")
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{key} is damaged: {' '.join(str(exc).split())[:300]}",
                             "run `supabackup verify` to record a new result") from None


def check_key(store: Store, database_id: str, when: datetime) -> str:
    """Where the result of a run that ended at `when` is stored (one key per run)."""
    return store.key(database_id, CHECKS, f"{when.strftime(STAMP)}.json")


def check_record(report: VerifyReport, backup_id: str | None, started: datetime,
                 finished: datetime, scrub: Callable[[str], str] = str) -> CheckRecord:
    """What `report` says, as a CheckRecord; `scrub` takes the drill server's password
    out of what its errors may quote (the record is stored, and read by people)."""
    drill = None
    if report.drill_target:
        done = report.drill
        drill = DrillRecord(target=report.drill_target,
                            backup_id=done.backup_id if done else (
                                report.drill_problems[0].backup_id
                                if report.drill_problems else ""),
                            ran=done is not None, ok=report.drill_passed,
                            problems=[scrub(str(f)) for f in report.drill_problems],
                            tables=done.tables if done else 0, rows=done.rows if done else 0,
                            files=done.files if done else 0)
    return CheckRecord(database_id=report.database_id, started_at=iso(started),
                       finished_at=iso(finished), backup=backup_id or "",
                       verified=report.verified, ok=report.ok,
                       problems=[scrub(str(f)) for f in report.findings],
                       error=scrub(report.error),
                       bytes_read=report.bytes_read,
                       capture=report.capture.summary() if report.capture else None,
                       drill=drill)


def record_check(store: Store, report: VerifyReport, backup_id: str | None,
                 started: datetime, scrub: Callable[[str], str] = str) -> None:
    """Store the run's CheckRecord; a failure is logged and named in the report
    (`record_error`), never raised: the verify's result is what it found, and status
    shows a missing record as a verify not on record."""
    finished = utcnow()
    key = check_key(store, report.database_id, finished)
    body = check_record(report, backup_id, started, finished, scrub).to_json()
    try:
        store.put_small(key, body, "application/json", tags=CHECK_TAGS)
    except StoreError as exc:
        report.record_error = f"the result could not be recorded at {key}: {exc}"
        log.error("%s (the verify's own result stands)", report.record_error)
        return
    report.record = key


def _drill(store: Store, manifests: dict[str, Manifest], backup_id: str,
           server: ConnectionInfo, report: VerifyReport) -> None:
    manifest = manifests.get(backup_id)
    if manifest is None:
        report.findings.append(Finding(backup_id or "-", "drill", "no backup to restore"))
        return
    broken = sorted({f.backup_id for f in report.findings} & set(_with_chain(backup_id,
                                                                             manifests)))
    if broken:
        report.findings.append(Finding(backup_id, "drill", "not run: the backup relies on "
                                       f"{', '.join(broken)}, which failed to verify"))
        return
    try:
        report.drill = run_drill(store, manifest, server)
    except (RestoreFailed, StoreError) as exc:
        report.findings.append(Finding(backup_id, "drill", f"the restore failed: {exc.message}"))
        return
    report.findings += [Finding(backup_id, m.table, m.problem) for m in report.drill.mismatches]
    report.drill.files, problems = drill_files(store, manifest)
    report.findings += [Finding(p.backup_id, f"files/{p.path}", p.problem) for p in problems]


def _check_capture(store: Store, database_id: str, manifests: dict[str, Manifest],
                   keys: list[str], report: VerifyReport) -> None:
    unreadable = {k.rsplit("/", 2)[-2] for k in keys} - set(manifests)
    keep_days = checked_keep_days(os.environ.get(KEEP_DAYS_ENV), f"${KEEP_DAYS_ENV}")
    report.capture = audit_store(store, database_id, manifests, unreadable, keep_days)
    if report.capture is not None:
        report.bytes_read += report.capture.bytes_read
        report.findings += [Finding(CAPTURE, p.name, p.problem)
                            for p in report.capture.problems]


def _with_chain(backup_id: str, manifests: dict[str, Manifest]) -> list[str]:
    manifest = manifests.get(backup_id)
    if manifest is None:
        return []
    return sorted(manifest.depends_on | {backup_id})


def _check_chain(manifest: Manifest, manifests: dict[str, Manifest]) -> list[Finding]:
    findings = []
    if manifest.base and manifest.base not in manifests:
        findings.append(Finding(manifest.backup_id, "chain",
                                f"its base {manifest.base} is missing"))
    for holder in sorted(manifest.depends_on - {manifest.base}):
        if holder not in manifests:
            tables = sorted(t.qualified for t in manifest.held_in(holder))
            findings.append(Finding(manifest.backup_id, "chain",
                                    f"{holder}, which holds {', '.join(tables[:5])}, is missing"))
    return findings


def _check_objects(store: Store, manifest: Manifest, report: VerifyReport) -> list[Finding]:
    findings = []
    present = store.object_names(manifest.database_id, manifest.backup_id)
    expected = {o.name for o in manifest.objects} | {MANIFEST}
    for extra in sorted(present - expected):
        findings.append(Finding(manifest.backup_id, extra, "extra object, not in the manifest"))
    for obj in manifest.objects:
        if obj.name not in present:
            findings.append(Finding(manifest.backup_id, obj.name, "missing"))
            continue
        size, digest, archive_error = _read_through(store, manifest, obj.name, obj.format)
        report.bytes_read += size
        if size != obj.size:
            findings.append(Finding(manifest.backup_id, obj.name,
                                    f"size {size} bytes, the manifest says {obj.size}"))
        elif digest != obj.sha256:
            findings.append(Finding(manifest.backup_id, obj.name,
                                    "sha256 does not match the manifest (same size: "
                                    "the content was altered)"))
        if archive_error:
            reader = "pg_restore" if obj.format == "custom" else "zstd"
            findings.append(Finding(manifest.backup_id, obj.name,
                                    f"{reader} cannot read it through: {archive_error}"))
    return findings


def _check_held_parts(manifest: Manifest, manifests: dict[str, Manifest]) -> list[Finding]:
    """Every part a table of `manifest` names in another backup's folder is an object that
    backup's manifest lists, with the same size and sha256 (format 2)."""
    findings = []
    for table in manifest.tables:
        holder = manifests.get(table.held_in)
        if table.held_in == manifest.backup_id or holder is None:
            continue  # its own parts are its objects; a missing holder is a chain finding
        listed = {o.name: o for o in holder.objects}
        for part in table.parts:
            obj = listed.get(part.name)
            if obj is None or (obj.size, obj.sha256) != (part.size, part.sha256):
                findings.append(Finding(manifest.backup_id, "chain",
                                        f"{table.qualified}'s part {part.name} is not in "
                                        f"{holder.backup_id} as recorded"))
    return findings


class _Discard:
    """A sink for objects that are only hashed."""

    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


class _Unzstd:
    """A sink that decompresses a zstd stream and keeps what is wrong with it."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor().decompressobj()
        self.error = ""

    def write(self, data: bytes) -> int:
        if not self.error:
            try:
                self._zstd.decompress(data)
            except zstandard.ZstdError as exc:
                self.error = str(exc)
        return len(data)

    def close(self) -> None:
        if not self.error and not self._zstd.eof:
            self.error = "it ends before its last frame does (truncated)"


def _read_through(store: Store, manifest: Manifest, name: str,
                  format: str) -> tuple[int, str, str]:
    """Stream an object once: its size, its sha256 and, for an archive, pg_restore's verdict
    (for a table part, zstd's)."""
    child = None
    if format == "custom":
        tools = find_tools(manifest.pg_dump_major, purpose="verify")
        child = Child([tools.path("pg_restore"), "--file=/dev/null"], stdin=True)
    sink = _Unzstd() if format == "copy" else _Discard()
    try:
        size, digest = store.stream_to(manifest, name, child.stdin if child else sink)
    except StoreError as exc:
        if child is not None:
            child.kill()
        return 0, "", f"could not be read: {exc}"
    verdict = sink.error if isinstance(sink, _Unzstd) else ""
    if child is not None:
        code, stderr = child.wait()
        if code != 0:
            verdict = "; ".join(ln for ln in stderr.strip().splitlines() if "error" in ln)[:500] \
                or exit_reason(code)
    return size, digest, verdict
