"""Benchmark of full backups: `supabackup backup full` against pg_dump alone.

It starts one throwaway PostgreSQL 17 cluster and a loopback S3 endpoint. For each
size it creates a database, fills it inside the server (INSERT ... SELECT
generate_series; deterministic), runs each method once uncounted (warm-up), then
REPEAT times each, in a rotating order:

  pg_dump             pg_dump -Fc --compress=zstd > /dev/null  (the baseline)
  ours                supabackup backup full --store s3://... (the loopback endpoint)
  dump-then-upload    pg_dump -Fc --compress=zstd -f FILE, then boto3 upload_file(FILE)

It prints medians, the ratios against the baseline of the same run, where the CPU time
went, the project's targets as PASS/MISS (it never fails on a MISS), and writes every
figure to bench/results/latest.json. Everything it starts or writes is removed at the
end, also on Ctrl-C. Method and caveats: bench/README.md.

  python bench/bench_full.py                      # 1 GiB, 3 runs each (make bench)
  python bench/bench_full.py --sizes 0.25,1.0     # two sizes, and is our RSS flat?
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # devkit, when run without the editable install

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from devkit.pg import Cluster, bindir_for, free_port  # noqa: E402
from devkit.s3 import FAKE_CREDENTIALS  # noqa: E402

BUCKET = "supabackup-bench"
STORE_PREFIX = "bench"
RESULTS = REPO / "bench" / "results" / "latest.json"
SUPABACKUP = Path(sys.executable).parent / "supabackup"
SINK = Path(__file__).resolve().parent / "s3sink.py"
MIB = 1024 * 1024

# Targets the project set (printed as PASS/MISS, never asserted).
TARGET_VS_PG_DUMP = 1.15       # ours wall time / pg_dump > /dev/null
TARGET_VS_DUMP_UPLOAD = 1.0    # ours wall time / dump-then-upload (strictly below)
TARGET_RSS_MB = 200.0          # peak RSS of the supabackup Python process
TARGET_RSS_FLAT = 1.20         # largest-size RSS / smallest-size RSS

METHODS = ("pg_dump", "ours", "dump-then-upload")
POLL_SECONDS = 0.02
# The throwaway server: durability off, WAL-free bulk load (wal_level=minimal), no
# autovacuum or checkpoint kicking in while a run is timed.
CLUSTER_SETTINGS = {
    "wal_level": "minimal", "max_wal_senders": "0", "max_wal_size": "8GB",
    "checkpoint_timeout": "30min", "maintenance_work_mem": "256MB",
    "shared_buffers": "256MB", "autovacuum": "off",
}
GNU_TIME = "/usr/bin/time"  # apt package `time`

# The same upload `aws s3 cp FILE s3://...` does: boto3's upload_file with the default
# TransferConfig (8 MiB parts, 10 threads), in its own process.
UPLOAD_SNIPPET = """
import sys, boto3
boto3.client("s3").upload_file(sys.argv[1], sys.argv[2], sys.argv[3])
"""


# --- the data set ------------------------------------------------------------------------

# Rows per GiB of pg_database_size(), calibrated on PostgreSQL 17 with the schema below
# (a fixed constant, so that a size always gives the same rows and the same bytes).
EVENTS_PER_GB = 1_010_000
ITEMS_PER_EVENT = 3
EVENTS_PER_ACCOUNT = 100

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu order invoice refund shipment customer payment checkout cart discount coupon "
         "warehouse parcel tracking delivered pending failed retry webhook session login "
         "logout signup profile avatar settings billing plan upgrade downgrade trial "
         "renewal receipt").split()

SCHEMA_ACCOUNTS = """
CREATE TABLE accounts (
    id          integer NOT NULL,
    name        text NOT NULL,
    email       text NOT NULL,
    plan        text NOT NULL,
    created_at  timestamptz NOT NULL,
    balance     numeric(14,2) NOT NULL,
    settings    jsonb NOT NULL
);
INSERT INTO accounts
SELECT i,
       'Account ' || i,
       'user' || i || '@example.com',
       (ARRAY['free','pro','team','enterprise'])[1 + i %% 4],
       timestamptz '2020-01-01 00:00:00+00' + i * interval '7 minutes',
       ((i * 7919) %% 1000000) / 100.0,
       jsonb_build_object('theme', (ARRAY['light','dark','system'])[1 + i %% 3],
                          'notifications', i %% 2 = 0,
                          'locale', (ARRAY['en','de','fr','ja','pt'])[1 + i %% 5],
                          'seats', 1 + i %% 50)
