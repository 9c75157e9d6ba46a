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
import sys
import time
from typing import TYPE_CHECKING, Any

from harness import S3Endpoint, median
from supabackup import capture
from supabackup.backup import BackupRequest
from supabackup.dburl import ConnectionInfo
from supabackup.store import BOTO_CONFIG, Store, StoreURL

from devkit.pg import logical_cluster

if TYPE_CHECKING:
    from devkit.pg import Cluster

SCHEDULE_SECONDS = 60
BUCKET = "bench-capture"


def commit_each(cluster: Cluster, db: str, count: int) -> None:
    conn = cluster.connect(db)
    try:
        with conn.cursor() as cur:
            for i in range(count):
                cur.execute("INSERT INTO orders (note, amount) VALUES (%s, %s)",
                            (f"order {i}", i % 997))
    finally:
        conn.close()


def decode_only(cluster: Cluster, state: Any) -> float:
    """The baseline: the seconds to decode what is in the slot, without consuming it."""
    db = cluster.connect("shop")
    try:
        with db.cursor() as cur:
            t0 = time.perf_counter()
            cur.execute(capture.slot.PEEK["pgoutput"], (state.slot, capture.slot.MAX_CHANGES,
                                                       state.publication))
            cur.fetchall()
            return time.perf_counter() - t0
    finally:
        db.close()


def capture_run(conn: ConnectionInfo, store: Store, database_id: str, count: int) -> float:
    """The seconds of one capture run, which must store the `count` transactions committed."""
    t0 = time.perf_counter()
    result = capture.run(conn, store, database_id)
    seconds = time.perf_counter() - t0
    assert result.segment is not None and result.segment.transactions == count
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,100,1000,5000",
                        help="transactions committed before each measured run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with logical_cluster(17) as cluster, S3Endpoint("thread", bucket=BUCKET) as s3:
        store = Store(StoreURL.parse(f"s3://{BUCKET}/b"), s3.client(BOTO_CONFIG))
        cluster.create_database("shop")
        cluster.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, note text, amount int,"
                        " at timestamptz DEFAULT now())", "shop")
        conn = ConnectionInfo.from_url(cluster.url("shop"))
        state, base = capture.start(conn, store, BackupRequest())
        print(f"bench: PostgreSQL 17, slot {state.slot} ({state.plugin}), moto S3 on loopback")
        print(f"{'transactions':>12}  {'decode only s':>13}  {'capture run s':>13}  "
              f"{'x decode':>8}  {'recovery point s':>16}")
        for count in batches:
            decode, run = [], []
            for _ in range(args.repeat):
                commit_each(cluster, "shop", count)
                decode.append(decode_only(cluster, state))
                run.append(capture_run(conn, store, base.database_id, count))
            d, r = median(decode), median(run)
            assert d is not None and r is not None
            print(f"{count:>12}  {d:>13.3f}  {r:>13.3f}  {r / d:>7.1f}x  "
                  f"{SCHEDULE_SECONDS + max(run):>16.1f}")
        capture.drop(conn, store, base.database_id)
    print(f"recovery point = the schedule ({SCHEDULE_SECONDS} s) + the slowest run; "
          "target: under 120 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
