"""Auditing what change capture stored: what `supabackup verify` checks of it.

For each epoch: its base backup has a manifest; its index entries form an unbroken chain
from its start (state.py: an entry's `after` is at or before where the entries before it
reach, else the changes in between are gone); the newest entry its progress record names
exists. For each index entry: its segment object exists, has the size and sha256 the entry
records, and reads back as gzip holding as many transactions as the entry says.

`audit` is a pure function of the records and of what reading each segment found, so
every way a store can be damaged is a few records in a test; `audit_store` reads them.
Its reads are ordered so that a capture running meanwhile cannot make a finding: the
progress records first (a progress record is written after the entry it names), then the
index entries, then the epochs (an epoch is recorded before any entry names it); a miss
that could be newer than a listing (a base, a progress record) is looked for once more.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..errors import StoreError
from ..manifest import utcnow
from ..retention import KEEP_DAYS, capture_needs
from ..store import MANIFEST, Store
from .state import (
    INDEX_READERS,
    CaptureState,
    Progress,
    Segment,
    entry_name,
    lsn_int,
    lsn_key,
    read_record,
    segments_of,
    store_key,
)

R = TypeVar("R")
SEGMENT_READERS = 8  # segments read at once (each is held whole while it is hashed)
CHUNK = 1024 * 1024  # how much of a segment is decompressed at a time


@dataclass(frozen=True)
class Problem:
    name: str      # the record or object, as its key under <database-id>/cdc/
    problem: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


@dataclass(frozen=True)
class Read:
    """What reading one segment object found."""

    size: int
    sha256: str
    transactions: int = 0  # the JSON lines it holds, one per transaction
    broken: str = ""       # why it does not read back as gzip ("" when it does)
    unread: str = ""       # why it could not be read at all ("" when it was)


@dataclass(frozen=True)
class Stored:
    """What the store holds of a database's change capture, as `read_stored` found it."""

    epochs: list[CaptureState] = field(default_factory=list)  # oldest first
    progress: Mapping[str, Progress | None] = field(default_factory=dict)  # by start LSN
    entries: list[Segment] = field(default_factory=list)  # index entries, in LSN order
    damaged: list[Problem] = field(default_factory=list)  # records that did not read back
    late: frozenset[str] = frozenset()  # epochs whose progress was read after the entries

    def __bool__(self) -> bool:
        return bool(self.epochs or self.progress or self.entries or self.damaged)


@dataclass
class CaptureAudit:
    """What `verify` checked of change capture, and what it found."""

    epochs: int = 0
    segments: int = 0
    transactions: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    released: int = 0  # epochs retention let go: past the window, not checked

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "segments": self.segments,
                "transactions": self.transactions, "bytes_read": self.bytes_read,
                "problems": len(self.problems), "released_epochs": self.released}


def audit(stored: Stored, bases: Mapping[str, str], objects: Mapping[str, Read | None],
          released: Collection[str] = ()) -> list[Problem]:
    """Every problem with what capture stored. `bases`: {backup id: "" when its manifest
    reads back, else what is wrong with it}, for every epoch's base; `objects`: {segment
    key: what reading it found, None when there is no such object}; `released`: the
    epochs (start LSNs) retention let go, whose base and changes may be gone by design."""
    problems = list(stored.damaged)
    starts = {e.start_lsn for e in stored.epochs}
    for entry in stored.entries:
        if entry.epoch in released:
            continue
        if entry.epoch and entry.epoch not in starts:
            problems.append(Problem(_index_name(entry.end_lsn, entry.epoch), (
                f"names epoch {entry.epoch}, which has no record (epochs/"
                f"{lsn_key(entry.epoch)}.json is missing): no restore replays it")))
        problems += _segment_problems(entry, objects.get(entry.key))
    for i, epoch in enumerate(stored.epochs):
        if epoch.start_lsn in released:
            continue
        until = stored.epochs[i + 1].start_lsn if i + 1 < len(stored.epochs) else ""
        mine = segments_of(stored.entries, epoch, until)
        wrong = bases.get(epoch.base, "missing")
        if wrong:
            problems.append(Problem(_epoch_name(epoch), (
                f"the base of epoch {epoch.start_lsn}, backup {epoch.base}, is {wrong}: "
                "no restore can replay the epoch's changes")))
        problems += _gaps(epoch, mine)
        problems += _progress_problems(epoch, stored, mine)
    return problems