FROM generate_series(1::bigint, %(accounts)s) AS i;
"""

SCHEMA_EVENTS = """
CREATE TABLE events (
    id          bigint NOT NULL,
    account_id  integer NOT NULL,
    kind        text NOT NULL,
    created_at  timestamptz NOT NULL,
    amount      numeric(14,2),
    ref         uuid NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    payload     jsonb NOT NULL,
    tags        text[] NOT NULL,
    processed   boolean NOT NULL
);
INSERT INTO events
SELECT i,
       1 + (i * 2654435761) %% %(accounts)s,
       w[1 + (i * 13) %% 24],
       timestamptz '2023-01-01 00:00:00+00' + i * interval '2 seconds',
       CASE WHEN i %% 7 = 0 THEN NULL ELSE ((i::bigint * 104729) %% 10000000) / 100.0 END,
       md5('ref' || i)::uuid,
       initcap(w[1 + (i * 7) %% n]) || ' ' || w[1 + (i * 11) %% n] || ' #' || i,
       concat_ws(' ', w[1 + (i * 3) %% n], w[1 + (i * 5) %% n], w[1 + (i * 17) %% n],
                 w[1 + (i * 19) %% n], w[1 + (i * 23) %% n], w[1 + (i * 29) %% n],
                 w[1 + (i * 31) %% n], w[1 + (i * 37) %% n])
         || '. ref ' || md5(i::text) || ' ' || substr(md5((i * 3)::text), 1, 1 + i %% 32)
         || repeat(' the quick brown fox jumps over the lazy dog', (i %% 5)::int)
         || '. ' || w[1 + (i * 41) %% n] || ' ' || w[1 + (i * 43) %% n] || '.',
       jsonb_build_object(
           'ip', '10.' || (i %% 256) || '.' || ((i / 256) %% 256) || '.' || ((i * 7) %% 256),
           'agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0',
                           'Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15',
                           'Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0',
                           'curl/8.5.0', 'python-requests/2.32.3'])[1 + i %% 5],
           'session', substr(md5('s' || (i / 10)), 1, 20),
           'items', jsonb_build_array(
               jsonb_build_object('sku', 'SKU-' || (i %% 5000), 'qty', 1 + i %% 4),
               jsonb_build_object('sku', 'SKU-' || ((i * 3) %% 5000), 'qty', 1 + i %% 3)),
           'total', (((i::bigint * 104729) %% 10000000) / 100.0)::numeric(12,2),
           'flags', jsonb_build_object('gift', i %% 11 = 0, 'express', i %% 3 = 0)),
       ARRAY[w[1 + (i * 47) %% n], w[1 + (i * 53) %% n]],
       i %% 10 <> 0
FROM generate_series(%(first)s, %(last)s) AS i,
     LATERAL (SELECT %(words)s::text[] AS w, %(nwords)s AS n) AS words;
"""

SCHEMA_ITEMS = """
CREATE TABLE line_items (
    event_id    bigint NOT NULL,
    line        smallint NOT NULL,
    sku         text NOT NULL,
    quantity    integer NOT NULL,
    unit_price  numeric(10,2) NOT NULL
);
INSERT INTO line_items
SELECT e, l, 'SKU-' || ((e * 31 + l * 7) %% 5000), 1 + (e + l) %% 9,
       ((e * 7 + l * 104729) %% 100000) / 100.0
