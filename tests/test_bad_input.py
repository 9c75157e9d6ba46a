"""Every kind of bad input gets a clear error, and nothing half-written counts as a backup."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError, ConnectionFailed, StoreError, ToolError
from supabackup.notify import Notifier
from supabackup.report import backup_and_report
from supabackup.store import Store, StoreURL

from devkit.pg import PG15_BINDIR, Cluster, free_port

from .helpers import Inbox, open_uploads, stored_keys

SECRET = "Sup3r-S3cret-Pa55word"


def _fails(conn: ConnectionInfo, store: Store, inbox: Inbox, error: type[Exception],
           match: str, request: BackupRequest | None = None) -> dict[str, Any]:
    """Run a backup that must fail; check nothing was stored and one failure was sent."""
    with pytest.raises(error, match=match) as caught:
        backup_and_report(conn, store, request or BackupRequest(), Notifier(inbox.topic_arn))
    assert stored_keys(store.s3) == []
    assert open_uploads(store.s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert SECRET not in str(caught.value) and SECRET not in repr(msg)
    return msg


def test_wrong_password_says_so_and_stores_nothing(pg17: Cluster, store: Store,
                                                   inbox: Inbox) -> None:
    conn = ConnectionInfo.from_url(pg17.url(password=SECRET))
    msg = _fails(conn, store, inbox, ConnectionFailed, "password authentication failed")
    assert msg["Message"]["what_to_do"] == "check the user and password in the database URL or secret"


def test_unreachable_host_says_so_and_stores_nothing(store: Store, inbox: Inbox) -> None:
    conn = ConnectionInfo.from_url(f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/app")
    msg = _fails(conn, store, inbox, ConnectionFailed, "cannot connect to postgres@127.0.0.1:.*refused")
    assert "check the host and port" in msg["Message"]["what_to_do"]


def test_transaction_pooler_port_is_refused_with_the_session_pooler_url() -> None:
    url = f"postgresql://postgres.abcdefghij:{SECRET}@aws-0-us-east-1.pooler.supabase.com:6543/postgres"
    with pytest.raises(ConfigError) as caught:
        ConnectionInfo.from_url(url)
    text = str(caught.value)
    assert "port 6543 on aws-0-us-east-1.pooler.supabase.com is Supabase's transaction pooler" in text
    assert ("use the session pooler instead: postgresql://postgres.abcdefghij:[YOUR-PASSWORD]"
            "@aws-0-us-east-1.pooler.supabase.com:5432/postgres") in text
    assert SECRET not in text


def test_missing_bucket_fails_before_any_dump(pg15: Cluster, new_db: Any, s3: Any,
                                              inbox: Inbox) -> None:
    db = new_db(pg15)
    store = Store(StoreURL.parse("s3://no-such-bucket-here/x"), s3)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        backup_and_report(ConnectionInfo.from_url(pg15.url(db)), store, BackupRequest(),
                          Notifier(inbox.topic_arn))
    (msg,) = inbox.messages()
    assert msg["Message"]["error_type"] == "StoreError"


def test_unknown_profile_is_refused_before_connecting(store: Store, inbox: Inbox) -> None:
    conn = ConnectionInfo.from_url(f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/app")
    _fails(conn, store, inbox, ConfigError, "unknown profile 'mysql'",
           BackupRequest(profile="mysql"))


def test_server_newer_than_every_pg_dump_is_named(pg17: Cluster, new_db: Any, store: Store,
                                                  inbox: Inbox,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    db = new_db(pg17)
    monkeypatch.setenv("SUPABACKUP_PG_BINDIR", str(PG15_BINDIR))
    msg = _fails(ConnectionInfo.from_url(pg17.url(db)), store, inbox, ToolError,
                 r"no pg_dump/pg_restore of version 17 or newer to dump with \(found: 15\.\d+ in ")
    assert "SUPABACKUP_PG_BINDIR" in msg["Message"]["what_to_do"]


@pytest.mark.parametrize("url", [
    "mysql://root@localhost/db", "postgresql://", "postgresql://h:notaport/db",
    "postgresql://u:p@h/db?sslmode=require&evil=1",
])
def test_malformed_database_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="malformed|unsupported database URL parameter"):
        ConnectionInfo.from_url(url)


@pytest.mark.parametrize("secret", ['{"host": "h"}', "not json", "[]", '{"username": "u"}'])
def test_malformed_secret_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(ConfigError, match="the database secret is malformed") as caught:
        ConnectionInfo.from_secret(secret)
    assert secret not in str(caught.value)


def test_tls_is_required_off_loopback_unless_the_url_says_otherwise() -> None:
    assert ConnectionInfo.from_url("postgresql://u:p@db.example.com/d").sslmode == "require"
    assert ConnectionInfo.from_url("postgresql://u:p@127.0.0.1/d").sslmode == "prefer"
    assert ConnectionInfo.from_url(
        "postgresql://u:p@db.example.com/d?sslmode=verify-full").sslmode == "verify-full"
    secret = ConnectionInfo.from_secret(
        '{"host": "db.abc.supabase.co", "port": 5432, "username": "postgres", '
        '"password": "x", "dbname": "postgres"}')
    assert (secret.sslmode, secret.database_id) == ("require", "abc")


def test_no_password_in_logs_messages_or_errors_on_success_and_failure(
        pg17: Cluster, new_db: Any, store: Store, inbox: Inbox,
        caplog: pytest.LogCaptureFixture) -> None:
    db = new_db(pg17)
    pg17.execute(f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sb_secret_user')"
                 f" THEN CREATE ROLE sb_secret_user LOGIN SUPERUSER PASSWORD '{SECRET}'; END IF;"
                 f" END$$; CREATE TABLE t (id int); INSERT INTO t VALUES (1)", db)
    caplog.set_level(logging.DEBUG)
    good = ConnectionInfo.from_url(pg17.url(db, user="sb_secret_user", password=SECRET))
    manifest, _ = backup_and_report(good, store, BackupRequest(), Notifier(inbox.topic_arn))
    bad = ConnectionInfo.from_url(pg17.url(db, user="sb_secret_user", password=SECRET + "x"))
    with pytest.raises(ConnectionFailed) as caught:
        backup_and_report(bad, store, BackupRequest(), Notifier(inbox.topic_arn))
    published = repr(inbox.messages())
    stored = b"".join(store.s3.get_object(Bucket=store.url.bucket, Key=k)["Body"].read()
                      for k in stored_keys(store.s3))
    for text in (caplog.text, published, str(caught.value), repr(caught.value),
                 manifest.to_json().decode(), repr(good), stored.decode("latin-1")):
        assert SECRET not in text


# ---------------------------------------------------- failures that once read "unexpected error"


def test_a_line_pg_restore_lists_that_is_no_toc_entry_is_a_restore_failure() -> None:
    from supabackup.errors import RestoreFailed
    from supabackup.restore.toc import TocEntry
    entry = TocEntry.parse("3350; 0 16390 TABLE DATA public todos postgres", "B")
    assert (entry.desc, entry.schema, entry.name) == ("TABLE DATA", "public", "todos")
    with pytest.raises(RestoreFailed, match="pg_restore --list of B gave a line that is not"):
        TocEntry.parse("WARNING: archive made by a newer pg_dump", "B")


@pytest.mark.parametrize("name, body, match", [
    ("epochs/0000000001000000.json", b'{"slot": "s"}', "capture epoch .* is damaged"),
    ("epochs/0000000001000000.json", b"[1, 2]", "capture epoch .* is damaged"),
    ("index/0000000001000000.json", b'{"key": 7}', "capture index entry .* is damaged"),
    ("state.json", b"{not json", "capture state .* is damaged"),
])
def test_damaged_capture_records_fail_with_one_line_not_a_traceback(
        store: Store, capsys: pytest.CaptureFixture[str], name: str, body: bytes,
        match: str) -> None:
    """A capture record that is not one (damaged, or written by something else) is a store
    error with its key and what to do, for a restore to a time and for capture alike."""
    from supabackup import capture, cli
    from supabackup.manifest import new_backup_id, utcnow
    store.put_small(store.backup_key("db1", new_backup_id(utcnow(), "full"), "x"), b"")
    store.put_small(store.key("db1", "cdc", name), body)
    code = cli.main(["restore", "--store", str(store.url), "--database-id", "db1",
                     "--target-url", "postgresql://u@127.0.0.1:1/t",
                     "--at", "2026-11-30T12:00:00Z"])
    err = capsys.readouterr().err.strip()
    if name.startswith("epochs/"):
        assert code == StoreError.exit_code and len(err.splitlines()) == 1, err
        assert "unexpected" not in err and re.search(match, err), err
    with pytest.raises(StoreError, match=match):
        (capture.read_state if name == "state.json" else
         capture.segments if name.startswith("index/") else capture.epochs)(store, "db1")


def test_a_non_numeric_setting_in_the_functions_environment_is_refused_clearly(
        s3: Any, inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> None:
    from supabackup.handlers import capture as capture_handler
    from supabackup.handlers import common

    from .helpers import FakeContext
    monkeypatch.setenv("SUPABACKUP_MAX_RETAINED_WAL", "lots")
    monkeypatch.setattr(common, "clients", {"s3": s3, "sns": inbox.sns})
    monkeypatch.setenv("SUPABACKUP_SNS_TOPIC_ARN", inbox.topic_arn)
    with pytest.raises(ConfigError, match="SUPABACKUP_MAX_RETAINED_WAL is not a whole number"):
        capture_handler.handler({"action": "run"}, FakeContext())
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert "SUPABACKUP_MAX_RETAINED_WAL" in msg["Message"]["error"]


# ------------------------------------------------ what a second pair of eyes found, each a test


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The command line in-process: its exit status and its stderr."""
    from supabackup import cli
    code = cli.main(list(args))
    return code, capsys.readouterr().err.strip()


