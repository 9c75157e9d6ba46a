"""Connections to the user's database: open one with a clear, password-free error, run a
statement on one of its own, and say what to do about a failure to connect."""

from __future__ import annotations

from collections.abc import Callable

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .dburl import ConnectionInfo
from .errors import ConnectionFailed, SupabackupError


def user_schemas(alias: str = "n", *, parameters: bool = False) -> str:
    """SQL true for the schemas users own: not pg_catalog, information_schema, or any pg_*
    schema (toast, temp: pg_ names are reserved). `alias` is pg_namespace's alias ("" for
    none); with `parameters`, for a statement sent with parameters (its % doubled)."""
    column = f"{alias}.nspname" if alias else "nspname"
    like = "%%" if parameters else "%"
    return (f"{column} NOT IN ('pg_catalog', 'information_schema') "
            f"AND {column} NOT LIKE 'pg\\_{like}'")


# Namespace alias n, in statements sent without parameters: every catalog query of capture.
USER_SCHEMAS = user_schemas()


def connect(conn: ConnectionInfo) -> psycopg2.extensions.connection:
    """Open a connection, turning libpq's failures into one clear, password-free error."""
    try:
        connection = psycopg2.connect(**conn.psycopg_kwargs())
    except psycopg2.OperationalError as exc:
        detail = conn.error_line(exc)
        raise ConnectionFailed(f"cannot connect to {conn.display()}: {detail}",
                               connection_hint(detail, conn)) from None
    # Our SQL and names are Unicode: psycopg2 quotes an identifier in the connection's
    # encoding, and a LATIN1 database's default would garble a name like "tablé".
    connection.set_client_encoding("UTF8")
    # A database's or role's timeouts are for its application, not for our sessions (as
    # pg_dump and pg_restore set them off for theirs): a scan of a big table is one query.
    try:
        with connection.cursor() as cur:
            cur.execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")
        connection.commit()
    except psycopg2.Error as exc:
        connection.close()
        raise ConnectionFailed(f"cannot set up a session on {conn.display()}: "
                               f"{conn.error_line(exc)}", connection_hint("", conn)) from None
    return connection


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
        raise fail(conn.error_line(exc)) from None
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
