"""The rows of every table, each its own object or objects, dumped by N workers in one snapshot.

    lock the tables (and prove none was rewritten since the snapshot) -> cut big tables into
    page ranges -> N workers, largest work first: psql COPY ... TO STDOUT in the run's
    snapshot -> count rows and zstd-compress on the way -> a multipart upload per part

Why our own COPY rather than pg_dump per table: pg_dump cannot dump part of a table, and
each run of it reads the whole catalog first. psql (from the same layer) is the COPY
client, so no row passes through Python one by one: the worker reads psql's stdout in
1 MiB chunks, counts rows with bytes.count (a COPY text row ends with the only unescaped
newline it has), and compresses with zstd, which releases the GIL. The text is what
pg_dump's own COPY would give, under the settings pg_dump fixes (output.STABLE), so it
restores the same way and can be read by `psql -c "COPY ... FROM STDIN"` alone.

Row counts come from these streams, not from a second scan. Content fingerprints do not:
hashing every row on the server costs about as much server CPU as the dump (see
bench/README.md), and in Python it would cost more than the dump's wall time. A full
backup therefore records rows and no fingerprint; an incremental's change detection,
which reads every table anyway, fingerprints them all (inventory.py), and the drill
compares what is recorded.

A table split into page ranges is read with `WHERE ctid >= '(a,0)' AND ctid < '(b,0)'`,
a TID range scan on PostgreSQL 14+ (older servers are not split): ranges are contiguous
and disjoint, the last one is open-ended, and every tuple lives on exactly one page, so
no row is lost or read twice at an edge. The tables are locked (ACCESS SHARE, as
pg_dump does) for the run, so none is truncated or rewritten while the workers read it;
and one that was between the snapshot and the lock is found and refused, as is a table
found under another name when the workers are done (a schema renamed takes no table
lock): backup.py compares the catalog of now with the snapshot's, before and after.
A worker waits at most WORKER_LOCK_TIMEOUT for its table's lock (as pg_dump's parallel
workers take theirs with NOWAIT): a migration queued behind the run's lock would
otherwise queue the worker, and the application behind both, for good.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import psycopg2
import psycopg2.extensions
import zstandard
from psycopg2 import sql

from . import output
from .dburl import ConnectionInfo
from .dump import DumpProcess
from .errors import ConfigError, DumpFailed
from .inventory import WORKER_LOCK_TIMEOUT, Listed
from .manifest import TablePart, TableState
from .pgtools import PgTools
from .roles import quote_ident, quote_literal
from .store import BackupWriter

log = logging.getLogger(__name__)
R = TypeVar("R")

MIB = 1024 * 1024
READ_CHUNK = MIB
ZSTD_LEVEL = 1
# A table is split when it is larger than 1.5 ranges; ranges are sized so that the work
# splits into about four pieces per worker, but never below 64 MiB (a range costs a
# connection and an object) nor above 1 GiB (an object a person can still handle).
MIN_RANGE = 64 * MIB
MAX_RANGE = 1024 * MIB
SPLIT_ENV = "SUPABACKUP_SPLIT_BYTES"
JOBS_ENV = "SUPABACKUP_JOBS"
MAX_JOBS = 16
# What one worker holds at most, beyond Python itself: its upload's part buffers (see
# store.upload) and its psql process. The default number of workers leaves room for them.
WORKER_MEMORY = 48 * MIB
BASE_MEMORY = 160 * MIB
LOCK_TIMEOUT = "60s"


def default_jobs() -> int:
    """Workers for this process: two per CPU (they mostly wait on the network), as many as
    its memory holds (on Lambda, the function's memory size), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    memory = _memory_bytes()
    by_memory = max(1, (memory - BASE_MEMORY) // WORKER_MEMORY) if memory else 8
    return max(1, min(8, 2 * cpus, by_memory))


def _memory_bytes() -> int:
    lambda_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if lambda_mb.isdigit():
        return int(lambda_mb) * MIB
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def checked_jobs(value: object, where: str = "--jobs") -> int:
    """A number of workers as given by a user (flag, variable or event), or a clear error."""
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_JOBS:
        raise ConfigError(f"{where} must be a whole number of workers from 1 to {MAX_JOBS} "
                          f"(not {str(value)[:40]!r})", "leave it out for the default")
    return int(text)


@dataclass(frozen=True)
class Slice:
    """One piece of work: the rows of a table on heap pages [first_page, end_page)."""

    table: Listed
    index: int
    first_page: int = 0
    end_page: int = -1   # -1: to the end of the table
    bytes: int = 0       # the heap bytes it covers (for ordering and part sizes)

    @property
    def name(self) -> str:
        return f"tables/{self.table.oid}.{self.index}.copy.zst"

    @property
    def whole(self) -> bool:
        return self.first_page == 0 and self.end_page == -1

    def describe(self) -> str:
        where = f"{self.table.schema}.{self.table.name}"
        if self.whole:
            return where
        end = "end" if self.end_page < 0 else str(self.end_page)
        return f"{where} pages {self.first_page}-{end}"


def plan_slices(tables: Iterable[Listed], jobs: int, split_ranges: bool,
                block_size: int = 8192, range_bytes: int | None = None) -> list[Slice]:
    """The work of a run, largest first. Pure: tested over sizes without a server.

    With `split_ranges` (the server has TID range scans), a table above 1.5 ranges is cut
    into ranges of about `range_bytes` (SUPABACKUP_SPLIT_BYTES, or derived from the total
    size and the workers).
    """
    tables = list(tables)
    total = sum(_size(t) for t in tables)
    if range_bytes is None:
        range_bytes = int(os.environ.get(SPLIT_ENV, "0") or 0) or (
            min(MAX_RANGE, max(MIN_RANGE, total // (4 * jobs))) if jobs > 1 else MAX_RANGE)
    slices = []
    for table in tables:
        size = _size(table)  # with TOAST: a table of files in bytea has a small heap
        pages = table.bytes // block_size
        count = math.ceil(size / range_bytes) if range_bytes > 0 else 1
        if not split_ranges or size <= 1.5 * range_bytes or pages < 2 or count < 2:
            slices.append(Slice(table, 0, bytes=size))
            continue
        step = math.ceil(pages / count)
        edges = list(range(0, pages, step))
        for i, first in enumerate(edges):
            end = -1 if i == len(edges) - 1 else edges[i + 1]
            covered = ((pages if end < 0 else end) - first) / pages
            slices.append(Slice(table, i, first, end, int(size * covered)))
    return sorted(slices, key=lambda s: (-s.bytes, s.table.oid, s.index))


def _size(table: Listed) -> int:
    return max(table.bytes, table.total_bytes)


def lock_tables(conn: psycopg2.extensions.connection, tables: list[Listed]) -> None:
    """Hold ACCESS SHARE on every table for the run, in the snapshot's own transaction.

    pg_dump does the same: no TRUNCATE, VACUUM FULL, CLUSTER, rename or ALTER TABLE can
    run until the backup ends (they wait; the application's reads and writes do not). One
    that committed between the snapshot and the lock is caught afterwards by comparing
    the catalog as it is now with the snapshot's (inventory.unchanged_since).
    """
    if not tables:
        return
    with conn.cursor() as cur:
        cur.execute("SET LOCAL lock_timeout = %s", (LOCK_TIMEOUT,))
        try:
            for start in range(0, len(tables), 500):
                names = sql.SQL(", ").join(sql.Identifier(t.schema, t.name)
                                           for t in tables[start:start + 500])
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(names))
        except psycopg2.Error as exc:
            detail = " ".join(str(exc).split())[:300]
            hint = ("grant the backup's user SELECT on it (pg_dump needs the same)"
                    if "permission denied" in detail else
                    "a table was dropped or renamed as the backup began, or a migration held "
                    f"a lock for over {LOCK_TIMEOUT}; run again")
            raise DumpFailed(f"cannot lock the tables to back up: {detail}", hint) from None


class CompressingReader:
    """Reads a COPY stream, counts its rows, and hands out zstd-compressed bytes."""

    def __init__(self, raw: DumpProcess) -> None:
        self.raw = raw
        self.rows = 0
        self.bytes = 0
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self._buffer = bytearray()
        self._done = False

    def read(self, n: int = -1) -> bytes:
        want = READ_CHUNK if n is None or n < 0 else n
        while len(self._buffer) < want and not self._done:
            chunk = self.raw.read(READ_CHUNK)
            if chunk:
                self.rows += chunk.count(b"\n")
                self.bytes += len(chunk)
                self._buffer += self._zstd.compress(chunk)
            else:  # the stream ended well (DumpProcess raises if psql did not)
                self._buffer += self._zstd.flush()
                self._done = True
        with memoryview(self._buffer) as view:  # one copy of the part, not two
            out = bytes(view[:want])
        del self._buffer[:want]
        return out


def copy_target(table: Listed | TableState) -> str:
    """`"schema"."name" ("col", ...)` for COPY: the columns a part holds, in order (none
    when the table has no column to copy)."""
    columns = _columns(table)
    return f"{_qualified(table)} ({columns})" if columns else _qualified(table)


def _qualified(table: Listed | TableState) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def _columns(table: Listed | TableState) -> str:
    return ", ".join(quote_ident(c) for c in table.columns)


def copy_out_sql(piece: Slice) -> str:
    """The COPY that gives `piece`'s rows as pg_dump's COPY would give them."""
    table = piece.table
    if piece.whole:  # COPY of a table is its own rows, never its children's
        return f"COPY {copy_target(table)} TO STDOUT"
    where = f"ctid >= '({piece.first_page},0)'"
    if piece.end_page >= 0:
        where += f" AND ctid < '({piece.end_page},0)'"
    # A table without a column to copy (all generated, or none) gives an empty line a row.
    return f"COPY (SELECT {_columns(table)} FROM ONLY {_qualified(table)} WHERE {where}) TO STDOUT"


def session_sql(snapshot_id: str, encoding: str, extra: dict[str, str] | None = None) -> str:
    """BEGIN in the run's snapshot, with the settings that fix the text of every value."""
    settings = {"row_security": "off", "statement_timeout": "0",
                "lock_timeout": WORKER_LOCK_TIMEOUT, **(extra or {})}
    return (f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT "
            f"{quote_literal(snapshot_id)}; {copy_settings(encoding, settings)}")


def copy_encoding(database_encoding: str) -> str:
    """The encoding of a backup's COPY text: UTF8, which every encoding converts to and
    from (and in which our SQL names its tables); a SQL_ASCII database's bytes, which
    have no encoding to convert from, pass as they are."""
    return "SQL_ASCII" if database_encoding == "SQL_ASCII" else "UTF8"


def copy_settings(encoding: str, extra: dict[str, str] | None = None) -> str:
    """SET statements for a session that writes or reads COPY text: output.STABLE (the text
    of every value, as pg_dump fixes it) and the text's encoding; for psql -c."""
    settings = {**output.STABLE, "client_encoding": encoding or "UTF8", **(extra or {})}
    return "; ".join(f"SET {name} = {quote_literal(value)}" for name, value in settings.items())



class TableDumper:
    """Runs the slices over N workers; the first failure stops them all."""

    def __init__(self, conn: ConnectionInfo, tools: PgTools, writer: BackupWriter,
                 tags: dict[str, str], snapshot_id: str, encoding: str, jobs: int) -> None:
        self.conn, self.tools, self.writer, self.tags = conn, tools, writer, tags
        self.snapshot_id, self.encoding, self.jobs = snapshot_id, encoding, jobs
        self._running: set[DumpProcess] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Kill every running COPY (a failed worker, the time budget, the run's end)."""
        self._stopped.set()
        with self._lock:
            for proc in list(self._running):
                proc.stop()

    def run(self, slices: list[Slice]) -> list[tuple[Slice, TablePart]]:
        """Each slice with the part it became, in the order given."""
        parts = run_all(self.jobs, "supabackup-dump",
                        [lambda piece=piece: self._dump(piece) for piece in slices],  # type: ignore[misc]
                        self.stop)
        return list(zip(slices, parts, strict=True))

    def _dump(self, piece: Slice) -> TablePart:
        if self._stopped.is_set():
            raise DumpFailed("the run was stopped", "see the first error")
        argv = [self.tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-c", session_sql(self.snapshot_id, self.encoding),
                "-c", copy_out_sql(piece), "-c", "COMMIT"]
        with DumpProcess(argv, self.conn, f"COPY of {piece.describe()}") as proc:
            with self._lock:
                self._running.add(proc)
            try:
                if self._stopped.is_set():
                    proc.stop()
                stream = CompressingReader(proc)
                # Part sizes follow the whole table's size (no range holds more than it),
                # so that even a range far larger than planned fits S3's 10,000 parts.
                stored = self.writer.upload(piece.name, stream, _size(piece.table), self.tags,
                                            kind="table-data", format="copy",
                                            compression="zstd", share=self.jobs)
            finally:
                with self._lock:
                    self._running.discard(proc)
        log.debug("%s: %d rows, %d bytes of COPY text, %d stored", piece.describe(),
                  stream.rows, stream.bytes, stored.size)
        return TablePart(name=piece.name, size=stored.size, sha256=stored.sha256,
                         rows=stream.rows, first_page=piece.first_page,
                         end_page=piece.end_page)


def run_all(jobs: int, name: str, work: list[Callable[[], R]],
            stop: Callable[[], None]) -> list[R]:
    """Run `work` over `jobs` threads; the results, in order. The first failure calls
    `stop` (which kills what the others run), cancels what has not started, waits for
    the rest, and raises the error that started it, not one of those it killed.

    Ctrl-C or SIGTERM (a KeyboardInterrupt in this thread) stops the workers too before
    the pool waits for them: else a long COPY would hold the cleanup up for as long as it
    runs (past Fargate Spot's two minutes' warning)."""
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix=name) as pool:
        futures = [pool.submit(job) for job in work]

        def halt() -> None:
            stop()
            for future in futures:
                future.cancel()
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            halt()
            raise
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            halt()
            wait(futures)
            raise _first_cause(failed, futures)
        return [f.result() for f in futures]


def _first_cause(failed: list[Future[R]], futures: list[Future[R]]) -> BaseException:
    """The error that started the failure: a worker's own, not one killed after it."""
    errors = [f.exception() for f in failed]
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            errors.append(future.exception())
    real = [e for e in errors if e is not None and "was stopped" not in str(e)
            and "killed by signal" not in str(e)]
    return (real or [e for e in errors if e is not None])[0]
