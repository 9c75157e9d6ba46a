"""A strict picture of a database, object by object, and the differences of two pictures.

The picture is a plain pg_dump (the newest pg_dump here), cut into its entries by the
`-- Name: ...; Type: ...; Schema: ...` header pg_dump writes before each one: every
object's definition, every table's rows (COPY under pg_dump's fixed output settings),
every sequence's state (setval), large objects by content, ownership, grants, comments,
policies, triggers and their firing modes. Lines within an entry are compared as a
multiset (row order is physical). pg_dump does not dump a materialized view's rows, only
a REFRESH; its rows are pictured separately, as the rows its query gives, which is what a
restore promises for them (it rebuilds them from the restored tables).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import psycopg2
from supabackup.dburl import ConnectionInfo
from supabackup.pgtools import child_env, find_tools

from devkit.compare import SERVER_ASSIGNED, _has_restrict_key

HEADER = re.compile(r"^-- (?:Data for )?Name: (.*); Type: (.*); Schema: (.*); Owner: .*$")

Picture = dict[str, Counter[str]]


def picture(url: str, source: bool) -> Picture:
    """Every entry of the database, keyed "TYPE schema name" (`source`: the side whose
    materialized views are pictured by their query)."""
    info = ConnectionInfo.from_url(url)
    pg_dump = find_tools(0).path("pg_dump")
    argv = [pg_dump, "--no-sync"]
    if _has_restrict_key(pg_dump):
        argv.append("--restrict-key=differential")
    # pg_dump fixes DateStyle, IntervalStyle and float digits itself, not the time zone or
    # bytea_output, which a database may set: the same value must read the same on both
    # sides, whatever each database sets for its sessions.
    env = {**child_env(info), "PGTZ": "UTC",
           "PGOPTIONS": "-c bytea_output=hex -c lc_monetary=C -c xmloption=content"}
    out = subprocess.run(argv, env=env, capture_output=True, check=True).stdout
    entries: Picture = {}
    key = "PREAMBLE"
    for line in out.decode().splitlines():
        match = HEADER.match(line)
        if match:
            name, kind, schema = match.groups()
            key = f"{kind} {schema} {name}"
            entries.setdefault(key, Counter())
            continue
        if not line.strip() or line.startswith("--"):
            continue
        entries.setdefault(key, Counter())[SERVER_ASSIGNED.sub(r"\1=<server-assigned>", line)] += 1
    entries.update(_matview_rows(url, from_query=source))
    return entries


def _matview_rows(url: str, from_query: bool) -> Picture:
    """Each materialized view's rows: those its query gives now (`from_query`, the
    source's side) or those it holds (the restored side, what a user reads)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; "
                        "SET extra_float_digits = 3; SET search_path = ''")
            cur.execute("SELECT format('%I.%I', schemaname, matviewname), ispopulated,"
                        " definition FROM pg_matviews ORDER BY 1")
            out: Picture = {}
            for name, populated, definition in cur.fetchall():
                rows: Counter[str] = Counter()
                if populated:
                    source = f"({definition.rstrip().rstrip(';')})" if from_query else name
                    cur.execute(f"SELECT q::text FROM {source} q")
                    rows.update(r[0] for r in cur.fetchall())
                out[f"MATERIALIZED VIEW ROWS {name}"] = rows
            return out
    finally:
        conn.close()


def differences(source: Picture, restored: Picture, limit: int = 6) -> dict[str, list[str]]:
    """Entry -> a few of its differing lines ('-' only in the source, '+' only restored)."""
    out = {}
    for key in sorted(set(source) | set(restored)):
        a, b = source.get(key, Counter()), restored.get(key, Counter())
        if a != b:
            lines = ([f"- {x}"[:300] for x in sorted((a - b).elements())]
                     + [f"+ {x}"[:300] for x in sorted((b - a).elements())])
            out[key] = lines[:limit] if lines else ["(entry missing)"]
    return out
