"""Backups stored years ago restore and verify: a chain kept in the repository as the
engine wrote it (tests/data/format1, made by devkit.stored_backup), restored on every run.

A change to the archive layout or the manifest that breaks these breaks every user's
existing backups; the tests say so before a release does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from supabackup.catalog import select_backup
from supabackup.dburl import ConnectionInfo
from supabackup.restore import run_restore
from supabackup.store import Store
from supabackup.verify import verify_database

from devkit.compare import table_fingerprints
from devkit.pg import Cluster

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
    stored.put_small(key, json.dumps({**manifest, "format": 2}).encode())
    with pytest.raises(StoreError, match="of manifest format 2, newer than this supabackup"):
        stored.manifests(EXPECTED["database_id"])


def test_the_readmes_restore_without_supabackup_gives_back_the_source(
        cluster: Cluster, new_db: Any, tmp_path: Path) -> None:
    """The README's steps for a person with only PostgreSQL's tools, run as written, on the
    stored incremental (whose unchanged tables are held by its full)."""
    import os
    import re
    import shutil
    import subprocess

    from supabackup.pgtools import child_env, find_tools
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [script] = re.findall(r"<!-- restore-by-hand:[^\n]*\n```bash\n(.*?)```", readme, re.S)
    [backup_id] = re.findall(r"^B=(\S+)", script, re.M)
    assert backup_id in EXPECTED["tables"] and backup_id.endswith("-incr")
    shutil.copytree(FORMAT1 / "objects" / "backups" / EXPECTED["database_id"] / "backups",
                    tmp_path / "backups")
    target = new_db(cluster)
    conn = ConnectionInfo.from_url(cluster.url(target))
    env = child_env(conn)
    env["PATH"] = f"{find_tools(17).bindir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()
              and "already exists" not in line and "transaction_timeout" not in line
              and "errors ignored on restore" not in line]
    assert errors == [], done.stderr[-3000:]
    expected = {table: tuple(found) for table, found in EXPECTED["tables"][backup_id].items()}
    assert table_fingerprints(cluster.url(target)) == expected
