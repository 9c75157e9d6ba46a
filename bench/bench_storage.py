"""Benchmark of Storage files: supabackup's file copy against `aws s3 sync`.

It starts one throwaway PostgreSQL 17 cluster with Supabase's storage schema
(devkit/sql/supabase_platform.sql) and two moto servers, each in its own process: the
source project's Storage S3 endpoint and the store. The source gets SMALL files of
1-20 KiB in many folders and LARGE files of LARGE_MIB MiB (random bytes, seeded), and
their rows in storage.objects as Supabase Storage writes them. Then, each from an empty
store, in a rotating order, one uncounted warm-up round and REPEAT counted rounds:

  ours          run_backup(conn, store, BackupRequest(kind="full", profile="supabase",
                files=CopyRequest(endpoint))): the database and its files, in this process
  copy_files    supabackup.files.copy.copy_files alone, into a BackupWriter of
                store.begin(): the files and nothing else
  aws s3 sync   `aws s3 sync s3://SOURCE DIR --endpoint-url SOURCE`, then
                `aws s3 sync DIR s3://STORE/... --endpoint-url STORE` (one command cannot
                sync between two endpoints); the two wall times are added

Then the incremental: a full backup and a sync kept as the base, 1% of the small files
and one large file rewritten on the source, an incremental backup and a sync again; the
bytes the incremental stored against the bytes of the changed files.

It prints medians, the ratios against aws s3 sync measured in the same run, where the
CPU time went, the targets as PASS/MISS (never asserted), and writes every figure to
bench/results/storage.json. awscli comes from its own venv (requirements-awscli.txt,
build/tools/awscli; `make bench-storage` installs it). Everything it starts or writes
is removed at the end, also on Ctrl-C. Method and caveats: bench/README.md.

  python bench/bench_storage.py                           # make bench-storage
  python bench/bench_storage.py --small 1000 --large 2 --repeat 1     # a quick run
  BENCH_STORAGE_SMALL=1000 BENCH_STORAGE_LARGE=2 make bench-storage   # the same
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import harness
from botocore.config import Config
from harness import BUCKET, MIB, Lab, S3Endpoint, fmt_mb, measure, verdict
from supabackup import backup as backup_module
from supabackup.backup import BackupRequest, run_backup
from supabackup.dburl import ConnectionInfo
from supabackup.files import run as files_run_module
from supabackup.files.copy import CopyRequest, copy_files
from supabackup.files.endpoint import StorageEndpoint
from supabackup.manifest import Manifest
from supabackup.store import BOTO_CONFIG, Store, StoreURL

from devkit.s3 import FAKE_CREDENTIALS
from devkit.storage_peer import StoragePeer

RESULTS = harness.REPO / "bench" / "results" / "storage.json"
AWS = harness.REPO / "build" / "tools" / "awscli" / "bin" / "aws"
SQL = harness.REPO / "devkit" / "sql" / "supabase_platform.sql"
DBNAME = "bench_storage"
SOURCE_BUCKET = "media"          # the project's Storage bucket
STORE_PREFIX = "bench-storage"   # ours: s3://supabackup-bench/bench-storage
AWS_PREFIX = "aws-sync"          # aws s3 sync: s3://supabackup-bench/aws-sync/media/...
COPY_DATABASE = "bench-copy-files"  # copy_files alone: a database id of its own
KIB = 1024

# Targets the project set (printed as PASS/MISS, never asserted).
TARGET_VS_AWS = 1.0          # ours wall time / aws s3 sync (down + up): no slower
TARGET_STORED_OVER = 1.05    # incremental's stored bytes / bytes of the changed files

METHODS = ("ours", "copy_files", "aws s3 sync")

# The small files' folders under users/<user>/ and their content types.
FOLDERS = (("avatars", "png", "image/png"),
           ("documents/2025", "pdf", "application/pdf"),
           ("documents/2026/invoices", "pdf", "application/pdf"),
           ("photos/2026/05", "jpg", "image/jpeg"),
           ("photos/2026/06", "jpg", "image/jpeg"),
           ("exports", "csv", "text/csv"))
USERS_PER_FILES = 20         # one user folder per 20 small files: 500 for 10,000


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# --- the data set ------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    key: str
    size: int
    content_type: str
    large: bool = False

    def body(self, seed: int, generation: int = 0) -> bytes:
        """The file's bytes: random, a function of the seed, the key and the generation."""
        rng = random.Random(f"{seed}/{generation}/{self.key}")  # noqa: S311 - data, not a secret
        return rng.randbytes(self.size)