def _gaps(epoch: CaptureState, entries: list[Segment]) -> list[Problem]:
    """The chain of an epoch's entries (LSN order) from its start: a gap where an entry
    began after where the entries before it reach. Entries stored before 0.6 name no
    start (`after` is ""): they extend the chain, unchecked."""
    problems, reach = [], epoch.start_lsn
    for entry in entries:
        if entry.after and lsn_int(entry.after) > lsn_int(reach):
            problems.append(Problem(_epoch_name(epoch), (
                f"a gap in epoch {epoch.start_lsn}: no stored segment holds the changes "
                f"from {reach} to {entry.after} (the next entry, "
                f"{_index_name(entry.end_lsn, entry.epoch)}, begins after {entry.after})")))
        reach = max(reach, entry.end_lsn, key=lsn_int)
    return problems


def _progress_problems(epoch: CaptureState, stored: Stored, entries: list[Segment]
                       ) -> list[Problem]:
    name = f"progress/{lsn_key(epoch.start_lsn)}.json"
    if epoch.start_lsn not in stored.progress:
        return []  # it did not read back: a finding of its own
    progress = stored.progress[epoch.start_lsn]
    if progress is None:
        return [Problem(name, f"missing: restores to a time in epoch {epoch.start_lsn} "
                        "reach only its base")]
    last = progress.last_segment
    if not last or epoch.start_lsn in stored.late or any(e.end_lsn == last for e in entries):
        return []
    return [Problem(name, (
        f"names the newest segment of epoch {epoch.start_lsn}, ending at {last}, but its "
        f"index entry {_index_name(last, epoch.start_lsn)} is gone (its segment no longer "
        "counts): the epoch's newest changes are lost"))]


def _segment_problems(entry: Segment, found: Read | None) -> list[Problem]:
    name = _segment_name(entry)
    if found is None:
        return [Problem(name, f"missing (its index entry {_index_name(entry.end_lsn, entry.epoch)} "
                        "names it)")]
    if found.unread:
        return [Problem(name, f"could not be read: {found.unread}")]
    if found.size != entry.size:
        return [Problem(name, f"damaged: size {found.size} bytes, its index entry says "
                        f"{entry.size}")]
    if found.sha256 != entry.sha256:
        return [Problem(name, "damaged: sha256 does not match its index entry (same size: "
                        "the content was altered)")]
    if found.broken:  # what capture wrote, yet not readable: a bug, named all the same
        return [Problem(name, f"damaged: it does not read back as gzip ({found.broken})")]
    if found.transactions != entry.transactions:
        return [Problem(name, f"damaged: holds {found.transactions} transaction(s), its "
                        f"index entry says {entry.transactions}")]
    return []


def _epoch_name(epoch: CaptureState) -> str:
    return f"epochs/{lsn_key(epoch.start_lsn)}.json"


def _index_name(end_lsn: str, epoch: str) -> str:
    return f"index/{entry_name(end_lsn, epoch) if epoch else lsn_key(end_lsn)}.json"


def _segment_name(entry: Segment) -> str:
    """The segment's key under <database-id>/cdc/ (the whole key if it lies elsewhere)."""
    _, sep, tail = entry.key.rpartition("/cdc/segments/")
    return f"segments/{tail}" if sep else entry.key


# --- reading ------------------------------------------------------------------------------

def audit_store(store: Store, database_id: str, manifests: Collection[str],
                unreadable: Collection[str] = (), keep_days: int = KEEP_DAYS,
                now: datetime | None = None) -> CaptureAudit | None:
    """Audit the database's change capture (None when it has none). `manifests`: the
    backups whose manifests verify read; `unreadable`: those whose manifests it could not.
    Epochs past the window of the last `keep_days` days (retention.capture_needs) are
    not checked: retention let their bases go, and lifecycle their changes."""
    stored = read_stored(store, database_id)
    if not stored:
        return None
    needed = capture_needs([(e, stored.progress.get(e.start_lsn)) for e in stored.epochs],
                           now or utcnow(), keep_days)
    released = frozenset(e.start_lsn for e in stored.epochs if e.base not in needed)
    bases = {e.base: _base(store, database_id, e.base, manifests, unreadable)
             for e in stored.epochs if e.start_lsn not in released}
    checked = [e for e in stored.entries if e.epoch not in released]
    objects = read_segments(store, checked)
    return CaptureAudit(epochs=len(stored.epochs) - len(released), segments=len(checked),
                        transactions=sum(e.transactions for e in checked),
                        bytes_read=sum(r.size for r in objects.values() if r is not None),
                        problems=audit(stored, bases, objects, released),
                        released=len(released))


