"""Large databases on paper: backup and restore times on Lambda and on Fargate, and what a
month of backups costs, from figures measured by bench/bench_parallel.py.

The measured inputs are bench_parallel.py's slow-link model (bench/README.md, "Benchmark:
parallel backups and restores"): the database bytes a second one COPY stream carries
through an 8 MB/s link, the client CPU a GiB costs (supabackup, psql, pg_dump), the fixed
cost of a run, and how much longer a restore took than a backup through the same link.
They are read from bench/results/parallel.json when `make bench-parallel` has written it,
else taken from the run recorded in bench/README.md (commit 1298995, 2026-12-02).

  backup time(size, N workers, vCPUs) = fixed + start + size / rate
      rate = min(N x one stream, vCPUs / client CPU per byte)
  restore time = backup time x the measured restore/backup ratio

On Lambda, N workers get N/2 vCPUs (the engine's default is two workers a CPU), i.e.
memory = 1,769 MB a vCPU, at least 1,024 MB; a run ends at 15 minutes (840 s of work:
budget.MARGIN and the report). On Fargate the task runs as long as it takes, with 2
workers a vCPU up to tabledata.MAX_JOBS, and starts in about START_FARGATE seconds
(provisioning, the image's pull, the code's download: an assumption, not measured here).

Cost, a month: 4.35 weekly fulls and 30 daily incrementals (an incremental scans every
table and dumps the changed ones: INCREMENTAL_SHARE of a full's time, measured by
bench_incremental.py at 5% of the bytes changed), each on the path the state machine
would choose; storage of what the default retention keeps (4-5 weekly fulls and 14 days of
incrementals in S3 Standard, 12 monthly archives in Glacier Instant Retrieval), at the
compression bench_parallel.py measured. Prices: AWS's published us-east-1 prices, arm64.
Supabase's own prices beside them: Pro includes 7 days of daily backups (not
downloadable for newer projects, nor physical ones above 15 GB); PITR is an add-on.

  python bench/model_large.py              # make model-large
  python bench/model_large.py --stream-mbps 40 --json /tmp/large.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "parallel.json"
MB, GB, GIB = 10**6, 10**9, 2**30

# bench_parallel.py on commit 1298995 (bench/README.md): used when results/parallel.json
# is absent. The restore ratio: restore --jobs 4 8.21 s against backup --jobs 4 7.10 s,
# both through the link, 0.25 GiB; the compression: our backup 31 MiB of 0.25 GiB.
RECORDED = {"stream_bytes_s": 11.6 * MB, "client_cpu_s_per_gib": 5.6, "fixed_seconds": 0.97,
            "restore_over_backup": 8.21 / 7.10, "stored_per_byte": 31 / 256,
            "source": "bench/README.md, bench_parallel.py on commit 1298995"}

LAMBDA_WORK = 840.0          # seconds of work in one 15-minute run
LAMBDA_MB_PER_VCPU = 1769    # Lambda gives one vCPU per 1,769 MB of memory
START_FARGATE = 90.0         # seconds: task placement, image pull, code and layer download
INCREMENTAL_SHARE = 0.30     # an incremental's time / the full's (bench_incremental, 5% changed)
DAILY_CHANGE = 0.05          # the bytes an incremental stores / the full's
MAX_JOBS = 16                # tabledata.MAX_JOBS

# AWS, us-east-1, published prices (arm64 where there is a choice).
LAMBDA_GB_S = 0.0000133334
FARGATE_VCPU_H = 0.03238
FARGATE_GB_H = 0.00356
FARGATE_SPOT_DISCOUNT = 0.70      # "up to 70%": the best case
STEP_TRANSITION = 0.000025        # Standard workflows; about 6 a run
S3_STANDARD_GB_MONTH = 0.023
S3_GLACIER_IR_GB_MONTH = 0.004
S3_PUT = 0.005 / 1000
PART_BYTES = 16 * 2**20           # store.part_size_for, roughly, for big tables

# Supabase (supabase.com/pricing and docs): what its own backups cost beside ours.
SUPABASE = [("Pro plan: daily backups, 7 days (physical above 15 GB: not downloadable)",
             "included in $25/month"),
            ("PITR add-on, 7 days (needs at least the Small compute add-on)", "$100/month"),
            ("PITR add-on, 14 days", "$200/month"),
            ("PITR add-on, 28 days", "$400/month")]

SIZES_GB = (10, 100, 1000)
LAMBDA_WORKERS = (1, 2, 4, 6)
FARGATE_VCPUS = ((4, 8), (8, 16), (16, 32))   # (vCPU, GB of memory)


@dataclass(frozen=True)
class Inputs:
    stream_bytes_s: float
    client_cpu_s_per_gib: float
    fixed_seconds: float
    restore_over_backup: float
    stored_per_byte: float
    source: str

    @classmethod
    def load(cls, path: Path) -> Inputs:
        """The measured figures: results/parallel.json when present, else the recorded run."""
        figures = dict(RECORDED)
        if path.exists():
            data = json.loads(path.read_text())
            model = data["lambda_model"]
            slow = data["sizes"][0]["median"]
            figures.update(stream_bytes_s=model["stream_bytes_s"],
                           client_cpu_s_per_gib=model["client_cpu_s_per_gib"],
                           fixed_seconds=model["fixed_seconds"],
                           restore_over_backup=(slow["restore-j4/slow"]["wall"]
                                                / slow["backup-j4/slow"]["wall"]),
                           source=str(path.relative_to(REPO)))
        return cls(**figures)


@dataclass(frozen=True)
class Machine:
    name: str
    workers: int
    vcpus: float
    memory_gb: float
    lambda_: bool

    def rate(self, inputs: Inputs) -> float:
        """Database bytes a second: the streams, or the client's CPUs, whichever binds."""
        cpu_bound = self.vcpus * GIB / inputs.client_cpu_s_per_gib
        return min(self.workers * inputs.stream_bytes_s, cpu_bound)

    def backup_seconds(self, size: float, inputs: Inputs) -> float:
        start = 0.0 if self.lambda_ else START_FARGATE
        return inputs.fixed_seconds + start + size / self.rate(inputs)

    def restore_seconds(self, size: float, inputs: Inputs) -> float:
        start = 0.0 if self.lambda_ else START_FARGATE
        return start + (self.backup_seconds(size, inputs) - start) * inputs.restore_over_backup

    def cost(self, seconds: float) -> float:
        if self.lambda_:
            return seconds * self.memory_gb * LAMBDA_GB_S
        return seconds / 3600 * (self.vcpus * FARGATE_VCPU_H + self.memory_gb * FARGATE_GB_H)


