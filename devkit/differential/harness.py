"""The differential harness: a generated source, a random workload, and a strict comparison
of the source at each point with a restore to that point.

Two modes:
- "cdc": change capture (`cdc start`, a `cdc run` after each step) and a restore to the
  time each run covered (`restore --at`), with the plugin the server has;
- "incremental": a full backup, then an incremental after each step, each restored.

A difference between the source at T and the restore at T is a failure unless the restore
named that object as inexact (its report's `inexact` lines), and every error a restore
raises must be one of ours (a SupabackupError, one clear line). A case also checks the
boundaries: a time later than capture covers is refused, and so is a time inside a schema
change's window; the restored database takes the same next writes as the source.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
from supabackup import capture
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.errors import SupabackupError
from supabackup.manifest import new_backup_id
from supabackup.restore import RestoreOptions, run_restore
from supabackup.store import Store
from supabackup.tabledata import SPLIT_ENV

from devkit.pg import Cluster

from .catalogue import SETTINGS
from .picture import Picture, differences, picture
from .source import Source

MODES = ("cdc", "incremental")


@dataclass
class CaseResult:
    mode: str
    seed: int
    steps: int
    points: int = 0                  # restores compared
    named: list[str] = field(default_factory=list)     # what restores said was inexact
    refused: list[str] = field(default_factory=list)   # boundaries refused, as expected
    problems: list[str] = field(default_factory=list)  # silent differences, wrong errors
    log: list[str] = field(default_factory=list)       # the case's SQL, to reproduce it

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.mode} seed {self.seed}: {self.points} restores over {self.steps} "
                f"steps, {len(self.named)} named inexact, {len(self.refused)} refused")
        return head + "".join(f"\n  PROBLEM {p}" for p in self.problems)


_names = itertools.count()


def _fresh_db(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}_{next(_names)}"
    cluster.drop_database(name)
    cluster.create_database(name)
    return name


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _key_name(key: str) -> str:
    """What a restore names for a picture entry: schema.name, or "large objects"."""
    if "LARGE OBJECT" in key or "BLOB" in key:
        return "large objects"
    if key.startswith("MATERIALIZED VIEW ROWS "):
        return key.removeprefix("MATERIALIZED VIEW ROWS ")
    _, schema, name = key.rsplit(" ", 2) if key.count(" ") >= 2 else ("", "", key)
    return f"{schema}.{name}"


def _says(line: str, key: str) -> bool:
    """Whether an inexact line of a restore's report names this picture entry: the entry's
    object by its whole name, or a sequence's state under the line about sequences."""
    if key.startswith("SEQUENCE SET "):
        return line.startswith("sequences:")
    name = _key_name(key)
    return any(re.search(rf"(^|[\s,(]){re.escape(n)}($|[\s,:)])", line)
               for n in {name, name.replace('"', "")})


def _judge(result: CaseResult, what: str, expected: Picture, restored: Picture,
           inexact: list[str]) -> None:
    result.points += 1
    for key, lines in differences(expected, restored).items():
        said = [line for line in inexact if _says(line, key)]
        if said:
            result.named.append(f"{what}: {key}: {said[0]}")
            continue
        result.problems.append(f"{what}: {key} differs silently: {'; '.join(lines)}")


def _vary_target(source: Source, cluster: Cluster, db: str) -> None:
    """The target's own settings differ from the source's: a restore must not care."""
    rng = source.rng
    for name in rng.sample(sorted(SETTINGS), 2):
        cluster.execute(f'ALTER DATABASE "{db}" SET {name} = {rng.choice(SETTINGS[name])}')


def _server_now(cluster: Cluster, db: str) -> datetime:
    return cluster.execute("SELECT clock_timestamp()", db)[0][0]  # type: ignore[no-any-return]


def _next_writes(cluster: Cluster, source_db: str, restored_db: str) -> list[str]:
    """The next value of every sequence, and the next default row: the same on both."""
    def take(db: str) -> list[Any]:
        conn = psycopg2.connect(cluster.url(db))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences"
                            " ORDER BY 1")
                names = [r[0] for r in cur.fetchall()]
                values = []
                for name in names:
                    cur.execute("SELECT nextval(%s)", (name,))
                    values.append((name, cur.fetchone()[0]))
                cur.execute("INSERT INTO public.numbered (note) VALUES ('next') RETURNING id")
                values.append(("numbered default id", cur.fetchone()[0]))
                return values
        finally:
            conn.close()

    a, b = take(source_db), take(restored_db)
    return [f"next write differs: {x} at the source, {y} restored"
            for x, y in zip(a, b, strict=False) if x != y] + (
        [f"sequences differ: {len(a)} at the source, {len(b)} restored"] if len(a) != len(b)
        else [])


def run_case(mode: str, cluster: Cluster, store: Store, seed: int, steps: int = 4,
             ddl_every: int = 3, tables: int = 6) -> CaseResult:
    """One seeded case; never raises for what it finds (that goes to `problems`)."""
    rng = random.Random(seed)  # noqa: S311 - a seeded, replayable case, not a secret
    result = CaseResult(mode, seed, steps)
    source_db = _fresh_db(cluster, f"diff_{mode[:3]}_{seed}")
    source = Source(cluster.url(source_db), rng)
    targets: list[str] = []
    try:
        source.build(tables)
        source.vary_database_settings(source_db)
        if mode == "cdc":
            _cdc_case(cluster, store, source, source_db, result, steps, ddl_every, targets)
        else:
            _incremental_case(cluster, store, source, source_db, result, steps, ddl_every,
                              targets)
    except Exception as exc:  # noqa: BLE001 - a case reports what broke, it does not stop
        result.problems.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}")
    finally:
        result.log = source.log
        for db in [*targets, source_db]:
            cluster.drop_database(db)
    return result


