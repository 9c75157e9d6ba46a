"""Write the stored backups that tests/test_stored_format.py restores: a full backup and an
incremental of devkit/sql/all_kinds.sql, as this version of the engine stores them.

Backups a user took years ago must stay restorable whatever the engine becomes (a new
archive layout, a new manifest format). So the objects of one chain, in today's format
(manifest format 1: one custom-format archive per backup), are kept in the repository,
with the tables' fingerprints the source held at each backup, and the tests restore and
verify them on every run. Run this again only to add a format, never to replace one:

    .venv/bin/python -m devkit.stored_backup tests/data/format1
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import boto3
from moto import mock_aws
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.store import Store, StoreURL

from .compare import table_fingerprints
from .pg import Cluster, bindir_for

SQL = Path(__file__).resolve().parent / "sql" / "all_kinds.sql"
DATABASE_ID = "stored-format"
# What the incremental sees changed since the full: rows in, rows out, a row rewritten.
CHANGE = """
    INSERT INTO kinds.customers (email, name)
        SELECT 'stored' || g || '@example.com', 'Stored ' || g FROM generate_series(1, 5) g;
    UPDATE kinds.customers SET name = name || ' (renamed)' WHERE id = 100;
    DELETE FROM kinds.orders WHERE id % 7 = 0 AND status = 'cancelled';
    UPDATE kinds.orders SET note = 'stored format ' || id WHERE id % 5 = 0;
"""


def write(out: Path) -> None:
    if out.exists():
        raise SystemExit(f"{out} exists: stored formats are added, never replaced")
    with Cluster(bindir_for(15)) as cluster, mock_aws():
        cluster.create_database("source")
        cluster.psql_file(SQL, "source")
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="stored")
        store = Store(StoreURL.parse("s3://stored/backups"), client)
        conn = ConnectionInfo.from_url(cluster.url("source"))
        expected = {}
        full = run_backup(conn, store, BackupRequest(database_id=DATABASE_ID,
                                                     retention="weekly"))
        expected[full.backup_id] = table_fingerprints(cluster.url("source"))
        cluster.execute(CHANGE, "source")
        incremental = run_backup(conn, store, BackupRequest(
            database_id=DATABASE_ID, kind="incremental", retention="daily"))
        assert incremental.kind == "incremental", incremental.escalation
        expected[incremental.backup_id] = table_fingerprints(cluster.url("source"))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for key in store.list_keys("backups/"):
            path = tmp / "objects" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket="stored", Key=key)["Body"].read()
            if key.endswith("/manifest.json"):  # no path of this machine in the repository
                manifest = json.loads(body)
                manifest["pg_dump"] = Path(manifest["pg_dump"]).name
                body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
            path.write_bytes(body)
        (tmp / "expected.json").write_text(json.dumps(
            {"database_id": DATABASE_ID, "server": full.server_version,
             "pg_dump": full.pg_dump_version, "tables": expected}, indent=1, sort_keys=True))
        tmp.rename(out)
    print(f"wrote {out}: {full.backup_id} and {incremental.backup_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    write(parser.parse_args().out)


if __name__ == "__main__":
    main()
