"""Trying to break streaming change capture and its rebase, with real PostgreSQL and real
processes: runs killed (SIGKILL) at random moments under a writer without pause, a
rebase crashed at each of its steps, big and tiny transactions, a transaction open
across a flush, TRUNCATE, VACUUM FULL and DDL mid-stream, a table added mid-stream, and
`cdc run` given values it cannot keep.

What every test holds capture to: a restore to any time capture covers is exactly the
source at that time (each row's pg_xact_commit_timestamp decides), or it refuses; each
transaction is stored once per epoch; a killed run leaves nothing that counts and loses
nothing; one slot is left, and no slot holds WAL nobody drains. A test marked xfail
fails because of the bug its reason names. Both plugins, as test_cdc.py.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from supabackup import capture, cli
from supabackup.backup import BackupRequest
from supabackup.capture import drain as drain_module
from supabackup.capture import lifecycle
from supabackup.capture.audit import audit_store
from supabackup.dburl import ConnectionInfo
from supabackup.errors import CaptureError, StoreError, SupabackupError
from supabackup.manifest import parse_time, utcnow
from supabackup.store import Store, StoreURL

from devkit.compare import table_fingerprints
from devkit.pg import Cluster

from .helpers import server_now as _now

EXE = str(Path(sys.executable).with_name("supabackup"))


# --- helpers -----------------------------------------------------------------------------

def _only(cluster: Cluster, plugin: str, why: str) -> None:
    """Run the test on one plugin's server only (the suite's time is counted)."""
    if cluster.plugin != plugin:  # type: ignore[attr-defined]
        pytest.skip(f"on {plugin} only: {why}")


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def _fresh(cluster: Cluster, db: str, schema: str = "CREATE TABLE ticks (id bigint PRIMARY KEY)"
           ) -> str:
    cluster.drop_database(db)
    cluster.create_database(db)
    cluster.execute(schema, db)
    return db


def _slots(cluster: Cluster, db: str) -> list[str]:
    """The replication slots of the database `db` (slots are the cluster's)."""
    return [r[0] for r in cluster.execute("SELECT slot_name FROM pg_replication_slots "
                                          "WHERE database = current_database() ORDER BY 1", db)]


def _publications(cluster: Cluster, db: str) -> list[str]:
    return [r[0] for r in cluster.execute("SELECT pubname FROM pg_publication ORDER BY 1", db)]


class Writer:
    """One connection committing one row per transaction into `ticks`, without pause."""

    def __init__(self, cluster: Cluster, db: str, pause: float = 0.0) -> None:
        self.cluster, self.db, self.pause = cluster, db, pause
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        conn = self.cluster.connect(self.db)
        with conn.cursor() as cur:
            i = 0
            while not self.stop.is_set():
                i += 1
                cur.execute("INSERT INTO ticks VALUES (%s)", (i,))
                if self.pause:
                    time.sleep(self.pause)
        conn.close()

    def finish(self) -> list[tuple[int, datetime]]:
        """Stop; every row with its commit time."""
        self.stop.set()
        self.thread.join(timeout=30)
        return self.cluster.execute("SELECT id, pg_xact_commit_timestamp(xmin) FROM ticks",
                                    self.db)


def _restored_ids(cluster: Cluster, store: Store, database_id: str, when: datetime,
                  name: str) -> set[int]:
    cluster.drop_database(name)
    cluster.create_database(name)
    capture.restore_to_time(store, database_id, _conn(cluster, name), when)
    ids = {r[0] for r in cluster.execute("SELECT id FROM ticks", name)}
    cluster.drop_database(name)
    return ids


def _assert_exact(cluster: Cluster, store: Store, database_id: str, times: list[datetime],
                  committed: list[tuple[int, datetime]], name: str) -> None:
    """A restore at each time holds exactly the rows committed by then."""
    for i, when in enumerate(sorted(times)):
        got = _restored_ids(cluster, store, database_id, when, f"{name}_{i}")
        want = {n for n, at in committed if at <= when}
        assert got == want, (when, sorted(want - got)[:5], sorted(got - want)[:5])


def _stored_twice(store: Store, database_id: str) -> dict[str, int]:
    """Commit LSNs stored more than once within one epoch."""
    seen: Counter[tuple[str, str]] = Counter()
    for segment in capture.segments(store, database_id):
        raw = store.read_small(segment.key)
        assert raw is not None
        for line in gzip.decompress(raw).splitlines():
            seen[(segment.epoch, json.loads(line)["commit_lsn"])] += 1
    return {f"{e}:{lsn}": n for (e, lsn), n in seen.items() if n > 1}


def _problems(store: Store, database_id: str) -> list[str]:
    found = audit_store(store, database_id, [m.backup_id for m in store.manifests(database_id)])
    return [str(p) for p in found.problems] if found else []


def _times(first: datetime, last: datetime, n: int) -> list[datetime]:
    return [first + (last - first) * k / (n - 1) for k in range(n)]


# --- a rebase that fails or is killed at each step ---------------------------------------

class Killed(BaseException):
    """What a SIGKILL does to a run, in process: it stops where it is, and no cleanup of
    its own runs (the patches below keep `abandon` and the lease's release from running,
    as a killed process runs neither; its connections close, as they do)."""


def _as_if_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "abandon", lambda *a, **k: None)
    monkeypatch.setattr(lifecycle.locks, "release", lambda *a, **k: None)


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: str, fail: Callable[[], BaseException]
             ) -> None:
    """Make the rebase stop at `step` with the exception `fail()` gives."""
    if step == "new slot":  # the new slot exists, its base is being taken
        def no_base(*a: Any, **k: Any) -> Any:
            raise fail()
        monkeypatch.setattr(lifecycle, "run_backup", no_base)
    elif step == "new base":  # the new epoch is recorded, state.json does not name it yet
        real_begin = lifecycle._begin_epoch

        def begun(*a: Any, **k: Any) -> Any:
            real_begin(*a, **k)
            raise fail()
        monkeypatch.setattr(lifecycle, "_begin_epoch", begun)
    elif step == "handover named":  # state.json names the handover
        real_put = lifecycle.put_json

        def put(store: Store, key: str, value: dict[str, Any]) -> None:
            real_put(store, key, value)
            if key.endswith("/state.json") and value.get("handover"):
                raise fail()
        monkeypatch.setattr(lifecycle, "put_json", put)
    elif step == "old slot not dropped":  # state.json names the new epoch; the old slot stays
        def no_drop(*a: Any, **k: Any) -> None:
            raise fail()
        monkeypatch.setattr(lifecycle, "drop_slot", no_drop)
    else:
        raise AssertionError(step)


