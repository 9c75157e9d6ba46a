"""Every kind of bad input gets a clear error, and nothing half-written counts as a backup."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.errors import ConfigError, ConnectionFailed, StoreError, ToolError
from supabackup.notify import Notifier
from supabackup.run import backup_and_report
from supabackup.store import Store, StoreURL

from devkit.pg import PG15_BINDIR, Cluster, free_port

from .conftest import Inbox, open_uploads, stored_keys

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
