"""Backups stored years ago restore and verify: a chain kept in the repository as the
engine wrote it (tests/data/format1, made by devkit.stored_backup), restored on every run;
and the README's steps for a person without supabackup, run as written, on that stored
format-1 chain and on a format-2 chain made at test time.

A change to the archive layout or the manifest that breaks these breaks every user's
existing backups; the tests say so before a release does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from supabackup.backup import BackupRequest, run_backup
from supabackup.catalog import select_backup
from supabackup.dburl import ConnectionInfo
from supabackup.manifest import Manifest, new_backup_id
from supabackup.pgtools import child_env, find_tools
from supabackup.restore import run_restore
from supabackup.store import Store
from supabackup.verify import verify_database

from devkit.compare import dump_lines, table_fingerprints
from devkit.pg import Cluster

from .helpers import SQL

FORMAT1 = Path(__file__).resolve().parent / "data" / "format1"
EXPECTED = json.loads((FORMAT1 / "expected.json").read_text())


@pytest.fixture
def stored(store: Store) -> Store:
    """The store holding the stored chain (under the store's own prefix, `backups`)."""
    objects = FORMAT1 / "objects"
    for path in sorted(p for p in objects.rglob("*") if p.is_file()):
        store.s3.put_object(Bucket=store.url.bucket, Key=str(path.relative_to(objects)),
                            Body=path.read_bytes())
    return store


@pytest.mark.parametrize("kind", ["full", "incr"])
def test_a_format_1_backup_restores_to_what_its_source_held(
        cluster: Cluster, new_db: Any, stored: Store, kind: str) -> None:
    [backup_id] = [b for b in EXPECTED["tables"] if b.endswith(kind)]
    manifest = select_backup(stored, EXPECTED["database_id"], backup_id)
    assert manifest.format == 1 and manifest.kind == ("full" if kind == "full" else
                                                      "incremental")
    target = new_db(cluster)
    report = run_restore(stored, manifest, ConnectionInfo.from_url(cluster.url(target)))
    assert report.backups == sorted({manifest.backup_id, manifest.base} - {""})
    expected = {table: tuple(found) for table, found in EXPECTED["tables"][backup_id].items()}
    assert table_fingerprints(cluster.url(target)) == expected


def test_a_format_1_chain_verifies_and_its_drill_matches(pg17: Cluster, stored: Store) -> None:
    report = verify_database(stored, EXPECTED["database_id"],
                             drill=ConnectionInfo.from_url(pg17.url()))
    assert report.ok, report.findings
    assert sorted(report.verified) == sorted(EXPECTED["tables"])
    assert report.drill is not None and report.drill.mismatches == []
    drilled = select_backup(stored, EXPECTED["database_id"], report.drill.backup_id)
    assert report.drill.tables == len(drilled.tables) > 0


def test_a_manifest_of_a_format_this_engine_does_not_know_is_a_clear_error(
        stored: Store) -> None:
    """A backup written by a newer engine is refused by name, never half read."""
    from supabackup.errors import StoreError
    [full] = [b for b in EXPECTED["tables"] if b.endswith("full")]
    key = stored.backup_key(EXPECTED["database_id"], full, "manifest.json")
    manifest = json.loads(stored.read_small(key) or b"")
    stored.put_small(key, json.dumps({**manifest, "format": 3}).encode())
    with pytest.raises(StoreError, match="of manifest format 3, newer than this supabackup"):
        stored.manifests(EXPECTED["database_id"])


# --- the README's "Restore without supabackup", run as written -------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
# Tables the format-2 chain adds to devkit/sql/all_kinds.sql: names that need quoting (a
# space, capitals, a double quote) and a generated column, values whose text depends on
# the session's settings (money, xml, an interval, non-ASCII text, a tab, a newline, a
# backslash), and a table of a few hundred kB that SUPABACKUP_SPLIT_BYTES cuts into page
# ranges.
EXTRA = r"""
    CREATE SCHEMA "My Schema";
    CREATE TABLE "My Schema"."Odd ""name"" here" (
      "Id"       int PRIMARY KEY,
      "a b"      text,
      "quote""d" numeric,
      doubled    numeric GENERATED ALWAYS AS ("quote""d" * 2) STORED,
      price      money,
      doc        xml,
      span       interval,
      note       text
    );
    INSERT INTO "My Schema"."Odd ""name"" here" ("Id", "a b", "quote""d", price, doc, span, note)
      SELECT g, 'row ' || g, g / 3.0, g * 1.25, xmlparse(content '<a>' || g || '</a>text'),
             g * interval '1 day 2 hours', E'tab\there, newline\nthere, back\\slash, café ' || g
        FROM generate_series(1, 300) g;
    CREATE TABLE kinds.big (id bigint PRIMARY KEY, payload text, at timestamptz);
    INSERT INTO kinds.big
      SELECT g, repeat(md5(g::text), 3), timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
        FROM generate_series(1, 4000) g;
    ANALYZE kinds.big;
"""
# What the incremental sees changed: the quoted table and a few of all_kinds' tables (rows
# in, out and rewritten, a sequence moved on) and a new large object; the big table is
# left alone, so its parts are the full backup's.
CHANGE = r"""
    UPDATE "My Schema"."Odd ""name"" here" SET note = 'changed ' || "Id", "quote""d" = 0
      WHERE "Id" % 10 = 0;
    INSERT INTO "My Schema"."Odd ""name"" here" ("Id", "a b") VALUES (1000, 'added "later"');
    INSERT INTO kinds.customers (email, name)
      SELECT 'later' || g || '@example.com', 'Later ' || g FROM generate_series(1, 5) g;
    DELETE FROM kinds.orders WHERE id % 7 = 0 AND status = 'cancelled';
    UPDATE kinds.orders SET note = 'by hand ' || id WHERE id % 5 = 0;
    SELECT lo_from_bytea(0, '\x0102feff'::bytea);
"""
ODD = "My Schema.Odd \"name\" here"


def _readme_block(marker: str) -> str:
    """The README's bash block marked `<!-- marker: ... -->`."""
    [script] = re.findall(rf"<!-- {marker}:[^\n]*\n```bash\n(.*?)```", README.read_text(),
                          re.S)
    return script


def _run_by_hand(script: str, cwd: Path, cluster: Cluster, target: str) -> None:
    """`script` run with bash in `cwd`, with PostgreSQL 17's tools on PATH and the target
    in PG* variables; fails on any error but those the README says are harmless."""
    env = child_env(ConnectionInfo.from_url(cluster.url(target)))
    env["PATH"] = f"{find_tools(17).bindir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()
              and "already exists" not in line and "transaction_timeout" not in line
              and "errors ignored on restore" not in line]
    assert errors == [], done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]


