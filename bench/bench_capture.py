"""Change capture end to end: how soon a commit is in the store, how much WAL a stream keeps
up with, how fast a restore to a time replays, and what continuous capture costs.

One throwaway PostgreSQL cluster with wal_level=logical (devkit.pg.logical_cluster: 15
with wal2json by default, `--major 17` for pgoutput) and moto's S3 server in its own
process, both on loopback. Four parts, each figure beside a baseline of the same run:

  latency  streaming capture (`capture.run(..., seconds=S, policy=FlushPolicy(5.0))`) in a
           thread while a writer commits at a steady pace; each commit's time from its
           COMMIT returning to the first sight of an index entry that ends past it (the
           store polled every 0.1 s): p50, p95 (target: p95 <= 10 s) against the flush
           interval. The S3 requests the stream made, counted per flush, feed the cost.
  wal      pgbench at increasing rates (`-R`), then a writer of wide rows, while a stream
           runs: each step's WAL MB/s and the slot's largest lag (pg_current_wal_lsn -
           confirmed_flush_lsn); the highest rate held under 64 MB of lag, against
           pgbench's own WAL rate without capture on this machine.
  replay   restore_to_time of captured workloads (many small transactions of 1-3 row
           changes, as a web app writes; three of 10,000 rows; inserts, updates and
           deletes) on a table with a primary key, one with REPLICA IDENTITY FULL and no
           key, and one with both (as Supabase Realtime has them): rows/s and
           transactions/s of the replay against the rate the source wrote them, each
           restore checked equal to the source; what a day of a busy small project (20
           transactions/s) would take at that rate (target: under an hour).
  cost     Lambda and S3 per month of continuous capture on paper (MemorySize read from
           template.yaml) against Supabase's PITR add-on.

    .venv/bin/python bench/bench_capture.py                # make bench-capture: ~3 min
    .venv/bin/python bench/bench_capture.py --only replay --small 20000
    .venv/bin/python bench/bench_capture.py --only latency --seconds 120 --rate 50

Targets are printed as PASS/MISS, never asserted. Figures go to bench/results/capture.json.
Method and a run's figures: bench/README.md.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import harness
import yaml
from harness import S3Endpoint, verdict
from supabackup import capture
from supabackup.backup import BackupRequest
from supabackup.capture import pointintime
from supabackup.capture.state import lsn_int, transactions_until
from supabackup.dburl import ConnectionInfo
from supabackup.store import BOTO_CONFIG, Store, StoreURL

from devkit.compare import table_fingerprints
from devkit.pg import Cluster, logical_cluster

RESULTS = harness.REPO / "bench" / "results" / "capture.json"
TEMPLATE = harness.REPO / "template.yaml"
BUCKET = "bench-capture"
MB = 1_000_000

TARGET_P95 = 10.0            # seconds from commit to stored, at the default 5 s flush
FLUSH_INTERVAL = 5.0
LAG_LIMIT = 64 * 1024 * 1024  # bytes of slot lag a rate must stay under
POLL = 0.1                   # seconds between looks at the store's index entries

# Prices (us-east-1) and the schedule's shape, for the cost on paper.
PRICE_GB_S = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
PRICE_REQUEST = 0.20 / 1_000_000
PRICE_PUT = 0.005 / 1000
PRICE_GET = 0.0004 / 1000
RUNS_A_MONTH = 8640          # every 5 minutes for 30 days
RUN_SECONDS = 300
IDLE_PROGRESS = capture.FlushPolicy().idle_interval  # an idle stream records progress this often
SUPABASE_PITR = 100.0        # $ a month, the PITR add-on with 7 days


def main() -> int:
    parser = harness.parser_for("bench_capture.py", __doc__ or "")
    parser.add_argument("--only", default="latency,wal,replay,cost",
                        help="the parts to run, comma-separated (default: all four)")
    parser.add_argument("--major", type=int, default=15, choices=(15, 17),
                        help="15: wal2json (default); 17: pgoutput")
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="how long the latency part's writer commits (default: 45)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="the latency part's commits a second (default: 20)")
    parser.add_argument("--step-seconds", type=float, default=8.0,
                        help="each rate of the wal part (default: 8)")
    parser.add_argument("--small", type=int, default=3000,
                        help="small transactions in each replay workload (default: 3000)")
    parser.add_argument("--big-rows", type=int, default=10_000,
                        help="rows of each big transaction (default: 10000)")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - {"latency", "wal", "replay", "cost"}
    if unknown:
        parser.error(f"no such part: {', '.join(sorted(unknown))}")
    code = harness.prepare()  # Ctrl-C and SIGTERM stop cleanly
    if code is not None:
        return code
    started = time.monotonic()
    figures: dict[str, Any] = {}
    try:
        with ExitStack() as stack:
            cluster, s3 = open_lab(stack, args.major) if parts != ["cost"] else (None, None)
            if "latency" in parts:
                figures["latency"] = latency(cluster, s3, args.seconds, args.rate)
            if "wal" in parts:
                figures["wal"] = wal_rates(cluster, s3, args.step_seconds)
            if "replay" in parts:
                figures["replay"] = replay_part(cluster, s3, args.small, args.big_rows)
            if "cost" in parts:
                figures["cost"] = cost(figures.get("latency"))
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - report, clean up, exit
        return harness.failed(exc)
    out = {**harness.environment(), "major": args.major,
           "seconds": round(time.monotonic() - started, 1), **figures}
    harness.write_results(args.json, out)
    return 0


# --- the lab -----------------------------------------------------------------------------

def open_lab(stack: ExitStack, major: int) -> tuple[Cluster, S3Endpoint]:
    print(f"bench: starting PostgreSQL {major} (wal_level=logical) and moto's S3 server ...",
          flush=True)
    cluster = logical_cluster(major)
    stack.callback(cluster.stop)
    cluster.start()
    s3 = S3Endpoint("process", bucket=BUCKET)
    stack.callback(s3.stop)
    s3.start()
    print(f"bench: PostgreSQL {cluster.execute('SHOW server_version')[0][0]}, "
          f"{harness.os.cpu_count()} CPUs, fsync off, synchronous_commit on", flush=True)
    return cluster, s3


class Requests:
    """S3 requests a client made, by operation (botocore's before-call event)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, model: Any, **_: Any) -> None:
        with self.lock:
            self.counts[model.name] = self.counts.get(model.name, 0) + 1


def new_store(s3: S3Endpoint, prefix: str, requests: Requests | None = None) -> Store:
    client = s3.client(BOTO_CONFIG)
    if requests is not None:
        client.meta.events.register("before-call.s3", requests)
    return Store(StoreURL.parse(f"s3://{BUCKET}/{prefix}"), client)


def conn_info(cluster: Cluster, db: str) -> ConnectionInfo:
    return ConnectionInfo.from_url(cluster.url(db))


def fresh_db(cluster: Cluster, name: str) -> str:
    cluster.drop_database(name)
    cluster.create_database(name)
    return name


class Stream(threading.Thread):
    """capture.run streaming for `seconds` in a thread; `result` or `error` when done."""

    def __init__(self, conn: ConnectionInfo, store: Store, database_id: str,
                 seconds: float) -> None:
        super().__init__(daemon=True)
        self.args = (conn, store, database_id)
        self.seconds = seconds
        self.result: capture.CaptureRun | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = capture.run(*self.args, seconds=self.seconds,
                                      policy=capture.FlushPolicy(interval=FLUSH_INTERVAL))
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            self.error = exc

    def finish(self) -> capture.CaptureRun:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def slot_ready(cluster: Cluster, db: str, patience: float = 30.0) -> None:
    """Wait until the stream holds its slot (active), so what follows is streamed."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        rows = cluster.execute("SELECT active FROM pg_replication_slots WHERE database = "
                               "current_database()", db)
        if rows and rows[0][0]:
            return
        time.sleep(0.1)
    raise RuntimeError("the capture stream did not start")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# --- latency: commit -> stored -----------------------------------------------------------

def latency(cluster: Cluster, s3: S3Endpoint, seconds: float, rate: float) -> dict[str, Any]:
    print(f"\nlatency: a writer commits {rate:g}/s for {seconds:g} s while a stream captures "
          f"(flush every {FLUSH_INTERVAL:g} s); the store is polled every {POLL:g} s",
          flush=True)
    db = fresh_db(cluster, "latency")
    cluster.execute("CREATE TABLE ticks (id bigserial PRIMARY KEY, note text NOT NULL,"
                    " at timestamptz NOT NULL DEFAULT clock_timestamp())", db)
    conn = conn_info(cluster, db)
    requests = Requests()
    store = new_store(s3, "latency", requests)
    _, base = capture.start(conn, store, BackupRequest())
    database_id = base.database_id
    before = dict(requests.counts)
    lead, tail = 3.0, 10.0  # the stream is up before the first commit; the last is flushed
    stream = Stream(conn, store, database_id, lead + seconds + tail)
    stream.start()
    slot_ready(cluster, db)
    watcher = IndexWatcher(new_store(s3, "latency"), database_id)
    watcher.start()
    time.sleep(max(0.0, lead - 1.0))
    commits = paced_writer(cluster, db, seconds, rate)
    run = stream.finish()
    watcher.stop()
    counts = {k: v - before.get(k, 0) for k, v in requests.counts.items()}
    delays = []
    for wal_before, committed in commits:
        seen = watcher.first_past(wal_before)
        if seen is not None:
            delays.append(seen - committed)
    lost = len(commits) - len(delays)
    p50, p95 = statistics.median(delays), pct(delays, 0.95)
    flushes = run.segments
    print(f"  {len(commits)} commits ({len(commits) / seconds:.1f}/s), {flushes} segments "
          f"stored, {run.transactions} transactions; {lost} commit(s) never seen stored")
    print(f"  commit -> stored   p50 {p50:5.2f} s   p95 {p95:5.2f} s   max {max(delays):5.2f} s"
          f"   (baseline: the flush interval, {FLUSH_INTERVAL:g} s; half of it on average)")
    print(f"  {verdict(p95 <= TARGET_P95 and lost == 0)}  p95 <= {TARGET_P95:g} s at the default "
          f"{FLUSH_INTERVAL:g} s flush interval")
    per_flush = {k: round(v / max(flushes, 1), 2) for k, v in sorted(counts.items())}
    print(f"  S3 requests per stored segment (the whole stream, start to end): {per_flush}")
    return {"commits": len(commits), "rate": rate, "seconds": seconds, "segments": flushes,
            "unseen": lost, "p50": p50, "p95": p95, "max": max(delays),
            "target_p95": TARGET_P95, "pass": p95 <= TARGET_P95 and lost == 0,
            "requests": counts, "requests_per_segment": per_flush,
            "stream_seconds": lead + seconds + tail}


def paced_writer(cluster: Cluster, db: str, seconds: float, rate: float
                 ) -> list[tuple[int, float]]:
    """Commit one row every 1/rate s for `seconds`: (WAL insert position just before the
    COMMIT, wall time the COMMIT returned) of each. Its commit record ends past that
    position, and nothing else commits meanwhile: the first index entry that ends past it
    holds the commit."""
    conn = cluster.connect(db)
    conn.autocommit = False
    out = []
    try:
        with conn.cursor() as cur:
            start = time.monotonic()
            for i in range(int(seconds * rate)):
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                cur.execute("INSERT INTO ticks (note) VALUES (%s);"
                            " SELECT pg_current_wal_insert_lsn()::text", (f"tick {i}",))
                (lsn,) = cur.fetchone()
                conn.commit()
                out.append((lsn_int(lsn), time.time()))
    finally:
        conn.close()
    return out


class IndexWatcher(threading.Thread):
    """Polls the store's index entries; remembers when each was first seen."""

    def __init__(self, store: Store, database_id: str) -> None:
        super().__init__(daemon=True)
        self.store, self.database_id = store, database_id
        self.seen: list[tuple[int, float]] = []  # (end LSN, wall time first seen)
        self.halt = threading.Event()

    def run(self) -> None:
        after = ""
        while not self.halt.is_set():
            found = capture.segments(self.store, self.database_id, after_lsn=after)
            now = time.time()
            for segment in found:
                self.seen.append((lsn_int(segment.end_lsn), now))
                after = segment.end_lsn
            self.halt.wait(POLL)

    def stop(self) -> None:
        time.sleep(2 * POLL)
        self.halt.set()
        self.join()

    def first_past(self, lsn: int) -> float | None:
        return next((t for end, t in self.seen if end > lsn), None)


# --- wal: the rate a stream keeps up with ------------------------------------------------

PGBENCH_RATES = (1000, 0)                # transactions/s; 0: as fast as it can
WIDE_ROWS = 100                          # rows of 1.3 kB (random hex) per wide transaction
WIDE_RATES = (20, 40, 80, 120, 160, 240)  # wide transactions/s, until one is over 64 MB
BLOBS = 20 * WIDE_ROWS                   # the rows they copy, in turn


def wal_rates(cluster: Cluster, s3: S3Endpoint, step: float) -> dict[str, Any]:
    print(f"\nwal: pgbench, then a writer of wide rows, at increasing rates ({step:g} s each, "
          "a stream of its own for each) while capture streams; the slot's lag sampled every "
          "0.2 s", flush=True)
    db = fresh_db(cluster, "walrate")
    pgbench = str(cluster.bindir / "pgbench")
    url = cluster.url(db)
    subprocess.run([pgbench, "-i", "-q", "-s", "2", url], check=True, capture_output=True)
    cluster.execute("CREATE TABLE wide (id bigserial PRIMARY KEY, body text NOT NULL);"
                    "CREATE TABLE blobs (id int PRIMARY KEY, body text NOT NULL);"
                    "INSERT INTO blobs SELECT b, string_agg(md5(random()::text), '')"
                    f" FROM generate_series(1, {BLOBS}) b, generate_series(1, 40) GROUP BY b",
                    db)
    baseline = bench_step(cluster, db, lambda: run_pgbench(pgbench, url, 0, step))
    print(f"  baseline, no capture: pgbench as fast as it can: {baseline['tps']:.0f} tps, "
          f"{baseline['wal_mb_s']:.2f} WAL MB/s", flush=True)
    conn = conn_info(cluster, db)
    store = new_store(s3, "walrate")
    _, base = capture.start(conn, store, BackupRequest())
    steps: list[dict[str, Any]] = []
    print(f"  {'writer':<11}{'rate':>6}{'tps':>7}{'WAL MB/s':>10}{'max lag MB':>12}"
          f"{'stored txns':>13}", flush=True)
    for kind, rates, make in (
            ("pgbench", PGBENCH_RATES, lambda r: lambda: run_pgbench(pgbench, url, r, step)),
            ("wide rows", WIDE_RATES, lambda r: lambda: wide_writer(cluster, db, r, step))):
        for rate in rates:
            drain(conn, store, base.database_id)  # each step starts with an empty slot
            stream = Stream(conn, store, base.database_id, step + 6.0)
            stream.start()
            slot_ready(cluster, db)
            lagger = LagSampler(cluster, db)
            lagger.start()
            try:
                got = bench_step(cluster, db, make(rate))
            finally:
                lagger.stop()
            run = stream.finish()
            got.update(kind=kind, rate=rate, max_lag=lagger.peak, stored=run.transactions,
                       held=lagger.peak < LAG_LIMIT)
            steps.append(got)
            print(f"  {kind:<11}{rate or 'max':>6}{got['tps']:>7.0f}{got['wal_mb_s']:>10.2f}"
                  f"{got['max_lag'] / MB:>12.1f}{run.transactions:>13}"
                  f"{'' if got['held'] else '   over 64 MB'}", flush=True)
            if not got["held"]:
                break
    held = [s for s in steps if s["held"]]
    best = max(held, key=lambda s: s["wal_mb_s"]) if held else None
    if best is not None:
        print(f"  highest held under 64 MB of lag: {best['wal_mb_s']:.2f} WAL MB/s "
              f"({best['kind']} at {best['rate'] or 'max'}/s) = "
              f"{best['wal_mb_s'] / baseline['wal_mb_s']:.1f}x pgbench's own "
              f"{baseline['wal_mb_s']:.2f} MB/s without capture")
    capture.drop(conn, store, base.database_id)
    return {"baseline": baseline, "steps": steps, "best": best}


def bench_step(cluster: Cluster, db: str, work: Callable[[], int]) -> dict[str, Any]:
    """Run `work` (which returns the transactions it committed): its WAL bytes a second."""
    (start,) = cluster.execute("SELECT pg_current_wal_lsn()::text", db)[0]
    t0 = time.monotonic()
    txns = work()
    seconds = time.monotonic() - t0
    (end,) = cluster.execute("SELECT pg_current_wal_lsn()::text", db)[0]
    wal = lsn_int(end) - lsn_int(start)
    return {"seconds": seconds, "transactions": txns, "tps": txns / seconds,
            "wal_bytes": wal, "wal_mb_s": wal / MB / seconds}


def run_pgbench(pgbench: str, url: str, rate: int, seconds: float) -> int:
    """pgbench's TPC-B-like script on 2 clients, at `rate` tps (0: unthrottled)."""
    argv = [pgbench, "-n", "-c", "2", "-j", "2", "-T", str(max(1, round(seconds)))]
    if rate:
        argv += ["-R", str(rate)]
    done = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    line = next(x for x in done.splitlines() if x.startswith("number of transactions actually"))
    return int(line.split(":")[1].split()[0])


def wide_writer(cluster: Cluster, db: str, rate: int, seconds: float) -> int:
    """Transactions of WIDE_ROWS rows of 1.3 kB of random hex (which neither pglz nor gzip
    shrinks much), copied from `blobs` (made beforehand: the writer costs the server
    little) at `rate` a second, for `seconds`."""
    conn = cluster.connect(db)
    done = 0
    try:
        with conn.cursor() as cur:
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                wait = start + done / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                first = done * WIDE_ROWS % BLOBS
                cur.execute("INSERT INTO wide (body) SELECT body FROM blobs"
                            " WHERE id > %s AND id <= %s", (first, first + WIDE_ROWS))
                done += 1
    finally:
        conn.close()
    return done


class LagSampler(threading.Thread):
    """The slot's lag behind the WAL, sampled every 0.2 s; `peak`: the largest seen."""

    def __init__(self, cluster: Cluster, db: str) -> None:
        super().__init__(daemon=True)
        self.conn = cluster.connect(db)
        self.peak = 0
        self.halt = threading.Event()

    def lag(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
                        "::bigint FROM pg_replication_slots WHERE database = current_database()")
            row = cur.fetchone()
        return int(row[0] or 0) if row else 0

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.peak = max(self.peak, self.lag())
                self.halt.wait(0.2)
        finally:
            self.conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join()


# --- replay: restore_to_time -------------------------------------------------------------

COLUMNS = ("id bigint NOT NULL, customer int NOT NULL, status text NOT NULL, "
           "amount numeric(12, 2), note text, updated_at timestamptz NOT NULL")
PRELOAD = 2000
DAY_RATE = 20                          # transactions/s of a busy small project
DAY_TRANSACTIONS = DAY_RATE * 86_400   # 1.73 M
DAY_ROWS = 3_000_000
DAY_TARGET_MINUTES = 60                # minutes, not hours
STATUSES = ("new", "paid", "packed", "shipped", "delivered", "refunded")


@dataclass
class Workload:
    name: str
    table: str       # "pk" or "full"
    write: Callable[[Any, str, random.Random], None]


@dataclass
class Replayed:
    transactions: int = 0
    rows: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


# The tables: a primary key; REPLICA IDENTITY FULL and no key (rows found by every
# column's text, a scan each); and both (what Supabase Realtime asks for old records).
KINDS = ("pk", "full", "pk+full")


def table_sql(name: str, kind: str) -> str:
    key = ", PRIMARY KEY (id)" if kind in ("pk", "pk+full") else ""
    full = f" ALTER TABLE {name} REPLICA IDENTITY FULL;" if "full" in kind else ""
    return f"CREATE TABLE {name} ({COLUMNS}{key});{full}"


def preload_sql(name: str) -> str:
    return (f"INSERT INTO {name} SELECT g, g % 97, 'new', g * 1.25, 'order ' || g, "
            f"'2026-01-01 00:00+00'::timestamptz + g * interval '1 minute' "
            f"FROM generate_series(1, {PRELOAD}) g;")


def small_writer(count: int) -> Callable[[Any, str, random.Random], None]:
    """`count` web-app transactions of 1-3 row changes each, each committed on its own."""

    def write(conn: Any, table: str, rng: random.Random) -> None:
        live = list(range(1, PRELOAD + 1))
        next_id = PRELOAD + 1
        with conn.cursor() as cur:
            for _ in range(count):
                kind = rng.random()
                if kind < 0.35 or len(live) < 10:
                    ops = ["I"]
                elif kind < 0.65:
                    ops = ["U"]
                elif kind < 0.80:
                    ops = ["I", "U"]
                elif kind < 0.90:
                    ops = ["U"] * rng.randint(2, 3)
                else:
                    ops = ["D"]
                for op in ops:
                    if op == "I":
                        cur.execute(f"INSERT INTO {table} VALUES (%s, %s, 'new', %s, %s, now())",
                                    (next_id, rng.randint(1, 500), rng.randint(100, 99999) / 100,
                                     f"order {next_id}"))
                        live.append(next_id)
                        next_id += 1
                    elif op == "U":
                        cur.execute(f"UPDATE {table} SET status = %s, amount = amount + 1,"
                                    " updated_at = now() WHERE id = %s",
                                    (rng.choice(STATUSES), rng.choice(live)))
                    else:
                        victim = live.pop(rng.randrange(len(live)))
                        cur.execute(f"DELETE FROM {table} WHERE id = %s", (victim,))
                conn.commit()

    return write


def big_writer(rows: int) -> Callable[[Any, str, random.Random], None]:
    """Three transactions of `rows` row changes each: insert them, update them, delete
    half of them and the rest of the preload... (each one statement at the source)."""

    def write(conn: Any, table: str, rng: random.Random) -> None:
        first = PRELOAD + 1
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} SELECT g, g % 97, 'new', g * 0.5, 'bulk ' || g,"
                        f" now() FROM generate_series({first}, {first + rows - 1}) g")
            conn.commit()
            cur.execute(f"UPDATE {table} SET status = 'paid', amount = amount + 1,"
                        f" updated_at = now() WHERE id >= {first}")
            conn.commit()
            cur.execute(f"DELETE FROM {table} WHERE id >= {first + rows // 2} OR id <= "
                        f"{rows // 2}")
            conn.commit()

    return write


