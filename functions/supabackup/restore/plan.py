"""What a restore reads, in order: which archives (a chain's holders too), which entries of
each, and the SQL of our own between them; also said as text for `--dry-run`, touching no
database."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackupNotFound, ConfigError, RestoreFailed
from ..files.endpoint import StorageEndpoint
from ..manifest import Manifest, TableState
from ..profiles import PROFILES
from ..store import Store
from ..tabledata import checked_jobs
from .supabase import SupabaseTarget
from .toc import TocEntry, read_toc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreOptions:
    tables: tuple[str, ...] = ()  # schema.name, or name alone when one schema has it
    profile: str = "postgres"     # "supabase": into a fresh Supabase project
    jobs: int | None = None       # connections (format 2); None: derived from CPUs and memory
    storage: StorageEndpoint | None = None  # write the backup's Storage files there too

    def __post_init__(self) -> None:
        if self.jobs is not None:
            checked_jobs(self.jobs)
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown restore profile {self.profile!r}",
                              f"choose one of: {', '.join(PROFILES)}")


@dataclass(frozen=True)
class Part:
    """One pg_restore run of a restore: an archive and which of its entries to take."""

    manifest: Manifest
    args: tuple[str, ...] = ()
    what: str = "everything"
    read_all: bool = True  # False: a pass that needs only the table of contents


# A restore is pg_restore runs and, between them, SQL of our own (bytes), all fed to one psql.
Step = Part | bytes


def restore_plan(store: Store, manifest: Manifest, workdir: Path,
                 selected: set[int] | None = None,
                 supabase: SupabaseTarget | None = None,
                 placeholders: frozenset[str] = frozenset()) -> list[Step]:
    """The steps that rebuild `manifest`'s database, in order.

    A full backup is one run. An incremental: its pre-data; then the data of each table
    it did not dump, from the backup of the chain that holds it (matched by the table's
    oid, whose definition that backup recorded as the same); then its own data and
    sequences; then its post-data (indexes, constraints, triggers, matview contents).
    `selected` (table oids) keeps the data of those tables only; `supabase` skips what a
    fresh project has and applies the backup's grants last (see supabase.py).
    Event triggers owned by `placeholders` (platform roles made NOLOGIN stand-ins on a
    server without them) are the platform's own, and only a superuser may own one: they
    are left out.
    """
    wanted = entry_filter(selected, supabase, placeholders)
    tocs: dict[str, list[TocEntry]] = {}

    def toc(of: Manifest) -> list[TocEntry]:  # each archive's head is read once
        if of.backup_id not in tocs:
            tocs[of.backup_id] = read_toc(store, of)
        return tocs[of.backup_id]

    def use_list(of: Manifest, keep: Callable[[TocEntry], bool], name: str) -> str:
        listing = workdir / f"{of.backup_id}.{name}.list"
        listing.write_text("".join(e.line + "\n" for e in toc(of) if keep(e)))
        return f"--use-list={listing}"

    filtered = selected is not None or supabase is not None or bool(placeholders)
    own = (use_list(manifest, wanted, "restore"),) if filtered else ()
    steps: list[Step] = [supabase.prologue()] if supabase is not None else []
    if manifest.kind == "full":
        steps.append(Part(manifest, own))
    else:
        steps.append(Part(manifest, ("--section=pre-data", *own), "pre-data"))
        steps += _holder_parts(store, manifest, selected, wanted, toc, use_list)
        steps += [Part(manifest, ("--section=data", *own), "data"),
                  Part(manifest, ("--section=post-data", *own), "post-data")]
    if supabase is not None:
        steps += [supabase.reset_default_grants(),
                  Part(manifest, (use_list(manifest, supabase.keep_grant, "grants"),),
                       "grants", read_all=False)]
    return steps


def entry_filter(selected: set[int] | None, supabase: SupabaseTarget | None,
                 placeholders: frozenset[str]) -> Callable[[TocEntry], bool]:
    """Which entries of an archive a restore takes (see restore_plan)."""
    def wanted(entry: TocEntry) -> bool:
        if entry.desc == "TABLE DATA" and selected is not None and entry.oid not in selected:
            return False
        if entry.desc == "EVENT TRIGGER" and entry.owner in placeholders:
            return False
        return supabase is None or supabase.keep(entry)
    return wanted


def tables_to_load(manifest: Manifest, wanted: Callable[[TocEntry], bool]) -> list[TableState]:
    """The tables of a format-2 backup whose parts a restore loads: those whose TABLE DATA
    entry `wanted` would take, were it in the archive."""
    return [t for t in manifest.tables
            if wanted(TocEntry("", t.oid, "TABLE DATA", t.schema, t.name, ""))]


def _holder_parts(store: Store, manifest: Manifest, selected: set[int] | None,
                  wanted: Callable[[TocEntry], bool],
                  toc: Callable[[Manifest], list[TocEntry]],
                  use_list: Callable[[Manifest, Callable[[TocEntry], bool], str], str]
                  ) -> list[Part]:
    """The data an incremental did not dump, from the backups of its chain that hold it."""
    holders: dict[str, set[int]] = {}
    for oid, table in manifest.tables_by_oid.items():
        if table.held_in != manifest.backup_id and (selected is None or oid in selected):
            holders.setdefault(table.held_in, set()).add(oid)
    by_id = {m.backup_id: m for m in store.manifests(manifest.database_id)} if holders else {}
    parts = []
    for holder_id in sorted(holders):
        holder = by_id.get(holder_id)
        if holder is None:
            raise BackupNotFound(
                f"{manifest.backup_id} needs table data from {holder_id}, which is gone",
                "restore an earlier or a full backup (`supabackup list`)")
        oids = holders[holder_id]
        found = {e.oid for e in toc(holder) if e.desc == "TABLE DATA"} & oids
        if found != oids:
            raise RestoreFailed(f"{holder_id} lacks table data that {manifest.backup_id} "
                                "relies on", "run `supabackup verify`; restore another backup")
        data = use_list(holder, lambda e, oids=oids: (  # type: ignore[misc]
            e.desc == "TABLE DATA" and e.oid in oids and wanted(e)), "data")
        tables = sorted(t.qualified for t in manifest.held_in(holder_id) if t.oid in oids)
        what = f"data of {len(tables)} table(s): {', '.join(tables[:8])}" + (
            ", ..." if len(tables) > 8 else "")
        parts.append(Part(holder, ("--data-only", data), what))
    return parts


def describe_plan(store: Store, manifest: Manifest, options: RestoreOptions | None = None
                  ) -> list[str]:
    """What a restore of `manifest` would read, in order, without touching any database."""
    options = options or RestoreOptions()
    lines = [f"restore of {manifest.backup_id} ({manifest.kind}, snapshot at "
             f"{manifest.snapshot_at}):"]
    roles = manifest.object("roles")
    lines.append(f"  roles      {manifest.backup_id}/{roles.name}  {roles.size} bytes")
    selected = select_tables(manifest, options.tables)
    if manifest.format >= 2:
        lines += _describe_parts(manifest, selected)
    else:
        lines += _describe_steps(store, manifest, selected)
    if selected is not None:
        lines.append(f"  table data of: {table_names(manifest, selected)} only")
    return lines


def _describe_parts(manifest: Manifest, selected: set[int] | None) -> list[str]:
    schema = manifest.object("database")
    lines = [f"  {manifest.backup_id}/{schema.name}  {schema.size} bytes  the schema: "
             "pre-data first; sequence values, indexes, constraints and the rest last"]
    for table in manifest.tables:
        if selected is not None and table.oid not in selected:
            continue
        for part in table.parts:
            lines.append(f"  {table.held_in}/{part.name}  {part.size} bytes  "
                         f"{part.rows} rows of {table.qualified}")
    return lines


def _describe_steps(store: Store, manifest: Manifest, selected: set[int] | None) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="supabackup-") as workdir:
        for step in restore_plan(store, manifest, Path(workdir), selected):
            if isinstance(step, Part):
                obj = step.manifest.object("database")
                lines.append(f"  {step.manifest.backup_id}/{obj.name}  {obj.size} bytes  "
                             f"{step.what}")
    return lines


def select_tables(manifest: Manifest, names: Iterable[str]) -> set[int] | None:
    """The oids of the named tables in `manifest`, or None for all; unknown names are an error."""
    names = list(names)
    if not names:
        return None
    tables = manifest.tables
    oids: set[int] = set()
    for wanted in names:
        found = [t for t in tables if wanted in (t.qualified, t.name)]
        if len(found) != 1:
            known = ", ".join(sorted(t.qualified for t in tables)[:10])
            problem = "is in several schemas" if found else "is not in the backup"
            raise ConfigError(f"table {wanted!r} {problem} {manifest.backup_id}",
                              f"name it as schema.table; the backup has: {known}")
        oids.add(found[0].oid)
    return oids


def table_names(manifest: Manifest, oids: set[int]) -> str:
    return ", ".join(sorted(t.qualified for t in manifest.tables
                            if t.oid in oids))