def _rebase_then_converge(logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch,
                          db: str, step: str, fail: Callable[[], BaseException],
                          killed: bool) -> None:
    """Capture under a writer; a rebase stops at `step`; then the next runs (the old base
    still older than rebase_every, until a handover gives a new one) must converge: one
    slot left, no gap, every time restores exactly, nothing stored twice."""
    _fresh(logical, db)
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    writer = Writer(logical, db, pause=0.002)
    try:
        time.sleep(0.3)
        assert capture.run(_conn(logical, db), store, database_id).segment is not None
        time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
        with monkeypatch.context() as patch:
            if killed:
                _as_if_killed(patch)
            _kill_at(patch, step, fail)
            try:
                crashed = capture.run(_conn(logical, db), store, database_id,
                                      rebase_every=timedelta(0))
            except (Killed, SupabackupError):
                crashed = None
        if killed:  # the killed run's lease expires (LEASE); here it is taken as expired
            store.delete_key(store.key(database_id, "locks", "capture.json"))
        time.sleep(1.1)  # the crashed rebase may have committed a base: the next needs its own id
        # the next runs: the old base is still older than rebase_every, a new one is not
        running = capture.read_state(store, database_id)
        assert running is not None
        every = (utcnow() - parse_time(base.snapshot_at)) - timedelta(milliseconds=500)
        again = capture.run(_conn(logical, db), store, database_id, rebase_every=every)
        time.sleep(0.3)
        last = capture.run(_conn(logical, db), store, database_id, rebase_every=None)
    finally:
        committed = writer.finish()
    assert not again.rebase_error, again.rebase_error
    assert crashed is None or crashed.rebase_error  # the crash was seen
    # THEN one slot is left, the running epoch's, and no publication of any other
    running = capture.read_state(store, database_id)
    assert running is not None and not running.handover
    assert _slots(logical, db) == [running.slot]
    if running.plugin == "pgoutput":
        assert _publications(logical, db) == sorted(running.publication.split(","))
    else:
        assert _publications(logical, db) == []
    # no gap, nothing stored twice, verify finds nothing
    status = capture.status(_conn(logical, db), store, database_id)
    assert status["window"]["gaps"] == []
    assert _stored_twice(store, database_id) == {}
    assert _problems(store, database_id) == []
    # and every time from the first base on restores exactly, around each base too
    assert last.covered_through is not None
    first, end = parse_time(base.snapshot_at), last.covered_through
    times = _times(first, end, 3)
    for epoch in capture.epochs(store, database_id)[1:]:
        at = parse_time(epoch.base_at)
        times += [at - timedelta(milliseconds=1), at]
    _assert_exact(logical, store, database_id, times, committed, db)
    assert state.slot  # (the first epoch's slot is dropped or is the running one)