FROM generate_series(1::bigint, %(events)s) AS e, generate_series(1, %(per)s) AS l;
"""

POST_LOAD = [
    "ALTER TABLE accounts ADD PRIMARY KEY (id), ADD UNIQUE (email)",
    "ALTER TABLE events ADD PRIMARY KEY (id)",
    "ALTER TABLE line_items ADD PRIMARY KEY (event_id, line)",
    "CREATE INDEX events_account_created ON events (account_id, created_at)",
    "CREATE INDEX events_kind ON events (kind)",
    "CREATE INDEX line_items_sku ON line_items (sku)",
    "ALTER TABLE events ADD FOREIGN KEY (account_id) REFERENCES accounts (id)",
    "ALTER TABLE line_items ADD FOREIGN KEY (event_id) REFERENCES events (id)",
    "CREATE VIEW account_totals AS SELECT account_id, count(*) AS events, sum(amount) AS total"
    " FROM events GROUP BY account_id",
    "COMMENT ON TABLE events IS 'benchmark data: deterministic, generated in the server'",
]


def generate(cluster: Cluster, dbname: str, size_gb: float) -> dict[str, Any]:
    """Create and fill one database; returns what was made and how long it took."""
    started = time.monotonic()
    cluster.create_database(dbname)
    events = max(1000, round(size_gb * EVENTS_PER_GB))
    accounts = max(10, events // EVENTS_PER_ACCOUNT)
    words = "ARRAY[" + ",".join(f"'{w}'" for w in WORDS) + "]"
    # Each table is created and filled in one transaction, which with wal_level=minimal
    # writes no WAL for the load; two connections, as the machine has 2 cores. Keys and
    # indexes come after the load, as a bulk load would do it.
    _parallel(cluster, dbname, [
        [SCHEMA_ACCOUNTS % {"accounts": accounts},
         SCHEMA_EVENTS % {"accounts": accounts, "first": 1, "last": events,
                          "words": words, "nwords": len(WORDS)}],
        [SCHEMA_ITEMS % {"events": events, "per": ITEMS_PER_EVENT}],
    ])
    loaded = time.monotonic() - started
    for sql in POST_LOAD:
        cluster.execute(sql, dbname)
    # Set hint bits and the visibility map now, so no measured run pays for them, and
    # flush the dirty buffers before anything is timed.
    cluster.execute("VACUUM (ANALYZE)", dbname)
    cluster.execute("CHECKPOINT", dbname)
    size = int(cluster.execute("SELECT pg_database_size(current_database())", dbname)[0][0])
    return {"events": events, "line_items": events * ITEMS_PER_EVENT, "accounts": accounts,
            "database_bytes": size, "load_seconds": round(loaded, 1),
            "generate_seconds": round(time.monotonic() - started, 1)}


def _parallel(cluster: Cluster, dbname: str, lanes: list[list[str]]) -> None:
    errors: list[BaseException] = []

    def lane(statements: list[str]) -> None:
        try:
            for sql in statements:
                conn = cluster.connect(dbname)
                try:
                    conn.autocommit = False
                    with conn.cursor() as cur:
                        cur.execute(sql)
                    conn.commit()
                finally:
                    conn.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(s,), daemon=True) for s in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- measuring one command ---------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (so field N of proc(5) is index N - 3)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of one process (and of the children it has reaped, if asked)."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = cpu[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _proc_status(pid: int) -> tuple[str, int] | None:
    """(program name, VmHWM in KiB): the kernel's own peak-RSS counter of one process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    name, hwm = "", 0
    for line in text.splitlines():
        if line.startswith("Name:"):
            name = line.split(None, 1)[1].strip()
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return (name, hwm) if hwm else None