def _base(store: Store, database_id: str, backup_id: str, manifests: Collection[str],
          unreadable: Collection[str]) -> str:
    if backup_id in manifests:
        return ""
    if backup_id in unreadable:
        return "damaged (its manifest does not read back)"
    # A base taken since verify listed the manifests (a new epoch) is there now.
    found = store.read_small(store.backup_key(database_id, backup_id, MANIFEST))
    return "" if found is not None else "missing (it has no manifest)"


def read_stored(store: Store, database_id: str) -> Stored:
    """The progress records, then the index entries, then the epochs (see the docstring)."""
    damaged: list[Problem] = []
    by_key = _read_all(store, store_key(store, database_id, "progress"), Progress,
                       "capture progress", damaged)
    entries = list(_read_all(store, store_key(store, database_id, "index"), Segment,
                             "capture index entry", damaged).values())
    epochs = list(_read_all(store, store_key(store, database_id, "epochs"), CaptureState,
                            "capture epoch", damaged).values())
    progress: dict[str, Progress | None] = {}
    late: set[str] = set()
    for epoch in epochs:
        name = f"progress/{lsn_key(epoch.start_lsn)}.json"
        if name in by_key:
            progress[epoch.start_lsn] = by_key[name]
        elif not any(p.name == name for p in damaged):
            again = _read_one(store, store_key(store, database_id, name), Progress,
                              "capture progress", damaged)
            progress[epoch.start_lsn] = again
            if again is not None:
                late.add(epoch.start_lsn)  # started since: it may name newer entries
    return Stored(epochs=epochs, progress=progress, entries=entries,
                  damaged=sorted(damaged, key=lambda p: p.name), late=frozenset(late))


def _read_all(store: Store, prefix: str, kind: type[R], what: str,
              damaged: list[Problem]) -> dict[str, R]:
    """{name under cdc/: record} of every record under `prefix`, in key order; each one
    that does not read back is a Problem in `damaged`."""
    keys = sorted(k for k in store.list_keys(prefix + "/") if k.endswith(".json"))
    with ThreadPoolExecutor(max_workers=INDEX_READERS) as pool:
        found = list(pool.map(lambda k: _read_one(store, k, kind, what, damaged), keys))
    return {_cdc_name(k): r for k, r in zip(keys, found, strict=True) if r is not None}


def _read_one(store: Store, key: str, kind: type[R], what: str,
              damaged: list[Problem]) -> R | None:
    try:
        found = read_record(store, key, kind, what)
        if found is not None:
            _check_positions(found, what)
        return found
    except StoreError as exc:
        damaged.append(Problem(_cdc_name(key), exc.message.replace(f" {key} ", " ")))
        return None


def _check_positions(found: Any, what: str) -> None:
    """The WAL positions record() does not check by name (theirs do not end in _lsn)."""
    for name in ("epoch", "after", "last_segment"):
        value = getattr(found, name, "")
        try:
            if value:
                lsn_int(value)
        except ValueError:
            raise StoreError(f"{what} is damaged ({name} is not a WAL position: "
                             f"{str(value)[:40]!r})") from None


def _cdc_name(key: str) -> str:
    _, sep, tail = key.rpartition("/cdc/")
    return tail if sep else key


def read_segments(store: Store, entries: list[Segment]) -> dict[str, Read | None]:
    """{key: what reading it found, None when it is missing} for every entry's segment."""
    keys = sorted({e.key for e in entries})
    with ThreadPoolExecutor(max_workers=SEGMENT_READERS) as pool:
        return dict(zip(keys, pool.map(lambda k: read_segment(store, k), keys), strict=True))


def read_segment(store: Store, key: str) -> Read | None:
    try:
        raw = store.read_small(key)
    except StoreError as exc:
        return Read(size=0, sha256="", unread=exc.message)
    if raw is None:
        return None
    lines, broken = _lines(raw)
    return Read(size=len(raw), sha256=hashlib.sha256(raw).hexdigest(), transactions=lines,
                broken=broken)


def _lines(raw: bytes) -> tuple[int, str]:
    """The lines a gzip stream (one or more members) holds, decompressed a chunk at a
    time; and why it does not decompress ("" when it does, to its end, CRCs matching)."""
    lines, last = 0, b"\n"
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as unzipped:
            while chunk := unzipped.read(CHUNK):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, EOFError, zlib.error) as exc:
        return lines, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return lines + (last != b"\n"), ""