def _one_clear_line(code: int, err: str, expected: int = 1) -> None:
    assert code == expected and len(err.splitlines()) == 1, (code, err)
    assert "unexpected" not in err and err.startswith("supabackup: error: "), err


def _manifest(backup_id: str, snapshot_at: str, **fields: Any) -> bytes:
    from supabackup.manifest import Manifest, StoredObject
    return Manifest(
        backup_id=backup_id, database_id="db", kind="full", profile="postgres",
        retention="weekly", started_at=snapshot_at, finished_at=snapshot_at,
        snapshot_at=snapshot_at, snapshot_id="s", server_version="17.0", database="app",
        database_size=1, pg_dump="pg_dump", pg_dump_version="17.0",
        objects=[StoredObject("database.dump", "database", 1, "0" * 64, "custom")],
        **fields).to_json()


GOOD_AT = "2026-02-01T00:00:00.000000Z"


@pytest.mark.parametrize("change", [
    lambda m: [], lambda m: {**m, "started_at": "nope"}, lambda m: {**m, "snapshot_at": 5},
    lambda m: {**m, "label": 5}, lambda m: {**m, "backup_id": 5},
    lambda m: {**m, "objects": [{**m["objects"][0], "size": "big"}]},
    lambda m: {**m, "objects": []},
], ids=["a list", "bad started_at", "numeric snapshot_at", "numeric label",
        "numeric backup_id", "text size", "no database archive"])
