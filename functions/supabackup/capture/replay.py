"""Replay captured transactions into a restored base: each once, each exactly.

    pin the output settings -> triggers off (replica mode, and the ALWAYS and REPLICA
    ones disabled by name), identity columns settable -> the transactions in commit
    order, in batches (below), every row change touching exactly one row -> triggers and
    identities back as they were

Why each rule:
- Values arrive as the source's text, decoded under output.STABLE; they are parsed under
  the same settings, so a date, a float, a bytea, a money amount, a regclass reads back as
  the value it was, whatever the source or target database sets for its sessions.
- The stream already holds what triggers did at the source. session_replication_role =
  replica stops ordinary triggers (and foreign-key checks), but triggers set ENABLE ALWAYS
  still fire in it and ENABLE REPLICA ones fire only in it: those are disabled for the
  replay and set back to their mode afterwards. Rules set so are treated the same way.
- One change is one row. UPDATE and DELETE find their row by the replica identity: the key
  (with `=`, so an index serves it) or, under REPLICA IDENTITY FULL, every column's text
  (some types have no equality operator) and one row of equal ones by ctid (duplicates are
  legal there, and a DELETE of one must not take its twins); where such a table has a
  primary key too (as Supabase Realtime has them), its `=` as well, so its index serves
  (a row whose every column's text is equal has an equal key). ONLY, so an inheritance
  parent's change does not touch its children. A change that finds no row means the target
  is not what the source was: the replay stops and says so, never skips.
- Columns the target computes itself (GENERATED ... STORED) are left out; it computes them
  from the replayed values. Identity columns take the source's values: those GENERATED
  ALWAYS are BY DEFAULT for the replay (an UPDATE may not set them otherwise) and ALWAYS
  again afterwards.
- Only the tables whose data the base holds: the rest was left out by the backup's profile,
  or lived and died between two capture runs.
- A TRUNCATE of several tables at once (a CASCADE, or tables linked by foreign keys) is
  one statement again: truncated one by one, the first would fail on the foreign key.
- Tables without a replica identity: only their inserts and truncates can be replayed
  (updates and deletes are left out and counted); the caller names them as inexact.

Batches, for speed (a busy day is millions of transactions; a round trip and a commit per
change would take hours): up to BATCH_TRANSACTIONS captured transactions (or
BATCH_CHANGES row changes) are applied in one database transaction, their statements sent
many to a round trip (_Trip). Consecutive changes of one kind to one table with the same
columns go as one statement: a multi-row INSERT; an UPDATE ... FROM (VALUES ...) or
DELETE ... USING (VALUES ...) whose rows are found by their key, or, under REPLICA
IDENTITY FULL without one, by their whole row's text (then hashed: one scan for all). A
change that goes alone runs a statement prepared once for its table and columns, its
values the very literals a statement of its own would have. Why the state is the same:
- At the batch's commit it is the one the transactions give one by one: triggers and
  foreign-key checks are off, and a deferred constraint that each commit met holds at
  the last one too.
- Every statement still checks, in the server, that it touched the rows the source did
  (a data-modifying CTE's RETURNING counted; a wrong count raises an error): one row per
  change found by a key, each change of a statement by its own key, none seen twice in
  one; found by the whole row's text, each change numbered and seen to touch one row,
  none two twins. A change that must see one before it (the same row again, or the row
  an earlier UPDATE made) starts a new statement; one missed all the same finds too few
  rows, and fails.
- A batch that fails in any way is rolled back and applied again the slow way: each
  transaction on its own, each statement of its own checked as it runs (as before
  batches), which stops at the very transaction that fails, with the ones before it
  committed: the error names it, and the target holds exactly what it says. Only a
  connection lost during a batch's commit leaves its outcome unknown, and the error says
  that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql

from .. import output
from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import SupabackupError

log = logging.getLogger(__name__)

BATCH_TRANSACTIONS = 500   # captured transactions applied in one database transaction
BATCH_CHANGES = 10_000     # ... or row changes, whichever comes first
TRIP_BYTES = 256 << 10     # SQL text sent in one round trip
TRIP_STATEMENTS = 500      # ... or statements
INSERT_ROWS = 500          # rows of one multi-row INSERT, UPDATE or DELETE
MAX_PREPARED = 1000        # statements prepared at once (one per table and columns)
C = '"C"'                  # the collation that compares text byte by byte
WHOLE_ROWS_TOGETHER = 32   # changes found by their whole row's text that go as one


class ReplayFailed(SupabackupError):
    """A captured transaction could not be applied: the target is not the database as of
    the time asked for."""


@dataclass(frozen=True)
class TableShape:
    full_identity: bool          # REPLICA IDENTITY FULL: rows are found by every column
    generated: frozenset[str]    # columns the target computes (GENERATED ALWAYS AS ... STORED)
    types: dict[str, str]        # column -> its type, as the target names it (qualified)
    partitioned: bool = False    # TRUNCATE ONLY refuses a partitioned table
    keyless: bool = False        # no replica identity: updates and deletes cannot be found
    key: tuple[str, ...] = ()    # the primary key's columns (not DEFERRABLE), if it has one


@dataclass
class Replayed:
    transactions: int = 0
    last_commit_time: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # table -> updates/deletes left out
    ambiguous: set[str] = field(default_factory=set)  # tables with nulls that may be NaN


def replay(target: ConnectionInfo, transactions: Iterable[dict[str, Any]],
           held: set[tuple[str, str]] | None = None) -> Replayed:
    """Apply `transactions` to `target` in order, in batches (see above); with `held`,
    only the changes to those tables (schema, name), the ones whose data the base holds."""
    db = connect(target)
    done = Replayed()
    current: dict[str, Any] | None = None
    try:
        with db.cursor() as cur:
            output.pin(cur)
            # standard_conforming_strings: the literals below double quotes, nothing else
            cur.execute("SET session_replication_role = replica; SET row_security = off;"
                        " SET standard_conforming_strings = on")
            tables = _Tables(cur, _shapes(cur))
            toggles = _firing_triggers(cur) + _firing_rules(cur) + _always_identities(cur)
            _toggle(cur, toggles, replaying=True)
            db.commit()
            try:
                for batch in _batches(transactions):
                    current = batch[0]  # what a lost connection stopped at
                    if _apply_batch(db, cur, batch, tables, held, done):
                        continue
                    for current in batch:  # the slow way: stops at the one that fails
                        _apply_one(db, cur, current, tables, held, done)
                current = None
            finally:
                if not db.closed:
                    db.rollback()
                    _toggle(cur, toggles, replaying=False)
                    db.commit()
    except (psycopg2.Error, _Diverged) as exc:
        if not db.closed:
            db.rollback()
        raise _failure(target, exc, current, done) from None
    except _Uncertain as exc:
        raise _failure(target, exc.cause, exc.batch[0], done, exc.batch) from None
    finally:
        db.close()
    return done


class _Diverged(Exception):
    def __init__(self, table: str, rows: int, why: str = "") -> None:
        super().__init__(why or f"a change to {table} found {rows} rows where the source had one")


class _Uncertain(Exception):
    """The connection was lost while a batch committed: it may or may not have."""

    def __init__(self, cause: psycopg2.Error, batch: list[dict[str, Any]]) -> None:
        super().__init__(str(cause))
        self.cause, self.batch = cause, batch


def _failure(target: ConnectionInfo, exc: BaseException, txn: dict[str, Any] | None,
             done: Replayed, uncertain: list[dict[str, Any]] | None = None) -> ReplayFailed:
    detail = target.error_line(exc)
    where = (f"transaction {txn.get('xid') or '?'} (commit LSN {txn['commit_lsn']}, committed "
             f"{txn['commit_time']})" if txn else "setting up the replay")
    holds = (f"the base and {done.transactions} transaction(s), through the one committed "
             f"{done.last_commit_time}" if done.transactions else "the base only")
    if uncertain:
        where = (f"the commit of {len(uncertain)} transaction(s), from {where} to the one "
                 f"committed {uncertain[-1]['commit_time']}")
        holds += (f", or those {len(uncertain)} as well if the commit reached it before the "
                  "connection was lost")
    return ReplayFailed(f"replaying into {target.display()} failed at {where}: {detail}",
                        f"the target holds {holds}; it is not the database as of the time "
                        "asked for: drop it, and restore an earlier time or a backup")


# Whether table c has a replica identity, as PostgreSQL decides it: FULL, an index, or by
# default its primary key, unless that key is DEFERRABLE (PostgreSQL then skips it).
HAS_REPLICA_IDENTITY = """(c.relreplident IN ('f', 'i') OR (c.relreplident = 'd' AND EXISTS (
    SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND i.indimmediate)))"""


def _shapes(cur: Any) -> dict[tuple[str, str], TableShape]:
    cur.execute(f"""
        SELECT n.nspname, c.relname, c.relkind = 'p', c.relreplident = 'f',
               NOT {HAS_REPLICA_IDENTITY},
               coalesce(array_agg(a.attname) FILTER (WHERE a.attgenerated <> ''), '{{}}'),
               coalesce(json_object_agg(a.attname, format_type(a.atttypid, a.atttypmod))
                        FILTER (WHERE a.attname IS NOT NULL), '{{}}'),
               (SELECT coalesce(array_agg(k.attname ORDER BY u.n), '{{}}') FROM pg_index i
                CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY u(attnum, n)
                JOIN pg_attribute k ON k.attrelid = i.indrelid AND k.attnum = u.attnum
                WHERE i.indrelid = c.oid AND i.indisprimary AND i.indimmediate)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p') GROUP BY c.oid, 1, 2, 3, 4, 5""")
    return {(s, t): TableShape(full, frozenset(gen), dict(types), partitioned, keyless,
                               tuple(key))
            for s, t, partitioned, full, keyless, gen, types, key in cur.fetchall()}