def replay_part(cluster: Cluster, s3: S3Endpoint, small: int, big_rows: int
                ) -> dict[str, Any]:
    print(f"\nreplay: restore_to_time of captured workloads ({small} small transactions; "
          f"3 of {big_rows} rows), each restore checked equal to the source", flush=True)
    workloads = [Workload(f"small/{kind}", kind, small_writer(small)) for kind in KINDS]
    workloads += [Workload(f"big/{kind}", kind, big_writer(big_rows)) for kind in KINDS]
    print(f"  {'workload':<14}{'txns':>7}{'rows':>8}{'written/s txns':>16}{'rows':>9}"
          f"{'replayed/s txns':>17}{'rows':>9}{'replay s':>10}{'read s':>8}  equal",
          flush=True)
    out = [replay_case(cluster, s3, load, i) for i, load in enumerate(workloads)]
    # A day of a busy small project, at each small workload's rate (rows are the slower)
    day = {}
    for case in out:
        if case["workload"].startswith("small/"):
            minutes = max(DAY_TRANSACTIONS / case["replayed_tps"],
                          DAY_ROWS / case["replayed_rows_s"]) / 60
            day[case["workload"]] = minutes
            print(f"  {verdict(minutes < DAY_TARGET_MINUTES)}  a day at {DAY_RATE} transactions/s"
                  f" ({DAY_TRANSACTIONS / 1e6:.2f} M, ~{DAY_ROWS / 1e6:.0f} M row changes) "
                  f"like {case['workload']}: {minutes:.0f} min to replay here "
                  f"(target: under {DAY_TARGET_MINUTES} min)")
    return {"cases": out, "day_minutes": day}


