"""An archive's table of contents (`pg_restore --list`), parsed into entries a restore can select.

A restore picks entries of an archive (the data of some tables, everything but the ACLs,
what a fresh Supabase project lacks) by writing the lines it keeps to a file that
`pg_restore --use-list` reads. Lines look like

    215; 1259 16390 TABLE public todos postgres
    3350; 0 16390 TABLE DATA public todos postgres
    3190; 2606 16398 POLICY storage objects Avatar images are public postgres

The description may be several words, the name may contain spaces (a policy's is "table
policy"), and the owner is the last word. Only the head of the archive is read.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import RestoreFailed
from ..manifest import Manifest
from ..pgtools import Child, PgTools, exit_reason, find_tools
from ..store import Store

# pg_dump's entry descriptions with more than one word, longest first; others are one word.
_MULTIWORD = sorted((
    "ACCESS METHOD", "BLOB DATA", "BLOB METADATA", "CHECK CONSTRAINT", "DATABASE PROPERTIES",
    "DEFAULT ACL", "EVENT TRIGGER", "FK CONSTRAINT", "FOREIGN DATA WRAPPER", "FOREIGN SERVER",
    "FOREIGN TABLE", "INDEX ATTACH", "LARGE OBJECT", "MATERIALIZED VIEW",
    "MATERIALIZED VIEW DATA", "OPERATOR CLASS", "OPERATOR FAMILY", "PROCEDURAL LANGUAGE",
    "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA", "ROW SECURITY", "SECURITY LABEL",
    "SEQUENCE OWNED BY", "SEQUENCE SET", "SHELL TYPE", "SUBSCRIPTION TABLE", "TABLE ATTACH",
    "TABLE DATA", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE", "USER MAPPING",
), key=len, reverse=True)
_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")


@dataclass(frozen=True)
class TocEntry:
    line: str
    oid: int       # the object's oid (a TABLE DATA entry's is its table's)
    desc: str      # TABLE, TABLE DATA, POLICY, ACL, ...
    schema: str    # "-" for objects outside any schema
    name: str
    owner: str
    dump_id: int = 0
    deps: tuple[int, ...] = ()  # dump ids it depends on (`pg_restore --list --verbose`)

    @classmethod
    def parse(cls, line: str, backup_id: str = "the archive") -> TocEntry:
        match = _LINE.match(line)
        if match is None:
            raise RestoreFailed(f"pg_restore --list of {backup_id} gave a line that is not a "
                                f"table of contents entry: {line[:200]!r}",
                                "use the pg_restore of the backup's pg_dump version or newer "
                                "(SUPABACKUP_PG_BINDIR); run `supabackup verify`")
        dump_id, _, oid, text = match.groups()
        rest, _, owner = text.rpartition(" ")  # the owner is last, and may be empty
        desc = next((d for d in _MULTIWORD if rest.startswith(d + " ")), rest.split(" ", 1)[0])
        schema, _, name = rest[len(desc) + 1:].partition(" ")
        return cls(line, int(oid), desc, schema, name, owner, int(dump_id))


def parse_listing(text: str, backup_id: str) -> list[TocEntry]:
    """`pg_restore --list [--verbose]` output as entries, each with the dependencies that
    the verbose listing gives on the comment line after it."""
    entries: list[TocEntry] = []
    for line in text.splitlines():
        if line.startswith(";\tdepends on:") and entries:
            deps = tuple(int(d) for d in line.split(":", 1)[1].split())
            entries[-1] = replace(entries[-1], deps=deps)
        elif line and not line.startswith(";"):
            entries.append(TocEntry.parse(line, backup_id))
    return entries


def list_archive(tools: PgTools, path: Path, backup_id: str,
                 section: str | None = None) -> list[TocEntry]:
    """The entries of a local archive file (of one section), with their dependencies.

    `pg_restore --list --verbose`, which gives the dependencies, ignores --section; so a
    section's entries are those the plain listing of it names, taken from the verbose one.
    """
    entries = parse_listing(_listing(tools, path, backup_id, "--verbose"), backup_id)
    if section is None:
        return entries
    ids = {e.dump_id for e in parse_listing(
        _listing(tools, path, backup_id, f"--section={section}"), backup_id)}
    return [e for e in entries if e.dump_id in ids]


def _listing(tools: PgTools, path: Path, backup_id: str, option: str) -> str:
    child = Child([tools.path("pg_restore"), "--list", option, str(path)], stdout=True)
    out = child.stdout.read()
    code, stderr = child.wait()
    child.close()
    return _listed(out, code, stderr, backup_id)


def _listed(out: bytes, code: int, stderr: str, backup_id: str) -> str:
    """pg_restore --list's output, or the clear error of a listing that failed."""
    if code != 0:
        raise RestoreFailed(f"pg_restore --list of {backup_id} failed ({exit_reason(code)}): "
                            f"{' '.join(stderr.split())[:500]}",
                            "run `supabackup verify`; restore another backup")
    return out.decode("utf-8", "replace")


def read_toc(store: Store, manifest: Manifest) -> list[TocEntry]:
    """The entries of a backup's archive, read from S3 (only its head is fetched)."""
    tools = find_tools(manifest.pg_dump_major, purpose="restore")
    child = Child([tools.path("pg_restore"), "--list"], stdin=True, stdout=True)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
    reader.start()
    try:
        # It reads the table of contents and stops: no need to fetch the rest.
        store.stream_to(manifest, manifest.object("database").name, child.stdin,
                        read_all=False)
    except BaseException:
        child.kill()  # it would wait for the rest of its input
        raise
    finally:
        code, stderr = child.wait()
        reader.join()
    return parse_listing(_listed(b"".join(out), code, stderr, manifest.backup_id),
                         manifest.backup_id)
