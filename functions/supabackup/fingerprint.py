"""Content fingerprints of tables: an order-independent hash of every row, read in a
backup's snapshot and again after a restore.

An incremental records, for every table, the row count and fingerprint read in its own
snapshot (see ROW_HASHES), so that a restore drill proves the restored data is the data
the snapshot held, table by table, including the tables it leaves where an older backup
holds them: a wrong "unchanged" shows up there as a mismatch. The fingerprints are fresh
in every incremental rather than inherited, because its detection scan reads every row
anyway: hashing them in the same pass costs server CPU, and no second read. A full
backup reads each table once, in its COPY, and records counts only (tabledata.py); its
drill compares each restored table with the lines of its stored parts instead
(copy_text_fingerprint).
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from . import output

# An order-independent hash of a table's rows: the sum of a 64-bit hash of each row. A
# restore gives back the same rows in any physical order, so the drill compares sums, not
# digests of an ordered scan (which would sort every table). Two ways to hash a row, the
# cheaper first: "r", hash_record_extended (PostgreSQL 14+), hashes each column's value
# with its type's own hash function, about 3x cheaper than "t", a hash of the row's text;
# but json, xml, point, tsvector and a few more have no hash function, and their tables
# take "t". The fingerprint names its way ("r:0123..."), so the drill hashes the same way.
# Row text depends on a few session settings, which output.FINGERPRINT fixes on both sides.
# row_security is off as in pg_dump: policies that would hide rows from us are an error,
# not a short count. ROW(sb_row.*) is the whole row even when a column is named sb_row.
ROW_HASHES = {"r": "hash_record_extended(ROW(sb_row.*), 0)",
              "t": "hashtextextended(ROW(sb_row.*)::text, 0)"}


def fingerprint_hex(total: object) -> str:
    """The row-hash sum as 16 hex digits (modulo 2^64)."""
    return format(int(str(total)) % (1 << 64), "016x")


def fingerprinted(cur: psycopg2.extensions.cursor, table: sql.Composable,
                   extra: sql.Composable, ways: tuple[str, ...]) -> tuple[int, int, str]:
    """count(*), `extra` and the table's fingerprint, the first of `ways` that works.

    A way that cannot hash one of the table's types fails at once (UndefinedFunction); a
    savepoint keeps the transaction, and with it the run's snapshot, alive for the next.
    """
    for way in ways:
        cur.execute("SAVEPOINT sb_fingerprint")
        try:
            cur.execute(sql.SQL("SELECT count(*), {}, coalesce(sum({}), 0) FROM ONLY {} sb_row")
                        .format(extra, sql.SQL(ROW_HASHES[way]), table))
        except psycopg2.errors.UndefinedFunction:
            cur.execute("ROLLBACK TO SAVEPOINT sb_fingerprint")
            if way == ways[-1]:
                raise
            continue
        rows, other, total = cur.fetchone()
        cur.execute("RELEASE SAVEPOINT sb_fingerprint")
        return int(rows), int(other), f"{way}:{fingerprint_hex(total)}"
    raise AssertionError("unreachable")


# Types whose binary hash is the hash of an oid that a restore assigns anew.
_OID_VALUED = ("regclass", "regcollation", "regconfig", "regdictionary", "regnamespace",
               "regoper", "regoperator", "regproc", "regprocedure", "regrole", "regtype")


def binary_hash_is_stable(cur: psycopg2.extensions.cursor, type_oids: set[int]) -> set[int]:
    """The column types whose binary hash ("r") survives a dump and restore.

    An enum's hash is that of its label's oid, and reg* values hash as oids: a restore
    gives both new oids, so their tables are hashed as text. Composites and ranges might
    hold either, and are hashed as text too. Domains and arrays are judged by what they
    are of.
    """
    cur.execute("SELECT oid, typtype, typcategory, typbasetype, typelem, typname,"
                " typnamespace = 'pg_catalog'::regnamespace FROM pg_type")
    types = {row[0]: row[1:] for row in cur.fetchall()}

    def stable(oid: int, depth: int = 0) -> bool:
        typtype, category, base, elem, name, in_catalog = types[oid]
        if depth > 10:
            return False
        if typtype == "d":
            return stable(base, depth + 1)
        if category == "A" and elem:
            return stable(elem, depth + 1)
        return typtype == "b" and not (in_catalog and name in _OID_VALUED)

    return {oid for oid in type_oids if oid in types and stable(oid)}


def table_contents(conn: psycopg2.extensions.connection,
                   tables: dict[tuple[str, str], str]) -> dict[tuple[str, str], tuple[int, str]]:
    """(rows, fingerprint) of each named table that exists, read as a backup read it.

    The restore drill's side of the comparison: `tables` maps (schema, name) to the
    fingerprint the backup recorded, whose way ("r" or "t") is used again, with the same
    FROM ONLY count under the same output.FINGERPRINT, in one transaction. A table recorded
    without a fingerprint is counted only ("" for its fingerprint).
    """
    found = {}
    with conn.cursor() as cur:
        output.pin(cur, local=True, settings=output.FINGERPRINT)
        for (schema, name), recorded in tables.items():
            cur.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, name).as_string(cur),))
            if cur.fetchone()[0] is None:
                continue
            way = recorded.partition(":")[0]
            table = sql.Identifier(schema, name)
            if way in ROW_HASHES:
                rows, _, digest = fingerprinted(cur, table, sql.SQL("0"), (way,))
            else:
                cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(table))
                rows, digest = int(cur.fetchone()[0]), ""
            found[(schema, name)] = (rows, digest)
    conn.rollback()
    return found


def copy_text_fingerprint(chunks: Iterable[bytes]) -> tuple[int, str]:
    """(rows, "c:<hex>") of a stream of COPY text: the sum of a 64-bit hash of each line.

    The drill's way for a table its backup recorded no fingerprint for (a format-2 full
    backup counts rows from its streams and hashes none, see tabledata.py): the stored
    parts and a COPY of the restored table, both hashed here, must hold the same lines.
    It costs about a microsecond a row in Python, which a drill can spend and a backup
    should not.
    """
    total = rows = 0
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        rows += len(lines)
        for line in lines:
            total += int.from_bytes(blake2b(line, digest_size=8).digest(), "big")
    if rest:  # COPY text ends every row with a newline; a partial line is one more row
        rows += 1
        total += int.from_bytes(blake2b(rest, digest_size=8).digest(), "big")
    return rows, f"c:{fingerprint_hex(total)}"
