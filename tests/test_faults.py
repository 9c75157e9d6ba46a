"""The fault suite: every way a run can fail on its worst day, injected, and what it leaves.

For each fault the suite checks what a user would: a failed backup has no manifest (the
store lists no backup of the database), no object and no multipart upload is left, no
pg_dump or psql child and no backend of the run is left running, the earlier backup is
untouched, the failure message names the cause; and a transient fault is retried and the
run commits one good backup (it verifies, and holds every row). README.md ("Faults")
tabulates the faults and their outcomes; a test keeps the table and this suite in step.

The backups are of manifest format 2: roles.sql, schema.dump (pg_dump), and every table's
rows as objects tables/<oid>.<n>.copy.zst, dumped by JOBS workers (each a psql COPY child
whose output streams into its own upload). `big_db`'s big table is cut into page ranges
(SUPABACKUP_SPLIT_BYTES), so a run has more slices than workers and several uploads of
several parts in flight at once: faults are aimed at one worker while the others run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from moto.core.botocore_stubber import MockRawResponse
from supabackup import locks
from supabackup.backup import BackupRequest, run_backup
from supabackup.budget import MARGIN, Budget
from supabackup.dburl import ConnectionInfo
from supabackup.errors import (
    BackupNotFound,
    ConfigError,
    DumpFailed,
    DuplicateRun,
    RunInProgress,
    StoreError,
    SupabackupError,
    TimeLimitExceeded,
)
from supabackup.handlers import backup as backup_handler
from supabackup.manifest import Manifest, iso, utcnow
from supabackup.notify import Notifier
from supabackup.report import backup_and_report
from supabackup.store import BOTO_CONFIG, MIB, Store, StoreURL
from supabackup.tabledata import SPLIT_ENV
from supabackup.verify import verify_database

from devkit.pg import Cluster

from .helpers import (
    BUCKET,
    REPO,
    FakeContext,
    Inbox,
    child_pids,
    kill_children,
    load_event,
    open_uploads,
    retention_days,
    sam_template,
    stored_keys,
)

REGION = "us-east-1"
# Every fault this suite injects, by the name README.md's table gives it.
FAULTS: dict[str, str] = {}
# Workers of every run of big_db, and the size of its page ranges: `blob` (~75 MB of heap)
# is cut into 3 ranges, each about 10 MB of zstd COPY text, i.e. 2 parts of 5 MiB.
JOBS = 4
RANGE_BYTES = 24 * MIB
RANGES = 3
ROWS = {"blob": 450_000, "small_a": 20_000, "small_b": 5_000}
# What a run starts as children: none may outlive a failed run.
CHILDREN = ("psql", "pg_dump", "pg_dumpall")
# Attempts at one request: botocore's "max_attempts" counts the retries after the first.
ATTEMPTS = 1 + BOTO_CONFIG.retries["max_attempts"]


def fault(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a test as the one that injects `name` (README.md lists each)."""
    def register(test: Callable[..., None]) -> Callable[..., None]:
        FAULTS[name] = test.__name__
        return test
    return register


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


@pytest.fixture(autouse=True)
def _page_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run of this suite (in process or a CLI child) cuts big tables into ranges of
    RANGE_BYTES: big_db's runs have more slices than workers."""
    monkeypatch.setenv(SPLIT_ENV, str(RANGE_BYTES))


@pytest.fixture(scope="module")
def big_db(pg17: Cluster) -> str:
    """~75 MB of poorly compressible rows (every md5 of its own string, ~31 MB as zstd COPY
    text): `blob` in RANGES page ranges of 2 parts each, and two small tables; 5 slices
    for JOBS workers, so several uploads of several parts are in flight at once."""
    name = "bigdb_failures"
    pg17.drop_database(name)
    pg17.create_database(name)
    pg17.execute("""
        CREATE TABLE blob (id int PRIMARY KEY, body text);
        INSERT INTO blob SELECT g, md5('a' || g) || md5('b' || g) || md5('c' || g)
                                 || md5('d' || g)
          FROM generate_series(1, 450000) g;
        CREATE TABLE small_a (id int PRIMARY KEY, v text);
        INSERT INTO small_a SELECT g, md5('e' || g) FROM generate_series(1, 20000) g;
        CREATE TABLE small_b (id int, v text);
        INSERT INTO small_b SELECT g, md5('f' || g) FROM generate_series(1, 5000) g;
    """, name)
    return name


@pytest.fixture(scope="module")
def lob_db(pg17: Cluster) -> str:
    """A database whose schema.dump is long: 12 MiB of large objects (pg_dump dumps them
    there; random bytes, they do not compress), so pg_dump is mid-stream as its upload's
    first part goes out."""
    name = "lobdb_failures"
    pg17.drop_database(name)
    pg17.create_database(name)
    pg17.execute("""
        CREATE TABLE t (id int); INSERT INTO t VALUES (1);
        SELECT lo_from_bytea(0, (SELECT string_agg(sha256((i || '-' || g)::bytea), '')
                                   FROM generate_series(1, 32768) g))
          FROM generate_series(1, 12) i;
    """, name)
    return name