class Poller(threading.Thread):
    """Samples peak RSS (VmHWM) and CPU time of every process of a tree, by program name."""

    def __init__(self, pid: int, rename: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.pid, self.rename = pid, rename
        self.seen: dict[int, tuple[str, int, float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            stopping = self.stop.is_set()
            todo = [self.pid]
            while todo:
                pid = todo.pop()
                got = _proc_status(pid)
                if got:
                    name = self.rename.get(got[0], got[0])
                    self.seen[pid] = (name, got[1], process_cpu(pid))
                todo += _children(pid)
            if stopping or self.stop.wait(POLL_SECONDS):
                if stopping:
                    return

    def by_name(self) -> tuple[dict[str, int], dict[str, float]]:
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name, hwm, secs in self.seen.values():
            rss[name] = max(rss.get(name, 0), hwm)
            cpu[name] = cpu.get(name, 0.0) + secs
        return rss, cpu


@dataclass
class Sample:
    wall: float
    rss_tree_kb: int        # GNU time %M: the peak of the command or any of its children
    cpu_tree: float         # GNU time %U + %S: the command and its children
    rss_kb: dict[str, int]  # polled VmHWM per program name
    cpu: dict[str, float]   # polled CPU seconds per program name

    def rss_mb(self, name: str) -> float | None:
        kb = self.rss_kb.get(name)
        return None if kb is None else kb / 1024


def measure(argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL,
            rename: dict[str, str] | None = None) -> Sample:
    """Run one command; wall time from fork to reap, peak RSS from GNU time and /proc.

    The command runs under `/usr/bin/time`, whose ru_maxrss is the peak of the command
    and its children. (Not wait4() from here: a child's ru_maxrss also counts the pages
    of the parent it was forked from, before exec, and this process is ~80 MB.) The
    poller samples each process's own VmHWM, to tell supabackup from its pg_dump.
    """
    fd, name = tempfile.mkstemp(prefix="sbbench-time-")
    os.close(fd)
    timefile = Path(name)
    started = time.perf_counter()
    # A process group of its own, so that an interrupted run can be stopped whole.
    proc = subprocess.Popen([GNU_TIME, "-f", "%M %U %S", "-o", str(timefile), "--", *argv],
                            env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.PIPE, start_new_session=True)
    poller = Poller(proc.pid, rename or {})
    poller.start()
    try:
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        code = proc.wait()
        wall = time.perf_counter() - started
        last = (timefile.read_text().strip().splitlines() or ["0 0 0"])[-1].split()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        poller.stop.set()
        poller.join()
        timefile.unlink(missing_ok=True)
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited {code}: "
                           f"{stderr.decode(errors='replace').strip()[-2000:]}")
    rss, cpu = poller.by_name()
    rss.pop("time", None)
    cpu.pop("time", None)
    return Sample(wall=wall, rss_tree_kb=int(last[0]), cpu_tree=float(last[1]) + float(last[2]),
                  rss_kb=rss, cpu=cpu)


class CpuAccount:
    """Where the machine's CPU time went during one measurement.

    command: what GNU time reports for the measured command and its children;
    postgres: the server (the postmaster, its live children and those it has reaped);
    s3: the S3 endpoint (the moto process; this whole process in thread mode);
    others: everything else the machine ran meanwhile: noise from other work.
    """

    def __init__(self, cluster: Cluster, s3: S3Endpoint) -> None:
        self.cluster, self.s3 = cluster, s3
        self.postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])

    def _postgres(self) -> float:
        total = process_cpu(self.postmaster, children=True)
        return total + sum(process_cpu(p) for p in _children(self.postmaster))

    def snapshot(self) -> tuple[float, float, float, float]:
        me = os.times()
        return (machine_busy(), self._postgres(), self.s3.cpu_seconds(), me.user + me.system)

    def since(self, before: tuple[float, float, float, float], command: float) -> dict[str, float]:
        after = self.snapshot()
        busy, pg, s3, me = (a - b for a, b in zip(after, before, strict=True))
        if self.s3.mode == "thread":
            me = 0.0  # s3 is this process
        return {"postgres": pg, "s3": s3,
                "others": max(0.0, busy - command - pg - s3 - me)}


def settle(max_seconds: float) -> float:
    """Wait (up to max_seconds) for the machine to be idle; return the busy CPUs seen last."""
    deadline = time.monotonic() + max_seconds
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(0.5)
        busy = (machine_busy() - b0) / (time.monotonic() - t0)
        if busy < 0.25 or time.monotonic() >= deadline:
            return busy


# --- the loopback S3 endpoint ------------------------------------------------------------

class S3Endpoint:
    """moto's server, in its own process (default) or a thread of this one; or the sink."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread_server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.url,
                "AWS_ENDPOINT_URL_S3": self.url,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def start(self) -> S3Endpoint:
        if self.mode in ("process", "sink"):
            server = (["-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
                      if self.mode == "process" else [str(SINK), "--port", str(self.port)])
            # A session of its own: a Ctrl-C reaches us, and we stop it in order.
            self.proc = subprocess.Popen([sys.executable, *server], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        else:
            import logging

            from moto.server import ThreadedMotoServer
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self.thread_server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                                    verbose=False)
            self.thread_server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc and self.proc.poll() is not None:
                    raise RuntimeError("moto server exited at start") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        if self.mode != "sink":
            urllib.request.urlopen(self.url + "/moto-api/", timeout=10).read()  # noqa: S310
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def cpu_seconds(self) -> float:
        """CPU time the endpoint has used so far (this whole process in thread mode)."""
        return process_cpu(self.proc.pid if self.proc else os.getpid())

    def rss_mb(self) -> float | None:
        """The endpoint's resident memory now (None in thread mode: it is this process)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def empty(self, prefix: str = "") -> int:
        """Delete every object and abort every upload under prefix; return bytes deleted."""
        s3, total = self.client(), 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                total += obj["Size"]
                s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
        for up in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=BUCKET, Key=up["Key"], UploadId=up["UploadId"])
        return total

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread_server is not None:
            self.thread_server.stop()


# --- the three methods -------------------------------------------------------------------

PY_NAMES = {"supabackup": "python", "python": "python", "python3": "python",
            "python3.12": "python"}


