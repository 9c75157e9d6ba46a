"""Restore a format-2 backup over N connections.

    the schema archive, checked, to a local file -> pre-data (one transaction)
    -> every table part over N connections (COPY ... FROM STDIN, each part checked)
    -> indexes and constraints over N connections, each once what it depends on is in
    -> the rest, in one transaction: sequence values, large objects, triggers, rules,
       policies, materialized view contents, comments and grants on them

The archive's own entries go through pg_restore in script mode and ScriptFilter (as in
pipeline.py); the table parts are zstd-compressed COPY text streamed from S3 into psql,
and their size and sha256 are checked before psql may end the COPY: a damaged part
aborts its COPY, which loads nothing. Index and constraint entries are scheduled by
the dependencies `pg_restore --list --verbose` gives, as `pg_restore -j` does; two that
deadlock on one table (foreign keys in both directions) are retried.

Unlike a format-1 restore this is not one transaction: a restore that fails has loaded
some of the data, and says so. The target is complete only when the run returns; the
error says to drop it and restore into a new database.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ..dburl import ConnectionInfo
from ..errors import RestoreFailed
from ..manifest import Manifest, TablePart, TableState
from ..pgtools import Child, PgTools, child_env, exit_reason
from ..store import Store
from ..tabledata import copy_settings, copy_target, run_all
from .supabase import SupabaseTarget
from .toc import TocEntry, list_archive

log = logging.getLogger(__name__)

# Post-data entries that may run side by side, each once its dependencies are in.
PARALLEL = frozenset({"INDEX", "CONSTRAINT", "FK CONSTRAINT", "CHECK CONSTRAINT",
                      "INDEX ATTACH"})
DEADLOCK_RETRIES = 3
INCOMPLETE = "the target is incomplete: drop it and restore into a new, empty database"
DAMAGED = ("the object is damaged: run `supabackup verify`; the target is incomplete: drop "
           "it and restore another backup into a new, empty database")


@dataclass
class Progress:
    """What a restore has done, for the error of one that fails part way."""

    phase: str = "starting"
    parts_loaded: int = 0
    parts_total: int = 0
    entries_done: int = 0
    tables_loaded: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def said(self) -> str:
        return (f"it stopped in {self.phase}: {self.parts_loaded} of {self.parts_total} "
                f"table parts loaded ({len(self.tables_loaded)} tables), "
                f"{self.entries_done} indexes and constraints built")


@dataclass
class Loader:
    """The pieces a format-2 restore needs, shared by its phases."""

    store: Store
    manifest: Manifest
    target: ConnectionInfo
    tools: PgTools
    script_filter: Callable[[], object]   # a new ScriptFilter for each psql
    jobs: int
    archive: Path
    session: dict[str, str]               # settings for the COPY sessions
    progress: Progress = field(default_factory=Progress)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _running: set[Child] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.target, application="supabackup restore")

    # --- one psql ---------------------------------------------------------------------

    def _child(self, argv: list[str], **kwargs: bool) -> Child:
        child = Child(argv, self.env, **kwargs)
        with self._lock:
            self._running.add(child)
        if self._stopped.is_set():
            child.stop()
        return child

    def _done(self, child: Child) -> None:
        with self._lock:
            self._running.discard(child)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for child in list(self._running):
                child.stop()

    def apply_entries(self, entries: list[TocEntry], what: str, before: bytes = b"") -> None:
        """The archive's `entries` (after SQL of our own) in one psql transaction, streamed
        from pg_restore through ScriptFilter (large objects can be large); once more when
        it deadlocked with another worker's."""
        if not entries and not before:
            return
        for attempt in range(DEADLOCK_RETRIES + 1):
            code, stderr = self._apply_once(entries, before)
            if code == 0:
                return
            if "deadlock detected" in stderr and attempt < DEADLOCK_RETRIES:
                log.info("%s: deadlock with another worker; trying again", what)
                continue
            raise self._failed(what, code, stderr)

    def _apply_once(self, entries: list[TocEntry], before: bytes) -> tuple[int, str]:
        psql = self._child([self.tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                            "--single-transaction", "-o", "/dev/null"], stdin=True)
        listing = self.archive.with_name(
            f"list-{threading.get_ident()}-{entries[0].dump_id if entries else 0}")
        restore = None
        try:
            with contextlib.suppress(BrokenPipeError):  # psql stopped: its status says why
                psql.stdin.write(before)
            if entries:
                listing.write_text("".join(e.line + "\n" for e in entries))
                restore = self._child([self.tools.path("pg_restore"), "--file=-",
                                       f"--use-list={listing}", str(self.archive)], stdout=True)
                self.script_filter().pump(restore.stdout, psql.stdin)  # type: ignore[attr-defined]
                code, stderr = restore.wait()
                if code != 0:
                    psql.kill()  # before its input ends: the transaction never commits
                    raise RestoreFailed(
                        f"pg_restore of {self.manifest.backup_id}'s schema failed "
                        f"({exit_reason(code)}): {' '.join(stderr.split())[:500]}",
                        "run `supabackup verify`; " + INCOMPLETE)
            psql.end_input()  # only now may psql reach its COMMIT
            return psql.wait()
        except BaseException:
            psql.kill()
            raise
        finally:
            for child in (psql, restore):
                if child is not None:
                    child.kill()
                    self._done(child)
                    child.close()
            listing.unlink(missing_ok=True)

    def _failed(self, what: str, code: int, stderr: str) -> RestoreFailed:
        lines = [" ".join(ln.split()) for ln in self.target.redact(stderr).splitlines()]
        errors = [ln for ln in lines if "error" in ln.lower() or "FATAL" in ln]
        detail = "; ".join(errors or [ln for ln in lines if ln])[-1500:]
        return RestoreFailed(f"{what} failed ({exit_reason(code)}): {detail}", INCOMPLETE)

    # --- table parts ------------------------------------------------------------------

    def load_part(self, table: TableState, part: TablePart) -> int:
        """One part's rows into its table; its size and sha256 are checked first."""
        what = f"loading {table.qualified} from {table.held_in}/{part.name}"
        sets = copy_settings(self.manifest.encoding, self.session)
        child = self._child([self.tools.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                             "-c", sets,
                             "-c", f"COPY {copy_target(table)} FROM STDIN"],
                            stdin=True)
        digest, size = hashlib.sha256(), 0
        unzstd = zstandard.ZstdDecompressor().decompressobj()
        try:
            try:
                for chunk in self.store.open_object(self.manifest, part.name, table.held_in):
                    digest.update(chunk)
                    size += len(chunk)
                    child.stdin.write(unzstd.decompress(chunk))
                if size != part.size or digest.hexdigest() != part.sha256:
                    child.kill()  # before its input ends: the COPY never completes
                    differs = (f"size {size}, expected {part.size}" if size != part.size
                               else "same size, but its sha256 differs")
                    raise RestoreFailed(
                        f"{table.held_in}/{part.name} does not match its manifest ({differs})",
                        DAMAGED)
                if not unzstd.eof:
                    child.kill()
                    raise RestoreFailed(f"{table.held_in}/{part.name} ends mid-frame", DAMAGED)
            except BrokenPipeError:
                pass  # psql stopped; its exit status says why
            except zstandard.ZstdError as exc:
                child.kill()
                raise RestoreFailed(f"{table.held_in}/{part.name} is not a zstd stream: {exc}",
                                    DAMAGED) from None
            child.end_input()
            code, stderr = child.wait()
        except BaseException:
            child.kill()
            raise
        finally:
            self._done(child)
            child.close()
        if code != 0:
            raise self._failed(what, code, stderr)
        with self.progress.lock:
            self.progress.parts_loaded += 1
            self.progress.tables_loaded.add(table.qualified)
        return size

    # --- N workers --------------------------------------------------------------------

    def run_parts(self, work: list[tuple[TableState, TablePart]]) -> int:
        self.progress.parts_total = len(work)
        ordered = sorted(work, key=lambda w: -w[1].size)  # largest first
        jobs: list[Callable[[], int]] = [
            (lambda table=table, part=part: self.load_part(table, part))  # type: ignore[misc]
            for table, part in ordered]
        return sum(run_all(self.jobs, "supabackup-restore", jobs, self.stop))

    def run_entries(self, entries: list[TocEntry]) -> None:
        """Indexes and constraints over N connections, each after what it depends on."""
        ids = {e.dump_id for e in entries}
        waiting = {e.dump_id: {d for d in e.deps if d in ids and d != e.dump_id}
                   for e in entries}
        by_id = {e.dump_id: e for e in entries}
        done: set[int] = set()
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=self.jobs,
                                thread_name_prefix="supabackup-restore") as pool:
            running: dict[Future[None], int] = {}
            while (waiting or running) and not errors:
                ready = [i for i, deps in waiting.items() if deps <= done]
                for dump_id in ready:
                    del waiting[dump_id]
                    entry = by_id[dump_id]
                    running[pool.submit(self.apply_entries, [entry],
                                        f"{entry.desc} {entry.schema}.{entry.name}")] = dump_id
                if not running:  # a cycle cannot happen in pg_dump's order; be safe
                    for dump_id in sorted(waiting):
                        running[pool.submit(self.apply_entries, [by_id[dump_id]],
                                            by_id[dump_id].name)] = dump_id
                    waiting.clear()
                try:
                    finished, _ = wait(running, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C, SIGTERM: stop the builds, then wait
                    self.stop()
                    raise
                for future in finished:
                    dump_id = running.pop(future)
                    if future.exception() is not None:
                        errors.append(future.exception())  # type: ignore[arg-type]
                    else:
                        done.add(dump_id)
                        self.progress.entries_done += 1
            if errors:
                self.stop()
                wait(running)
        if errors:
            raise errors[0]


def restore_parallel(store: Store, manifest: Manifest, target: ConnectionInfo,
                     tools: PgTools, workdir: Path, jobs: int,
                     wanted: Callable[[TocEntry], bool],
                     tables: list[TableState], script_filter: Callable[[], object],
                     supabase: SupabaseTarget | None = None) -> int:
    """Restore `manifest` (format 2) into `target`, whose roles are in place; the bytes read.

    `wanted` picks the archive's entries, `tables` the tables whose parts are loaded.
    Into a Supabase project (`supabase`), the project's triggers stay quiet while data
    loads (session_replication_role), and the backup's grants are applied last, after the
    default privileges the project gave the new objects are revoked (see supabase.py).
    """
    before = supabase.prologue() if supabase else b""
    session = {"session_replication_role": "replica"} if supabase else {}
    archive = workdir / "schema.dump"
    size = _download(store, manifest, archive)
    loader = Loader(store, manifest, target, tools, script_filter, jobs, archive,
                    {"row_security": "off", "statement_timeout": "0", "lock_timeout": "0",
                     **session})
    # A table's rows come from its parts; were the archive to hold them too, they are not
    # loaded twice.
    parted = {t.oid for t in manifest.tables if t.parts}
    sections = {s: [e for e in list_archive(tools, archive, manifest.backup_id, s)
                    if wanted(e) and not (e.desc == "TABLE DATA" and e.oid in parted)]
                for s in ("pre-data", "data", "post-data")}
    try:
        loader.progress.phase = "the schema (pre-data)"
        loader.apply_entries(sections["pre-data"], "restoring the schema (pre-data)", before)
        loader.progress.phase = "the table data"
        size += loader.run_parts([(t, p) for t in tables for p in t.parts])
        loader.progress.phase = "indexes and constraints"
        post = sections["post-data"]
        loader.run_entries([e for e in post if e.desc in PARALLEL])
        loader.progress.phase = ("sequence values, triggers, rules, policies and "
                                 "materialized views")
        last = sections["data"] + [e for e in post if e.desc not in PARALLEL]
        loader.apply_entries(last, "restoring sequence values and what comes last", before)
        if supabase is not None:
            loader.progress.phase = "the grants"
            grants = [e for e in list_archive(tools, archive, manifest.backup_id)
                      if supabase.keep_grant(e)]
            loader.apply_entries(grants, "restoring the grants", supabase.reset_default_grants())
    except RestoreFailed as exc:
        loader.stop()
        raise RestoreFailed(f"{exc.message}; {loader.progress.said()}", exc.hint) from None
    except BaseException:
        loader.stop()
        raise
    return size


def _download(store: Store, manifest: Manifest, path: Path) -> int:
    """The schema archive to a local file (pg_restore seeks in it), checked on the way."""
    obj = manifest.object("database")
    size, digest = store.stream_to(manifest, obj.name, path.open("wb"))  # it closes the file
    if size != obj.size or digest != obj.sha256:
        raise RestoreFailed(f"{manifest.backup_id}/{obj.name} does not match its manifest "
                            f"(size {size}, expected {obj.size})",
                            "the object is damaged: run `supabackup verify` and restore "
                            "another backup; nothing was restored")
    return size