def _store_error() -> BaseException:
    return StoreError("injected: S3 refused the write", "try again")


def _db_error() -> BaseException:
    return CaptureError("injected: the connection to the database broke", "try again")


@pytest.mark.parametrize(("step", "plugin"), [("new slot", "pgoutput"),
                                             ("handover named", "wal2json")])
def test_a_rebase_that_fails_at_a_step_converges_on_the_next_runs(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch, step: str,
        plugin: str) -> None:
    # an error (S3 refusing the base's upload; S3 failing just after state.json named the
    # handover): the run's own cleanup runs
    _only(logical, plugin, "each step on one plugin")
    _rebase_then_converge(logical, store, monkeypatch, f"breaks_fail_{step[:3]}", step,
                          _store_error, killed=False)


def test_a_rebase_whose_state_write_fails_after_the_new_base_converges(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "wal2json", "each step on one plugin")
    _rebase_then_converge(logical, store, monkeypatch, "breaks_fail_base", "new base",
                          _store_error, killed=False)


def test_times_after_a_failed_rebase_still_restore_exactly(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "wal2json", "the store's records are the plugin's neither")
    db = _fresh(logical, "breaks_orphan_epoch")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    logical.execute("INSERT INTO ticks VALUES (1)", db)
    capture.run(_conn(logical, db), store, database_id)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    with monkeypatch.context() as patch:
        _kill_at(patch, "new base", _store_error)
        failed = capture.run(_conn(logical, db), store, database_id, rebase_every=timedelta(0))
    assert failed.rebase_error
    logical.execute("INSERT INTO ticks VALUES (2)", db)
    when = _now(logical, db)
    covered = capture.run(_conn(logical, db), store, database_id, rebase_every=None)
    assert covered.covered_through is not None and covered.covered_through >= when
    window = capture.status(_conn(logical, db), store, database_id)["window"]
    assert window["gaps"] == [] and parse_time(window["latest"]) >= when  # it says it can
    assert capture.pointintime.replays(store, database_id, when)
    assert _restored_ids(logical, store, database_id, when, f"{db}_at") == {1, 2}


def test_a_rebase_whose_old_slot_drop_fails_converges(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "pgoutput", "each step on one plugin")
    _rebase_then_converge(logical, store, monkeypatch, "breaks_fail_drop",
                          "old slot not dropped", _db_error, killed=False)


