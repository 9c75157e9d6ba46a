"""PostgreSQL's own logical decoding output (pgoutput, protocol 1), read into the change
records that wal2json's format-version 2 gives, so capture and replay have one format.

pgoutput is built into every server, where wal2json is a plugin some servers lack. It
needs a publication (FOR ALL TABLES) and speaks a binary protocol, documented in "Logical
Replication Message Formats": Begin, Commit, Relation (the columns of a table, sent before
its first row in each decoding session), Insert, Update, Delete, Truncate; Origin and Type
messages are skipped. Column values come as text, typed by the Relation's type oids,
which the caller names with format_type().
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    key: bool


@dataclass(frozen=True)
class Relation:
    schema: str
    table: str
    columns: tuple[Column, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        text = self.data[self.pos:end].decode()
        self.pos = end + 1
        return text

    def tuple(self) -> list[tuple[str, str | None]]:
        """(kind, value) per column: kind 'n' null, 'u' unchanged TOAST, 't' text."""
        values: list[tuple[str, str | None]] = []
        for _ in range(self.take("!H")):
            kind = chr(self.take("!B"))
            if kind == "t":
                length = self.take("!I")
                values.append((kind, self.data[self.pos:self.pos + length].decode()))
                self.pos += length
            else:
                values.append((kind, None))
        return values


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def timestamp_text(micros: int) -> str:
    return (EPOCH_2000 + timedelta(microseconds=micros)).isoformat()


def changes(rows: Iterable[tuple[str, str, bytes]],
            type_name: Callable[[int, int], str]) -> list[tuple[str, dict[str, Any]]]:
    """(lsn, wal2json-shaped change) for each message of `rows` (lsn, xid, data)."""
    decoder = Decoder(type_name)
    return [(lsn, change) for lsn, _xid, data in rows for change in decoder.feed(lsn, data)]


class Decoder:
    """pgoutput's messages, one at a time, as wal2json-shaped changes. A decoding session
    sends a table's Relation once, before its first row: the decoder keeps them for the
    session (a peek's rows, or a replication stream)."""

    def __init__(self, type_name: Callable[[int, int], str]) -> None:
        self.type_name = type_name
        self.relations: dict[int, Relation] = {}

    def feed(self, lsn: str, data: bytes) -> list[dict[str, Any]]:
        r = _Reader(bytes(data))
        kind = chr(r.take("!B"))
        if kind == "B":
            final_lsn, ts, xid = r.take("!Q"), r.take("!q"), r.take("!I")
            return [{"action": "B", "lsn": lsn_text(final_lsn), "xid": xid,
                     "timestamp": timestamp_text(ts)}]
        if kind == "C":
            r.take("!B")
            commit_lsn, end_lsn, ts = r.take("!Q"), r.take("!Q"), r.take("!q")
            return [{"action": "C", "lsn": lsn_text(commit_lsn), "nextlsn": lsn_text(end_lsn),
                     "timestamp": timestamp_text(ts)}]
        if kind == "R":
            oid, schema, table = r.take("!I"), r.string(), r.string()
            r.take("!B")  # replica identity setting
            columns = []
            for _ in range(r.take("!H")):
                flags, name = r.take("!B"), r.string()
                columns.append(Column(name, r.take("!I"), r.take("!i"), bool(flags & 1)))
            self.relations[oid] = Relation(schema, table, tuple(columns))
            return []
        if kind in ("I", "U", "D"):
            return [_row_change(kind, r, self.relations, self.type_name)]
        if kind == "T":
            count, _options = r.take("!I"), r.take("!B")
            return [{"action": "T", "schema": self.relations[oid].schema,
                     "table": self.relations[oid].table}
                    for oid in [r.take("!I") for _ in range(count)]]
        return []  # Origin, Type: nothing to replay


def _row_change(kind: str, r: _Reader, relations: dict[int, Relation],
                type_name: Callable[[int, int], str]) -> dict[str, Any]:
    rel = relations[r.take("!I")]

    def named(values: list[tuple[str, str | None]], keys_only: bool = False
              ) -> list[dict[str, Any]]:
        return [{"name": col.name, "type": type_name(col.type_oid, col.typmod), "value": value}
                for col, (how, value) in zip(rel.columns, values, strict=True)
                if how != "u" and (not keys_only or col.key)]

    change: dict[str, Any] = {"action": kind, "schema": rel.schema, "table": rel.table}
    marker = chr(r.take("!B"))
    old = None
    if marker in ("K", "O"):  # the old key ('K') or the whole old row ('O')
        old = named(r.tuple(), keys_only=marker == "K")
        if kind == "U":
            marker = chr(r.take("!B"))
    if kind in ("I", "U"):
        assert marker == "N"
        new_values = r.tuple()
        change["columns"] = named(new_values)
        if kind == "U" and old is None:  # the key did not change: it is in the new row
            old = named(new_values, keys_only=True)
    if kind in ("U", "D"):
        change["identity"] = old or []
    return change