def plan_files(args: argparse.Namespace) -> list[SourceFile]:
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible data set, not a secret
    users = max(1, args.small // USERS_PER_FILES)
    files = []
    for i in range(args.small):
        folder, ext, content_type = FOLDERS[rng.randrange(len(FOLDERS))]
        files.append(SourceFile(f"users/u{rng.randrange(users):04d}/{folder}/file-{i:05d}.{ext}",
                                rng.randint(args.small_min_kib * KIB, args.small_max_kib * KIB),
                                content_type))
    files += [SourceFile(f"videos/{i:03d}/recording-{i:03d}.mp4", args.large_mib * MIB,
                         "video/mp4", large=True) for i in range(args.large)]
    return files


ROWS_SQL = """
INSERT INTO storage.objects (bucket_id, name, metadata, user_metadata, version)
SELECT %(bucket)s, n,
       jsonb_build_object('eTag', e, 'size', s, 'mimetype', m, 'cacheControl', 'no-cache',
                          'lastModified', lm, 'contentLength', s, 'httpStatusCode', 200),
       '{}'::jsonb, gen_random_uuid()::text
FROM unnest(%(names)s::text[], %(etags)s::text[], %(sizes)s::bigint[], %(types)s::text[],
            %(modified)s::text[]) AS x(n, e, s, m, lm)
ON CONFLICT (name, bucket_id) DO UPDATE SET metadata = EXCLUDED.metadata,
    user_metadata = EXCLUDED.user_metadata, version = EXCLUDED.version
"""


class Source:
    """The source project: its database (Supabase's storage schema) and its Storage."""

    def __init__(self, lab: Lab, s3: S3Endpoint, files: list[SourceFile], seed: int) -> None:
        self.lab, self.s3, self.files, self.seed = lab, s3, files, seed
        self.dsn = lab.cluster.url(DBNAME)
        self.client = s3.client(Config(max_pool_connections=16,
                                       retries={"max_attempts": 5, "mode": "standard"}))
        self.generation = {f.key: 0 for f in files}

    @property
    def conn(self) -> ConnectionInfo:
        return ConnectionInfo.from_url(self.dsn)

    @property
    def endpoint(self) -> StorageEndpoint:
        return StorageEndpoint(self.s3.url, "us-east-1", FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def create(self) -> None:
        """The database with Supabase's schema, the bucket, the files and their rows."""
        self.lab.cluster.create_database(DBNAME)
        self.lab.cluster.psql_file(SQL, DBNAME)
        self.lab.cluster.execute(f"INSERT INTO storage.buckets (id, name) VALUES "
                                 f"('{SOURCE_BUCKET}', '{SOURCE_BUCKET}')", DBNAME)

        def put(f: SourceFile) -> None:
            self.client.put_object(Bucket=SOURCE_BUCKET, Key=f.key, Body=f.body(self.seed),
                                   ContentType=f.content_type)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, self.files))
        self.write_rows()

    def write_rows(self) -> None:
        """Every file's row, in one statement: what StoragePeer.record_upload writes for
        one (the backend's ETag, size, type, last modified; a new version)."""
        types = {f.key: f.content_type for f in self.files}
        listed = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=SOURCE_BUCKET):
            listed += page.get("Contents", [])
        conn = self.lab.cluster.connect(DBNAME)
        try:
            with conn.cursor() as cur:
                cur.execute(ROWS_SQL, {
                    "bucket": SOURCE_BUCKET, "names": [o["Key"] for o in listed],
                    "etags": [o["ETag"] for o in listed], "sizes": [o["Size"] for o in listed],
                    "types": [types[o["Key"]] for o in listed],
                    "modified": [o["LastModified"].isoformat() for o in listed]})
            conn.cursor().execute("VACUUM (ANALYZE) storage.objects")
        finally:
            conn.close()

    def change(self, fraction: float, large: int) -> list[SourceFile]:
        """Rewrite `fraction` of the small files (new bytes, new size) and `large` large
        ones (new bytes), through StoragePeer as Supabase Storage writes them; the files
        as they are now."""
        rng = random.Random(self.seed + 1)  # noqa: S311 - a workload, not a secret
        small = [f for f in self.files if not f.large]
        picked = rng.sample(small, max(1, round(len(small) * fraction)) if small else 0)
        sizes = [f.size for f in small]
        changed = [SourceFile(f.key, rng.choice(sizes), f.content_type) for f in picked]
        changed += [SourceFile(f.key, f.size, f.content_type, large=True)
                    for f in rng.sample([f for f in self.files if f.large],
                                        min(large, sum(f.large for f in self.files)))]
        peer = StoragePeer(self.client, self.dsn)
        for f in changed:
            self.generation[f.key] += 1
            peer.put(SOURCE_BUCKET, f.key, f.body(self.seed, self.generation[f.key]),
                     f.content_type)
        now = {f.key: f for f in changed}
        self.files = [now.get(f.key, f) for f in self.files]
        return changed


