"""Compare two databases the way a user would: a plain pg_dump of each, apart from order.

Used by the round-trip tests and by `make demo`. The dumps are taken with the newest
pg_dump available, sorted line by line (pg_dump's order of equal-priority objects may
differ between two databases), and compared.
"""

from __future__ import annotations

import re
import subprocess

from supabackup.dburl import ConnectionInfo
from supabackup.pgtools import child_env, find_tools


def dump_lines(url: str) -> list[str]:
    info = ConnectionInfo.from_url(url)
    tools = find_tools(0)
    argv = [tools.path("pg_dump"), "--no-sync"]
    if _has_restrict_key(argv[0]):
        argv.append("--restrict-key=devkit")
    out = subprocess.run(argv, env=child_env(info), capture_output=True,
                         check=True).stdout.decode()
    return sorted(SERVER_ASSIGNED.sub(r"\1=<server-assigned>", line)
                  for line in out.splitlines() if line.strip() and not line.startswith("--"))


# Values a server assigns itself, which no restore can carry over (like OIDs):
# PostgreSQL 15.20 stamps every column with pg_attver and ignores a client's value.
SERVER_ASSIGNED = re.compile(r"\b(pg_attver)=\d+")


def _has_restrict_key(pg_dump: str) -> bool:
    """pg_dump 17.6+ writes a random \\restrict key per dump; fix it so dumps compare."""
    return "--restrict-key" in subprocess.run([pg_dump, "--help"], capture_output=True,
                                              text=True).stdout


def differences(source_url: str, restored_url: str, limit: int = 20) -> list[str]:
    """Lines only in one of the two dumps ('-' source, '+' restored); empty when equal."""
    a, b = dump_lines(source_url), dump_lines(restored_url)
    only_a = _multiset_minus(a, b)
    only_b = _multiset_minus(b, a)
    return ([f"- {x}" for x in only_a] + [f"+ {x}" for x in only_b])[:limit]


def _multiset_minus(a: list[str], b: list[str]) -> list[str]:
    from collections import Counter
    return sorted((Counter(a) - Counter(b)).elements())


def table_fingerprints(url: str) -> dict[str, tuple[int, str]]:
    """Each user table's row count and an md5 of its rows in a canonical order.

    Works across server versions, where a textual dump comparison does not (PostgreSQL
    16+ deparses view definitions differently, for one).
    """
    import psycopg2

    info = ConnectionInfo.from_url(url)
    conn = psycopg2.connect(**info.psycopg_kwargs())
    try:
        with conn.cursor() as cur:
            cur.execute("""
                SELECT format('%I.%I', n.nspname, c.relname), c.relispopulated FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'm') AND c.relpersistence = 'p'
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1""")
            tables = cur.fetchall()
            result = {}
            for table, populated in tables:
                if not populated:  # a materialized view never refreshed: nothing to read
                    result[table] = (-1, "unpopulated")
                    continue
                cur.execute(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' "
                            f"ORDER BY t::text), '')) FROM {table} t")
                count, digest = cur.fetchone()
                result[table] = (int(count), str(digest))
            return result
    finally:
        conn.close()