def replay_case(cluster: Cluster, s3: S3Endpoint, load: Workload, i: int) -> dict[str, Any]:
    db = fresh_db(cluster, f"replay_src_{i}")
    cluster.execute(table_sql("orders", load.table) + preload_sql("orders"), db)
    conn = conn_info(cluster, db)
    store = new_store(s3, f"replay{i}")
    _, base = capture.start(conn, store, BackupRequest())
    source = cluster.connect(db)
    source.autocommit = False
    t0 = time.monotonic()
    load.write(source, "orders", random.Random(i))  # noqa: S311 - a workload, not a secret
    written = time.monotonic() - t0
    source.close()
    when = drain(conn, store, base.database_id)
    expected = table_fingerprints(cluster.url(db))
    # what the replay reads, alone: segments fetched, checked and decoded
    epoch = capture.epochs(store, base.database_id)[-1]
    t0 = time.monotonic()
    txns = list(transactions_until(store, base.database_id, epoch, when))
    read = time.monotonic() - t0
    rows = sum(len(t["changes"]) for t in txns)
    target = fresh_db(cluster, f"replay_dst_{i}")
    timed = timed_replay()
    try:
        capture.restore_to_time(store, base.database_id, conn_info(cluster, target), when)
    finally:
        timed.undo()
    equal = table_fingerprints(cluster.url(target)) == expected
    capture.drop(conn, store, base.database_id)
    cluster.drop_database(target)
    cluster.drop_database(db)
    got = {"workload": load.name, "transactions": len(txns), "rows": rows,
           "written_seconds": written, "replay_seconds": timed.seconds, "read_seconds": read,
           "written_tps": len(txns) / written, "written_rows_s": rows / written,
           "replayed_tps": len(txns) / timed.seconds, "replayed_rows_s": rows / timed.seconds,
           "equal": equal}
    print(f"  {load.name:<14}{len(txns):>7}{rows:>8}{got['written_tps']:>16.0f}"
          f"{got['written_rows_s']:>9.0f}{got['replayed_tps']:>17.0f}"
          f"{got['replayed_rows_s']:>9.0f}{timed.seconds:>10.2f}{read:>8.2f}  "
          f"{'yes' if equal else 'NO'}", flush=True)
    return got


