"""How long after its commit a change is safely in the store: change capture's recovery point.

A capture run peeks the slot, writes one segment and its index entry, then advances the
slot. On the default schedule (every minute) a change waits at most one interval for the
next run, then that run's length. This bench measures the run's length for batches of
committed transactions, against a baseline measured in the same run: decoding the same
changes alone (`pg_logical_slot_peek_changes`, which every capture must pay).

    .venv/bin/python bench/bench_capture.py [--batches 1,100,1000,5000]

PostgreSQL 17 (pgoutput) and moto's S3 server on loopback, as `make demo` uses them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import boto3
from supabackup import cdc
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.store import BOTO_CONFIG, Store, StoreURL

from devkit.pg import Cluster, logical_cluster
from devkit.s3 import LocalS3

SCHEDULE_SECONDS = 60


def commit_each(cluster: Cluster, db: str, count: int) -> None:
    conn = cluster.connect(db)
    try:
        with conn.cursor() as cur:
            for i in range(count):
                cur.execute("INSERT INTO orders (note, amount) VALUES (%s, %s)",
                            (f"order {i}", i % 997))
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,100,1000,5000",
                        help="transactions committed before each measured run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with logical_cluster(17) as cluster, LocalS3() as s3:
        s3.create_bucket("bench-capture")
        client = boto3.client("s3", endpoint_url=s3.endpoint, config=BOTO_CONFIG,
                              **{k.lower(): v for k, v in s3.env().items()
                                 if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                              region_name="us-east-1")
        store = Store(StoreURL.parse("s3://bench-capture/b"), client)
        cluster.create_database("shop")
        cluster.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text, amount int,"
                        " at timestamptz DEFAULT now())", "shop")
        conn = ConnectionInfo.from_url(cluster.url("shop"))
        state, base = cdc.start(conn, store, BackupRequest())
        print(f"bench: PostgreSQL 17, slot {state.slot} ({state.plugin}), moto S3 on loopback")
        print(f"{'transactions':>12}  {'decode only s':>13}  {'capture run s':>13}  "
              f"{'x decode':>8}  {'recovery point s':>16}")
        for count in batches:
            decode, run = [], []
            for _ in range(args.repeat):
                commit_each(cluster, "shop", count)
                db = cluster.connect("shop")
                with db.cursor() as cur:
                    t0 = time.perf_counter()
                    cur.execute(cdc.PEEK["pgoutput"], (state.slot, cdc.MAX_CHANGES,
                                                      state.publication))
                    cur.fetchall()
                    decode.append(time.perf_counter() - t0)
                db.close()
                t0 = time.perf_counter()
                result = cdc.run(conn, store, base.database_id)
                run.append(time.perf_counter() - t0)
                assert result.segment is not None and result.segment.transactions == count
            d, r = statistics.median(decode), statistics.median(run)
            print(f"{count:>12}  {d:>13.3f}  {r:>13.3f}  {r / d:>7.1f}x  "
                  f"{SCHEDULE_SECONDS + max(run):>16.1f}")
        cdc.drop(conn, store, base.database_id)
    print(f"recovery point = the schedule ({SCHEDULE_SECONDS} s) + the slowest run; "
          "target: under 120 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