@pytest.fixture
def earlier_backup(pg17: Cluster, big_db: str, s3: Any) -> list[str]:
    """A good backup taken before the failing one: it must survive untouched."""
    earlier = Store(StoreURL.parse(f"s3://{BUCKET}/backups"), s3)
    run_backup(_conn(pg17, big_db), earlier, BackupRequest(database_id="earlier", jobs=JOBS))
    return stored_keys(s3)


def _part(cluster: Cluster, db: str, table: str, index: int = 0) -> str:
    """The name of a table part in a backup's folder, tables/<oid>.<index>.copy.zst."""
    [(oid,)] = cluster.execute(f"SELECT '{table}'::regclass::oid", db)
    return f"tables/{oid}.{index}.copy.zst"


def _target(request: Any) -> tuple[str, int]:
    """(object key, part number, 0 when none) of a request about to be sent."""
    url = urlsplit(request.url)
    part = re.search(r"(?:^|&)partNumber=(\d+)", url.query)
    return unquote(url.path), int(part.group(1)) if part else 0


def _on(s3: Any, operation: str, action: Callable[[Any], Any]) -> list[tuple[str, int]]:
    """Run `action(request)` as each `operation` request is about to be sent (its answer,
    if not None, is the request's); returns what each request was for (`_target`), one
    entry per attempt."""
    seen: list[tuple[str, int]] = []

    def hook(request: Any, **_: Any) -> Any:
        seen.append(_target(request))
        return action(request)
    s3.meta.events.register_first(f"before-send.s3.{operation}", hook)
    return seen


def _error(status: int, code: str, message: str = "injected") -> Callable[[Any], AWSResponse]:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    return lambda request: AWSResponse(request.url, status, {}, MockRawResponse(body))


def _once(respond: Callable[[Any], Any], when: Callable[[Any], bool] = lambda r: True
          ) -> Callable[[Any], Any]:
    """`respond` to the first request `when` accepts, then let every request through."""
    fired: list[bool] = []
    lock = threading.Lock()  # workers send at once

    def action(request: Any) -> Any:
        with lock:
            first = not fired and when(request)
            if first:
                fired.append(True)
        return respond(request) if first else None
    return action


def _is_part(name: str, number: int | None = None) -> Callable[[Any], bool]:
    """A request for the object `name` of a backup's folder (and part `number`)."""
    def match(request: Any) -> bool:
        key, part = _target(request)
        return key.endswith("/" + name) and number in (None, part)
    return match