class Runner:
    """Runs each method once against one database and returns its figures."""

    def __init__(self, cluster: Cluster, s3: S3Endpoint, pg_dump: str, workdir: Path,
                 settle_seconds: float) -> None:
        self.cluster, self.s3, self.pg_dump, self.workdir = cluster, s3, pg_dump, workdir
        self.settle_seconds = settle_seconds
        self.account = CpuAccount(cluster, s3)
        self.env = s3.env()

    def run(self, method: str, url: str) -> dict[str, Any]:
        busy_before = settle(self.settle_seconds) if self.settle_seconds > 0 else None
        if method == "pg_dump":
            res = self.pg_dump_devnull(url)
        elif method == "ours":
            res = self.ours(url)
        else:
            res = self.dump_then_upload(url)
        res["busy_cpus_before"] = busy_before
        res["s3_rss_mb"] = self.s3.rss_mb()  # objects are deleted: this must not pile up
        return res

    def pg_dump_devnull(self, url: str) -> dict[str, Any]:
        before = self.account.snapshot()
        with open(os.devnull, "wb") as devnull:
            s = measure([self.pg_dump, "-Fc", "--compress=zstd", "-d", url], self.env,
                        stdout=devnull)
        cpu = {"pg_dump": s.cpu_tree, **self.account.since(before, s.cpu_tree)}
        return {"wall": s.wall, "rss_mb": {"pg_dump": s.rss_tree_kb / 1024}, "cpu": cpu}

    def ours(self, url: str) -> dict[str, Any]:
        before = self.account.snapshot()
        s = measure([str(SUPABACKUP), "backup", "full", "--database-url", url,
                     "--store", f"s3://{BUCKET}/{STORE_PREFIX}"], self.env, rename=PY_NAMES)
        cpu = self.account.since(before, s.cpu_tree)
        stored = self.s3.empty(STORE_PREFIX + "/")
        dumps = s.cpu.get("pg_dump", 0.0) + s.cpu.get("pg_dumpall", 0.0)
        cpu = {"pg_dump": dumps, "supabackup": max(0.0, s.cpu_tree - dumps), **cpu}
        rss = {"python": s.rss_mb("python"), "pg_dump": s.rss_mb("pg_dump"),
               "tree": s.rss_tree_kb / 1024}
        return {"wall": s.wall, "rss_mb": rss, "cpu": cpu, "stored_bytes": stored}

    def dump_then_upload(self, url: str) -> dict[str, Any]:
        path = self.workdir / "database.dump"
        key = f"{STORE_PREFIX}-dtu/database.dump"
        try:
            before = self.account.snapshot()
            # --no-sync: no fsync of the file at the end, as `pg_dump > FILE` would do; the
            # comparison is then with the fastest form of this approach.
            dump = measure([self.pg_dump, "-Fc", "--compress=zstd", "--no-sync", "-f",
                            str(path), "-d", url], self.env)
            up = measure([sys.executable, "-c", UPLOAD_SNIPPET, str(path), BUCKET, key],
                         self.env)
            cpu = {"pg_dump": dump.cpu_tree, "uploader": up.cpu_tree,
                   **self.account.since(before, dump.cpu_tree + up.cpu_tree)}
            size = path.stat().st_size
        finally:
            path.unlink(missing_ok=True)
            self.s3.empty(f"{STORE_PREFIX}-dtu/")
        return {"wall": dump.wall + up.wall, "dump_wall": dump.wall, "upload_wall": up.wall,
                "rss_mb": {"pg_dump": dump.rss_tree_kb / 1024,
                           "uploader": up.rss_tree_kb / 1024},
                "cpu": cpu, "archive_bytes": size}


# --- one size ----------------------------------------------------------------------------

def fixed_cost(runner: Runner, cluster: Cluster, repeat: int) -> dict[str, Any]:
    """Both tools on an empty database: the cost that does not grow with the data."""
    cluster.create_database("bench_empty")
    try:
        url = cluster.url("bench_empty")
        walls: dict[str, list[float]] = {"pg_dump": [], "ours": []}
        for _ in range(repeat):
            for method in walls:
                walls[method].append(runner.run(method, url)["wall"])
    finally:
        cluster.drop_database("bench_empty")
    return {m: statistics.median(w) for m, w in walls.items()}