# --- measuring ---------------------------------------------------------------------------

class PhaseClock:
    """How long the file step and copy_files took inside the last run_backup: the names
    backup.py and files/run.py call are wrapped (the engine is not changed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._wrap(backup_module, "back_up_files", "file_step")
        self._wrap(files_run_module, "copy_files", "copy_in_backup")

    def _wrap(self, module: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = time.perf_counter() - started
        setattr(module, name, timed)


class RequestCounter:
    """The S3 calls this process's boto3 clients make, by endpoint and operation: a
    handler on boto3's default session, which every client made after it inherits (the
    engine's FileCopier makes its source client per run). Each HTTP attempt is counted
    too, so retries show."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names  # endpoint URL -> its name in the report
        self.calls: dict[str, int] = {}
        self.sends = 0
        self._lock = threading.Lock()
        boto3.setup_default_session()
        assert boto3.DEFAULT_SESSION is not None
        boto3.DEFAULT_SESSION.events.register("before-call.s3", self._call)
        boto3.DEFAULT_SESSION.events.register("before-send.s3", self._send)

    def _call(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        url = str(params.get("url", ""))
        where = next((n for u, n in self.names.items() if url.startswith(u)), "other")
        with self._lock:
            key = f"{where} {model.name}"
            self.calls[key] = self.calls.get(key, 0) + 1

    def _send(self, **_: Any) -> None:
        with self._lock:
            self.sends += 1

    def take(self) -> dict[str, Any]:
        """The counts since the last take."""
        with self._lock:
            out = {"calls": dict(sorted(self.calls.items())), "attempts": self.sends}
            self.calls, self.sends = {}, 0
        return out


def reset_peak_rss() -> None:
    """Reset this process's VmHWM (proc(5): clear_refs 5), to read one run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def own_peak_mb() -> float | None:
    got = harness.proc_status(os.getpid())
    return None if got is None else got[1] / 1024


class Account:
    """Where the machine's CPU time went during one run: the client (this process and
    the children it reaped: supabackup's pg_dump and psql, or aws under GNU time), the
    server, each moto process, and the rest (noise)."""

    def __init__(self, lab: Lab, source: S3Endpoint) -> None:
        self.lab, self.source = lab, source
        self.postmaster = int((lab.cluster.datadir / "postmaster.pid").read_text().split()[0])

    def snapshot(self) -> tuple[float, ...]:
        me = os.times()
        pg = harness.process_cpu(self.postmaster, children=True) + sum(
            harness.process_cpu(p) for p in harness.children(self.postmaster))
        return (harness.machine_busy(), me.user + me.system,
                me.children_user + me.children_system, pg, self.source.cpu_seconds(),
                self.lab.s3.cpu_seconds())

    def since(self, before: tuple[float, ...]) -> dict[str, float]:
        busy, me, reaped, pg, src, dst = (a - b for a, b in
                                          zip(self.snapshot(), before, strict=True))
        return {"client": me + reaped, "postgres": pg, "source_s3": src, "store_s3": dst,
                "others": max(0.0, busy - me - reaped - pg - src - dst)}


def reset(s3: S3Endpoint) -> None:
    """Forget every bucket of a moto server (its reset API) and make the bucket again:
    an empty store in a moment, where deleting 10,000 objects takes a while."""
    urllib.request.urlopen(urllib.request.Request(  # noqa: S310 - loopback
        f"{s3.url}/moto-api/reset", method="POST"), timeout=30).read()
    s3.client().create_bucket(Bucket=s3.bucket)


def count_objects(s3: S3Endpoint, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under a prefix of the store."""
    n = size = 0
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket,
                                                                       Prefix=prefix):
        for item in page.get("Contents", []):
            n, size = n + 1, size + int(item["Size"])
    return n, size