def lambda_machine(workers: int) -> Machine:
    vcpus = max(workers / 2, 1024 / LAMBDA_MB_PER_VCPU)
    memory_mb = min(10240, max(1024, math.ceil(workers / 2) * LAMBDA_MB_PER_VCPU))
    return Machine(f"Lambda, {workers} worker{'s' * (workers > 1)} ({memory_mb} MB)", workers,
                   min(vcpus, 6), memory_mb / 1024, True)


def fargate_machine(vcpus: int, memory_gb: int) -> Machine:
    workers = min(MAX_JOBS, 2 * vcpus)
    return Machine(f"Fargate {vcpus} vCPU / {memory_gb} GB, {workers} workers", workers,
                   vcpus, memory_gb, False)


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def times_table(inputs: Inputs) -> list[dict[str, Any]]:
    machines = [lambda_machine(n) for n in LAMBDA_WORKERS] + [
        fargate_machine(v, m) for v, m in FARGATE_VCPUS]
    print(f"\nexpected time of a full backup / a restore (rate: min(workers x "
          f"{inputs.stream_bytes_s / MB:.1f} MB/s, vCPUs / {inputs.client_cpu_s_per_gib:.1f} "
          f"CPU-s per GiB); restore = {inputs.restore_over_backup:.2f} x backup)")
    print(f"  {'machine':<42}{'MB/s':>7}" + "".join(f"{f'{s:,} GB':>22}" for s in SIZES_GB))
    rows = []
    for m in machines:
        cells = []
        for size_gb in SIZES_GB:
            b = m.backup_seconds(size_gb * GB, inputs)
            r = m.restore_seconds(size_gb * GB, inputs)
            over = m.lambda_ and b > LAMBDA_WORK
            cells.append({"size_gb": size_gb, "backup_s": b, "restore_s": r,
                          "fits_lambda": not over if m.lambda_ else None})
        rows.append({"machine": m.name, "rate_bytes_s": m.rate(inputs), "cells": cells})
        text = "".join(f"{(human(c['backup_s']) + ' / ' + human(c['restore_s'])):>18}"
                       f"{' (x)' if c['fits_lambda'] is False else '    '}" for c in cells)
        print(f"  {m.name:<42}{m.rate(inputs) / MB:7.0f}{text}")
    largest = {n: LAMBDA_WORK * lambda_machine(n).rate(inputs) for n in LAMBDA_WORKERS}
    print("  (x): more than one 15-minute Lambda run: the state machine sends it to Fargate."
          "  Largest backup one run holds: " + ", ".join(
              f"{n} worker{'s' * (n > 1)} {v / GB:.0f} GB" for n, v in largest.items()))
    return rows