def _with_backup(script: str, backup_id: str) -> str:
    """The block with its `B=` line naming `backup_id` (the one line a user edits)."""
    assert len(re.findall(r"^B=\S+", script, re.M)) == 1, script
    return re.sub(r"^B=\S+", f"B={backup_id}", script, flags=re.M)


def test_the_readmes_format_1_steps_give_back_the_source(
        cluster: Cluster, new_db: Any, tmp_path: Path) -> None:
    """The README's format-1 steps, run as written, on the stored incremental (whose
    unchanged tables are held by its full)."""
    script = _readme_block("restore-by-hand-format1")
    [backup_id] = re.findall(r"^B=(\S+)", script, re.M)
    assert backup_id in EXPECTED["tables"] and backup_id.endswith("-incr")
    shutil.copytree(FORMAT1 / "objects" / "backups" / EXPECTED["database_id"] / "backups",
                    tmp_path / "backups")
    target = new_db(cluster)
    _run_by_hand(script, tmp_path, cluster, target)
    expected = {table: tuple(found) for table, found in EXPECTED["tables"][backup_id].items()}
    assert table_fingerprints(cluster.url(target)) == expected


def test_the_readmes_format_2_steps_give_back_the_source_of_a_full_and_an_incremental(
        cluster: Cluster, new_db: Any, store: Store, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A format-2 chain made now (a full, changes, an incremental), fetched as `aws s3 cp
    --recursive` would, and the README's format-2 steps run as written on each backup:
    each restore is the source as it was at that backup, to the last line of a pg_dump."""
    assert shutil.which("zstd"), ("the README's format-2 steps need the zstd command line "
                                  "tool: apt-get install zstd (.ci/run installs it)")
    monkeypatch.setenv("SUPABACKUP_SPLIT_BYTES", "65536")
    source = new_db(cluster)
    cluster.psql_file(SQL / "all_kinds.sql", source)
    cluster.execute(EXTRA, source)
    conn = ConnectionInfo.from_url(cluster.url(source))
    at = datetime(2026, 12, 2, 3, tzinfo=UTC)

    def backup(kind: str, seconds: int) -> Manifest:
        return run_backup(conn, store, BackupRequest(
            kind=kind, database_id="by-hand", jobs=3,
            backup_id=new_backup_id(at.replace(second=seconds), kind)))

    full = backup("full", 0)
    at_full = dump_lines(cluster.url(source))
    cluster.execute(CHANGE, source)
    incremental = backup("incremental", 1)
    at_incremental = dump_lines(cluster.url(source))

    # The chain is what the README's steps must cope with: format 2, an incremental whose
    # unchanged tables (the big one, in several page ranges) are in the full's folder.
    assert (full.format, incremental.format, incremental.kind) == (2, 2, "incremental")
    tables = {t.qualified: t for t in incremental.tables}
    big, odd = tables["kinds.big"], tables[ODD]
    assert big.held_in == full.backup_id and len(big.parts) >= 3, big
    assert odd.held_in == incremental.backup_id and odd.columns == [
        "Id", "a b", 'quote"d', "price", "doc", "span", "note"], odd
    assert {t.held_in for t in incremental.tables} == {full.backup_id, incremental.backup_id}

    prefix = store.key("by-hand", "backups") + "/"
    for key in store.list_keys(prefix):
        path = tmp_path / "backups" / key[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        store.s3.download_file(store.url.bucket, key, str(path))

    script = _readme_block("restore-by-hand-format2")
    for manifest, expected in ((full, at_full), (incremental, at_incremental)):
        target = new_db(cluster)
        _run_by_hand(_with_backup(script, manifest.backup_id), tmp_path, cluster, target)
        restored = dump_lines(cluster.url(target))
        assert restored == expected, (manifest.backup_id,
                                      sorted(set(restored) ^ set(expected))[:10])
