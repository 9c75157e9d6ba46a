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