def bench_size(runner: Runner, cluster: Cluster, size_gb: float, repeat: int,
               warmup: bool) -> dict[str, Any]:
    dbname = f"bench_{str(size_gb).replace('.', '_')}"
    print(f"\n== {size_gb:g} GB: generating database {dbname} ...", flush=True)
    data = generate(cluster, dbname, size_gb)
    print(f"   {data['database_bytes'] / 2**30:.2f} GiB ({data['events']:,} events, "
          f"{data['line_items']:,} line items) in {data['generate_seconds']:.0f}s "
          f"(load {data['load_seconds']:.0f}s)", flush=True)
    url = cluster.url(dbname)
    try:
        if warmup:
            # Warms the page cache, the S3 endpoint's memory and the Python bytecode cache.
            print("   warm-up: each method once, not counted ...", flush=True)
            for method in METHODS:
                runner.run(method, url)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for r in range(repeat):
            order = METHODS[r % 3:] + METHODS[:r % 3]  # rotate: no method always goes first
            for method in order:
                res = runner.run(method, url)
                runs[method].append(res)
                rss = "  ".join(f"{k} {v:.0f}" for k, v in res["rss_mb"].items()
                                if v is not None and k != "tree")
                cpu = "  ".join(f"{k} {v:.1f}" for k, v in res["cpu"].items())
                print(f"   run {r + 1}/{repeat} {method:<17}{res['wall']:7.2f}s   "
                      f"RSS MB: {rss}   CPU s: {cpu}", flush=True)
    finally:
        cluster.drop_database(dbname)
    return {"size_gb": size_gb, "data": data, "runs": runs, "median": summarize(runs)}


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med: dict[str, Any] = {}
    for method, results in runs.items():
        entry: dict[str, Any] = {"wall": _median([r["wall"] for r in results]),
                                 "wall_min": min(r["wall"] for r in results)}
        for group in ("rss_mb", "cpu"):
            entry[group] = {k: _median([r[group].get(k) for r in results])
                            for k in results[0][group]}
        for extra in ("dump_wall", "upload_wall", "stored_bytes", "archive_bytes"):
            if extra in results[0]:
                entry[extra] = _median([r[extra] for r in results])
        med[method] = entry
    base, ours, dtu = med["pg_dump"]["wall"], med["ours"]["wall"], med["dump-then-upload"]["wall"]
    med["ratios"] = {"ours_vs_pg_dump": ours / base, "ours_vs_dump_then_upload": ours / dtu,
                     "dump_then_upload_vs_pg_dump": dtu / base,
                     "ours_vs_pg_dump_best": med["ours"]["wall_min"] / med["pg_dump"]["wall_min"]}
    return med


# --- the report --------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def _mb(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}"