def drain(conn: ConnectionInfo, store: Store, database_id: str) -> datetime:
    """Capture runs (peeks) until the slot is empty; the time restores now reach."""
    while True:
        run = capture.run(conn, store, database_id)
        if run.segment is None:
            assert run.covered_through is not None
            return run.covered_through


class timed_replay:
    """pointintime's replay, timed (the read of the segments it consumes included)."""

    def __init__(self) -> None:
        self.original = pointintime.replay
        self.seconds = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.monotonic() - t0

        pointintime.replay = timed  # type: ignore[assignment]

    def undo(self) -> None:
        pointintime.replay = self.original  # type: ignore[assignment]


# --- cost on paper -----------------------------------------------------------------------

def capture_memory_mb() -> int:
    """The capture function's MemorySize in template.yaml (its own, else the Globals'),
    a parameter resolved to its default."""
    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
        if isinstance(node, yaml.ScalarNode):
            return {name: loader.construct_scalar(node)}
        if isinstance(node, yaml.SequenceNode):
            return {name: loader.construct_sequence(node, deep=True)}
        return {name: loader.construct_mapping(node, deep=True)}  # type: ignore[arg-type]

    Loader.add_multi_constructor("!", intrinsic)
    template = yaml.load(TEMPLATE.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader's
    props = template["Resources"]["CaptureFunction"]["Properties"]
    memory = props.get("MemorySize", template["Globals"]["Function"]["MemorySize"])
    if isinstance(memory, dict):
        memory = template["Parameters"][memory["Ref"]]["Default"]
    return int(memory)


def cost(measured: dict[str, Any] | None) -> dict[str, Any]:
    memory = capture_memory_mb()
    gb_s = RUNS_A_MONTH * RUN_SECONDS * memory / 1024
    month_s = RUNS_A_MONTH * RUN_SECONDS
    busy_flushes = month_s / FLUSH_INTERVAL
    idle_flushes = month_s / IDLE_PROGRESS
    requests = RUNS_A_MONTH * PRICE_REQUEST
    print(f"\ncost: {RUNS_A_MONTH:,} runs of {RUN_SECONDS} s a month at {memory} MB "
          f"(template.yaml) = {gb_s:,.0f} GB-s; Supabase's PITR add-on: "
          f"${SUPABASE_PITR:.0f}/month (7 days)")
    # The brief's model: a busy stream puts a segment, its index entry and the progress
    # record at every flush; an idle one the progress record every idle interval. The
    # stream also renews its lease every 30 s (one GET and one PUT): the measured line.
    lease = month_s / 30.0
    models = {"busy (3 PUTs a flush, the lease every 30 s)":
              busy_flushes * 3 * PRICE_PUT + lease * (PRICE_PUT + PRICE_GET),
              f"idle (1 PUT every {IDLE_PROGRESS:g} s, the lease every 30 s)":
              idle_flushes * PRICE_PUT + lease * (PRICE_PUT + PRICE_GET)}
    if measured and measured.get("segments"):
        per = measured["requests_per_segment"]
        puts = per.get("PutObject", 0.0)
        gets = sum(v for k, v in per.items() if k in ("GetObject", "ListObjectsV2",
                                                      "HeadObject"))
        models[f"busy, as measured ({puts:g} PUT + {gets:g} GET/LIST a flush)"] = (
            busy_flushes * (puts * PRICE_PUT + gets * PRICE_GET))
    rows = []
    print(f"  {'S3 model':<60}{'S3 $':>7}{'x86 $':>9}{'arm64 $':>9}{'vs PITR':>9}")
    for name, s3_cost in models.items():
        x86 = gb_s * PRICE_GB_S["x86_64"] + requests + s3_cost
        arm = gb_s * PRICE_GB_S["arm64"] + requests + s3_cost
        rows.append({"model": name, "s3": s3_cost, "x86_64": x86, "arm64": arm})
        print(f"  {name:<60}{s3_cost:>7.2f}{x86:>9.2f}{arm:>9.2f}"
              f"{arm / SUPABASE_PITR:>8.0%}")
    print(f"  (Lambda compute: x86 ${gb_s * PRICE_GB_S['x86_64']:.2f}, arm64 "
          f"${gb_s * PRICE_GB_S['arm64']:.2f}; requests ${requests:.4f}; S3 storage, "
          "transfer and the free tier left out)")
    return {"memory_mb": memory, "gb_s": gb_s, "models": rows, "supabase_pitr": SUPABASE_PITR}


if __name__ == "__main__":
    sys.exit(main())
