"""What change capture keeps in the store, and reading it back.

Layout, under <database-id>/cdc/:

    state.json                          the epoch now running (slot, plugin, base)
    epochs/<start-lsn>.json             every epoch ever started
    progress/<start-lsn>.json           how far each epoch is covered, and why it ended
    segments/<end-lsn>.jsonl.gz         one JSON line per transaction
    index/<end-lsn>.json                commit times, LSNs, size and sha256 of a segment,
                                        and the check of the run that stored it

A segment counts only once its index entry is stored (as a backup counts only once its
manifest is): the entry is written last.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..errors import StoreError
from ..manifest import parse_time, record
from ..store import Store

R = TypeVar("R")
# The slot's output plugin: wal2json where the server has it; else pgoutput, built in, which
# needs a publication.
PLUGINS = ("wal2json", "pgoutput")


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_key(lsn: str) -> str:
    """An LSN as 16 hex digits, so keys sort in LSN order."""
    return f"{lsn_int(lsn):016X}"


@dataclass(frozen=True)
class CaptureState:
    slot: str
    plugin: str
    base: str          # the full backup taken in the slot's exported snapshot
    start_lsn: str     # the slot's consistent point: changes after it are not in the base
    publication: str = ""  # pgoutput's publications, comma-separated; wal2json needs none
    base_at: str = ""      # the base's snapshot time
    schema: str = ""       # definitions fingerprint when the base was taken


@dataclass(frozen=True)
class Check:
    """What a run read before peeking: everything committed before `lsn` is in the slot,
    and was committed under the definitions `schema`."""

    lsn: str
    at: str
    schema: str
    sequences: dict[str, list[Any]] = field(default_factory=dict)  # name: [last_value, is_called]
    large_objects: int = 0
    files: dict[str, int] = field(default_factory=dict)  # schema.table: relfilenode


@dataclass(frozen=True)
class Progress:
    """How far an epoch is covered: restores reach times up to `verified_at`."""

    verified_lsn: str
    verified_at: str
    sequences: dict[str, list[Any]] = field(default_factory=dict)
    sequences_at: str = ""
    large_objects: int = 0
    ended: str = ""   # why the epoch ended ("" while it runs)
    files: dict[str, int] = field(default_factory=dict)      # the check's (see _rewritten)
    truncated_after: list[str] = field(default_factory=list)  # by stored commits after it


@dataclass(frozen=True)
class Segment:
    key: str
    end_lsn: str
    transactions: int
    first_commit_time: str
    last_commit_time: str
    size: int
    sha256: str
    checked_at: str = ""     # the run's check (Check): sequences as they were then
    sequences: dict[str, list[Any]] = field(default_factory=dict)
    large_objects: int = 0


def store_key(store: Store, database_id: str, *parts: str) -> str:
    return store.key(database_id, "cdc", *parts)


def read_record(store: Store, key: str, kind: type[R], what: str) -> R | None:
    """The record stored at `key` (None when there is none), or a clear StoreError when
    the object is not such a record (damaged, or written by something else)."""
    raw = store.read_small(key)
    if raw is None:
        return None
    try:
        found = record(kind, json.loads(raw), what)
        if isinstance(found, CaptureState) and not (found.base_at and found.start_lsn
                                                    and found.plugin in PLUGINS):
            raise ValueError("it names no base time, start position or known plugin")
        for value in getattr(found, "sequences", {}).values():
            if not (len(value) == 2 and type(value[0]) is int and type(value[1]) is bool):
                raise ValueError(f"a sequence value {str(value)[:40]} is not [int, bool]")
        return found
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{what} {key} is damaged ({' '.join(str(exc).split())[:200]})",
                         "restore from a backup, or `supabackup cdc drop` and start again"
                         ) from None


def _listed(store: Store, key: str, kind: type[R], what: str) -> R:
    """A record whose key a listing just gave: gone by now is damage too."""
    found = read_record(store, key, kind, what)
    if found is None:
        raise StoreError(f"{what} {key} vanished while it was read",
                         "run again; if it persists, check what deletes from the store")
    return found


def put_json(store: Store, key: str, value: dict[str, Any]) -> None:
    store.put_small(key, json.dumps(value).encode(), "application/json")


def read_state(store: Store, database_id: str) -> CaptureState | None:
    """The capture now running, if any."""
    return read_record(store, store_key(store, database_id, "state.json"), CaptureState,
                       "capture state")


def epochs(store: Store, database_id: str) -> list[CaptureState]:
    """Every capture ever started (a base and the changes after it), oldest first.

    A new epoch begins with `cdc start`, and by itself when the definitions changed (DDL
    is not in the stream) or the slot was lost; restores pick the epoch that covers their
    time.
    """
    prefix = store_key(store, database_id, "epochs") + "/"
    return [_listed(store, k, CaptureState, "capture epoch")
            for k in sorted(store.list_keys(prefix))]


def read_progress(store: Store, database_id: str, epoch: CaptureState) -> Progress | None:
    return read_record(store, progress_key(store, database_id, epoch), Progress,
                       "capture progress")


def progress_key(store: Store, database_id: str, epoch: CaptureState) -> str:
    return store_key(store, database_id, "progress", f"{lsn_key(epoch.start_lsn)}.json")


def write_segment(store: Store, database_id: str, transactions: list[dict[str, Any]],
                   end_lsn: str, check: Check) -> Segment:
    body = gzip.compress(b"".join(json.dumps(t).encode() + b"\n" for t in transactions))
    key = store_key(store, database_id, "segments", f"{lsn_key(end_lsn)}.jsonl.gz")
    segment = Segment(key=key, end_lsn=end_lsn, transactions=len(transactions),
                      first_commit_time=transactions[0]["commit_time"],
                      last_commit_time=transactions[-1]["commit_time"], size=len(body),
                      sha256=hashlib.sha256(body).hexdigest(), checked_at=check.at,
                      sequences=check.sequences, large_objects=check.large_objects)
    store.put_small(key, body)
    # The index entry is written last: a segment without one does not count.
    put_json(store, store_key(store, database_id, "index", f"{lsn_key(end_lsn)}.json"),
              asdict(segment))
    return segment


def segments(store: Store, database_id: str) -> list[Segment]:
    """Every committed segment, in LSN order."""
    prefix = store_key(store, database_id, "index") + "/"
    keys = sorted(k for k in store.list_keys(prefix) if k.endswith(".json"))
    return [_listed(store, k, Segment, "capture index entry") for k in keys]


def transactions_until(store: Store, database_id: str, epoch: CaptureState,
                       when: datetime, until_lsn: str = "") -> Iterator[dict[str, Any]]:
    """The transactions of `epoch` (after its base, before `until_lsn`, the next epoch's
    start) that make up the database as of `when`: once each, in commit (LSN) order, up
    to the first one committed after `when`. That is PostgreSQL's own recovery_target_time
    rule: the state is a prefix of the commit order, which is a state the database had.
    (A commit time is taken just before the commit is written, so two commits may be in
    one order by LSN and the other by time; the prefix rule keeps the state consistent.)"""
    applied: set[str] = set()
    start = lsn_int(epoch.start_lsn)
    end = lsn_int(until_lsn) if until_lsn else None
    for segment in segments(store, database_id):
        if lsn_int(segment.end_lsn) <= start:
            continue
        if parse_time(segment.first_commit_time) > when:
            break
        raw = store.read_small(segment.key)
        if raw is None or hashlib.sha256(raw).hexdigest() != segment.sha256:
            raise StoreError(f"change segment {segment.key} is missing or damaged",
                             "restore to a time before it, or from the base alone")
        for txn in _decoded(raw, segment.key):
            commit = lsn_int(txn["commit_lsn"])
            if txn["commit_lsn"] in applied or commit < start:
                continue  # delivered twice (a run that died before advancing), or in the base
            if parse_time(txn["commit_time"]) > when or (end is not None and commit >= end):
                return
            applied.add(txn["commit_lsn"])
            yield txn


def _decoded(raw: bytes, key: str) -> list[dict[str, Any]]:
    """The transactions of a segment whose hash matched its index entry, each checked for
    what replay reads: a segment written by something else is a clear error, not a
    traceback half way through a replay."""
    try:
        transactions = [json.loads(line) for line in gzip.decompress(raw).splitlines()]
        for txn in transactions:
            lsn_int(txn["commit_lsn"])
            parse_time(txn["commit_time"])
            for change in txn["changes"]:
                if change["action"] not in ("I", "U", "D", "T") or not (
                        isinstance(change["schema"], str) and isinstance(change["table"], str)):
                    raise ValueError(f"a change of action {change['action']!r}")
                for column in change.get("columns", []) + change.get("identity", []):
                    if not (isinstance(column["name"], str) and isinstance(column["type"], str)
                            and "value" in column):
                        raise ValueError(f"a column {str(column)[:80]}")
        return transactions
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError) as exc:
        raise StoreError(f"change segment {key} is damaged ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})",
                         "restore to a time before it, or from the base alone") from None