def _cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(results: list[dict[str, Any]], fixed: dict[str, float] | None) -> dict[str, Any]:
    print()
    if fixed:
        print(f"fixed cost (empty database, median): pg_dump {fixed['pg_dump']:.2f}s, "
              f"ours {fixed['ours']:.2f}s\n")
    for res in results:
        m, d = res["median"], res["data"]
        archive = m["dump-then-upload"].get("archive_bytes") or 0
        print(f"size {res['size_gb']:g} GB: database {d['database_bytes'] / 2**30:.2f} GiB, "
              f"archive {archive / MIB:.0f} MiB, generated in {d['generate_seconds']:.0f}s; "
              f"median of {len(res['runs']['ours'])} runs")
        print(f"  {'method':<34}{'wall s':>7}{'(best)':>8}{'x pg_dump':>10}   peak RSS MB")
        rows = [
            ("pg_dump -Fc zstd > /dev/null", m["pg_dump"],
             f"pg_dump {_mb(m['pg_dump']['rss_mb']['pg_dump'])}"),
            ("supabackup backup full (ours)", m["ours"],
             f"supabackup {_mb(m['ours']['rss_mb']['python'])}, pg_dump "
             f"{_mb(m['ours']['rss_mb']['pg_dump'])}"),
            ("pg_dump to file, then upload_file", m["dump-then-upload"],
             f"pg_dump {_mb(m['dump-then-upload']['rss_mb']['pg_dump'])}, uploader "
             f"{_mb(m['dump-then-upload']['rss_mb']['uploader'])}"),
        ]
        for label, entry, rss in rows:
            print(f"  {label:<34}{entry['wall']:7.2f}{entry['wall_min']:8.2f}"
                  f"{entry['wall'] / m['pg_dump']['wall']:9.2f}x   {rss}")
        dtu = m["dump-then-upload"]
        print(f"  (dump-then-upload = dump {dtu['dump_wall']:.2f}s + upload "
              f"{dtu['upload_wall']:.2f}s)")
        cols = ("pg_dump", "postgres", "supabackup", "uploader", "s3", "others")
        print(f"  {'CPU seconds':<34}" + "".join(f"{c:>11}" for c in cols))
        for label, key in (("pg_dump > /dev/null", "pg_dump"), ("ours", "ours"),
                           ("dump-then-upload", "dump-then-upload")):
            cpu = m[key]["cpu"]
            print(f"  {label:<34}" + "".join(f"{_cpu(cpu.get(c)):>11}" for c in cols))
        r = m["ratios"]
        rss = m["ours"]["rss_mb"]["python"]
        targets = {
            "ours_vs_pg_dump": r["ours_vs_pg_dump"] <= TARGET_VS_PG_DUMP,
            "ours_vs_dump_then_upload": r["ours_vs_dump_then_upload"] < TARGET_VS_DUMP_UPLOAD,
            "ours_rss_mb": None if rss is None else rss < TARGET_RSS_MB,
        }
        res["targets"] = targets
        print(f"  target  ours / pg_dump             {r['ours_vs_pg_dump']:5.2f}x  "
              f"(<= {TARGET_VS_PG_DUMP}x)  {verdict(targets['ours_vs_pg_dump'])}")
        print(f"  target  ours / dump-then-upload    {r['ours_vs_dump_then_upload']:5.2f}x  "
              f"(< {TARGET_VS_DUMP_UPLOAD}x)   {verdict(targets['ours_vs_dump_then_upload'])}")
        print(f"  target  ours peak RSS             {_mb(rss):>4} MB  "
              f"(< {TARGET_RSS_MB:.0f} MB)  {verdict(targets['ours_rss_mb'])}")
        if fixed:
            net = (m["ours"]["wall"] - fixed["ours"]) / (m["pg_dump"]["wall"] - fixed["pg_dump"])
            r["ours_vs_pg_dump_without_fixed_cost"] = net
            print(f"  (ours / pg_dump without each one's fixed cost: {net:.2f}x; "
                  f"best run against best run: {r['ours_vs_pg_dump_best']:.2f}x)")
        others = max(sum(run["cpu"]["others"] for run in runs) / sum(run["wall"] for run in runs)
                     for runs in res["runs"].values())
        if others > 0.2:
            print(f"  note: other programs kept {others:.1f} CPUs busy during some runs; "
                  "the figures are noisy")
        print()
    per_size = {f"{r['size_gb']:g}": r["median"]["ours"]["rss_mb"]["python"] for r in results}
    flat: bool | None = None
    if len(results) > 1 and all(v is not None for v in per_size.values()):
        small = per_size[f"{min(r['size_gb'] for r in results):g}"]
        large = per_size[f"{max(r['size_gb'] for r in results):g}"]
        flat = large <= small * TARGET_RSS_FLAT
    print("ours peak RSS by size: " + ", ".join(f"{k} GB {_mb(v)} MB" for k, v in per_size.items())
          + f"   flat (largest <= {TARGET_RSS_FLAT}x smallest): {verdict(flat)}"
          + ("" if flat is not None else " (run with --sizes A,B)"))
    growth = None
    if len(results) > 1:
        lo = min(results, key=lambda r: r["size_gb"])["median"]
        hi = max(results, key=lambda r: r["size_gb"])["median"]
        d_ours = hi["ours"]["wall"] - lo["ours"]["wall"]
        d_base = hi["pg_dump"]["wall"] - lo["pg_dump"]["wall"]
        if d_base > 0:
            growth = d_ours / d_base
            print(f"time per extra GB, smallest to largest size: ours +{d_ours:.2f}s, "
                  f"pg_dump +{d_base:.2f}s: {growth:.2f}x")
    return {"rss_by_size_mb": per_size, "rss_flat": flat, "ours_vs_pg_dump_marginal": growth}