def test_a_rebase_killed_during_its_base_converges(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "wal2json", "each step on one plugin (SIGKILL: see the next test)")
    _rebase_then_converge(logical, store, monkeypatch, "breaks_kill_slot", "new slot",
                          lambda: Killed(), killed=True)


# --- `cdc run` killed (SIGKILL) at random moments under a writer ---------------------------

# The CLI in a child process, with the lease's margin, its renewal and the idle interval
# shortened so a killed run's lease expires within seconds (in production: 90 s + 30 s +
# the idle interval).
SHORT_LEASE = r"""
import functools, sys
from supabackup import cli
from supabackup.capture import lifecycle
from supabackup.capture.stream import FlushPolicy
lifecycle.LEASE_MARGIN = 1
lifecycle.RENEW_EVERY = 0.0
cli.FlushPolicy = functools.partial(FlushPolicy, idle_interval=2.0)
sys.exit(cli.main(sys.argv[1:]))
"""
SHORT_HOLD = 3.0  # LEASE_MARGIN + RENEW_EVERY + idle_interval above


def _on_local_s3(local_s3: Any, bucket: str) -> tuple[Store, dict[str, str]]:
    local_s3.create_bucket(bucket)
    store = Store(StoreURL.parse(f"s3://{bucket}/breaks"), local_s3.client())
    return store, {**os.environ, **local_s3.env(), "SUPABACKUP_STORE": f"s3://{bucket}/breaks"}


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SHORT_LEASE, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_runs_killed_at_random_moments_lose_nothing_and_store_nothing_twice(
        logical: Cluster, local_s3: Any) -> None:
    _only(logical, "wal2json", "the kills are the store's and the slot's, either plugin's")
    db = _fresh(logical, "breaks_sigkill")
    store, env = _on_local_s3(local_s3, f"breaks-sigkill-{logical.plugin}")  # type: ignore[attr-defined]
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    url = logical.url(db)
    run = ("cdc", "run", "--database-url", url, "--for", "20", "--flush-interval", "1")
    rng = random.Random(f"sigkill-{logical.plugin}")  # type: ignore[attr-defined]  # noqa: S311
    writer = Writer(logical, db, pause=0.01)
    kills = []
    try:
        # GIVEN `cdc run --for 20` killed at random moments, each next run started at once
        for _ in range(3):
            proc = _cli(env, *run)
            after = rng.uniform(0.5, 5.0)
            time.sleep(after)
            ended_early = proc.poll()
            proc.kill()
            out, err = proc.communicate(timeout=30)
            assert ended_early is None, (after, ended_early, out, err)
            kills.append(round(after, 2))
            lease = store.read_small(store.key(database_id, "locks", "capture.json"))
            if lease is not None:  # the killed run's: it expires within the margin
                expires = parse_time(json.loads(lease)["expires_at"])
                assert expires <= utcnow() + timedelta(seconds=SHORT_HOLD + 1), kills
            expired_at = expires if lease is not None else utcnow()
        # WHEN a run then goes to its end, once the last killed run's lease expired
        time.sleep(max(0.0, (expired_at - utcnow()).total_seconds()) + 0.2)
        last_run = _cli(env, *run[:-4], "--for", "4", "--flush-interval", "1")
        out, err = last_run.communicate(timeout=60)
        assert last_run.returncode == 0 and "left without draining" not in out, (kills, err)
    finally:
        committed = writer.finish()
    final = capture.run(_conn(logical, db), store, database_id)
    assert final.covered_through is not None and not final.left
    # THEN no transaction is stored twice, the chain has no hole, one epoch, one slot
    assert _stored_twice(store, database_id) == {}, kills
    assert _problems(store, database_id) == [], kills
    assert len(capture.epochs(store, database_id)) == 1, kills
    assert _slots(logical, db) == [state.slot]
    # and every time restores exactly; the last one holds every row (nothing lost)
    times = _times(parse_time(base.snapshot_at), final.covered_through, 4)
    _assert_exact(logical, store, database_id, times, committed, db)
    assert max(at for _, at in committed) <= final.covered_through