class Runner:
    """Runs each method once, from an empty store, and returns its figures."""

    def __init__(self, lab: Lab, source: Source, aws: Path, settle_seconds: float) -> None:
        self.lab, self.source, self.aws_path = lab, source, aws
        self.settle_seconds = settle_seconds
        self.requests = RequestCounter({source.s3.url: "source", lab.s3.url: "store"})
        self.store = Store(StoreURL.parse(f"s3://{BUCKET}/{STORE_PREFIX}"), boto3.client(
            "s3", endpoint_url=lab.s3.url, region_name="us-east-1",
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=BOTO_CONFIG))  # the engine's own client configuration
        self.account = Account(lab, source.s3)
        self.clock = PhaseClock()
        self.syncdir = lab.workdir / "sync"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.aws_env = {**env, **FAKE_CREDENTIALS, "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                        "AWS_EC2_METADATA_DISABLED": "true"}

    def run(self, method: str) -> dict[str, Any]:
        reset(self.lab.s3)
        shutil.rmtree(self.syncdir, ignore_errors=True)
        busy_before = harness.settle(self.settle_seconds) if self.settle_seconds > 0 else None
        if method == "ours":
            res = self.ours()
        elif method == "copy_files":
            res = self.copy_alone()
        else:
            res = self.aws_sync()
        res["busy_cpus_before"] = busy_before
        res["source_s3_rss_mb"], res["store_s3_rss_mb"] = (self.source.s3.rss_mb(),
                                                           self.lab.s3.rss_mb())
        return res

    def backup(self, kind: str) -> tuple[Manifest, dict[str, Any]]:
        self.clock.seconds.clear()
        self.requests.take()
        before = self.account.snapshot()
        rss_before = harness.rss_mb(os.getpid())
        reset_peak_rss()
        started = time.perf_counter()
        manifest = run_backup(self.source.conn, self.store, BackupRequest(
            kind=kind, profile="supabase", files=CopyRequest(self.source.endpoint)))
        wall = time.perf_counter() - started
        files = manifest.files
        if files is None or not files.complete or files.out_of_step():
            raise RuntimeError(f"the {kind} backup's files are not complete and in step")
        step = self.clock.seconds.get("file_step", 0.0)
        return manifest, {
            "wall": wall, "file_step": step, "database_part": wall - step,
            "copy_in_backup": self.clock.seconds.get("copy_in_backup"),
            "files": len(files.files), "changes": dict(files.changes),
            "rss_mb": {"supabackup": own_peak_mb(), "before": rss_before},
            "cpu": self.account.since(before), "requests": self.requests.take()}

    def ours(self) -> dict[str, Any]:
        _, res = self.backup("full")
        self._check(res["files"], res["changes"]["stored_bytes"], "ours")
        return res

    def copy_alone(self) -> dict[str, Any]:
        writer = self.store.begin(COPY_DATABASE, f"copy-{uuid.uuid4().hex[:12]}")
        self.requests.take()
        before = self.account.snapshot()
        rss_before = harness.rss_mb(os.getpid())
        reset_peak_rss()
        started = time.perf_counter()
        _, done, missing, copied = copy_files(CopyRequest(self.source.endpoint), self.store,
                                              writer, {"retention": "daily", "kind": "full"},
                                              None)
        wall = time.perf_counter() - started
        cpu = self.account.since(before)
        if missing:
            raise RuntimeError(f"copy_files left {len(missing)} files")
        self._check(len(done), copied.stored_bytes, "copy_files")
        # Not committed, and not discarded file by file: the next run resets the store.
        return {"wall": wall, "files": len(done), "stored_bytes": copied.stored_bytes,
                "rss_mb": {"supabackup": own_peak_mb(), "before": rss_before}, "cpu": cpu,
                "requests": self.requests.take()}

    def aws_sync(self) -> dict[str, Any]:
        before = self.account.snapshot()
        down, down_files = self.aws("download")
        up, up_files = self.aws("upload")
        cpu = self.account.since(before)
        stored, stored_bytes = count_objects(self.lab.s3, AWS_PREFIX + "/")
        self._check(stored, stored_bytes, "aws s3 sync")
        return {"wall": down.wall + up.wall, "download_wall": down.wall, "upload_wall": up.wall,
                "downloaded": down_files, "uploaded": up_files,
                "rss_mb": {"aws_download": down.rss_tree_kb / 1024,
                           "aws_upload": up.rss_tree_kb / 1024}, "cpu": cpu}

    def aws_sync_kept(self) -> float:
        """A sync into the store beside a backup (the store is not reset): a base."""
        shutil.rmtree(self.syncdir, ignore_errors=True)
        down, _ = self.aws("download")
        up, _ = self.aws("upload")
        return down.wall + up.wall

    def aws(self, direction: str) -> tuple[harness.Sample, int]:
        """One `aws s3 sync`: the source to the local folder, or the folder to the store;
        the sample and how many files it copied (its `download:`/`upload:` lines)."""
        local = self.syncdir / SOURCE_BUCKET
        local.mkdir(parents=True, exist_ok=True)
        if direction == "download":
            # --exact-timestamps: without it a download sync skips a file whose size did
            # not change (it only fetches what is larger, smaller or older locally)
            argv = [str(self.aws_path), "s3", "sync", f"s3://{SOURCE_BUCKET}", str(local),
                    "--endpoint-url", self.source.s3.url, "--no-progress",
                    "--exact-timestamps"]
        else:
            argv = [str(self.aws_path), "s3", "sync", str(self.syncdir), f"s3://{BUCKET}/{AWS_PREFIX}",
                    "--endpoint-url", self.lab.s3.url, "--no-progress"]
        log = self.lab.workdir / "aws.out"
        with open(log, "wb") as out:
            sample = measure(argv, self.aws_env, stdout=out)
        lines = log.read_text(errors="replace").splitlines()
        log.unlink()
        return sample, sum(1 for line in lines if line.startswith(f"{direction}:"))

    def _check(self, files: int, stored_bytes: int, method: str) -> None:
        want = (len(self.source.files), self.source.total_bytes)
        if (files, stored_bytes) != want:
            raise RuntimeError(f"{method} stored {files} files, {stored_bytes} bytes; the "
                               f"source has {want[0]} files, {want[1]} bytes")


# --- the incremental ---------------------------------------------------------------------

def incremental(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """A base (a full backup, a sync), the changes, an incremental backup and a sync again."""
    print("\n== incremental: a full backup and a sync as the base ...", flush=True)
    runner.run("ours")  # resets the store; keeps what it stored
    aws_base = runner.aws_sync_kept()
    changed = runner.source.change(args.change_pct / 100, args.change_large)
    changed_bytes = sum(f.size for f in changed)
    print(f"   changed {len(changed)} files ({changed_bytes / MIB:.1f} MiB) on the source; "
          "the incremental backup and the sync again ...", flush=True)
    if runner.settle_seconds > 0:
        harness.settle(runner.settle_seconds)
    _, second = runner.backup("incremental")
    before = runner.account.snapshot()
    down, down_files = runner.aws("download")
    up, up_files = runner.aws("upload")
    aws_cpu = runner.account.since(before)
    return {"changed_files": len(changed),
            "changed_small": sum(not f.large for f in changed),
            "changed_large": sum(f.large for f in changed),
            "changed_bytes": changed_bytes, "ours": second, "aws_base_wall": aws_base,
            "aws": {"wall": down.wall + up.wall, "download_wall": down.wall,
                    "upload_wall": up.wall, "downloaded": down_files, "uploaded": up_files,
                    "cpu": aws_cpu}}


# --- the report --------------------------------------------------------------------------

def _described(res: dict[str, Any]) -> str:
    extra = ""
    if "download_wall" in res:
        extra = f"download {res['download_wall']:.2f}s + upload {res['upload_wall']:.2f}s   "
    elif "file_step" in res:
        extra = (f"database part {res['database_part']:.2f}s, file step "
                 f"{res['file_step']:.2f}s   ")
    cpu = "  ".join(f"{k} {v:.1f}" for k, v in res["cpu"].items())
    return f"{extra}CPU s: {cpu}"


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    extra = ("download_wall", "upload_wall", "file_step", "database_part", "copy_in_backup")
    med: dict[str, Any] = {m: harness.summarize_runs(results, extra)
                           for m, results in runs.items()}
    aws = med["aws s3 sync"]["wall"]
    med["ratios"] = {"ours_vs_aws": med["ours"]["wall"] / aws,
                     "copy_files_vs_aws": med["copy_files"]["wall"] / aws,
                     "file_step_vs_aws": med["ours"]["file_step"] / aws,
                     "ours_vs_aws_best": med["ours"]["wall_min"] / med["aws s3 sync"]["wall_min"]}
    return med


def print_requests(label: str, requests: dict[str, Any], files: int) -> None:
    """The S3 calls of one run (its last), in all and per file."""
    calls = requests["calls"]
    text = ", ".join(f"{k} {v:,}" for k, v in calls.items())
    total = sum(calls.values())
    print(f"  S3 calls of {label} (last run): {total:,} ({total / max(files, 1):.2f} a file; "
          f"{requests['attempts']:,} HTTP attempts): {text}")


def report(source: Source, setup: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
           inc: dict[str, Any]) -> dict[str, Any]:
    med = summarize(runs)
    files, total = len(source.files), source.total_bytes
    small = [f for f in source.files if not f.large]
    large = [f for f in source.files if f.large]
    print(f"\nsource: {len(small):,} small files ({sum(f.size for f in small) / MIB:.1f} MiB, "
          f"{min((f.size for f in small), default=0) / KIB:.0f}-"
          f"{max((f.size for f in small), default=0) / KIB:.0f} KiB, "
          f"{setup['folders']:,} folders) and {len(large)} large "
          f"({sum(f.size for f in large) / MIB:.0f} MiB): {files:,} files, "
          f"{total / MIB:.1f} MiB; set up in {setup['seconds']:.0f}s")
    n = len(runs["ours"])
    print(f"\nfull copy into an empty store; median of {n} run{'s' if n > 1 else ''}")
    print(f"  {'method':<46}{'wall s':>7}{'(best)':>8}{'x aws':>7}{'files/s':>9}"
          f"{'MiB/s':>7}   peak RSS MB")
    aws = med["aws s3 sync"]

    def row(label: str, wall: float | None, best: float | None, rss: str = "") -> None:
        if wall is None:
            return
        print(f"  {label:<46}{wall:7.2f}{'' if best is None else f'{best:8.2f}':>8}"
              f"{wall / aws['wall']:6.2f}x{files / wall:9.0f}{total / MIB / wall:7.1f}   {rss}")
    rss = aws["rss_mb"]
    row("aws s3 sync, download + upload (baseline)", aws["wall"], aws["wall_min"],
        f"aws {fmt_mb(rss['aws_download'])} / {fmt_mb(rss['aws_upload'])}")
    row("  download only: source -> local folder", aws["download_wall"], None)
    row("  upload only: local folder -> store", aws["upload_wall"], None)
    ours = med["ours"]
    row("supabackup run_backup, full, with files", ours["wall"], ours["wall_min"],
        f"this process {fmt_mb(ours['rss_mb']['supabackup'])} (from "
        f"{fmt_mb(ours['rss_mb']['before'])})")
    row("  database part (all but the file step)", ours["database_part"], None)
    row("  file step (back_up_files)", ours["file_step"], None)
    row("    of which copy_files", ours["copy_in_backup"], None)
    alone = med["copy_files"]
    row("copy_files alone (files vs files)", alone["wall"], alone["wall_min"],
        f"this process {fmt_mb(alone['rss_mb']['supabackup'])} (from "
        f"{fmt_mb(alone['rss_mb']['before'])})")
    cols = ("client", "postgres", "source_s3", "store_s3", "others")
    harness.print_cpu_table([(m, med[m]["cpu"]) for m in ("aws s3 sync", "ours", "copy_files")],
                            cols, 46)
    harness.print_noise_note(runs.values())
    print_requests("ours", runs["ours"][-1]["requests"], files)
    r = med["ratios"]
    print(f"\n  target  ours (backup with files) / aws s3 sync   {r['ours_vs_aws']:5.2f}x  "
          f"(<= {TARGET_VS_AWS}x)   {verdict(r['ours_vs_aws'] <= TARGET_VS_AWS)}")
    print(f"          copy_files alone / aws s3 sync           {r['copy_files_vs_aws']:5.2f}x  "
          f"(<= {TARGET_VS_AWS}x)   {verdict(r['copy_files_vs_aws'] <= TARGET_VS_AWS)}")
    print(f"          best run against best run                {r['ours_vs_aws_best']:5.2f}x")

    o, a = inc["ours"], inc["aws"]
    stored = o["changes"]["stored_bytes"]
    ratio = stored / inc["changed_bytes"] if inc["changed_bytes"] else float("inf")
    c = o["changes"]
    share = inc["changed_small"] / len(small) if small else 0.0
    print(f"\nincremental: {inc['changed_small']} small files ({share:.0%} of them)"
          f" and {inc['changed_large']} large rewritten: {inc['changed_files']} files, "
          f"{inc['changed_bytes'] / MIB:.2f} MiB ({inc['changed_bytes']:,} bytes)")
    print(f"  {'method':<46}{'wall s':>7}   what it moved")
    print(f"  {'supabackup run_backup, incremental':<46}{o['wall']:7.2f}   "
          f"stored {stored:,} bytes in {c['stored_files']} files; {c['added']} added, "
          f"{c['changed']} changed ({c['changed_bytes']:,} bytes), {c['deleted']} deleted")
    print(f"  {'  database part / file step':<46}{o['database_part']:7.2f}   "
          f"file step {o['file_step']:.2f}s")
    print_requests("the incremental", o["requests"], len(source.files))
    print(f"  {'aws s3 sync again, download + upload':<46}{a['wall']:7.2f}   "
          f"download {a['download_wall']:.2f}s ({a['downloaded']} files) + upload "
          f"{a['upload_wall']:.2f}s ({a['uploaded']} files)")
    ok = stored <= inc["changed_bytes"] * TARGET_STORED_OVER
    print(f"\n  target  stored by the incremental / changed bytes   {ratio:6.3f}x  "
          f"(<= {TARGET_STORED_OVER}x)  {verdict(ok)}")
    inc["stored_over_changed"] = ratio
    return {"median": med, "targets": {"ours_vs_aws": r["ours_vs_aws"] <= TARGET_VS_AWS,
                                       "copy_files_vs_aws": r["copy_files_vs_aws"] <= TARGET_VS_AWS,
                                       "incremental_stored": ok}}


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser_for("bench_storage.py", __doc__)
    parser.add_argument("--small", type=int, default=env_int("BENCH_STORAGE_SMALL", 10_000),
                        help="small files on the source (default 10000; env "
                             "BENCH_STORAGE_SMALL)")
    parser.add_argument("--small-min-kib", type=int, default=1)
    parser.add_argument("--small-max-kib", type=int, default=20)
    parser.add_argument("--large", type=int, default=env_int("BENCH_STORAGE_LARGE", 10),
                        help="large files on the source (default 10; env BENCH_STORAGE_LARGE)")
    parser.add_argument("--large-mib", type=int, default=env_int("BENCH_STORAGE_LARGE_MIB", 20),
                        help="size of each large file in MiB (default 20; env "
                             "BENCH_STORAGE_LARGE_MIB)")
    parser.add_argument("--repeat", type=int, default=env_int("BENCH_STORAGE_REPEAT", 3),
                        help="measured runs of each method; medians are reported (default 3;"
                             " env BENCH_STORAGE_REPEAT)")
    parser.add_argument("--change-pct", type=float, default=1.0,
                        help="percent of the small files rewritten before the incremental "
                             "(default 1)")
    parser.add_argument("--change-large", type=int, default=1,
                        help="large files rewritten before the incremental (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--aws", type=Path, default=AWS,
                        help=f"the aws command (default: {AWS.relative_to(harness.REPO)}, "
                             "from requirements-awscli.txt)")
    harness.add_settle(parser)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted first round")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.small < 0 or args.large < 0 or args.small + args.large == 0 or args.repeat < 1:
        parser.error("give some files, and --repeat at least 1")
    if not 1 <= args.small_min_kib <= args.small_max_kib or args.large_mib < 1:
        parser.error("sizes must be positive, --small-min-kib <= --small-max-kib")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(args.aws, os.X_OK):
        print(f"bench: {args.aws} not found; run `make bench-storage` (or `make "
              "build/tools/awscli/.installed`)", file=sys.stderr)
        return 2
    version = subprocess.run([str(args.aws), "--version"], capture_output=True,
                                      text=True).stdout.strip()

    def body(lab: Lab) -> dict[str, Any]:
        print(f"bench: {version}; a second moto server for the source Storage ...",
              flush=True)
        with S3Endpoint("process", bucket=SOURCE_BUCKET) as source_s3:
            files = plan_files(args)
            source = Source(lab, source_s3, files, args.seed)
            print(f"bench: putting {len(files):,} files ({source.total_bytes / MIB:.0f} MiB) "
                  "on the source and writing their rows ...", flush=True)
            started = time.monotonic()
            source.create()
            setup = {"seconds": time.monotonic() - started,
                     "folders": len({f.key.rsplit("/", 1)[0] for f in files})}
            print(f"bench: set up in {setup['seconds']:.0f}s", flush=True)
            runner = Runner(lab, source, args.aws, args.settle)
            runs = harness.rounds(METHODS, args.repeat, not args.no_warmup, runner.run,
                                  _described)
            inc = incremental(runner, args)
            summary = report(source, setup, runs, inc)
            reset(lab.s3)
        return {"aws": version, "repeat": args.repeat,
                "data": {"small": args.small, "small_kib": [args.small_min_kib,
                                                             args.small_max_kib],
                         "large": args.large, "large_mib": args.large_mib,
                         "files": len(files), "bytes": sum(f.size for f in files),
                         "seed": args.seed, **setup},
                "targets": {"ours_vs_aws_max": TARGET_VS_AWS,
                            "incremental_stored_max": TARGET_STORED_OVER},
                "runs": runs, "incremental": inc, **summary}

    return harness.run_bench("process", harness.ENDPOINTS["process"], args.json, body)


if __name__ == "__main__":
    sys.exit(main())