def _restore_point(cluster: Cluster, source: Source, prefix: str, targets: list[str]) -> str:
    db = _fresh_db(cluster, prefix)
    targets.append(db)
    _vary_target(source, cluster, db)
    return db


def _cdc_case(cluster: Cluster, store: Store, source: Source, db: str, result: CaseResult,
              steps: int, ddl_every: int, targets: list[str]) -> None:
    conn = _conn(cluster, db)
    database_id = f"diff-{db}"
    capture.start(conn, store, BackupRequest(database_id=database_id))
    points: list[tuple[datetime, Picture]] = []
    windows: list[datetime] = []  # times between a schema change and the new base
    middle: list[tuple[datetime, Picture]] = []  # times inside a segment
    try:
        for i in range(steps):
            ddl = ddl_every > 0 and i % ddl_every == ddl_every - 1
            source.step(ddl=ddl)
            changed_at = _server_now(cluster, db)
            if not ddl and i % 2 == 1:  # a time between commits, not one a run checked
                middle.append((_server_now(cluster, db), picture(cluster.url(db), source=True)))
                source.step()
            # every other run streams (one flush through the replication protocol, as
            # `cdc run --for` does); the others drain once with a peek
            run = (capture.run(conn, store, database_id, seconds=0.5,
                               policy=capture.FlushPolicy(interval=0.2, idle_interval=0.2))
                   if i % 2 == 0 else capture.run(conn, store, database_id))
            if run.restarted:  # the change's moment is unknown: that time must be refused
                windows.append(changed_at)
            points.append((run.covered_through, picture(cluster.url(db), source=True)))
        _restore_each(cluster, source, db, result, targets, [
            (f"restore at {what} ({when.isoformat()})", expected,
             lambda target, when=when: capture.restore_to_time(store, database_id, target, when))
            for what, (when, expected) in [*[(f"a time inside step {i}", p)
                                             for i, p in enumerate(middle)],
                                           *[(f"step {i}", p) for i, p in enumerate(points)]]])
        _boundaries(cluster, store, source, database_id, points, windows, result, targets)
    finally:
        capture.drop(conn, store, database_id)


def _boundaries(cluster: Cluster, store: Store, source: Source, database_id: str,
                points: list[tuple[datetime, Picture]], windows: list[datetime],
                result: CaseResult, targets: list[str]) -> None:
    """Times capture cannot restore exactly are refused, with one clear line."""
    later = points[-1][0] + timedelta(hours=1)
    for what, when in [("a time later than capture covers", later),
                       *[("a time inside a schema change's window", w) for w in windows]]:
        target = _restore_point(cluster, source, "diff_refused", targets)
        try:
            report = capture.restore_to_time(store, database_id, _conn(cluster, target), when)
        except SupabackupError as exc:
            result.refused.append(f"{what}: {str(exc).splitlines()[0]}")
            continue
        result.problems.append(f"{what} ({when.isoformat()}) was restored, not refused "
                               f"(base {report.base.backup_id})")


_ticks = itertools.count(1)


def _incremental_case(cluster: Cluster, store: Store, source: Source, db: str,
                      result: CaseResult, steps: int, ddl_every: int,
                      targets: list[str]) -> None:
    conn = _conn(cluster, db)
    database_id = f"diff-{db}"
    epoch = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=next(_ticks))

    # Workers and page ranges vary with the seed: 1, 2 or 4 of them, and ranges of 2 to 8
    # pages, so that tables of a few pages are split and their edges are tested too.
    jobs = (1, 2, 4)[result.seed % 3]
    split = str(8192 * (2 + 2 * (result.seed % 4)))

    def backup(kind: str, n: int) -> Any:
        backup_id = new_backup_id(epoch + timedelta(seconds=n), kind)
        with _environment(SPLIT_ENV, split):
            return run_backup(conn, store, BackupRequest(kind=kind, database_id=database_id,
                                                         backup_id=backup_id, jobs=jobs))

    backup("full", 0)
    points = []
    for i in range(steps):
        source.step(ddl=ddl_every > 0 and i % ddl_every == ddl_every - 1)
        manifest = backup("incremental", i + 1)
        if manifest.kind != "incremental":
            result.problems.append(f"step {i}: escalated to a full backup ({manifest.escalation})")
        points.append((manifest, picture(cluster.url(db), source=True)))
    _restore_each(cluster, source, db, result, targets, [
        (f"restore of {manifest.backup_id}", expected,
         lambda target, manifest=manifest: run_restore(store, manifest, target,
                                                       RestoreOptions(jobs=jobs)))
        for manifest, expected in points])


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _restore_each(cluster: Cluster, source: Source, db: str, result: CaseResult,
                  targets: list[str],
                  points: list[tuple[str, Picture, Callable[[ConnectionInfo], Any]]]) -> None:
    """Restore each point into a fresh database and judge it against the source's picture;
    after the last, the next writes of both must agree too."""
    for i, (what, expected, restore) in enumerate(points):
        target = _restore_point(cluster, source, f"diff_{result.mode[:3]}_to_{i}", targets)
        try:
            report = restore(_conn(cluster, target))
        except SupabackupError as exc:
            result.problems.append(f"{what} failed: {exc}")
            continue
        _judge(result, what, expected, picture(cluster.url(target), source=False),
               report.inexact)
        if i == len(points) - 1 and not any(n.startswith("sequences") for n in report.inexact):
            result.problems += _next_writes(cluster, db, target)