def test_a_killed_streams_lease_is_taken_over_once_it_expires(
        logical: Cluster, local_s3: Any) -> None:
    _only(logical, "wal2json", "the lease is the store's")
    db = _fresh(logical, "breaks_lease")
    store, env = _on_local_s3(local_s3, "breaks-lease")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    logical.execute("INSERT INTO ticks VALUES (1)", db)
    # GIVEN a stream killed after its first flush: its lease stays in the store
    proc = _cli(env, "cdc", "run", "--database-url", logical.url(db), "--for", "20",
                "--flush-interval", "1")
    key = store.key(database_id, "locks", "capture.json")
    deadline = time.monotonic() + 20
    while not capture.segments(store, database_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=30)
    killed_at = utcnow()
    logical.execute("INSERT INTO ticks VALUES (2)", db)
    held = json.loads(store.read_small(key) or b"{}")
    assert parse_time(held["expires_at"]) <= killed_at + timedelta(seconds=SHORT_HOLD + 0.5)
    # WHEN a run that may wait starts at once; and one that may not, after it
    waiting = _cli(env, "cdc", "run", "--database-url", logical.url(db), "--for", "10",
                   "--flush-interval", "1")
    out, err = waiting.communicate(timeout=60)
    # THEN it took the lease over within the margin and stored the second row, once
    assert waiting.returncode == 0 and "left without draining" not in out, (out, err)
    assert "stored 1 transaction(s)" in out, out
    assert store.read_small(key) is None  # released
    assert _stored_twice(store, database_id) == {}