def _pg_dump_for(major: int) -> tuple[str, str]:
    """The pg_dump supabackup itself would choose for this server."""
    from supabackup.pgtools import find_tools
    tools = find_tools(major)
    return tools.path("pg_dump"), tools.version


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_full.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="database size to generate, in GiB of pg_database_size "
                             "(default: 1.0)")
    parser.add_argument("--sizes", help="comma-separated sizes in GiB, e.g. 0.25,1.0: bench "
                        "each (overrides --size-gb) and check that our RSS stays flat")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured runs of each method per size; medians are reported "
                             "(default: 3)")
    parser.add_argument("--s3", choices=("process", "thread", "sink"), default="process",
                        help="the loopback S3 endpoint: moto's server as a separate process "
                             "(default) or in a thread of this process; or `sink`, a null "
                             "endpoint that stores nothing and costs almost no CPU "
                             "(bench/s3sink.py), to see the backup's own cost")
    parser.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                        help="before each run, wait up to this long for the machine to be "
                             "idle (default: 10; 0 disables)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted first run of each method (which warms the "
                             "page cache and the S3 endpoint)")
    parser.add_argument("--no-fixed-cost", action="store_true",
                        help="skip timing both tools on an empty database")
    parser.add_argument("--json", type=Path, default=RESULTS,
                        help=f"where to write the figures (default: {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    try:
        args.size_list = ([float(s) for s in args.sizes.split(",") if s.strip()]
                          if args.sizes else [args.size_gb])
    except ValueError:
        parser.error("--sizes takes numbers separated by commas, e.g. 0.25,1.0")
    if not args.size_list or any(s <= 0 for s in args.size_list) or args.repeat < 1:
        parser.error("sizes must be positive and --repeat at least 1")
    return args


INTERRUPTED = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop at once; the ExitStack in main() removes everything."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def failed(exc: BaseException) -> int:
    """Say how a bench ended early (everything was cleaned up by then); the exit status."""
    # A Ctrl-C also reaches the measured command, which may fail before we see it.
    if isinstance(exc, KeyboardInterrupt) or INTERRUPTED.is_set():
        print("\nbench: interrupted; cluster, S3 server and temporary files removed",
              file=sys.stderr)
        return 130
    print(f"\nbench: error: {exc}\n(cluster, S3 server and temporary files removed)",
          file=sys.stderr)
    return 1


def prepare() -> int | None:
    """Stop cleanly on Ctrl-C and SIGTERM; check what every bench needs (exit code if not)."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if not os.access(GNU_TIME, os.X_OK):
        print(f"bench: {GNU_TIME} not found; install it: apt-get install time", file=sys.stderr)
        return 2
    if not SUPABACKUP.exists():
        print(f"bench: {SUPABACKUP} not found; run `make setup`", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = prepare()
    if failed is not None:
        return failed
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    fixed: dict[str, float] | None = None
    try:
        with ExitStack() as stack:
            workdir = Path(tempfile.mkdtemp(prefix="sbbench-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            endpoint = {"process": "moto server in its own process",
                        "thread": "moto server in a thread of this process",
                        "sink": "the null sink, bench/s3sink.py"}[args.s3]
            print(f"bench: starting PostgreSQL 17 and the S3 endpoint ({endpoint}) ...",
                  flush=True)
            cluster = Cluster(bindir_for(17), settings=CLUSTER_SETTINGS)
            stack.callback(cluster.stop)
            cluster.start()
            s3 = S3Endpoint(args.s3)
            stack.callback(s3.stop)
            s3.start()
            pg_dump, pg_dump_version = _pg_dump_for(cluster.major)
            print(f"bench: pg_dump {pg_dump_version} at {pg_dump}; {os.cpu_count()} CPUs",
                  flush=True)
            runner = Runner(cluster, s3, pg_dump, workdir, args.settle)
            if not args.no_fixed_cost:
                fixed = fixed_cost(runner, cluster, args.repeat)
                print(f"bench: fixed cost on an empty database: pg_dump {fixed['pg_dump']:.2f}s,"
                      f" ours {fixed['ours']:.2f}s", flush=True)
            for size in args.size_list:
                results.append(bench_size(runner, cluster, size, args.repeat,
                                          not args.no_warmup))
            summary = report(results, fixed)
            left = s3.empty()
            if left:
                print(f"bench: warning: {left} bytes were left in the bucket after the runs")
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - report, clean up, exit
        return failed(exc)
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": _git_rev(), "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                    "platform": platform.platform()},
        "pg_dump": {"path": pg_dump, "version": pg_dump_version},
        "s3": args.s3, "repeat": args.repeat, "seconds": round(time.monotonic() - started, 1),
        "targets": {"ours_vs_pg_dump_max": TARGET_VS_PG_DUMP,
                    "ours_vs_dump_then_upload_below": TARGET_VS_DUMP_UPLOAD,
                    "ours_rss_mb_below": TARGET_RSS_MB, "rss_flat_max_ratio": TARGET_RSS_FLAT},
        "fixed_cost_seconds": fixed, "sizes": results, **summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nbench: figures written to {args.json} ({out['seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
