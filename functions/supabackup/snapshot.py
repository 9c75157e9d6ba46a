"""The run's one snapshot, and the facts about the server read inside it.

The session first takes the database's advisory lock (see locks.py), so two runs never
dump one database at once. A REPEATABLE READ, READ ONLY transaction is opened and its
snapshot exported; every pg_dump of the run attaches to it with --snapshot, so all
archives of one backup show the same instant. The transaction (and its connection) must
stay open until the last pg_dump has started, so SnapshotSession is a context manager
held for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import psycopg2
import psycopg2.extensions

from .db import connect
from .dburl import ConnectionInfo
from .errors import ConnectionFailed, RunInProgress

# A session-level advisory lock whose key is derived from the database's name.
ADVISORY_LOCK = ("SELECT pg_try_advisory_lock(hashtextextended('supabackup ' || "
                 "current_database(), 0))")


@dataclass(frozen=True)
class ServerInfo:
    version: str        # e.g. "15.18"
    version_num: int    # e.g. 150018
    database_size: int  # bytes, pg_database_size() of the dumped database
    snapshot_at: datetime
    encoding: str = "UTF8"  # the database's: the text of COPY and pg_dump is in it
    block_size: int = 8192

    @property
    def major(self) -> int:
        return self.version_num // 10000


class SnapshotSession:
    """An open REPEATABLE READ transaction whose snapshot pg_dump attaches to."""

    def __init__(self, conn: ConnectionInfo, imported: str | None = None) -> None:
        """Open the run's snapshot; with `imported`, join one exported elsewhere (the
        replication slot's, so that a base backup and its change stream meet exactly)."""
        self.connection = connect(conn)
        try:
            self.connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with self.connection.cursor() as cur:
                # The run's workers import the snapshot until the run ends: this session
                # must not be timed out by a database's or role's settings (pg_dump too
                # sets them off for itself), nor its own statements.
                cur.execute("SET idle_in_transaction_session_timeout = 0;"
                            " SET statement_timeout = 0")
                if self.connection.server_version >= 170000:
                    cur.execute("SET transaction_timeout = 0")
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
                    " pg_database_size(current_database()),"
                    " pg_encoding_to_char(encoding), current_setting('block_size')::int"
                    " FROM pg_database WHERE datname = current_database()", (imported,)
                )
                snapshot, now, version, version_num, size, encoding, block = cur.fetchone()
        except RunInProgress:
            self.connection.close()
            raise
        except psycopg2.Error as exc:
            self.connection.close()
            detail = conn.error_line(exc)
            raise ConnectionFailed(
                f"cannot export a snapshot on {conn.display()}: {detail}",
                "use a direct connection or Supabase's session pooler; a transaction "
                "pooler cannot hold a snapshot",
            ) from None
        self.snapshot_id: str = snapshot
        self.server = ServerInfo(version=version.split()[0], version_num=version_num,
                                 database_size=size, snapshot_at=now, encoding=encoding,
                                 block_size=block)

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
