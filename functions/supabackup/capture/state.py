"""What change capture keeps in the store, and reading it back.

Layout, under <database-id>/cdc/:

    state.json                          the epoch now running (slot, plugin, base)
    epochs/<start-lsn>.json             every epoch ever started
    progress/<start-lsn>.json           how far each epoch is covered, and why it ended
    segments/<end-lsn>.jsonl.gz         one JSON line per transaction (gzip; one or more
                                        members, which read back as one stream)
    index/<end-lsn>.json                commit times, LSNs, size and sha256 of a segment,
                                        its epoch, where its stream began, and the check
                                        of the run that stored it
    slots/<slot>.json                   the slot's health as the last run to open it read
                                        it (retained WAL, safe_wal_size, wal_status), so
                                        `supabackup status` can say what it holds without
                                        a connection to the database

A segment counts only once its index entry is stored (as a backup counts only once its
manifest is): the entry is written last. Segments and index entries carry the tag
retention=capture, which the bucket's lifecycle rule for captured changes expires.

The entries of an epoch form a chain: each names the position its stream began after
(`after`), and holds every transaction that ended in (after, end_lsn]. Within an epoch the
`after` of each entry is at or before where the entries before it reach, so a hole (an
entry deleted, a run that lost changes) shows as a gap; the progress record names the
newest entry (`last_segment`), so a deleted newest entry shows too (verify checks both).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..errors import StoreError
from ..manifest import parse_time, record
from ..store import Store

R = TypeVar("R")
INDEX_READERS = 16  # index entries read at once (boto3's client is thread-safe)
SEGMENT_READERS = 4  # segments read at once by a replay, ahead of the one it applies
SEGMENTS_AHEAD = 8   # ... at most this many (their bytes wait in memory)
# The slot's output plugin: wal2json where the server has it; else pgoutput, built in, which
# needs a publication.
PLUGINS = ("wal2json", "pgoutput")
TAGS = {"retention": "capture"}  # what the lifecycle rule for captured changes expires


def lsn_int(lsn: str) -> int:
    """A WAL position's number; ValueError when the text is none."""
    high, sep, low = lsn.partition("/")
    if not sep or not high or not low:
        raise ValueError(f"not a WAL position: {lsn[:40]!r}")
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
    handover: str = ""     # state.json only: the epoch (start LSN) a rebase hands over to


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
    files_lsn: str = ""  # the WAL position inserted once `files` was read (a TRUNCATE
    #                      committed before it explains a new relfilenode)


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
    last_segment: str = ""  # end LSN of the newest segment stored in the epoch ("" for none)


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
    epoch: str = ""          # start LSN of the epoch whose slot it came from ("" before 0.6)
    after: str = ""          # its stream began after this position (see the chain above)


@dataclass(frozen=True)
class SlotReading:
    """A slot's health as a capture run read it (slot.slot_status), kept in a record of its
    own rather than in the progress record: a reader of an older release refuses a
    progress record with fields it does not know, and this one is only an observation."""

    slot: str
    read_at: str
    found: bool                      # False: the slot was gone when the run looked
    wal_status: str | None = None    # reserved, extended, unreserved, lost
    retained_wal_bytes: int = 0      # pg_current_wal_lsn() - restart_lsn
    safe_wal_size: int | None = None  # WAL the server may still write before it invalidates
    #                                  the slot (None: no max_slot_wal_keep_size)


def slot_key(store: Store, database_id: str, slot: str) -> str:
    return store_key(store, database_id, "slots", f"{slot}.json")


def record_slot(store: Store, database_id: str, slot: str, health: dict[str, Any],
                at: str) -> None:
    """Keep what slot_status read of `slot` at `at` (an ISO time)."""
    reading = SlotReading(slot=slot, read_at=at, found=bool(health),
                          wal_status=health.get("wal_status"),
                          retained_wal_bytes=int(health.get("retained_wal_bytes") or 0),
                          safe_wal_size=health.get("safe_wal_size"))
    put_json(store, slot_key(store, database_id, slot), asdict(reading))


def read_slot(store: Store, database_id: str, slot: str) -> SlotReading | None:
    """The last reading of `slot` a capture run kept (None: none yet)."""
    return read_record(store, slot_key(store, database_id, slot), SlotReading,
                       "capture slot reading")


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
        for name in ("epoch", "after", "last_segment", "handover"):
            value = getattr(found, name, "")
            if value:
                try:
                    lsn_int(value)
                except ValueError:
                    raise ValueError(f"its {name} is not a WAL position: {value[:40]!r}"
                                     ) from None
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


class Batch:
    """Whole transactions on their way into one segment, compressed as they come: a batch
    holds their compressed bytes and, of each, what the progress record needs."""

    def __init__(self) -> None:
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip stream
        self._parts: list[bytes] = []
        self.meta: list[dict[str, Any]] = []
        self.raw_bytes = 0

    def add(self, txn: dict[str, Any]) -> None:
        line = json.dumps(txn).encode() + b"\n"
        self._parts.append(self._zip.compress(line))
        self.raw_bytes += len(line)
        self.meta.append({"commit_lsn": txn["commit_lsn"], "commit_time": txn["commit_time"],
                          "end_lsn": txn["end_lsn"],
                          "truncated": sorted({f"{c['schema']}.{c['table']}"
                                               for c in txn["changes"] if c["action"] == "T"})})

    def body(self) -> bytes:
        """The segment's bytes (the batch takes no more transactions)."""
        return b"".join(self._parts) + self._zip.flush()


def entry_name(end_lsn: str, epoch_lsn: str) -> str:
    """A segment's and its index entry's name: its end LSN, then its epoch's start. Two
    epochs' slots stream the same transactions for a while after a rebase, and may end a
    segment at the same LSN: the epoch keeps them apart. Keys still sort by end LSN (a
    name of before 0.6 is the end LSN alone)."""
    return f"{lsn_key(end_lsn)}.{lsn_key(epoch_lsn)}"