def _settled(probe: Callable[[], list[Any]], seconds: float = 15) -> list[Any]:
    """What `probe` finds once it finds nothing, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _run_backends(cluster: Cluster, db: str) -> list[tuple[Any, ...]]:
    """The server sessions of supabackup (its snapshot session, psql, pg_dump) on `db`."""
    return cluster.execute(
        "SELECT pid, application_name, state, left(query, 120) FROM pg_stat_activity "
        f"WHERE datname = '{db}' AND application_name LIKE 'supabackup%'")


def _copies(cluster: Cluster, db: str) -> list[tuple[int, str]]:
    """(pid, query) of the session of every worker's psql on `db` whose COPY it runs (or
    has run, and now streams from its socket), those still copying first."""
    return [(pid, query) for pid, query in cluster.execute(
        "SELECT pid, query FROM pg_stat_activity WHERE application_name = 'supabackup psql'"
        f" AND datname = '{db}' AND query LIKE 'COPY%' ORDER BY state <> 'active', pid")]


def _range_of(copy_sql: str) -> str:
    """How an error names the slice a COPY reads: "public.blob pages 3062-6124"."""
    found = re.search(r"FROM ONLY \"(\w+)\"\.\"(\w+)\" WHERE ctid >= '\((\d+),0\)'"
                      r"(?: AND ctid < '\((\d+),0\)')?", copy_sql)
    assert found, copy_sql
    schema, table, first, end = found.groups()
    return f"{schema}.{table} pages {first}-{end or 'end'}"


def _assert_nothing_left(store: Store, cluster: Cluster, db: str) -> None:
    """No child process, no server session of the run, and no backup of `db` listed."""
    for name in CHILDREN:
        assert child_pids(name) == [], f"a {name} child outlived the run"
    assert _settled(lambda: _run_backends(cluster, db)) == [], \
        "a session of the failed run is still open on the server"
    assert store.manifests(_conn(cluster, db).database_id) == [], "a failed run counts"


def _assert_nothing_committed(s3: Any, inbox: Inbox, earlier: list[str],
                              cause: str) -> dict[str, Any]:
    assert stored_keys(s3) == earlier, "a failed run must leave no object behind"
    assert open_uploads(s3) == [], "a failed run must leave no multipart upload open"
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert re.search(cause, msg["Message"]["error"]), msg["Message"]["error"]
    return msg["Message"]


def _assert_one_good_backup(s3: Any, store: Store, inbox: Inbox, earlier: list[str],
                            manifest: Manifest) -> None:
    """The run committed one backup of format 2: its objects are exactly what its manifest
    lists, every table's parts hold its rows (blob's ranges edge to edge), and it
    verifies (every object's sha256, schema.dump and every part read through)."""
    folder = store.backup_key(manifest.database_id, manifest.backup_id) + "/"
    new = [k for k in stored_keys(s3) if k not in earlier]
    assert all(k.startswith(folder) for k in new), new
    parts = [p.name for t in manifest.tables for p in t.parts]
    assert sorted(o.name for o in manifest.objects) == sorted(
        ["roles.sql", "schema.dump", *parts])
    assert sorted(k[len(folder):] for k in new) == sorted(
        ["manifest.json", "roles.sql", "schema.dump", *parts])
    tables = {t.name: t for t in manifest.tables}
    assert {name: t.rows for name, t in tables.items()} == ROWS
    assert all(sum(p.rows for p in t.parts) == t.rows for t in manifest.tables)
    ranges = [(p.first_page, p.end_page) for p in tables["blob"].parts]
    assert len(ranges) == RANGES and ranges[0][0] == 0 and ranges[-1][1] == -1
    assert all(a[1] == b[0] for a, b in pairwise(ranges)), ranges
    assert open_uploads(s3) == []
    report = verify_database(store, manifest.database_id, manifest.backup_id)
    assert report.ok and report.verified == [manifest.backup_id], report.findings
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert all(child_pids(name) == [] for name in CHILDREN)


def _assert_sent_once_but(seen: list[tuple[str, int]], again: tuple[str, int]) -> None:
    """Every part of every upload was sent once, but `again`'s name, sent twice."""
    counts = Counter(seen)
    twice = [t for t, n in counts.items() if n > 1]
    assert len(twice) == 1 and twice[0][0].endswith("/" + again[0]) \
        and twice[0][1] == again[1] and counts[twice[0]] == 2, counts
    for key in {k for k, _ in counts}:
        numbers = sorted(n for k, n in counts if k == key)
        assert numbers == list(range(1, len(numbers) + 1)), (key, numbers)


def _backup(pg17: Cluster, db: str, store: Store, inbox: Inbox,
            request: BackupRequest | None = None) -> Manifest:
    manifest, _ = backup_and_report(_conn(pg17, db), store,
                                    request or BackupRequest(jobs=JOBS),
                                    Notifier(inbox.topic_arn, inbox.sns))
    return manifest


# --- the dump fails ----------------------------------------------------------------------


@fault("pg_dump killed with SIGKILL mid-stream")
def test_pg_dump_killed_mid_stream_stores_nothing_and_reports_the_signal(
        pg17: Cluster, lob_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    killed: list[int] = []
    _on(s3, "UploadPart", _once(lambda request: killed.append(kill_children("pg_dump")),
                                _is_part("schema.dump", 1)))
    with pytest.raises(DumpFailed, match=r"^pg_dump failed \(killed by signal 9\)"):
        _backup(pg17, lob_db, store, inbox)
    assert killed == [1]  # pg_dump was streaming schema.dump, and was killed then
    body = _assert_nothing_committed(s3, inbox, earlier_backup,
                                     r"^pg_dump failed \(killed by signal 9\)")
    assert body["error_type"] == "DumpFailed"
    _assert_nothing_left(store, pg17, lob_db)


@fault("a COPY worker's psql killed with SIGKILL mid-stream")
def test_a_copy_worker_killed_mid_stream_fails_the_run_naming_its_range(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    killed: list[str] = []  # the COPY of the psql killed
    running: list[int] = []

    def kill_one(request: Any) -> None:
        children = child_pids("psql")
        running.append(len(children))
        for pid in children:
            copy = _copy_of(pid)
            if "ctid" in copy:
                os.kill(pid, signal.SIGKILL)
                killed.append(copy)
                return

    _on(s3, "UploadPart", _once(kill_one, lambda r: "/tables/" in _target(r)[0]))
    with pytest.raises(DumpFailed) as caught:
        _backup(pg17, big_db, store, inbox)
    (copy,) = killed
    assert running[0] >= 2  # other workers were copying then
    where = _range_of(copy)
    assert str(caught.value).startswith(f"COPY of {where} failed (killed by signal 9)"), \
        str(caught.value)
    body = _assert_nothing_committed(
        s3, inbox, earlier_backup, "^" + re.escape(f"COPY of {where} failed (killed by signal 9)"))
    assert body["error_type"] == "DumpFailed"
    _assert_nothing_left(store, pg17, big_db)


@fault("connection terminated mid-dump (pg_terminate_backend)")
def test_a_workers_connection_terminated_mid_copy_fails_the_run_naming_the_cause(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    terminated: list[str] = []  # the COPY whose backend was terminated
    copying: list[int] = []

    def terminate(request: Any) -> None:
        copies = _copies(pg17, big_db)
        copying.append(len(child_pids("psql")))
        for pid, query in copies:
            if "ctid" in query:  # a range of blob, being copied
                [(done,)] = pg17.execute(f"SELECT pg_terminate_backend({pid})")
                if done:
                    terminated.append(query)
                return

    _on(s3, "UploadPart", _once(terminate, lambda r: "/tables/" in _target(r)[0]))
    with pytest.raises(DumpFailed) as caught:
        _backup(pg17, big_db, store, inbox)
    (copy,) = terminated
    assert copying[0] >= 2  # other workers were copying then
    where = _range_of(copy)
    message = str(caught.value)
    # one error: the terminated worker's, naming its range and the lost connection (psql's
    # exit status 2, and the server's FATAL when it could send one between two rows), not
    # the others', which were killed once it failed
    cause = (re.escape(f"COPY of {where} failed (exit status 2): ")
             + "(FATAL:  terminating connection due to administrator command"
             + "|COPY data transfer failed: server closed the connection unexpectedly"
             + "|connection to server was lost)")
    assert re.match(cause, message), message
    assert "the connection was lost mid-dump" in message, message
    body = _assert_nothing_committed(s3, inbox, earlier_backup, "^" + cause)
    assert body["error_type"] == "DumpFailed"
    assert body["what_to_do"].startswith("the connection was lost mid-dump")
    _assert_nothing_left(store, pg17, big_db)


@fault("server restarted mid-run")
def test_server_restarted_mid_run_stores_nothing(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    restarted: list[bool] = []

    def restart(request: Any) -> None:
        restarted.append(True)
        pg17.restart()

    _on(s3, "UploadPart", _once(restart, lambda r: "/tables/" in _target(r)[0]))
    with pytest.raises(SupabackupError):
        _backup(pg17, big_db, store, inbox)
    assert restarted == [True]
    _assert_nothing_committed(s3, inbox, earlier_backup,
                              "terminat|connection|shut ?down|closed|lost")
    _assert_nothing_left(store, pg17, big_db)


def _killed_mid_upload(pg17: Cluster, big_db: str, local_s3: Any, tmp_path: Path,
                       bucket: str) -> list[int] | None:
    """Start `supabackup backup full` into `bucket` and SIGKILL it while its psql workers
    run and a table part's upload is open; their pids, or None if it ended first."""
    client = local_s3.client()
    exe = str(Path(sys.executable).with_name("supabackup"))
    run = subprocess.Popen([exe, "backup", "full", "--database-url", pg17.url(big_db),
                            "--store", f"s3://{bucket}/b", "--jobs", str(JOBS)],
                           env={**os.environ, **local_s3.env()}, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ((copies := child_pids("psql", run.pid))
                   and any("/tables/" in k for k in open_uploads(client, bucket))):
            if run.poll() is not None:
                return None
            assert time.monotonic() < deadline, "the run never reached its table parts"
            time.sleep(0.02)
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(timeout=10) == -signal.SIGKILL
        return copies
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


@fault("the backup process killed with SIGKILL mid-run")
def test_a_run_killed_mid_upload_leaves_no_backup_and_what_it_leaves_expires(
        pg17: Cluster, big_db: str, local_s3: Any, tmp_path: Path) -> None:
    """A process killed outright (the OOM killer, a host lost) cleans nothing: what it
    uploaded stays, but without its manifest none of it is a backup; S3's lifecycle aborts
    its open uploads, its lease expires, and its children end by themselves."""
    client = local_s3.client()
    # WHEN it is killed as its workers copy and upload table parts; a run that ends
    # before the poll sees that moment (a quiet machine) is tried again, in a new bucket
    for attempt in range(3):
        bucket = f"killed-run-{attempt}"
        local_s3.create_bucket(bucket)
        copies = _killed_mid_upload(pg17, big_db, local_s3, tmp_path, bucket)
        if copies is not None:
            break
    assert copies is not None, "three runs ended before they could be killed"
    # THEN its psql children and their server sessions end by themselves
    assert _settled(lambda: [pid for pid in copies if _running(pid)], 30) == []
    assert _settled(lambda: _run_backends(pg17, big_db), 30) == []
    # no backup exists: no manifest, so nothing is listed or verified
    store = Store(StoreURL.parse(f"s3://{bucket}/b"), client)
    database_id = _conn(pg17, big_db).database_id
    assert store.manifests(database_id) == []
    with pytest.raises(BackupNotFound, match="no backup of"):
        verify_database(store, database_id)
    left = stored_keys(client, bucket)
    assert not [k for k in left if k.endswith("/manifest.json")]
    # what it wrote stays, all in its own folder, tagged so that its retention class's
    # lifecycle rule expires it ...
    lease = store.key(database_id, "locks", "backup.json")
    written = [k for k in left if k != lease]
    backups = store.key(database_id, "backups") + "/"
    assert lease in left and written and all(k.startswith(backups) for k in written), left
    assert len({k[len(backups):].split("/", 1)[0] for k in written}) == 1, written
    for key in written:
        tags = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        assert {"Key": "retention", "Value": "daily"} in tags, (key, tags)
    assert "daily" in retention_days()
    # ... and its open uploads stay open ...
    uploads = open_uploads(client, bucket)
    assert uploads and all(f"/{database_id}/backups/" in k for k in uploads), uploads
    # ... until the bucket's lifecycle aborts them, a day on: one rule, for every key
    rules = sam_template()["Resources"]["BackupBucket"]["Properties"][
        "LifecycleConfiguration"]["Rules"]
    aborting = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert len(aborting) == 1 and aborting[0]["Status"] == "Enabled"
    assert aborting[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert not {"Prefix", "TagFilters", "Filter"} & set(aborting[0])
    # and the next run, while the lease lasts, fails clearly, naming the killed run
    with pytest.raises(RunInProgress, match=r"another backup of .* is in progress: cli run"):
        run_backup(_conn(pg17, big_db), store, BackupRequest(jobs=JOBS))
    assert stored_keys(client, bucket) == left


def _running(pid: int) -> bool:
    """Whether `pid` still runs (an orphan nobody reaps stays a zombie: it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- S3 fails ------------------------------------------------------------------------------


@pytest.mark.parametrize("status, code", [(500, "InternalError"), (503, "ServiceUnavailable"),
                                          (503, "SlowDown")])
@fault("S3 500, 503 or SlowDown on one part (transient)")
def test_a_transient_s3_error_on_one_part_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str], status: int, code: str) -> None:
    name = _part(pg17, big_db, "blob")
    seen = _on(s3, "UploadPart", _once(_error(status, code), _is_part(name, 2)))
    manifest = _backup(pg17, big_db, store, inbox)
    _assert_sent_once_but(seen, (name, 2))  # every part once, that one twice
    _assert_one_good_backup(s3, store, inbox, earlier_backup, manifest)


@fault("S3 failing for good on one table part")
def test_s3_failing_for_good_on_a_table_part_stores_nothing_and_stops_the_other_workers(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt at part 2 of blob's first range fails. The other range's upload is
    held from its first part on, so its psql stays mid-stream (blocked on its pipe) until
    the run stops it: the run must stop it itself, not let it run to its end."""
    monkeypatch.setenv(SPLIT_ENV, str(RANGE_BYTES * 3 // 2))  # 2 ranges of 3 parts each
    name = _part(pg17, big_db, "blob")
    failing = _error(500, "InternalError")
    failed, released = threading.Event(), threading.Event()
    others: list[list[int]] = []  # the psql copying blob's other range, as the part fails
    stopped: list[bool] = []

    def upload_part(request: Any) -> Any:
        key, part = _target(request)
        if key.endswith("/" + name):
            if part >= 2:
                failed.set()
                return failing(request)
            return None
        released.wait(timeout=60)
        return None

    def watch() -> None:
        if failed.wait(timeout=60):
            others.append([pid for pid in child_pids("psql")
                           if "ctid >= '(0,0)'" not in _copy_of(pid)])
            stopped.append(_settled(lambda: [p for p in others[0] if _running(p)], 30) == [])
        released.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    seen = _on(s3, "UploadPart", upload_part)
    try:
        with pytest.raises(StoreError, match=rf"^S3 InternalError on \S+/{re.escape(name)}"):
            _backup(pg17, big_db, store, inbox)
    finally:
        failed.set()
        released.set()
        watcher.join(timeout=60)
    attempts = [t for t in seen if t[0].endswith("/" + name) and t[1] == 2]
    assert len(attempts) == ATTEMPTS  # retried, then final
    assert others and len(others[0]) >= 1, others  # another worker was mid-stream then
    assert stopped == [True], "the other workers ran on after the failure"
    _assert_nothing_committed(s3, inbox, earlier_backup,
                              rf"^S3 InternalError on \S+/{re.escape(name)}")
    _assert_nothing_left(store, pg17, big_db)


def _copy_of(pid: int) -> str:
    """The COPY a psql child runs ("" once it is gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((a.decode() for a in argv if a.startswith(b"COPY")), "")


@fault("S3 read timeout on one part (transient)")
def test_a_timeout_on_one_part_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    def time_out(request: Any) -> None:
        raise ReadTimeoutError(endpoint_url=request.url)

    name = _part(pg17, big_db, "blob", RANGES - 1)
    seen = _on(s3, "UploadPart", _once(time_out, _is_part(name, 2)))
    manifest = _backup(pg17, big_db, store, inbox)
    _assert_sent_once_but(seen, (name, 2))
    _assert_one_good_backup(s3, store, inbox, earlier_backup, manifest)


def _ok_with_error_body(request: Any) -> AWSResponse:
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")
    return AWSResponse(request.url, 200, {}, MockRawResponse(body))


@fault("HTTP 200 with an error body on CompleteMultipartUpload (transient)")
def test_200_with_an_error_body_on_complete_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    created = _on(s3, "CreateMultipartUpload", lambda request: None)
    completed = _on(s3, "CompleteMultipartUpload", _once(_ok_with_error_body))
    manifest = _backup(pg17, big_db, store, inbox)
    assert len(created) >= RANGES  # every range of blob is a multipart upload
    # every upload completed once, the first one twice
    assert sorted(set(completed)) == sorted(created) and len(completed) == len(created) + 1
    _assert_one_good_backup(s3, store, inbox, earlier_backup, manifest)


@fault("HTTP 200 with an error body on every CompleteMultipartUpload")
def test_200_with_an_error_body_for_good_is_a_failure_not_a_backup(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    _on(s3, "CompleteMultipartUpload", _ok_with_error_body)
    with pytest.raises(StoreError, match=r"^S3 InternalError on \S+/tables/"):
        _backup(pg17, big_db, store, inbox)
    _assert_nothing_committed(s3, inbox, earlier_backup, "S3 InternalError")
    _assert_nothing_left(store, pg17, big_db)


@fault("failed manifest put")
def test_failed_manifest_put_stores_nothing(pg17: Cluster, big_db: str, store: Store, s3: Any,
                                            inbox: Inbox, earlier_backup: list[str]) -> None:
    refuse = _error(403, "AccessDenied")
    seen = _on(s3, "PutObject",
               lambda r: refuse(r) if _target(r)[0].endswith("/manifest.json") else None)
    with pytest.raises(StoreError, match=r"^S3 AccessDenied on \S+/manifest.json"):
        _backup(pg17, big_db, store, inbox)
    assert [k for k, _ in seen if k.endswith("/manifest.json")] != []  # it got that far
    _assert_nothing_committed(s3, inbox, earlier_backup, "AccessDenied")
    _assert_nothing_left(store, pg17, big_db)


# --- access ----------------------------------------------------------------------------------


@fault("KMS access denied (not transient: not retried)")
def test_kms_access_denied_is_not_retried_and_names_kms(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    # The bucket's KMS key refuses every object the run writes into its backup's folder
    # (the first is roles.sql, a PutObject; table parts open multipart uploads).
    denied = _error(403, "AccessDenied", "User: arn:aws:sts::123456789012:assumed-role/"
                    "supabackup is not authorized to perform: kms:GenerateDataKey on resource")
    folder = f"/{_conn(pg17, big_db).database_id}/backups/"

    def deny(request: Any) -> AWSResponse | None:
        return denied(request) if folder in _target(request)[0] else None

    puts = _on(s3, "PutObject", deny)
    creates = _on(s3, "CreateMultipartUpload", deny)
    with pytest.raises(StoreError, match=r"^S3 AccessDenied on \S+/roles\.sql: .*kms:Generate"):
        _backup(pg17, big_db, store, inbox)
    # an authorization error is final: one attempt, and the run went no further
    assert [k.rsplit("/", 1)[1] for k, _ in puts + creates if folder in k] == ["roles.sql"]
    _assert_nothing_committed(s3, inbox, earlier_backup, "kms:GenerateDataKey")
    _assert_nothing_left(store, pg17, big_db)


@pytest.mark.parametrize("secret", [None, "not json"], ids=["missing", "malformed"])
@fault("the database secret missing or malformed")
def test_a_missing_or_malformed_secret_fails_clearly_and_stores_nothing(
        deployed: dict[str, Any], s3: Any, inbox: Inbox, monkeypatch: pytest.MonkeyPatch,
        secret: str | None) -> None:
    if secret is None:
        monkeypatch.setenv("SUPABACKUP_DB_SECRET_ARN", deployed["arn"] + "-gone")
    else:
        deployed["secrets"].put_secret_value(SecretId=deployed["arn"], SecretString=secret)
    with pytest.raises(ConfigError, match="secret"):
        backup_handler.handler(load_event("backup-full-manual.json"), FakeContext())
    assert stored_keys(s3) == [] and open_uploads(s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert "secret" in msg["Message"]["error"]
    assert secret is None or secret not in json.dumps(msg)


# --- notification ------------------------------------------------------------------------------


@fault("SNS publish failing (the backup still counts)")
def test_a_failed_publish_never_fails_a_good_backup(pg15: Cluster, new_db: Any, store: Store,
                                                    s3: Any, inbox: Inbox) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    sns = boto3.client("sns", region_name=REGION, config=BOTO_CONFIG)
    denied = b"<ErrorResponse><Error><Type>Sender</Type><Code>AuthorizationError</Code>" \
             b"<Message>injected</Message></Error></ErrorResponse>"
    attempts: list[int] = []

    def deny(request: Any, **_: Any) -> AWSResponse:
        attempts.append(1)
        return AWSResponse(request.url, 403, {}, MockRawResponse(denied))
    sns.meta.events.register_first("before-send.sns.Publish", deny)
    notifier = Notifier(inbox.topic_arn, sns)
    manifest, _ = backup_and_report(_conn(pg15, db), store, BackupRequest(), notifier)
    assert notifier.failures == 1 and len(attempts) == 1  # counted, and not retried
    assert any(k.endswith(f"{manifest.backup_id}/manifest.json") for k in stored_keys(s3))


@fault("SNS 500 once (transient)")
def test_a_transient_sns_error_is_retried(pg15: Cluster, new_db: Any, store: Store,
                                         inbox: Inbox) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int)", db)
    sns = boto3.client("sns", region_name=REGION, config=BOTO_CONFIG)
    body = b"<ErrorResponse><Error><Type>Receiver</Type><Code>InternalError</Code>" \
           b"<Message>injected</Message></Error></ErrorResponse>"
    fail_once = _once(lambda r: AWSResponse(r.url, 500, {}, MockRawResponse(body)))
    attempts: list[int] = []

    def hook(request: Any, **_: Any) -> Any:
        attempts.append(1)
        return fail_once(request)
    sns.meta.events.register_first("before-send.sns.Publish", hook)
    notifier = Notifier(inbox.topic_arn, sns)
    backup_and_report(_conn(pg15, db), store, BackupRequest(), notifier)
    assert notifier.failures == 0 and len(attempts) == 2  # failed once, retried, sent
    # (moto lets the injected attempt through to its topic as well: a real SNS would
    # never have received it, so only the statuses are asserted here)
    statuses = {m["MessageAttributes"]["status"]["Value"] for m in inbox.messages()}
    assert statuses == {"succeeded"}


# --- Lambda's time limit ---------------------------------------------------------------------


@fault("a backup that cannot fit in the time left")
def test_a_backup_that_will_not_fit_fails_before_dumping(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    # GIVEN recent backups whose pace says this one needs far more than is left
    first = _backup(pg17, big_db, store, inbox)
    inbox.messages()
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=store.backup_key(
        first.database_id, first.backup_id, "manifest.json"))["Body"].read())
    doc["started_at"] = iso(utcnow().replace(year=2000))  # it took 26 years
    s3.put_object(Bucket=BUCKET, Key=store.backup_key(first.database_id, first.backup_id,
                                                      "manifest.json"), Body=json.dumps(doc))
    before = stored_keys(s3)
    with pytest.raises(TimeLimitExceeded, match="would take about .* but .* are left"):
        _backup(pg17, big_db, store, inbox, BackupRequest(time_limit=MARGIN + 600, jobs=JOBS))
    _assert_nothing_committed(s3, inbox, before, "would take about")


def test_the_watchdog_kills_what_it_guards_at_the_margin() -> None:
    budget = Budget(seconds=MARGIN + 0.5)
    sleeper = subprocess.Popen(["sleep", "30"])
    started = time.monotonic()
    budget.on_expiry(sleeper.kill)
    assert sleeper.wait(timeout=10) == -9
    assert 0.3 < time.monotonic() - started < 5 and budget.expired
    late = subprocess.Popen(["sleep", "30"])
    budget.on_expiry(late.kill)  # registered after expiry: stopped at once
    assert late.wait(timeout=5) == -9


@fault("the time limit reached mid-run")
def test_a_run_stops_cleanly_before_the_time_limit(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    # The first part of every table part's upload stalls past the point where the
    # watchdog fires (3 s in): the run stops its workers, or, if they have finished, does
    # not commit.
    stalled = _on(s3, "UploadPart", lambda r: time.sleep(5) if _target(r)[1] == 1 else None)
    with pytest.raises(TimeLimitExceeded, match="stopped 60 s before the time limit"):
        _backup(pg17, big_db, store, inbox, BackupRequest(time_limit=MARGIN + 3, jobs=JOBS))
    assert len({k for k, _ in stalled}) >= 2  # several workers were uploading then
    _assert_nothing_committed(s3, inbox, earlier_backup, "stopped 60 s before")
    _assert_nothing_left(store, pg17, big_db)


# --- duplicate and concurrent runs -------------------------------------------------------------

TICK = "2026-11-29T03:00:00.000000Z"


@fault("a schedule tick delivered twice")
def test_two_deliveries_of_one_tick_make_one_backup(pg15: Cluster, new_db: Any, store: Store,
                                                    s3: Any, inbox: Inbox) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    request = BackupRequest(trigger="schedule", tick=TICK, backup_id="20261129T030000Z-full")
    results: list[Any] = []

    def deliver() -> None:
        try:
            results.append(_backup(pg15, db, store, inbox, request))
        except (DuplicateRun, RunInProgress) as exc:
            results.append(exc)

    # at once (one finds the other's lease) ...
    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # ... and once more afterwards (it finds the tick's backup)
    with pytest.raises(DuplicateRun, match="already has its backup, 20261129T030000Z-full"):
        _backup(pg15, db, store, inbox, request)
    manifests = [r for r in results if isinstance(r, Manifest)]
    assert len(manifests) == 1, results
    assert [type(r).__name__ for r in results if not isinstance(r, Manifest)] == ["DuplicateRun"]
    assert len([k for k in stored_keys(s3) if k.endswith("manifest.json")]) == 1
    # the duplicates report nothing: one message, the first delivery's
    assert [m["MessageAttributes"]["status"]["Value"] for m in inbox.messages()] == [
        "succeeded"]
    assert not [k for k in stored_keys(s3) if "/locks/" in k]  # the lease was released


def _during_upload(s3: Any, start: Callable[[], Any]) -> list[RunInProgress]:
    """Start a second run as the first uploads its first part; what refused it."""
    refused: list[RunInProgress] = []

    def attempt(request: Any) -> None:
        try:
            start()
        except RunInProgress as exc:
            refused.append(exc)

    _on(s3, "UploadPart", _once(attempt))
    return refused


@fault("a manual run while another run is in flight")
def test_a_run_in_flight_makes_a_second_run_fail_clearly(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    second = _during_upload(s3, lambda: run_backup(_conn(pg17, big_db), store,
                                                   BackupRequest(label="manual", jobs=JOBS)))
    first = _backup(pg17, big_db, store, inbox)
    assert second and "another backup of" in str(second[0]) and "in progress" in str(second[0])
    _assert_one_good_backup(s3, store, inbox, earlier_backup, first)


@fault("a second run against the same database from another store")
def test_the_advisory_lock_keeps_two_stores_from_dumping_one_database_at_once(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    other = Store(StoreURL.parse(f"s3://{BUCKET}/elsewhere"), s3)
    second = _during_upload(s3, lambda: run_backup(_conn(pg17, big_db), other,
                                                   BackupRequest(jobs=JOBS)))
    first = _backup(pg17, big_db, store, inbox)
    assert second and "holds the database's advisory lock" in str(second[0])
    assert not [k for k in stored_keys(s3) if "/elsewhere/" in k and "/locks/" not in k]
    _assert_one_good_backup(s3, store, inbox, earlier_backup, first)


@fault("a run killed without releasing its lease")
def test_the_lease_of_a_killed_run_expires_and_the_next_run_takes_over(
        pg15: Cluster, new_db: Any, store: Store, s3: Any, inbox: Inbox) -> None:
    db = new_db(pg15)
    pg15.execute("CREATE TABLE t (id int)", db)
    database_id = _conn(pg15, db).database_id
    # GIVEN a lease left by a run that was killed 21 minutes ago
    stale = utcnow() - locks.LEASE - locks.LEASE / 20
    locks.acquire(store, database_id, "schedule run dead", now=lambda: stale)
    # WHEN the next run starts THEN it takes the lease over and backs up
    manifest = _backup(pg15, db, store, inbox)
    assert manifest.kind == "full"
    assert not [k for k in stored_keys(s3) if "/locks/" in k]
    # while a live lease makes a run wait, then fail, naming the holder
    locks.acquire(store, database_id, "schedule run alive")
    with pytest.raises(RunInProgress, match="schedule run alive"):
        locks.acquire(store, database_id, "manual run", wait=10, sleep=lambda s: None)


def test_a_run_longer_than_its_lease_keeps_it_renewed(store: Store) -> None:
    """A Fargate backup takes hours; the lease (LEASE) is renewed while it runs, so the
    next run waits or leaves as for a live run, and does not take the lease over."""
    hold = timedelta(seconds=2)
    lease = locks.acquire(store, "long", "fargate run", hold=hold)
    with locks.Renewer(store, lease, hold=hold, every=0.3):
        time.sleep(3)  # past the hold it was taken with
        with pytest.raises(RunInProgress, match="fargate run"):
            locks.acquire(store, "long", "next run", hold=hold)
    time.sleep(2.5)  # the renewals stopped with the run: the lease now lapses
    assert locks.acquire(store, "long", "next run", hold=hold).owner == "next run"


# --- local disk ---------------------------------------------------------------------------------


@fault("local disk (a run writes nothing but its output)")
def test_a_backup_writes_nothing_to_local_disk(pg17: Cluster, big_db: str, local_s3: Any,
                                               tmp_path: Path) -> None:
    """GNU time's %O counts the file-system writes of the run and all its children."""
    local_s3.create_bucket("disk-check")
    env = {**os.environ, **local_s3.env(), "TMPDIR": str(tmp_path), "HOME": str(tmp_path),
           "PYTHONDONTWRITEBYTECODE": "1"}
    exe = str(Path(sys.executable).with_name("supabackup"))
    run = subprocess.run(["/usr/bin/time", "-f", "%O", exe, "backup", "full",
                          "--database-url", pg17.url(big_db), "--store", "s3://disk-check/b",
                          "--jobs", str(JOBS)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    blocks = int(run.stderr.strip().splitlines()[-1])
    print(f"file-system writes of the run and its children: {blocks} blocks of 512 bytes")
    assert blocks * 512 <= 64 * 1024, f"{blocks} blocks written"
    assert list(tmp_path.iterdir()) == []
    archive = int(re.search(r": ([\d.]+) MiB", run.stdout).group(1).split(".")[0])  # type: ignore[union-attr]
    assert archive >= 10  # while the archive it streamed was over 10 MiB


def test_readme_tabulates_every_fault_of_the_suite() -> None:
    table = (REPO / "README.md").read_text().split("### Faults", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    named = {row.split("|")[1].strip() for row in rows[1:]}
    assert named == set(FAULTS), set(FAULTS) ^ named
    assert "0 backups committed wrongly" in table and "0 silent failures" in table
