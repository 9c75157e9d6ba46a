"""`make fuzz`: differential cases with random seeds, for as long as asked.

    python -m devkit.differential [--minutes M] [--seeds 1,2,3] [--modes cdc,incremental]
                                  [--servers 15,17] [--steps N]

Starts its own servers (PostgreSQL 15 with wal2json, 17 with pgoutput) and an in-process
moto S3. Each failing case is shrunk to the fewest steps that still fail, and written to
build/fuzz/<mode>-pg<major>-seed<seed>.txt: the seed, the problems, and the SQL that
built and drove the source (run it into an empty database to see the case). Exit status
1 when any case failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import boto3
from moto import mock_aws
from supabackup.store import BOTO_CONFIG, MIB, Store, StoreURL

from devkit.pg import Cluster, logical_cluster
from devkit.s3 import FAKE_CREDENTIALS

from .harness import MODES, CaseResult, run_case

OUT = Path("build/fuzz")


def shrink(result: CaseResult, cluster: Cluster, store: Store) -> CaseResult:
    """The fewest steps of the same seed that still fail."""
    smallest = result
    for steps in range(1, result.steps):
        again = run_case(result.mode, cluster, store, result.seed, steps=steps)
        if not again.ok:
            return again
    return smallest


def write(result: CaseResult, major: int) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{result.mode}-pg{major}-seed{result.seed}.txt"
    path.write_text(f"-- {result.summary()}\n\n" + "\n".join(result.log) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.differential")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seeds", default="", help="comma-separated; default: random")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--servers", default="15,17")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    os.environ.update(FAKE_CREDENTIALS)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    clusters = {major: logical_cluster(major).start()
                for major in map(int, args.servers.split(","))}
    failed = 0
    ran = 0
    deadline = time.monotonic() + args.minutes * 60
    try:
        with mock_aws():
            client = boto3.client("s3", region_name="us-east-1", config=BOTO_CONFIG)
            client.create_bucket(Bucket="fuzz")
            store = Store(StoreURL.parse("s3://fuzz/cases"), client, min_part_size=5 * MIB)
            queue = list(seeds)
            while (queue if seeds else time.monotonic() < deadline):
                seed = queue.pop(0) if seeds else random.randrange(1 << 30)  # noqa: S311
                for major, cluster in clusters.items():
                    for mode in args.modes.split(","):
                        result = run_case(mode, cluster, store, seed, steps=args.steps)
                        ran += 1
                        print(f"pg{major} {result.summary()}", flush=True)
                        if not result.ok:
                            failed += 1
                            small = shrink(result, cluster, store)
                            print(f"  smallest: {small.steps} step(s), written to "
                                  f"{write(small, major)}", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    print(f"{ran} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