# (ALTER TABLE clause for the replay, clause to put it back), per table: names quoted by
# the server itself (regclass text, quote_ident).
Toggle = tuple[str, str, str]
_MODES = {"A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}  # pg_trigger.tgenabled, ev_enabled


def _firing_triggers(cur: Any) -> list[Toggle]:
    """User triggers that fire in replica mode, ALWAYS ('A') and REPLICA ('R'): off for the
    replay. A partition's clone follows its parent's trigger."""
    cur.execute("""
        SELECT t.tgrelid::regclass::text, quote_ident(t.tgname), t.tgenabled FROM pg_trigger t
        WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgenabled IN ('A', 'R')
        ORDER BY 1, 2""")
    return [(table, f"DISABLE TRIGGER {name}", f"{_MODES[mode]} TRIGGER {name}")
            for table, name, mode in cur.fetchall()]


def _firing_rules(cur: Any) -> list[Toggle]:
    """Rules set ENABLE ALWAYS or ENABLE REPLICA fire in replica mode, as such triggers do:
    off for the replay (the stream holds what they did)."""
    cur.execute("""
        SELECT r.ev_class::regclass::text, quote_ident(r.rulename), r.ev_enabled
        FROM pg_rewrite r WHERE r.rulename <> '_RETURN' AND r.ev_enabled IN ('A', 'R')
        ORDER BY 1, 2""")
    return [(table, f"DISABLE RULE {name}", f"{_MODES[mode]} RULE {name}")
            for table, name, mode in cur.fetchall()]


def _always_identities(cur: Any) -> list[Toggle]:
    """Identity columns GENERATED ALWAYS: BY DEFAULT for the replay, which must set them to
    the source's values in UPDATE as in INSERT (OVERRIDING serves INSERT only)."""
    cur.execute("""
        SELECT a.attrelid::regclass::text, quote_ident(a.attname) FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attidentity = 'a' AND NOT a.attisdropped AND a.attnum > 0
          AND NOT c.relispartition ORDER BY 1, 2""")
    return [(table, f"ALTER COLUMN {column} SET GENERATED BY DEFAULT",
             f"ALTER COLUMN {column} SET GENERATED ALWAYS") for table, column in cur.fetchall()]


def _toggle(cur: Any, toggles: list[Toggle], replaying: bool) -> None:
    for table, during, after in toggles:
        cur.execute(f"ALTER TABLE {table} {during if replaying else after}")


# --- applying: batches, and the slow way ------------------------------------------------

def _batches(transactions: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    changes = 0
    for txn in transactions:
        batch.append(txn)
        changes += len(txn["changes"])
        if len(batch) >= BATCH_TRANSACTIONS or changes >= BATCH_CHANGES:
            yield batch
            batch, changes = [], 0
    if batch:
        yield batch


def _apply_batch(db: Any, cur: Any, batch: list[dict[str, Any]], tables: _Tables,
                 held: set[tuple[str, str]] | None, done: Replayed) -> bool:
    """Apply `batch` in one database transaction, statements checked in the server;
    False, with nothing of it applied, when anything failed (the caller goes the slow
    way)."""
    plans = []
    try:
        trip = _Trip(cur, tables)
        for txn in batch:
            plan = _Plan()
            plans.append(plan)
            for op in plan.ops(txn, tables, held):
                trip.add(op)
        trip.flush()
    except (psycopg2.Error, _Diverged) as exc:
        if db.closed:
            raise
        _undo(db, cur, tables, batch, exc)
        return False
    try:
        db.commit()
    except psycopg2.Error as exc:
        if db.closed:
            raise _Uncertain(exc, batch) from None
        _undo(db, cur, tables, batch, exc)
        return False
    for plan in plans:
        plan.count(done)
    done.transactions += len(batch)
    done.last_commit_time = batch[-1]["commit_time"]
    return True


def _undo(db: Any, cur: Any, tables: _Tables, batch: list[dict[str, Any]],
          exc: BaseException) -> None:
    """Roll a failed batch back. Prepared statements outlive a rollback, and a PREPARE
    after the statement that failed never ran: all of them go, and are made again."""
    log.info("a batch of %d transaction(s) from %s failed as one (%s); applying them one "
             "at a time", len(batch), batch[0]["commit_lsn"], type(exc).__name__)
    db.rollback()
    cur.execute("DEALLOCATE ALL")
    db.commit()
    tables.forget_prepared()


def _apply_one(db: Any, cur: Any, txn: dict[str, Any], tables: _Tables,
               held: set[tuple[str, str]] | None, done: Replayed) -> None:
    """Apply one transaction in a transaction of its own, each statement checked as it
    runs."""
    plan = _Plan()
    for op in plan.ops(txn, tables, held):
        cur.execute(op.statement())
        if op.table is not None and cur.rowcount != 1:
            raise _Diverged(op.table.name, cur.rowcount)
    db.commit()
    plan.count(done)
    done.transactions += 1
    done.last_commit_time = txn["commit_time"]


def _checked(rows: int) -> str:
    """A select list that raises an error unless the count(*) it reads is `rows` (the text
    only reaches the cast to int when the count is wrong)."""
    return (f"CASE count(*) WHEN {rows} THEN 0 ELSE ('replay: ' || count(*) || ' row(s) where "
            f"the source had {rows}')::int END")


def _checked_each(rows: int) -> str:
    """As _checked, for a statement whose `rows` changes each find their row by its whole
    text (RETURNING the change's number): each must touch one row, none two twins."""
    return (f"CASE WHEN count(*) = {rows} AND count(DISTINCT i) = {rows} THEN 0 ELSE "
            f"('replay: ' || count(*) || ' row(s) for ' || count(DISTINCT i) || ' of "
            f"{rows} changes')::int END")


class _Trip:
    """Statements on their way to the server, many to a round trip. Consecutive changes of
    one kind to one table, with the same columns, go as one statement: inserts as a
    multi-row INSERT, updates and deletes found by a key as one UPDATE ... FROM (VALUES)
    or DELETE ... USING (VALUES), each row found by its own key (a key seen twice starts
    a new statement: the second change must see the first). A change that goes alone
    runs a statement prepared for its table and columns (the server plans it once), its
    values the same literals as in a statement of its own."""

    def __init__(self, cur: Any, tables: _Tables) -> None:
        self.cur, self.tables = cur, tables
        self.parts: list[str] = []
        self.size = 0
        self.gathered: list[_Op] = []  # the changes of the statement being gathered
        self.keys: set[tuple[str, ...]] = set()
        self.gathered_size = 0

    def add(self, op: _Op) -> None:
        gathered = self.gathered
        if (gathered and op.kind == gathered[0].kind and op.table is gathered[0].table
                and op.group == gathered[0].group and len(gathered) < INSERT_ROWS
                and self.gathered_size < TRIP_BYTES and op.key not in self.keys):
            self._gather(op)
            return
        self._gathered()
        if op.group is not None:
            self._gather(op)
        else:
            self._send(op.checked())

    def _gather(self, op: _Op) -> None:
        self.gathered.append(op)
        self.gathered_size += op.size
        if op.kind != "I":
            self.keys.add(op.key)
        if op.makes:  # a change that finds the row this one makes must see it: not here
            self.keys.add(op.makes)

    def _gathered(self) -> None:
        """The statement gathered so far, on its way: one for all, or, for a few found by
        their whole row's text (each a scan that stops at its row, where one for all
        compares every row), one each."""
        gathered = self.gathered
        if not gathered:
            return
        self.gathered, self.keys, self.gathered_size = [], set(), 0
        first = gathered[0]
        table, group = first.table, first.group
        assert table is not None and group is not None
        by_key = first.kind == "I" or bool(group[0])
        if len(gathered) > 1 and (by_key or len(gathered) >= WHOLE_ROWS_TOGETHER):
            rows = [op.row(i) for i, op in enumerate(gathered)]
            check = _checked(len(rows)) if by_key else _checked_each(len(rows))
            self._send(f"WITH c AS ({table.many(first.kind, group, rows)}) SELECT {check} "
                       "FROM c")
            return
        for op in gathered:
            name = self.tables.prepared(self.cur, table, op.kind, group)
            if name is None:
                self._send(op.checked())
                continue
            if isinstance(name, tuple):  # first use: PREPARE, in the same round trip
                name, prepare = name
                self._send(prepare)
            self._send(f"EXECUTE {name}{op.row()}")

    def _send(self, statement: str) -> None:
        self.parts.append(statement)
        self.size += len(statement)
        if self.size >= TRIP_BYTES or len(self.parts) >= TRIP_STATEMENTS:
            self._trip()

    def _trip(self) -> None:
        if self.parts:
            text = ";\n".join(self.parts)
            self.parts, self.size = [], 0
            self.cur.execute(text)

    def flush(self) -> None:
        self._gathered()
        self._trip()


# --- what each change becomes ------------------------------------------------------------

# How a change's row is found when it can go with others (see _Trip): by these key
# columns, then (REPLICA IDENTITY FULL) every one of these columns' text, setting these.
Group = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


class _Op:
    """One row change (or one TRUNCATE) as SQL. kind: I, U, D, S (an UPDATE that sets
    nothing: a SELECT of its row), T. `text`: the statement; for I, the row's values in
    parentheses. `group`: what a statement of several such changes needs to be the same
    (None: it goes alone): for I its columns, for U and D a Group; `lits`: for U and D in
    a group, the literals of its key, its compared columns and what it sets; `key`: the
    key's literals."""

    __slots__ = ("group", "key", "kind", "lits", "makes", "size", "table", "text")

    def __init__(self, kind: str, table: _Table | None, text: str,
                 group: tuple[str, ...] | Group | None = None,
                 lits: tuple[list[str], list[str], list[str]] | None = None) -> None:
        self.kind, self.table, self.text, self.group, self.lits = kind, table, text, group, lits
        self.key = tuple(lits[0] or lits[1]) if lits else ()
        self.size = len(text) + (sum(len(v) for part in lits for v in part) if lits else 0)
        self.makes: tuple[str, ...] = ()  # found by its whole row, an UPDATE: the new row's

    def statement(self) -> str:
        """The change as a statement of its own."""
        if self.kind == "I":
            assert self.table is not None and self.group is not None
            return self.table.insert(self.group) + self.text  # type: ignore[arg-type]
        if self.lits is not None:
            assert self.table is not None
            return self.table.one(self.kind, self.group, self.lits)  # type: ignore[arg-type]
        return self.text

    def checked(self) -> str:
        """The statement, raising an error in the server unless it touched one row."""
        if self.kind == "T":
            return self.text
        if self.kind == "S":
            return f"SELECT {_checked(1)} FROM ({self.text}) c"
        return f"WITH c AS ({self.statement()} RETURNING 1) SELECT {_checked(1)} FROM c"

    def row(self, index: int | None = None) -> str:
        """Its values in parentheses: the arguments of a prepared statement (for U and D:
        key, compared columns, what it sets), or, with its `index` among them, a row of a
        statement of several changes (which numbers the rows of those found by no key)."""
        if self.lits is None:
            return self.text
        key, compared, sets = self.lits
        number = [str(index)] if index is not None and not key else []
        return "(" + ", ".join(number + key + compared + sets) + ")"


@dataclass
class _Plan:
    """What a transaction leaves out, counted once it commits."""

    skipped: dict[str, int] = field(default_factory=dict)
    ambiguous: set[str] = field(default_factory=set)

    def count(self, done: Replayed) -> None:
        for name, n in self.skipped.items():
            done.skipped[name] = done.skipped.get(name, 0) + n
        done.ambiguous |= self.ambiguous

    def ops(self, txn: dict[str, Any], tables: _Tables, held: set[tuple[str, str]] | None
            ) -> Iterator[_Op]:
        """The transaction's changes as statements, one by one, each to touch exactly one
        row (but a TRUNCATE's)."""
        truncate: list[dict[str, Any]] = []
        for change in [*txn["changes"], _END]:
            if change["action"] == "T":
                if held is None or (change["schema"], change["table"]) in held:
                    truncate.append(change)
                continue
            if truncate:  # ONLY: the stream names every table it emptied, children too
                emptied = [tables.get(c) for c in truncate]
                yield _Op("T", None, "TRUNCATE " + ", ".join(
                    ("" if t.shape.partitioned else "ONLY ") + t.quoted for t in emptied))
                truncate = []
            if change["action"] == "end":
                return
            if held is not None and (change["schema"], change["table"]) not in held:
                continue  # not in the backup (see replay)
            table = tables.get(change)
            if change["action"] in ("U", "D") and table.shape.keyless:
                self.skipped[table.name] = self.skipped.get(table.name, 0) + 1
                continue
            if change.get("ambiguous"):
                self.ambiguous.add(table.name)
            yield table.op(change)


_END = {"action": "end"}


class _Tables:
    """The target's tables, each with its SQL pieces made once."""

    def __init__(self, cur: Any, shapes: dict[tuple[str, str], TableShape]) -> None:
        self.cur, self.shapes = cur, shapes
        self.known: dict[tuple[str, str], _Table] = {}
        self.made = 0  # prepared statements made (their names' numbers)
        self.live = 0  # ... and not deallocated since

    def prepared(self, cur: Any, table: _Table, kind: str, group: Any
                 ) -> str | tuple[str, str] | None:
        """The name of the statement prepared for changes of `kind` and `group` to
        `table`; (name, the PREPARE that makes it) when there is none yet; None past
        MAX_PREPARED of them."""
        name = table.prepared.get((kind, group))
        if name is not None:
            return name
        if self.live >= MAX_PREPARED:
            return None
        self.made += 1
        self.live += 1
        name = table.prepared[(kind, group)] = f"supabackup_replay_{self.made}"
        return name, table.prepare(name, kind, group)

    def forget_prepared(self) -> None:
        for table in self.known.values():
            table.prepared.clear()
        self.live = 0

    def get(self, change: dict[str, Any]) -> _Table:
        key = (change["schema"], change["table"])
        table = self.known.get(key)
        if table is None:
            shape = self.shapes.get(key)
            if shape is None:
                raise _Diverged(f"{key[0]}.{key[1]} (not in the target)", 0)
            table = self.known[key] = _Table(self.cur, key, shape)
        return table


class _Table:
    """One target table's quoted name, its columns' quoted names and casts, and the heads
    of its statements."""

    def __init__(self, cur: Any, key: tuple[str, str], shape: TableShape) -> None:
        self.shape = shape
        self.name = f"{key[0]}.{key[1]}"
        self.quoted = sql.Identifier(*key).as_string(cur)
        # name -> (quoted, "::type"): the target's own column type, format_type's text (a
        # plugin's type names are not always exact: wal2json's "char" is character(1));
        # never a type name from the stream
        self.columns = {name: (sql.Identifier(name).as_string(cur), f"::{type_name}")
                        for name, type_name in shape.types.items()}
        self.heads: dict[tuple[str, ...], str] = {}
        self.groups: dict[tuple[str, Group], tuple[str, str]] = {}
        self.prepared: dict[tuple[str, Any], str] = {}

    def insert(self, columns: tuple[str, ...]) -> str:
        head = self.heads.get(columns)
        if head is None:
            head = self.heads[columns] = (
                f"INSERT INTO {self.quoted} ({', '.join(self.columns[c][0] for c in columns)})"
                " OVERRIDING SYSTEM VALUE VALUES ")
        return head

    def column(self, name: str) -> tuple[str, str]:
        found = self.columns.get(name)
        if found is None:
            raise _Diverged("", 0, f"column {name!r} of a captured change is not in the "
                                   "target's table")
        return found

    def value(self, column: dict[str, Any]) -> str:
        """The column's value as a literal of the target's own column type."""
        cast = self.column(column["name"])[1]
        value = column["value"]
        if value is None:
            return "NULL" + cast
        if isinstance(value, bool):
            value = "true" if value else "false"
        return "'" + str(value).replace("'", "''") + "'" + cast

    def op(self, change: dict[str, Any]) -> _Op:
        shape = self.shape
        columns = [c for c in change.get("columns", []) if c["name"] not in shape.generated]
        if change["action"] == "I":
            values = "(" + ", ".join([self.value(c) for c in columns]) + ")"
            return _Op("I", self, values, tuple(c["name"] for c in columns))
        identity = change.get("identity") or []
        if not identity:
            raise _Diverged(f"{self.name} (no replica identity)", 0)
        unsure = frozenset(change.get("ambiguous", ()))
        # Key columns that keep their value stay out of SET: an identity column GENERATED
        # ALWAYS may not be assigned at all, and it cannot have changed at the source either.
        old = {c["name"]: c["value"] for c in identity}
        changed = ([] if change["action"] == "D" else
                   [c for c in columns if c["name"] not in old or old[c["name"]] != c["value"]])
        if change["action"] == "U" and not changed:
            # nothing but the key, and it kept its value: still one row must match
            where = self.where(self._found_by(identity, old, []), identity, unsure)
            return _Op("S", self, f"SELECT 1 FROM ONLY {self.quoted} WHERE {where}")
        keys = self._found_by(identity, old, changed)
        compared = (self._compared(identity, unsure) if shape.full_identity else [])
        if keys is None and self._whole_row(compared):
            keys = []  # found by its whole row's text (see many)
        if keys is None:  # found by a key it changes, or by the text of part of its row
            where = self.where(None, identity, unsure)
            if change["action"] == "D":
                return _Op("D", self, f"DELETE FROM ONLY {self.quoted} WHERE {where}")
            sets = ", ".join([f"{self.column(c['name'])[0]} = {self.value(c)}" for c in changed])
            return _Op("U", self, f"UPDATE ONLY {self.quoted} SET {sets} WHERE {where}")
        group = (tuple(c["name"] for c in keys), tuple(c["name"] for c in compared),
                 tuple(c["name"] for c in changed))
        lits = ([self.value(c) for c in keys], [self.value(c) for c in compared],
                [self.value(c) for c in changed])
        op = _Op(change["action"], self, "", group, lits)
        if not keys and change["action"] == "U":
            after = dict(zip(group[2], lits[2], strict=True))
            op.makes = tuple(after.get(n, v) for n, v in zip(group[1], lits[1], strict=True))
        return op

    def _found_by(self, identity: list[dict[str, Any]], old: dict[str, Any],
                  changed: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The columns of `identity` that find the change's row by `=`, an index serving
        it: the replica identity's key, or, under REPLICA IDENTITY FULL, the primary key
        (a row whose every column's text is equal has an equal key); None when there is
        none, or the change sets one of them."""
        if self.shape.full_identity:
            if not self.shape.key or not all(k in old for k in self.shape.key):
                return None
            keys = [c for c in identity if c["name"] in self.shape.key]
        else:
            keys = identity
        names = {c["name"] for c in keys}
        return None if any(c["name"] in names for c in changed) else keys

    def _whole_row(self, compared: list[dict[str, Any]]) -> bool:
        """Whether `compared` is every column the table stores (but those it computes):
        rows equal in all of them are twins, which no change can tell apart."""
        return bool(compared) and len(compared) == len(self.columns) - len(self.shape.generated)

    def _compared(self, identity: list[dict[str, Any]], unsure: frozenset[str]
                  ) -> list[dict[str, Any]]:
        generated = self.shape.generated
        return [c for c in identity if c["name"] not in generated and c["name"] not in unsure]

    def where(self, keys: list[dict[str, Any]] | None, identity: list[dict[str, Any]],
              unsure: frozenset[str]) -> str:
        by_key = ([f"{self.column(c['name'])[0]} = {self.value(c)}" for c in keys]
                  if keys is not None else [])
        if not self.shape.full_identity:  # a key: NOT NULL and unique, and its index serves `=`
            if keys is None:
                by_key = [f"{self.column(c['name'])[0]} = {self.value(c)}" for c in identity]
            return " AND ".join(by_key)
        same = [f"{self.column(c['name'])[0]}::text IS NOT DISTINCT FROM ({self.value(c)})::text"
                for c in self._compared(identity, unsure)]
        return (f"ctid = (SELECT ctid FROM ONLY {self.quoted} WHERE "
                f"{' AND '.join(by_key + same)} LIMIT 1)")

    def one(self, kind: str, group: Group, lits: tuple[list[str], list[str], list[str]]) -> str:
        """A change of a group (_Op.lits) as a statement of its own."""
        keys, compared, sets = group
        key_lits, compared_lits, set_lits = lits
        by_key = [f"{self.column(n)[0]} = {v}" for n, v in zip(keys, key_lits, strict=True)]
        if self.shape.full_identity:
            same = [f"{self.column(n)[0]}::text IS NOT DISTINCT FROM ({v})::text"
                    for n, v in zip(compared, compared_lits, strict=True)]
            where = (f"ctid = (SELECT ctid FROM ONLY {self.quoted} WHERE "
                     f"{' AND '.join(by_key + same)} LIMIT 1)")
        else:
            where = " AND ".join(by_key)
        if kind == "D":
            return f"DELETE FROM ONLY {self.quoted} WHERE {where}"
        assignments = ", ".join(f"{self.column(n)[0]} = {v}"
                                for n, v in zip(sets, set_lits, strict=True))
        return f"UPDATE ONLY {self.quoted} SET {assignments} WHERE {where}"

    def many(self, kind: str, group: tuple[str, ...] | Group, rows: list[str]) -> str:
        """One statement of several changes of `kind` and `group`, RETURNING a row for
        each row it touched."""
        if kind == "I":
            return f"{self.insert(group)}{', '.join(rows)} RETURNING 1"  # type: ignore[arg-type]
        around = self.groups.get((kind, group))  # type: ignore[arg-type]
        if around is None:
            keys, compared, sets = group  # type: ignore[misc]
            names = ([f"k{i}" for i in range(len(keys))] + [f"c{i}" for i in range(len(compared))]
                     + [f"s{i}" for i in range(len(sets))])
            if keys:
                match = " AND ".join(
                    [f"x.{self.column(n)[0]} = v.k{i}" for i, n in enumerate(keys)]
                    + [f"x.{self.column(n)[0]}::text IS NOT DISTINCT FROM v.c{i}::text"
                       for i, n in enumerate(compared)])
                returning = "1"
            else:
                # By the whole row's text, as one array (arrays compare NULLs as equal, and
                # hash: one scan of the table for all the changes, not one each), byte by
                # byte (COLLATE "C"); each change numbered (i), so _checked_each sees that
                # it found one row, and no change found two.
                ours = [f"x.{self.column(n)[0]}::text COLLATE {C}" for n in compared]
                theirs = [f"v.c{i}::text COLLATE {C}" for i in range(len(compared))]
                match = f"ARRAY[{', '.join(ours)}] = ARRAY[{', '.join(theirs)}]"
                names.insert(0, "i")
                returning = "v.i"
            after = f") AS v({', '.join(names)}) WHERE {match} RETURNING {returning}"
            if kind == "D":
                before = f"DELETE FROM ONLY {self.quoted} AS x USING (VALUES "
            else:
                assignments = ", ".join(f"{self.column(n)[0]} = v.s{i}"
                                        for i, n in enumerate(sets))
                before = f"UPDATE ONLY {self.quoted} AS x SET {assignments} FROM (VALUES "
            around = self.groups[(kind, group)] = (before, after)  # type: ignore[index]
        return around[0] + ", ".join(rows) + around[1]

    def prepare(self, name: str, kind: str, group: Any) -> str:
        """PREPARE `name` as one change of `kind` and `group` (its parameters: _Op.row's
        values, typed as their columns), raising an error unless it touches one row. A
        parameter's type has no typmod, but its argument is the literal already cast to
        the column's type, typmod and all: the value passes through unchanged."""
        if kind == "I":
            columns = group
            body = (f"{self.insert(columns)}("
                    f"{', '.join(f'${i}' for i in range(1, len(columns) + 1))}) RETURNING 1")
        else:
            keys, compared, sets = group
            columns = (*keys, *compared, *sets)
            numbered = iter(range(1, len(columns) + 1))
            by_key = [f"{self.column(n)[0]} = ${next(numbered)}" for n in keys]
            same = [f"{self.column(n)[0]}::text IS NOT DISTINCT FROM (${next(numbered)})::text"
                    for n in compared]
            assignments = ", ".join(f"{self.column(n)[0]} = ${next(numbered)}" for n in sets)
            where = (f"ctid = (SELECT ctid FROM ONLY {self.quoted} WHERE "
                     f"{' AND '.join(by_key + same)} LIMIT 1)" if self.shape.full_identity
                     else " AND ".join(by_key))
            body = (f"DELETE FROM ONLY {self.quoted} WHERE {where} RETURNING 1" if kind == "D"
                    else f"UPDATE ONLY {self.quoted} SET {assignments} WHERE {where} RETURNING 1")
        types = ", ".join(self.column(n)[1][2:] for n in columns)
        return f"PREPARE {name} ({types}) AS WITH c AS ({body}) SELECT {_checked(1)} FROM c"
