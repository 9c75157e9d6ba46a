"""The run's one snapshot, and the facts about the server read inside it.

The session first takes the database's advisory lock (see locks.py), so two runs never
dump one database at once. A REPEATABLE READ, READ ONLY transaction is opened and its
snapshot exported; every pg_dump of the run attaches to it with --snapshot, so all
archives of one backup show the same instant. The transaction (and its connection) must
stay open until the last pg_dump has started, so SnapshotSession is a context manager
held for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .dburl import ConnectionInfo
from .errors import ConnectionFailed, RunInProgress, SupabackupError

# A session-level advisory lock whose key is derived from the database's name.
ADVISORY_LOCK = ("SELECT pg_try_advisory_lock(hashtextextended('supabackup ' || "
                 "current_database(), 0))")


@dataclass(frozen=True)
class ServerInfo:
    version: str        # e.g. "15.18"
    version_num: int    # e.g. 150018
    database_size: int  # bytes, pg_database_size() of the dumped database
    snapshot_at: datetime

    @property
    def major(self) -> int:
        return self.version_num // 10000


def connect(conn: ConnectionInfo) -> psycopg2.extensions.connection:
    """Open a connection, turning libpq's failures into one clear, password-free error."""
    try:
        return psycopg2.connect(**conn.psycopg_kwargs())
    except psycopg2.OperationalError as exc:
        detail = conn.redact(" ".join(str(exc).split()))
        raise ConnectionFailed(f"cannot connect to {conn.display()}: {detail}",
                               connection_hint(detail, conn)) from None


def run_statement(conn: ConnectionInfo, statement: str | sql.Composable,
                  params: tuple[object, ...] = (),
                  fail: Callable[[str], SupabackupError] | None = None) -> None:
    """One statement on a connection of its own, in autocommit (CREATE DATABASE, a
    replication slot's drop, ...). A server error becomes `fail(detail)`, its detail
    password-free, or propagates as it is."""
    db = connect(conn)
    try:
        db.autocommit = True
        with db.cursor() as cur:
            cur.execute(statement, params or None)
    except psycopg2.Error as exc:
        if fail is None:
            raise
        raise fail(conn.redact(" ".join(str(exc).split()))) from None
    finally:
        db.close()


def connection_hint(detail: str, conn: ConnectionInfo) -> str:
    """What an operator should do about a libpq connection error."""
    lowered = detail.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return "check the user and password in the database URL or secret"
    if "does not exist" in lowered and "database" in lowered:
        return "check the database name"
    if "ssl" in lowered:
        return "the server refused TLS; add ?sslmode=disable only for a trusted local network"
    if conn.is_supabase:
        return ("check the host and port; Supabase's direct host is IPv6-only, so from "
                "IPv4 networks use the session pooler (port 5432, user postgres.<ref>)")
    return "check the host and port, and that the server accepts connections from here"


class SnapshotSession:
    """An open REPEATABLE READ transaction whose snapshot pg_dump attaches to."""

    def __init__(self, conn: ConnectionInfo, imported: str | None = None) -> None:
        """Open the run's snapshot; with `imported`, join one exported elsewhere (the
        replication slot's, so that a base backup and its change stream meet exactly)."""
        self.conn_info = conn
        self.connection = connect(conn)
        try:
            self.connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with self.connection.cursor() as cur:
                if imported:
                    cur.execute("SET TRANSACTION SNAPSHOT %s", (imported,))
                # Held by this session until the run ends: one backup of a database at a time.
                cur.execute(ADVISORY_LOCK)
                if not cur.fetchone()[0]:
                    raise RunInProgress(
                        f"another supabackup run is dumping {conn.dbname} on {conn.host} (it "
                        "holds the database's advisory lock)",
                        "let it finish and run again; a run that dies releases the lock")
                cur.execute(
                    "SELECT coalesce(%s, pg_export_snapshot()), now(),"
                    " current_setting('server_version'),"
                    " current_setting('server_version_num')::int,"
                    " pg_database_size(current_database())", (imported,)
                )
                snapshot, now, version, version_num, size = cur.fetchone()
        except RunInProgress:
            self.connection.close()
            raise
        except psycopg2.Error as exc:
            self.connection.close()
            detail = conn.redact(" ".join(str(exc).split()))
            raise ConnectionFailed(
                f"cannot export a snapshot on {conn.display()}: {detail}",
                "use a direct connection or Supabase's session pooler; a transaction "
                "pooler cannot hold a snapshot",
            ) from None
        self.snapshot_id: str = snapshot
        self.server = ServerInfo(version=version.split()[0], version_num=version_num,
                                 database_size=size, snapshot_at=now)

    def __enter__(self) -> SnapshotSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End the snapshot. A connection the server dropped (a restart, a terminated
        backend) cannot be rolled back, and that must never hide why the run failed."""
        if not self.connection.closed:
            try:
                self.connection.rollback()
            except psycopg2.Error:
                pass  # the transaction is gone with its connection
            finally:
                self.connection.close()