def month_cost(size: float, inputs: Inputs) -> dict[str, Any]:
    """A month of the default schedule for a database of `size` bytes, on the path the
    state machine picks for each run (Lambda with 6 workers when it fits, else Fargate
    with 4 vCPU, or 16 vCPU when 4 would take over 12 hours)."""
    small = lambda_machine(6)
    full_l = small.backup_seconds(size, inputs)
    inc_l = full_l * INCREMENTAL_SHARE

    def pick(seconds_on_lambda: float, full: bool) -> tuple[Machine, float]:
        if seconds_on_lambda <= LAMBDA_WORK:
            return small, seconds_on_lambda
        for vcpus, mem in FARGATE_VCPUS:
            m = fargate_machine(vcpus, mem)
            t = m.backup_seconds(size, inputs)
            t = t if full else START_FARGATE + (t - START_FARGATE) * INCREMENTAL_SHARE
            if t <= 12 * 3600 or vcpus == 16:
                return m, t
        raise AssertionError("unreachable")
    full_m, full_s = pick(full_l, True)
    inc_m, inc_s = pick(inc_l, False)
    stored_full = size * inputs.stored_per_byte
    compute = 4.35 * full_m.cost(full_s) + 30 * inc_m.cost(inc_s)
    spot = (4.35 * full_m.cost(full_s) * (0 if full_m.lambda_ else FARGATE_SPOT_DISCOUNT)
            + 30 * inc_m.cost(inc_s) * (0 if inc_m.lambda_ else FARGATE_SPOT_DISCOUNT))
    requests = (4.35 + 30 * DAILY_CHANGE) * stored_full / PART_BYTES * S3_PUT
    storage = ((5 * stored_full + 14 * DAILY_CHANGE * stored_full) / GB * S3_STANDARD_GB_MONTH
               + 12 * stored_full / GB * S3_GLACIER_IR_GB_MONTH)
    steps = (4.35 + 30) * 6 * STEP_TRANSITION
    return {"size_gb": size / GB, "full": [full_m.name, full_s], "incremental": [inc_m.name, inc_s],
            "compute": compute, "compute_spot": compute - spot, "s3_requests": requests,
            "s3_storage": storage, "step_functions": steps,
            "total": compute + requests + storage + steps}


def cost_table(inputs: Inputs) -> list[dict[str, Any]]:
    print("\na month of backups (4.35 weekly fulls, 30 daily incrementals, default retention), "
          "AWS us-east-1, arm64")
    print(f"  {'database':>9}  {'full runs on':<46}{'incremental on':<46}"
          f"{'compute $':>10}{'(Spot)':>8}{'S3 $':>9}{'total $':>9}")
    rows = []
    for size_gb in SIZES_GB:
        c = month_cost(size_gb * GB, inputs)
        rows.append(c)
        print(f"  {size_gb:>6,} GB  {c['full'][0] + ', ' + human(c['full'][1]):<46}"
              f"{c['incremental'][0] + ', ' + human(c['incremental'][1]):<46}"
              f"{c['compute']:10.2f}{c['compute_spot']:8.2f}"
              f"{c['s3_storage'] + c['s3_requests']:9.2f}{c['total']:9.2f}")
    print(f"  (stored: {inputs.stored_per_byte:.3f} bytes per database byte, as measured; "
          f"incrementals store {DAILY_CHANGE:.0%} of a full; Step Functions under $0.01)")
    print("\nSupabase's own, for the same database:")
    for what, price in SUPABASE:
        print(f"  {what:<78}{price}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_large.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="bench_parallel.py's results (default: bench/results/parallel.json)")
    parser.add_argument("--stream-mbps", type=float,
                        help="override the measured MB/s of database one stream carries")
    parser.add_argument("--json", type=Path, help="write the tables here as JSON")
    args = parser.parse_args(argv)
    inputs = Inputs.load(args.results)
    if args.stream_mbps:
        inputs = Inputs(**{**inputs.__dict__, "stream_bytes_s": args.stream_mbps * MB,
                           "source": inputs.source + f", --stream-mbps {args.stream_mbps:g}"})
    print(f"inputs ({inputs.source}): one stream {inputs.stream_bytes_s / MB:.1f} MB/s of "
          f"database, client {inputs.client_cpu_s_per_gib:.1f} CPU-s per GiB, fixed "
          f"{inputs.fixed_seconds:.2f} s, restore {inputs.restore_over_backup:.2f} x backup, "
          f"stored {inputs.stored_per_byte:.3f} bytes per byte; Fargate start "
          f"{START_FARGATE:.0f} s (assumed)")
    out = {"inputs": inputs.__dict__, "times": times_table(inputs), "costs": cost_table(inputs)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