def test_a_manifest_of_the_wrong_shape_is_named_damaged_by_every_command(
        store: Store, capsys: pytest.CaptureFixture[str], change: Any) -> None:
    import json
    good = json.loads(_manifest("20260201T000000Z-full", GOOD_AT))
    store.put_small(store.backup_key("db", "20260201T000000Z-full", "manifest.json"),
                    json.dumps(change(good)).encode())
    for args in (["list"], ["restore", "--dry-run", "--target-url", "postgresql://u@h/t",
                            "--at", "2026-06-01T00:00:00Z"]):
        code, err = _cli(capsys, *args, "--store", str(store.url))
        _one_clear_line(code, err)
        assert "is damaged" in err, err


@pytest.mark.parametrize("name, body", [
    ("epochs/0000000001000000.json", {"slot": "s", "plugin": "wal2json", "base": "b",
                                      "start_lsn": "0/1000000", "base_at": ""}),
    ("epochs/0000000001000000.json", {"slot": "s", "plugin": "wal2json", "base": "b",
                                      "start_lsn": "zz", "base_at": "2026-01-01T00:00:00Z"}),
    ("progress/0000000001000000.json", {"verified_lsn": "0/1000000", "verified_at": 7}),
    ("progress/0000000001000000.json", {"verified_lsn": "0/1000000",
                                        "verified_at": "2026-01-02T00:00:00Z",
                                        "sequences": {"public.s": [5]}}),
    ("epochs/0000000001000000.json", {"slot": "s", "plugin": "bogus", "base": "b",
                                      "start_lsn": "0/1000000", "base_at": "2026-01-01T00:00:00Z"}),
], ids=["no base time", "no WAL position", "numeric progress time", "a sequence half read",
        "an unknown plugin"])
