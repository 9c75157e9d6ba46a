"""The fault suite: every way a run can fail on its worst day, injected, and what it leaves.

For each fault the suite checks what a user would: a failed backup has no manifest, no
multipart upload is left open, the earlier backup is untouched, the failure message
names the cause; and a transient fault is retried and the run succeeds. README.md
("Faults") tabulates the faults and their outcomes; a test keeps the table and this
suite in step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from supabackup.store import BOTO_CONFIG, Store, StoreURL

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
    stored_keys,
)

REGION = "us-east-1"
# Every fault this suite injects, by the name README.md's table gives it.
FAULTS: dict[str, str] = {}


def fault(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a test as the one that injects `name` (README.md lists each)."""
    def register(test: Callable[..., None]) -> Callable[..., None]:
        FAULTS[name] = test.__name__
        return test
    return register


def _conn(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


@pytest.fixture(scope="module")
def big_db(pg17: Cluster) -> str:
    """~60 MB of poorly compressible rows: the dump spans many 5 MiB parts."""
    name = "bigdb_failures"
    pg17.drop_database(name)
    pg17.create_database(name)
    pg17.execute("""
        CREATE TABLE blob (id int PRIMARY KEY, body text);
        INSERT INTO blob SELECT g, md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text)
                                 || md5((g + 3)::text)
          FROM generate_series(1, 450000) g;
    """, name)
    return name


@pytest.fixture
def earlier_backup(pg17: Cluster, big_db: str, s3: Any) -> list[str]:
    """A good backup taken before the failing one: it must survive untouched."""
    earlier = Store(StoreURL.parse(f"s3://{BUCKET}/backups"), s3)
    run_backup(_conn(pg17, big_db), earlier, BackupRequest(database_id="earlier"))
    return stored_keys(s3)


def _on(s3: Any, operation: str, action: Callable[[Any], Any]) -> list[int]:
    """Run `action(request)` as each `operation` request is about to be sent; returns the
    list of attempt counts, one entry per request seen."""
    seen: list[int] = []

    def hook(request: Any, **_: Any) -> Any:
        seen.append(1)
        return action(request)
    s3.meta.events.register_first(f"before-send.s3.{operation}", hook)
    return seen


def _part_number(request: Any) -> int:
    return int(request.url.split("partNumber=")[1].split("&")[0])


def _error(status: int, code: str, message: str = "injected") -> Callable[[Any], AWSResponse]:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    return lambda request: AWSResponse(request.url, status, {}, MockRawResponse(body))


def _once(respond: Callable[[Any], Any], when: Callable[[Any], bool] = lambda r: True
          ) -> Callable[[Any], Any]:
    """`respond` to the first request `when` accepts, then let every request through."""
    fired: list[bool] = []

    def action(request: Any) -> Any:
        if not fired and when(request):
            fired.append(True)
            return respond(request)
        return None
    return action


def _assert_nothing_committed(s3: Any, inbox: Inbox, earlier: list[str],
                              cause: str) -> dict[str, Any]:
    assert stored_keys(s3) == earlier, "a failed run must leave no object behind"
    assert not [k for k in stored_keys(s3) if k.endswith("manifest.json")
                and k not in earlier], "a failed run must leave no manifest"
    assert open_uploads(s3) == [], "a failed run must leave no multipart upload open"
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert re.search(cause, msg["Message"]["error"]), msg["Message"]["error"]
    return msg["Message"]


def _assert_one_good_backup(s3: Any, inbox: Inbox, earlier: list[str],
                            manifest: Manifest) -> None:
    new = [k for k in stored_keys(s3) if k not in earlier]
    assert sorted(k.rsplit("/", 1)[1] for k in new) == [
        "database.dump", "manifest.json", "roles.sql"]
    assert all(manifest.backup_id in k for k in new)
    assert open_uploads(s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "succeeded"


def _backup(pg17: Cluster, db: str, store: Store, inbox: Inbox,
            request: BackupRequest | None = None) -> Manifest:
    manifest, _ = backup_and_report(_conn(pg17, db), store, request or BackupRequest(),
                                    Notifier(inbox.topic_arn, inbox.sns))
    return manifest


# --- the dump fails ----------------------------------------------------------------------


@fault("pg_dump killed with SIGKILL mid-stream")
def test_pg_dump_killed_mid_stream_stores_nothing_and_reports_the_signal(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    killed: list[int] = []
    _on(s3, "UploadPart", _once(lambda request: killed.append(kill_children("pg_dump"))))
    with pytest.raises(DumpFailed, match="killed by signal 9"):
        _backup(pg17, big_db, store, inbox)
    assert killed == [1]
    body = _assert_nothing_committed(s3, inbox, earlier_backup, "pg_dump failed")
    assert body["error_type"] == "DumpFailed"


@fault("connection terminated mid-dump (pg_terminate_backend)")
def test_connection_terminated_mid_dump_stores_nothing_and_names_the_cause(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    terminated: list[int] = []

    def terminate(request: Any) -> None:
        terminated.append(len(pg17.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'supabackup pg_dump'")))

    _on(s3, "UploadPart", _once(terminate))
    with pytest.raises(DumpFailed) as caught:
        _backup(pg17, big_db, store, inbox)
    assert terminated == [1]
    assert "pg_dump failed (exit status 1)" in str(caught.value)
    _assert_nothing_committed(s3, inbox, earlier_backup, "terminat|connection")


@fault("server restarted mid-run")
def test_server_restarted_mid_run_stores_nothing(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    restarted: list[bool] = []

    def restart(request: Any) -> None:
        restarted.append(True)
        pg17.restart()

    _on(s3, "UploadPart", _once(restart))
    with pytest.raises(SupabackupError):
        _backup(pg17, big_db, store, inbox)
    assert restarted == [True]
    _assert_nothing_committed(s3, inbox, earlier_backup,
                              "terminat|connection|shut ?down|closed|lost")


# --- S3 fails ------------------------------------------------------------------------------


@pytest.mark.parametrize("status, code", [(500, "InternalError"), (503, "ServiceUnavailable"),
                                          (503, "SlowDown")])
@fault("S3 500, 503 or SlowDown on one part (transient)")
def test_a_transient_s3_error_on_one_part_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str], status: int, code: str) -> None:
    seen = _on(s3, "UploadPart", _once(_error(status, code), lambda r: _part_number(r) == 3))
    manifest = _backup(pg17, big_db, store, inbox)
    parts = -(-manifest.object("database").size // store.min_part_size)
    assert len(seen) == parts + 1  # every part once, part 3 twice
    _assert_one_good_backup(s3, inbox, earlier_backup, manifest)


@fault("S3 failing on every part from the third on")
def test_s3_failing_for_good_mid_upload_stores_nothing_and_stops_pg_dump(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    failing = _error(500, "InternalError")
    _on(s3, "UploadPart", lambda r: failing(r) if _part_number(r) >= 3 else None)
    with pytest.raises(StoreError, match="InternalError"):
        _backup(pg17, big_db, store, inbox)
    assert child_pids("pg_dump") == []
    _assert_nothing_committed(s3, inbox, earlier_backup, "InternalError")


@fault("S3 read timeout on one part (transient)")
def test_a_timeout_on_one_part_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    def time_out(request: Any) -> None:
        raise ReadTimeoutError(endpoint_url=request.url)

    seen = _on(s3, "UploadPart", _once(time_out, lambda r: _part_number(r) == 2))
    manifest = _backup(pg17, big_db, store, inbox)
    assert len(seen) == -(-manifest.object("database").size // store.min_part_size) + 1
    _assert_one_good_backup(s3, inbox, earlier_backup, manifest)


def _ok_with_error_body(request: Any) -> AWSResponse:
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")
    return AWSResponse(request.url, 200, {}, MockRawResponse(body))


@fault("HTTP 200 with an error body on CompleteMultipartUpload (transient)")
def test_200_with_an_error_body_on_complete_is_retried_and_the_run_succeeds(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    seen = _on(s3, "CompleteMultipartUpload", _once(_ok_with_error_body))
    manifest = _backup(pg17, big_db, store, inbox)
    assert len(seen) == 2
    _assert_one_good_backup(s3, inbox, earlier_backup, manifest)


@fault("HTTP 200 with an error body on every CompleteMultipartUpload")
def test_200_with_an_error_body_for_good_is_a_failure_not_a_backup(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    _on(s3, "CompleteMultipartUpload", _ok_with_error_body)
    with pytest.raises(StoreError, match="InternalError"):
        _backup(pg17, big_db, store, inbox)
    _assert_nothing_committed(s3, inbox, earlier_backup, "InternalError")


@fault("failed manifest put")
def test_failed_manifest_put_stores_nothing(pg17: Cluster, big_db: str, store: Store, s3: Any,
                                            inbox: Inbox, earlier_backup: list[str]) -> None:
    refuse = _error(403, "AccessDenied")
    _on(s3, "PutObject",
        lambda r: refuse(r) if r.url.split("?")[0].endswith("/manifest.json") else None)
    with pytest.raises(StoreError, match="AccessDenied"):
        _backup(pg17, big_db, store, inbox)
    _assert_nothing_committed(s3, inbox, earlier_backup, "AccessDenied")


# --- access ----------------------------------------------------------------------------------


@fault("KMS access denied (not transient: not retried)")
def test_kms_access_denied_is_not_retried_and_names_kms(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    denied = _error(403, "AccessDenied", "User: arn:aws:sts::123456789012:assumed-role/"
                    "supabackup is not authorized to perform: kms:GenerateDataKey on resource")
    seen = _on(s3, "CreateMultipartUpload", denied)
    with pytest.raises(StoreError, match="kms:GenerateDataKey"):
        _backup(pg17, big_db, store, inbox)
    assert len(seen) == 1  # an authorization error is final
    assert child_pids("pg_dump") == []
    _assert_nothing_committed(s3, inbox, earlier_backup, "kms:GenerateDataKey")


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
        _backup(pg17, big_db, store, inbox, BackupRequest(time_limit=MARGIN + 600))
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
    # The upload of part 1 stalls past the point where the watchdog fires (3 s in): the
    # run stops pg_dump, or, if pg_dump has finished, does not commit.
    _on(s3, "UploadPart", lambda r: time.sleep(5) if _part_number(r) == 1 else None)
    with pytest.raises(TimeLimitExceeded, match="stopped 60 s before the time limit"):
        _backup(pg17, big_db, store, inbox, BackupRequest(time_limit=MARGIN + 3))
    assert child_pids("pg_dump") == []
    _assert_nothing_committed(s3, inbox, earlier_backup, "stopped 60 s before")


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
                                                   BackupRequest(label="manual")))
    first = _backup(pg17, big_db, store, inbox)
    assert second and "another backup of" in str(second[0]) and "in progress" in str(second[0])
    _assert_one_good_backup(s3, inbox, earlier_backup, first)


@fault("a second run against the same database from another store")
def test_the_advisory_lock_keeps_two_stores_from_dumping_one_database_at_once(
        pg17: Cluster, big_db: str, store: Store, s3: Any, inbox: Inbox,
        earlier_backup: list[str]) -> None:
    other = Store(StoreURL.parse(f"s3://{BUCKET}/elsewhere"), s3)
    second = _during_upload(s3, lambda: run_backup(_conn(pg17, big_db), other, BackupRequest()))
    first = _backup(pg17, big_db, store, inbox)
    assert second and "holds the database's advisory lock" in str(second[0])
    assert not [k for k in stored_keys(s3) if "/elsewhere/" in k and "/locks/" not in k]
    _assert_one_good_backup(s3, inbox, earlier_backup, first)


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
                          "--database-url", pg17.url(big_db), "--store", "s3://disk-check/b"],
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