def write_segment(store: Store, database_id: str, batch: Batch, epoch: CaptureState,
                  after: str, check: Check) -> Segment:
    """Store a batch as a segment, then its index entry, the commit marker."""
    transactions, body = batch.meta, batch.body()
    end_lsn = transactions[-1]["end_lsn"]
    name = entry_name(end_lsn, epoch.start_lsn)
    key = store_key(store, database_id, "segments", f"{name}.jsonl.gz")
    segment = Segment(key=key, end_lsn=end_lsn, transactions=len(transactions),
                      first_commit_time=transactions[0]["commit_time"],
                      last_commit_time=transactions[-1]["commit_time"], size=len(body),
                      sha256=hashlib.sha256(body).hexdigest(), checked_at=check.at,
                      sequences=check.sequences, large_objects=check.large_objects,
                      epoch=epoch.start_lsn, after=after)
    store.put_small(key, body, tags=TAGS)
    # The index entry is written last: a segment without one does not count.
    store.put_small(store_key(store, database_id, "index", f"{name}.json"),
                    json.dumps(asdict(segment)).encode(), "application/json", tags=TAGS)
    return segment


def segments(store: Store, database_id: str, after_lsn: str = "") -> list[Segment]:
    """Every committed segment (ending after `after_lsn`, when given), in LSN order. A
    stream stores one every few seconds: the entries are read over several connections."""
    prefix = store_key(store, database_id, "index") + "/"
    start = f"{prefix}{lsn_key(after_lsn)}.json" if after_lsn else ""
    keys = sorted(k for k in store.list_keys(prefix, start) if k.endswith(".json"))
    with ThreadPoolExecutor(max_workers=INDEX_READERS) as pool:
        return list(pool.map(lambda k: _listed(store, k, Segment, "capture index entry"), keys))


def segments_of(everything: list[Segment], epoch: CaptureState, until_lsn: str = ""
                ) -> list[Segment]:
    """The segments `epoch`'s slot gave, in LSN order. Two slots stream at once while one
    epoch hands over to the next (see lifecycle.rebase), so segments are told apart by the
    epoch they name; one that names none (stored before 0.6) belongs to the epoch whose
    LSNs it falls in: after its start, up to `until_lsn` (the next epoch's start)."""
    start = lsn_int(epoch.start_lsn)
    end = lsn_int(until_lsn) if until_lsn else None
    return [s for s in everything
            if s.epoch == epoch.start_lsn
            or (not s.epoch and lsn_int(s.end_lsn) > start
                and (end is None or lsn_int(s.end_lsn) <= end))]


def reach_of(progress: Progress | None, epoch: CaptureState) -> str:
    """Where the epoch's stored chain reaches: the newest segment's end, else its start."""
    return (progress.last_segment if progress is not None and progress.last_segment
            else epoch.start_lsn)


def transactions_until(store: Store, database_id: str, epoch: CaptureState,
                       when: datetime, until_lsn: str = "",
                       listed: list[Segment] | None = None) -> Iterator[dict[str, Any]]:
    """The transactions of `epoch` (after its base, before `until_lsn`, the next epoch's
    start) that make up the database as of `when`: once each, in commit (LSN) order, up
    to the first one committed after `when`. That is PostgreSQL's own recovery_target_time
    rule: the state is a prefix of the commit order, which is a state the database had.
    (A commit time is taken just before the commit is written, so two commits may be in
    one order by LSN and the other by time; the prefix rule keeps the state consistent.)
    `listed`: every index entry, when the caller read them already."""
    applied: set[str] = set()
    start = lsn_int(epoch.start_lsn)
    end = lsn_int(until_lsn) if until_lsn else None
    everything = segments(store, database_id) if listed is None else listed
    reached = itertools.takewhile(lambda s: parse_time(s.first_commit_time) <= when,
                                  segments_of(everything, epoch, until_lsn))
    for segment, raw in _read_ahead(store, reached):
        if raw is None or hashlib.sha256(raw).hexdigest() != segment.sha256:
            raise StoreError(f"change segment {segment.key} is missing or damaged",
                             "restore to a time before it, or from the base alone")
        for txn in _decoded(raw, segment.key):
            commit = lsn_int(txn["commit_lsn"])
            if txn["commit_lsn"] in applied or commit < start:
                continue  # stored twice (before 0.6, by a run that died), or in the base
            # The next epoch's start bounds a segment that names no epoch only: an epoch
            # that handed over to the next (lifecycle.rebase) reaches past that start.
            if parse_time(txn["commit_time"]) > when or (
                    end is not None and not segment.epoch and commit >= end):
                return
            applied.add(txn["commit_lsn"])
            yield txn


def _read_ahead(store: Store, reached: Iterable[Segment]
                ) -> Iterator[tuple[Segment, bytes | None]]:
    """Each segment with its bytes, in order, the next few read while the caller works
    on one (a day is some 17,000 segments of 5 s: one GET after the other would cost
    minutes in waits alone). A read's failure surfaces when its segment's turn comes;
    what the caller does not reach is not waited for."""
    pool = ThreadPoolExecutor(max_workers=SEGMENT_READERS)
    ahead: deque[tuple[Segment, Future[bytes | None]]] = deque()
    pending = iter(reached)
    try:
        while True:
            while len(ahead) < SEGMENTS_AHEAD:
                segment = next(pending, None)
                if segment is None:
                    break
                ahead.append((segment, pool.submit(store.read_small, segment.key)))
            if not ahead:
                return
            segment, raw = ahead.popleft()
            yield segment, raw.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