def test_capture_records_with_wrong_values_are_named_damaged(
        store: Store, capsys: pytest.CaptureFixture[str], name: str, body: dict) -> None:
    import json
    epoch = {"slot": "s", "plugin": "wal2json", "base": "b", "start_lsn": "0/1000000",
             "base_at": "2026-01-01T00:00:00Z"}
    store.put_small(store.key("db", "cdc", "epochs/0000000001000000.json"),
                    json.dumps(epoch).encode())
    store.put_small(store.key("db", "cdc", name), json.dumps(body).encode())
    code, err = _cli(capsys, "restore", "--dry-run", "--store", str(store.url), "--database-id",
                     "db", "--target-url", "postgresql://u@h/t", "--at", "2026-01-01T12:00:00Z")
    _one_clear_line(code, err)
    assert "is damaged" in err, err


@pytest.mark.parametrize("lease", [b'{"expires_at": "2999-01-01T00:00:00Z"}',
                                   b'{"expires_at": 5}', b'{"expires_at": null}'])
def test_a_lease_with_fields_missing_or_wrong_is_read_as_what_it_can_say(
        store: Store, capsys: pytest.CaptureFixture[str], lease: bytes) -> None:
    store.put_small(store.key("db", "locks", "backup.json"), lease)
    code, err = _cli(capsys, "backup", "full", "--database-url",
                     f"postgresql://u@127.0.0.1:{free_port()}/x", "--store", str(store.url),
                     "--database-id", "db")
    _one_clear_line(code, err)
    assert ("another backup of db is in progress: unknown" in err) == lease.startswith(
        b'{"expires_at": "2999'), err


