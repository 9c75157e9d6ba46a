"""Streaming capture (`cdc run --for SECONDS`): one replication connection reading the
slot as transactions commit, flushed every few seconds; the recovery point is the flush
interval, not the schedule.

    start replication from the slot's confirmed position
    -> whole transactions, compressed into a batch as they arrive
    -> every `flush_interval` seconds with something read (or `flush_bytes` of it), and at
       least every `idle_interval` seconds (10): a flush (drain.py): check at L, read the
       stream until the server says it has sent everything before L, store, confirm
       through the last whole transaction (a feedback message), record the progress
    -> a last flush just before the deadline, then the connection closes

Knowing that everything before L has arrived: a walsender answers a feedback message
that asks for a reply with a keepalive carrying how far it has decoded (psycopg2's
`wal_end`); decoding is in commit order, so once that reaches L every transaction
committed before L has been sent, and, the stream being in order, read. A stream that
cannot catch up in `CATCH_UP` seconds (a backlog) stores what it has; its progress
reaches its last whole transaction (as a peek stopped by MAX_CHANGES does).

Memory is the batch's compressed bytes plus the one transaction being read: a flush
comes at `flush_bytes` of changes read, so only a single transaction larger than memory
cannot be captured (it is never confirmed, and its WAL stays in the slot).
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..manifest import parse_time
from . import pgoutput
from .drain import CaptureRun, Drain, checked
from .slot import Assembler, start_stream, type_namer, wal2json_change
from .state import Batch, lsn_int

log = logging.getLogger(__name__)

CATCH_UP = 3.0          # seconds a flush waits for the stream to reach its check
ASK_EVERY = 0.1         # seconds between requests for the server's position
FINAL_MARGIN = 2.0      # the last flush starts this long before the deadline


@dataclass(frozen=True)
class FlushPolicy:
    """When a stream stores what it read."""

    interval: float = 5.0            # seconds: the recovery point while transactions commit
    max_bytes: int = 16 << 20        # of changes read (uncompressed JSON)
    # seconds: progress advances this often when nothing commits. A new epoch (after DDL)
    # begins where the last progress ended, so this is also the most an idle database's
    # DDL costs of the window.
    idle_interval: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.interval <= 600 and self.max_bytes > 0):
            raise ValueError(f"a flush interval of {self.interval} s is not one a stream "
                             "can keep: more than 0, at most 600")
        if self.idle_interval < self.interval:  # an idle stream flushes no more often
            object.__setattr__(self, "idle_interval", self.interval)


class _Reader:
    """The replication stream of one epoch's slot, read into whole transactions."""

    def __init__(self, drain: Drain, max_bytes: int) -> None:
        self.drain, self.max_bytes = drain, max_bytes
        self.repl, self.cursor, exact = start_stream(drain.conn, drain.state)
        if drain.state.plugin == "pgoutput":
            decoder = pgoutput.Decoder(type_namer(drain.db))
            self.decode: Callable[[int, bytes], list[dict[str, Any]]] = (
                lambda lsn, data: decoder.feed(pgoutput.lsn_text(lsn), data))
        else:
            self.decode = lambda lsn, data: [wal2json_change(data, exact)]
        self.assembler = Assembler()
        self.batch = Batch()
        self.read_through = ""       # end of the last whole transaction read
        self.reached = 0             # the server has sent everything before this LSN

    def close(self) -> None:
        self.repl.close()

    def read(self, until: float) -> None:
        """Read what arrives until the monotonic time `until`, or a full batch."""
        while True:
            message = self.cursor.read_message()
            if message is None:
                left = until - time.monotonic()
                if left <= 0:
                    return
                select.select([self.repl], [], [], min(left, 1.0))
                continue
            self.reached = max(self.reached, self.cursor.wal_end)
            for change in self.decode(message.data_start, message.payload):
                txn = self.assembler.feed(change)
                if txn is not None:
                    self.read_through = txn["end_lsn"]
                    if self.drain.is_new(txn):
                        self.batch.add(txn)
            if time.monotonic() >= until or self.batch.raw_bytes >= self.max_bytes:
                return

    def catch_up(self, lsn: str, patience: float) -> bool:
        """Read until the server has sent everything before `lsn`; False past `patience`."""
        target, give_up = lsn_int(lsn), time.monotonic() + patience
        while True:
            self.reached = max(self.reached, self.cursor.wal_end)
            if self.reached >= target:
                return True
            if time.monotonic() >= give_up:
                return False
            self.cursor.send_feedback(reply=True, force=True)
            self.read(min(give_up, time.monotonic() + ASK_EVERY))

    def confirm(self, end_lsn: str) -> None:
        self.cursor.send_feedback(flush_lsn=lsn_int(end_lsn), force=True)


def _next_tick(tick: float, interval: float) -> float:
    """The first tick after now (a flush that took longer than the interval skips ticks)."""
    now = time.monotonic()
    tick += interval
    while tick <= now:
        tick += interval
    return tick


def stream_epoch(drain: Drain, deadline: float, policy: FlushPolicy,
                 heartbeat: Callable[[], None] = lambda: None) -> tuple[CaptureRun, str]:
    """Stream the running epoch until the monotonic `deadline`: the run, and why the epoch
    must end ("" when the deadline came). `heartbeat` runs after every flush (the
    lease's renewal)."""
    result = CaptureRun(slot=drain.health)
    reader = _Reader(drain, policy.max_bytes)
    try:
        final_at = deadline - FINAL_MARGIN
        last_tick = time.monotonic()  # ticks every `interval`; a flush happens on a tick
        tick = last_tick + policy.interval
        while True:
            reader.read(until=min(tick, final_at))
            now = time.monotonic()
            final, full = now >= final_at, reader.batch.raw_bytes >= policy.max_bytes
            if not (final or full or now >= tick):
                continue
            if not (final or full or reader.batch.meta
                    or tick - last_tick >= policy.idle_interval - 1e-6):
                tick = _next_tick(tick, policy.interval)
                continue
            check = checked(drain.db)
            if check.schema != drain.state.schema:
                return result, "the schema changed"
            complete = reader.catch_up(check.files_lsn or check.lsn,
                                       min(CATCH_UP, max(deadline - now, 0.5)))
            batch, reader.batch = reader.batch, Batch()
            segment, reason = drain.flush(check, batch, complete, reader.read_through,
                                          reader.confirm)
            covered = drain.progress.verified_at if drain.progress and not reason else None
            result.add(segment, parse_time(covered) if covered else None)
            heartbeat()
            if reason or final:
                return result, reason
            last_tick, tick = tick, _next_tick(tick, policy.interval)
    finally:
        reader.close()