# The CLI in a child process whose rebase is due at once and which SIGKILLs itself when
# the rebase's base begins (the new slot exists): as Lambda's time limit kills a run.
KILLED_IN_REBASE = r"""
import os, signal, sys
from supabackup import cli
from supabackup.capture import lifecycle
lifecycle._rebase_due = lambda state, every: not state.handover
lifecycle.run_backup = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_cdc_run_sigkilled_during_a_rebase_base_leaves_no_slot_behind(
        logical: Cluster, local_s3: Any) -> None:
    _only(logical, "pgoutput", "with its publications (in process, wal2json: above)")
    db = _fresh(logical, "breaks_sigkill_rebase")
    store, env = _on_local_s3(local_s3, "breaks-sigkill-rebase")
    state, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    logical.execute("INSERT INTO ticks VALUES (1)", db)
    time.sleep(1.1)  # backup ids have one-second resolution: the new base needs its own
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_REBASE, "cdc", "run",
                             "--database-url", logical.url(db)], env=env, text=True,
                            capture_output=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    store.delete_key(store.key(database_id, "locks", "capture.json"))  # as if expired
    logical.execute("INSERT INTO ticks VALUES (2)", db)
    every = (utcnow() - parse_time(base.snapshot_at)) - timedelta(milliseconds=500)
    again = capture.run(_conn(logical, db), store, database_id, rebase_every=every)
    running = capture.read_state(store, database_id)
    assert running is not None and state.slot
    assert not again.rebase_error, again.rebase_error
    assert _slots(logical, db) == [running.slot]
    assert _publications(logical, db) == sorted(running.publication.split(","))


# --- what the stream carries -------------------------------------------------------------

def _stream(logical: Cluster, store: Store, db: str, database_id: str, seconds: float,
            interval: float = 0.5) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(capture.run(_conn(logical, db), store, database_id, seconds=seconds,
                                   policy=capture.FlushPolicy(interval=interval,
                                                              idle_interval=1.0)))
        except BaseException as exc:  # noqa: BLE001 - re-raised by _ended
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def _ended(thread: threading.Thread, out: list[Any]) -> capture.CaptureRun:
    thread.join(timeout=120)
    assert not thread.is_alive() and out, "the stream did not end"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]  # type: ignore[no-any-return]


def _fingerprint_at(logical: Cluster, store: Store, database_id: str, when: datetime,
                    name: str) -> dict[str, Any]:
    logical.drop_database(name)
    logical.create_database(name)
    capture.restore_to_time(store, database_id, _conn(logical, name), when)
    found = table_fingerprints(logical.url(name))
    logical.drop_database(name)
    return found


MIXED = """CREATE TABLE ticks (id bigint PRIMARY KEY);
           CREATE TABLE big (id int PRIMARY KEY, v text);
           CREATE TABLE scratch (k int PRIMARY KEY, v int)"""


def test_big_and_tiny_transactions_and_one_open_across_flushes_restore_exactly(
        logical: Cluster, store: Store) -> None:
    _only(logical, "pgoutput", "a big transaction's Relation and row messages across flushes")
    db = _fresh(logical, "breaks_mixed", MIXED)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    thread, out = _stream(logical, store, db, database_id, seconds=9.0)
    expected: list[tuple[str, datetime, dict[str, Any]]] = []

    def note(what: str) -> None:
        expected.append((what, _now(logical, db), table_fingerprints(logical.url(db))))

    # GIVEN, while a stream flushes every half second: many tiny transactions
    tiny = logical.connect(db)
    with tiny.cursor() as cur:
        for i in range(300):
            cur.execute("INSERT INTO ticks VALUES (%s)", (i,))
    note("tiny")
    # a transaction open across several flushes (a time while it is open must not hold it)
    open_txn = logical.connect(db)
    open_txn.autocommit = False
    with open_txn.cursor() as cur:
        cur.execute("INSERT INTO scratch SELECT g, g FROM generate_series(1, 5) g")
        time.sleep(1.5)
        note("while open")
        with tiny.cursor() as other:
            other.execute("INSERT INTO ticks VALUES (1000)")  # commits inside it
        time.sleep(1.0)
        cur.execute("UPDATE scratch SET v = -v")
    open_txn.commit()
    open_txn.close()
    note("committed")
    # one transaction of 200 000 rows, then changes to them
    logical.execute("INSERT INTO big SELECT g, repeat('x', 40) || g FROM "
                    "generate_series(1, 200000) g", db)
    note("big")
    # (a TRUNCATE here, behind the backlog the big transaction makes, ends the epoch: see
    # test_a_truncate_the_read_has_not_reached_yet_does_not_end_the_epoch)
    logical.execute("UPDATE big SET v = 'y' WHERE id <= 1000; DELETE FROM big WHERE id > 199000",
                    db)
    note("after big")
    tiny.close()
    result = _ended(thread, out)
    for _ in range(4):  # what the stream had not read: a peek takes MAX_CHANGES at a time
        final = capture.run(_conn(logical, db), store, database_id)
        if final.covered_through is not None and final.covered_through >= expected[-1][1]:
            break
    # THEN one epoch, each transaction stored once, and each noted time restores exactly
    assert not result.restarted and not final.restarted, result.restarted
    assert final.covered_through is not None and final.covered_through >= expected[-1][1]
    assert _stored_twice(store, database_id) == {}
    assert _problems(store, database_id) == []
    for i, (what, when, tables) in enumerate(expected):
        if what == "big":
            continue  # (the same 200 000 rows: "after big" replays them too)
        assert _fingerprint_at(logical, store, database_id, when, f"{db}_{i}") == tables, what


def test_vacuum_full_and_ddl_mid_stream_restore_exactly_or_refuse_only_between_epochs(
        logical: Cluster, store: Store) -> None:
    _only(logical, "pgoutput", "the epochs' publications are remade too")
    db = _fresh(logical, "breaks_rewrite")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    writer = Writer(logical, db, pause=0.005)
    try:
        thread, out = _stream(logical, store, db, database_id, seconds=11.0)
        time.sleep(1.5)
        logical.execute("VACUUM FULL ticks", db)  # a rewrite: not in the stream
        time.sleep(3.5)
        logical.execute("ALTER TABLE ticks ADD COLUMN note text", db)  # DDL: not either
        result = _ended(thread, out)
        final = capture.run(_conn(logical, db), store, database_id)
    finally:
        committed = writer.finish()
    assert "rewritten outside the change stream" in result.restarted, result.restarted
    assert "the schema changed" in result.restarted, result.restarted
    history = capture.epochs(store, database_id)
    assert len(history) == 3
    progress = [capture.state.read_progress(store, database_id, e) for e in history]
    gaps = [(parse_time(p.verified_at), parse_time(n.base_at))  # type: ignore[union-attr]
            for p, n in zip(progress, history[1:], strict=False)]
    assert final.covered_through is not None
    times = _times(parse_time(base.snapshot_at), final.covered_through, 5)
    times += [parse_time(e.base_at) for e in history[1:]] + [g[0] for g in gaps]
    refused = 0
    for i, when in enumerate(sorted(times)):
        try:
            got = _restored_ids(logical, store, database_id, when, f"{db}_{i}")
        except CaptureError as exc:
            assert "cannot be restored exactly" in exc.message
            assert any(start < when < end for start, end in gaps), (when, gaps)
            refused += 1
            continue
        assert got == {n for n, at in committed if at <= when}, when
    assert refused < len(times)
    assert _stored_twice(store, database_id) == {}


def test_a_truncate_that_commits_while_a_flush_checks_does_not_end_the_epoch(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "wal2json", "the check is the plugin's neither")
    db = _fresh(logical, "breaks_truncate_race", MIXED)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    logical.execute("INSERT INTO scratch VALUES (1, 1)", db)
    real = drain_module.table_files
    calls = [0]

    def racing(cur: Any) -> dict[str, int]:
        calls[0] += 1
        if calls[0] == 2:  # the second flush's check: after its position, before the files
            logical.execute("TRUNCATE scratch; INSERT INTO scratch VALUES (2, 2)", db)
        return real(cur)

    monkeypatch.setattr(drain_module, "table_files", racing)
    writer = Writer(logical, db, pause=0.01)
    try:
        result = capture.run(_conn(logical, db), store, database_id, seconds=5.0,
                             policy=capture.FlushPolicy(interval=1.0))
    finally:
        writer.finish()
    assert calls[0] >= 3
    assert not result.restarted, result.restarted
    assert len(capture.epochs(store, database_id)) == 1


def test_a_truncate_the_read_has_not_reached_yet_does_not_end_the_epoch(
        logical: Cluster, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(logical, "pgoutput", "the read is the plugin's neither")
    db = _fresh(logical, "breaks_truncate_behind", MIXED)
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    # a peek returns at most MAX_CHANGES rows: 20 here, as 100 000 behind a backlog
    monkeypatch.setattr(capture.slot, "MAX_CHANGES", 20)
    monkeypatch.setattr(drain_module, "MAX_CHANGES", 20)
    for i in range(30):
        logical.execute(f"INSERT INTO ticks VALUES ({i})", db)
    logical.execute("INSERT INTO scratch VALUES (1, 1)", db)
    logical.execute("TRUNCATE scratch; INSERT INTO scratch VALUES (2, 2)", db)
    first = capture.run(_conn(logical, db), store, database_id)
    assert first.segment is not None  # it stored what it read: the first transactions
    assert not first.restarted, first.restarted
    monkeypatch.undo()
    rest = capture.run(_conn(logical, db), store, database_id)
    assert not rest.restarted and len(capture.epochs(store, database_id)) == 1
    assert rest.covered_through is not None
    assert _fingerprint_at(logical, store, database_id, rest.covered_through, f"{db}_at") == \
        table_fingerprints(logical.url(db))


def test_a_table_added_mid_stream_is_captured_in_the_new_epoch(
        logical: Cluster, store: Store) -> None:
    # pgoutput: the publication of updates and deletes lists the tables it was made with;
    # a table created mid-stream is DDL, and the new epoch's publications must have it
    _only(logical, "pgoutput", "its publications list the tables")
    db = _fresh(logical, "breaks_new_table")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    database_id = base.database_id
    thread, out = _stream(logical, store, db, database_id, seconds=12.0)
    logical.execute("INSERT INTO ticks VALUES (1)", db)
    time.sleep(1.5)
    logical.execute("CREATE TABLE added (k int PRIMARY KEY, v text);"
                    "INSERT INTO added VALUES (1, 'one'), (2, 'two')", db)
    time.sleep(4.0)  # the stream finds the DDL, takes a new base, streams on
    # changes to the new table over several flushes (pgoutput: its relation message is
    # sent once per stream, before the first of them)
    logical.execute("INSERT INTO added VALUES (3, 'three')", db)
    time.sleep(1.0)
    logical.execute("UPDATE added SET v = 'TWO' WHERE k = 2", db)
    time.sleep(1.0)
    logical.execute("DELETE FROM added WHERE k = 1; INSERT INTO ticks VALUES (2)", db)
    when = _now(logical, db)
    expected = table_fingerprints(logical.url(db))
    result = _ended(thread, out)
    assert result.restarted == "the schema changed", result.restarted
    final = capture.run(_conn(logical, db), store, database_id)
    assert final.covered_through is not None and final.covered_through >= when
    running = capture.read_state(store, database_id)
    assert running is not None
    if running.plugin == "pgoutput":
        keyed = logical.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = "
                                f"'{running.slot}_keyed' ORDER BY 1", db)
        assert keyed == [("added",), ("ticks",)]
    assert _fingerprint_at(logical, store, database_id, when, f"{db}_at") == expected


# --- `cdc run` with values it cannot keep --------------------------------------------------

BAD_RUNS = [
    (["--for", "0"], "--for"), (["--for", "-5"], "--for"), (["--for", "nan"], "--for"),
    (["--for", "inf"], "--for"), (["--for", "86401"], "--for"),
    (["--for", "10", "--flush-interval", "0"], "flush interval"),
    (["--for", "10", "--flush-interval", "-1"], "flush interval"),
    (["--for", "10", "--flush-interval", "nan"], "flush interval"),
]


def _refused(logical: Cluster, store: Store, db: str, database_id: str, extra: list[str],
             capsys: pytest.CaptureFixture[str]) -> str:
    """Run `cdc run` with `extra`; it must refuse with one line and store nothing."""
    prefix = store.key(database_id) + "/"
    before = {k: store.read_small(k) for k in store.list_keys(prefix)}
    slot = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = " \
           f"'{capture.slot_name(_conn(logical, db))}'"
    confirmed = logical.execute(slot, db)
    capsys.readouterr()
    code = cli.main(["cdc", "run", "--database-url", logical.url(db), "--store",
                     str(store.url), "--database-id", database_id, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("supabackup: error:"), (
        extra, captured.err)
    assert captured.out == "", extra
    assert {k: store.read_small(k) for k in store.list_keys(prefix)} == before, extra
    assert logical.execute(slot, db) == confirmed, extra
    return lines[0]


def test_cdc_run_with_values_it_cannot_keep_refuses_in_one_line_and_stores_nothing(
        logical: Cluster, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _only(logical, "wal2json", "refused before any replication")
    db = _fresh(logical, "breaks_bad_values")
    _, base = capture.start(_conn(logical, db), store, BackupRequest())
    logical.execute("INSERT INTO ticks VALUES (1)", db)  # waiting in the slot
    for extra, named in BAD_RUNS:
        line = _refused(logical, store, db, base.database_id, extra, capsys)
        assert named in line, line
        assert extra[-1] in line or (extra[-1] == "0" and "0.0" in line), line


def test_a_flush_interval_over_the_idle_interval_is_kept_and_idle_flushes_follow_it() -> None:
    # a person who asks for a flush every 30 s gets one every 30 s, idle or not
    policy = capture.FlushPolicy(interval=30.0)
    assert policy.interval == policy.idle_interval == 30.0
    with pytest.raises(ValueError, match="more than 0, at most 600"):
        capture.FlushPolicy(interval=601.0)