@pytest.mark.parametrize("args, env, match", [
    (["--wait", "nan"], {}, "--wait must be a number of seconds"),
    (["--wait", "-5"], {}, "--wait must be a number of seconds"),
    ([], {"AWS_ENDPOINT_URL_S3": "not a url"}, "cannot create the s3 client"),
], ids=["wait nan", "wait negative", "endpoint not a URL"])
def test_bad_settings_are_refused_as_bad_input(
        s3: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        args: list[str], env: dict[str, str], match: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = _cli(capsys, "backup", "full", "--database-url", "postgresql://u@127.0.0.1:1/x",
                     "--store", "s3://sb-test-bucket/p", *args)
    _one_clear_line(code, err, expected=2)
    assert match in err, err


@pytest.mark.parametrize("url, match", [
    ("postgresql://u@127.0.0.1:1/x?connect_timeout=abc", "connect_timeout must be a whole"),
    ("postgresql://u@127.0.0.1:1/x%00y", "NUL character"),
])
def test_database_urls_libpq_would_trip_over_are_refused(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ConnectionInfo.from_url(url)
    with pytest.raises(ConfigError, match=match):
        ConnectionInfo.from_secret('{"host": "h", "username": "u", "connect_timeout": "abc"}'
                                   if "timeout" in match else
                                   '{"host": "h", "username": "u", "dbname": "a\\u0000b"}')


def test_an_invalid_bucket_name_is_one_line(s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(capsys, "list", "--store", "s3://B_A D/p")
    _one_clear_line(code, err)


def test_a_binary_secret_is_refused_clearly(s3: Any, inbox: Inbox,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from supabackup.handlers import common
    from supabackup.handlers import restore as restore_handler

    from .helpers import FakeContext
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="binary", SecretBinary=b"\x00\x01")["ARN"]
    store = Store(StoreURL.parse("s3://sb-test-bucket/p"), s3)
    store.put_small(store.backup_key("db", "20260201T000000Z-full", "manifest.json"),
                    _manifest("20260201T000000Z-full", GOOD_AT))
    monkeypatch.setattr(common, "clients", {"s3": s3, "secretsmanager": secrets,
                                            "sns": inbox.sns})
    monkeypatch.setenv("SUPABACKUP_STORE", "s3://sb-test-bucket/p")
    monkeypatch.setenv("SUPABACKUP_RESTORE_SECRET_ARN", arn)
    with pytest.raises(ConfigError, match="holds no text"):
        restore_handler.handler({"at": "latest"}, FakeContext())


def test_verify_of_a_database_the_store_does_not_hold_fails(
        store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    store.put_small(store.backup_key("db", "20260201T000000Z-full", "manifest.json"),
                    _manifest("20260201T000000Z-full", GOOD_AT))
    code, err = _cli(capsys, "verify", "--store", str(store.url), "--database-id", "nope")
    _one_clear_line(code, err)
    assert "no backup of nope" in err


def test_a_time_after_a_dropped_capture_restores_the_newest_backup_before_it(
        store: Store) -> None:
    """Capture covered January and was dropped; a backup was taken on February 1st. A time
    in February is not covered by capture: it is that backup, as the rule says, not a
    refusal to run `cdc run` on a capture that no longer exists. While capture runs, the
    same time is a replay (refused until capture reaches it)."""
    import json

    from supabackup.catalog import restore_point
    epoch = {"slot": "s", "plugin": "wal2json", "base": "20260101T000000Z-full",
             "start_lsn": "0/1000000", "base_at": "2026-01-01T00:00:00Z"}
    store.put_small(store.key("db", "cdc", "epochs/0000000001000000.json"),
                    json.dumps(epoch).encode())
    store.put_small(store.key("db", "cdc", "progress/0000000001000000.json"), json.dumps(
        {"verified_lsn": "0/2000000", "verified_at": "2026-01-02T00:00:00Z",
         "ended": "capture dropped"}).encode())
    for backup_id, at in (("20260101T000000Z-full", "2026-01-01T00:00:00.000000Z"),
                          ("20260201T000000Z-full", GOOD_AT)):
        store.put_small(store.backup_key("db", backup_id, "manifest.json"),
                        _manifest(backup_id, at))
    february = restore_point(store, "db", "2026-02-15T00:00:00Z")
    assert not february.replay and february.manifest is not None
    assert february.manifest.backup_id == "20260201T000000Z-full"
    assert "no change capture covers" in february.describe()
    assert restore_point(store, "db", "2026-01-01T12:00:00Z").replay
    store.put_small(store.key("db", "cdc", "state.json"), json.dumps(epoch).encode())
    assert restore_point(store, "db", "2026-02-15T00:00:00Z").replay  # capture runs on
    # an epoch that ended by itself (a schema change): a time after it is capture's to
    # refuse, naming the gap, not an old backup's to answer
    store.delete_key(store.key("db", "cdc", "state.json"))
    store.put_small(store.key("db", "cdc", "progress/0000000001000000.json"), json.dumps(
        {"verified_lsn": "0/2000000", "verified_at": "2026-01-02T00:00:00Z",
         "ended": "the schema changed"}).encode())
    assert restore_point(store, "db", "2026-01-02T00:00:30Z").replay


@pytest.mark.parametrize("body", [
    b"not gzip", "gzip:not json", 'gzip:{"commit_time": "2026-01-01T00:00:01Z"}',
    'gzip:{"commit_lsn": "0/1000100", "commit_time": "2026-01-01T00:00:01Z", '
    '"changes": [{"action": "Q"}]}',
    'gzip:{"commit_lsn": "0/1000100", "commit_time": "2026-01-01T00:00:01Z", '
    '"changes": [{"action": "I", "schema": "public", "table": "t", "columns": [{"value": "1"}]}]}',
], ids=["not gzip", "not json", "no commit position", "an unknown change", "a nameless column"])
def test_a_segment_whose_hash_matches_but_is_no_segment_is_named_damaged(
        store: Store, body: Any) -> None:
    """The index entry's sha256 vouches for the bytes, not for what wrote them: a segment
    that does not decode is a store error naming it, before replay applies any of it."""
    import gzip
    import hashlib
    from datetime import UTC, datetime

    from supabackup.capture import state
    raw = gzip.compress(body[5:].encode()) if isinstance(body, str) else body
    epoch = state.CaptureState(slot="s", plugin="p", base="b", start_lsn="0/1000000",
                               base_at="2026-01-01T00:00:00Z")
    key = store.key("db", "cdc", "segments", "0000000001000200.jsonl.gz")
    store.put_small(key, raw)
    state.put_json(store, store.key("db", "cdc", "index", "0000000001000200.json"), {
        "key": key, "end_lsn": "0/1000200", "transactions": 1,
        "first_commit_time": "2026-01-01T00:00:01Z", "last_commit_time": "2026-01-01T00:00:01Z",
        "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    with pytest.raises(StoreError, match="change segment .* is damaged"):
        list(state.transactions_until(store, "db", epoch, datetime(2026, 2, 1, tzinfo=UTC)))
