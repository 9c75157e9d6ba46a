"""The database a restore writes into: refuse one that is not empty, create the roles the
backup needs, and drop them again when the restore fails or a drill ends."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import psycopg2

from ..db import connect, user_schemas
from ..dburl import ConnectionInfo
from ..errors import RestoreFailed
from ..roles import quote_ident

log = logging.getLogger(__name__)


def check_empty(conn: psycopg2.extensions.connection, target: ConnectionInfo,
                 ignored_schemas: Iterable[str] = ()) -> None:
    """Refuse a target that holds any relation (outside a fresh Supabase project's own)."""
    with conn.cursor() as cur:
        cur.execute(f"""
            SELECT n.nspname || '.' || c.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {user_schemas(parameters=True)} AND NOT n.nspname LIKE ANY (%s)
            ORDER BY 1 LIMIT 5""", (list(ignored_schemas) or [""],))
        found = [r[0] for r in cur.fetchall()]
    if found:
        raise RestoreFailed(
            f"the target {target.display()} is not empty (it has {', '.join(found)}, ...)",
            "restore into a new, empty database (createdb NAME) so nothing is overwritten",
        )


def existing_roles(conn: psycopg2.extensions.connection) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT rolname FROM pg_roles")
        return {r[0] for r in cur.fetchall()}


def apply_roles(conn: psycopg2.extensions.connection, statements: list[str],
                 target: ConnectionInfo) -> None:
    if not statements:
        return
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            for stmt in statements:
                cur.execute(stmt)
            cur.execute("COMMIT")
    except psycopg2.Error as exc:
        conn.rollback()
        detail = target.error_line(exc)
        raise RestoreFailed(f"creating roles on {target.display()} failed: {detail}",
                            "the restoring user needs CREATEROLE; nothing was restored") from None


def drop_roles(target: ConnectionInfo, roles: list[str]) -> None:
    """Drop roles a restore created: after it failed, or after a drill (best effort)."""
    if not roles:
        return
    try:
        conn = connect(target)
        conn.autocommit = True
        with conn.cursor() as cur:
            for role in reversed(roles):
                cur.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
        conn.close()
    except Exception as exc:  # noqa: BLE001 - the restore's own outcome is the one to report
        log.warning("could not drop the roles the restore created: %s", exc)
