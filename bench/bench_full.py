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
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import harness
from harness import BUCKET, MIB, SUPABACKUP, Lab, fmt_mb, measure, verdict

if TYPE_CHECKING:
    from devkit.pg import Cluster

RESULTS = harness.REPO / "bench" / "results" / "latest.json"
STORE_PREFIX = "bench"

# Targets the project set (printed as PASS/MISS, never asserted).
TARGET_VS_PG_DUMP = 1.15       # ours wall time / pg_dump > /dev/null
TARGET_VS_DUMP_UPLOAD = 1.0    # ours wall time / dump-then-upload (strictly below)
TARGET_RSS_MB = 200.0          # peak RSS of the supabackup Python process
TARGET_RSS_FLAT = 1.20         # largest-size RSS / smallest-size RSS

METHODS = ("pg_dump", "ours", "dump-then-upload")

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
    words = harness.words_sql()
    # Each table is created and filled in one transaction, which with wal_level=minimal
    # writes no WAL for the load; two connections, as the machine has 2 cores. Keys and
    # indexes come after the load, as a bulk load would do it.
    harness.parallel(cluster, dbname, [
        [SCHEMA_ACCOUNTS % {"accounts": accounts},
         SCHEMA_EVENTS % {"accounts": accounts, "first": 1, "last": events,
                          "words": words, "nwords": len(harness.WORDS)}],
        [SCHEMA_ITEMS % {"events": events, "per": ITEMS_PER_EVENT}],
    ])
    loaded = time.monotonic() - started
    for sql in POST_LOAD:
        cluster.execute(sql, dbname)
    harness.vacuum_and_checkpoint(cluster, dbname)
    size = int(cluster.execute("SELECT pg_database_size(current_database())", dbname)[0][0])
    return {"events": events, "line_items": events * ITEMS_PER_EVENT, "accounts": accounts,
            "database_bytes": size, "load_seconds": round(loaded, 1),
            "generate_seconds": round(time.monotonic() - started, 1)}


# --- the three methods -------------------------------------------------------------------

class Runner:
    """Runs each method once against one database and returns its figures."""

    def __init__(self, lab: Lab, settle_seconds: float) -> None:
        self.lab, self.s3, self.pg_dump = lab, lab.s3, lab.pg_dump
        self.settle_seconds = settle_seconds
        self.account = harness.CpuAccount(lab.cluster, lab.s3)
        self.env = lab.s3.env()

    def run(self, method: str, url: str) -> dict[str, Any]:
        busy_before = harness.settle(self.settle_seconds) if self.settle_seconds > 0 else None
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
        s, cpu = self.account.measure_engine(
            [str(SUPABACKUP), "backup", "full", "--database-url", url,
             "--store", f"s3://{BUCKET}/{STORE_PREFIX}"], self.env)
        stored = self.s3.empty(STORE_PREFIX + "/")
        rss = {"python": s.rss_mb("python"), "pg_dump": s.rss_mb("pg_dump"),
               "tree": s.rss_tree_kb / 1024}
        return {"wall": s.wall, "rss_mb": rss, "cpu": cpu, "stored_bytes": stored}

    def dump_then_upload(self, url: str) -> dict[str, Any]:
        path = self.lab.workdir / "database.dump"
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


def _described(res: dict[str, Any]) -> str:
    rss = "  ".join(f"{k} {v:.0f}" for k, v in res["rss_mb"].items()
                    if v is not None and k != "tree")
    cpu = "  ".join(f"{k} {v:.1f}" for k, v in res["cpu"].items())
    return f"RSS MB: {rss}   CPU s: {cpu}"


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
        runs = harness.rounds(METHODS, repeat, warmup, lambda m: runner.run(m, url), _described)
    finally:
        cluster.drop_database(dbname)
    return {"size_gb": size_gb, "data": data, "runs": runs, "median": summarize(runs)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    extra = ("dump_wall", "upload_wall", "stored_bytes", "archive_bytes")
    med: dict[str, Any] = {m: harness.summarize_runs(results, extra)
                           for m, results in runs.items()}
    base, ours, dtu = med["pg_dump"]["wall"], med["ours"]["wall"], med["dump-then-upload"]["wall"]
    med["ratios"] = {"ours_vs_pg_dump": ours / base, "ours_vs_dump_then_upload": ours / dtu,
                     "dump_then_upload_vs_pg_dump": dtu / base,
                     "ours_vs_pg_dump_best": med["ours"]["wall_min"] / med["pg_dump"]["wall_min"]}
    return med


# --- the report --------------------------------------------------------------------------

def report(results: list[dict[str, Any]], fixed: dict[str, float] | None) -> dict[str, Any]:
    print()
    if fixed:
        print(f"fixed cost (empty database, median): pg_dump {fixed['pg_dump']:.2f}s, "
              f"ours {fixed['ours']:.2f}s\n")
    for res in results:
        report_size(res, fixed)
    return report_across_sizes(results)


def baseline_rows(m: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """The report's rows for plain pg_dump and ours: (label, medians, peak RSS)."""
    return [
        ("pg_dump -Fc zstd > /dev/null", m["pg_dump"],
         f"pg_dump {fmt_mb(m['pg_dump']['rss_mb']['pg_dump'])}"),
        ("supabackup backup full (ours)", m["ours"],
         f"supabackup {fmt_mb(m['ours']['rss_mb']['python'])}, pg_dump "
         f"{fmt_mb(m['ours']['rss_mb']['pg_dump'])}"),
    ]


def report_size(res: dict[str, Any], fixed: dict[str, float] | None) -> None:
    """One size: the methods against the baseline, the CPU time, the targets."""
    m, d = res["median"], res["data"]
    archive = m["dump-then-upload"].get("archive_bytes") or 0
    print(f"size {res['size_gb']:g} GB: database {d['database_bytes'] / 2**30:.2f} GiB, "
          f"archive {archive / MIB:.0f} MiB, generated in {d['generate_seconds']:.0f}s; "
          f"median of {len(res['runs']['ours'])} runs")
    print(f"  {'method':<34}{'wall s':>7}{'(best)':>8}{'x pg_dump':>10}   peak RSS MB")
    rows = [
        *baseline_rows(m),
        ("pg_dump to file, then upload_file", m["dump-then-upload"],
         f"pg_dump {fmt_mb(m['dump-then-upload']['rss_mb']['pg_dump'])}, uploader "
         f"{fmt_mb(m['dump-then-upload']['rss_mb']['uploader'])}"),
    ]
    for label, entry, rss in rows:
        print(f"  {label:<34}{entry['wall']:7.2f}{entry['wall_min']:8.2f}"
              f"{entry['wall'] / m['pg_dump']['wall']:9.2f}x   {rss}")
    dtu = m["dump-then-upload"]
    print(f"  (dump-then-upload = dump {dtu['dump_wall']:.2f}s + upload "
          f"{dtu['upload_wall']:.2f}s)")
    harness.print_cpu_table(
        [(label, m[key]["cpu"]) for label, key in (("pg_dump > /dev/null", "pg_dump"),
                                                   ("ours", "ours"),
                                                   ("dump-then-upload", "dump-then-upload"))],
        ("pg_dump", "postgres", "supabackup", "uploader", "s3", "others"), 34)
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
    print(f"  target  ours peak RSS             {fmt_mb(rss):>4} MB  "
          f"(< {TARGET_RSS_MB:.0f} MB)  {verdict(targets['ours_rss_mb'])}")
    if fixed:
        net = (m["ours"]["wall"] - fixed["ours"]) / (m["pg_dump"]["wall"] - fixed["pg_dump"])
        r["ours_vs_pg_dump_without_fixed_cost"] = net
        print(f"  (ours / pg_dump without each one's fixed cost: {net:.2f}x; "
              f"best run against best run: {r['ours_vs_pg_dump_best']:.2f}x)")
    harness.print_noise_note(res["runs"].values())
    print()


def report_across_sizes(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Is our RSS flat across sizes, and what does each tool add per extra GB."""
    per_size = {f"{r['size_gb']:g}": r["median"]["ours"]["rss_mb"]["python"] for r in results}
    flat: bool | None = None
    if len(results) > 1 and all(v is not None for v in per_size.values()):
        small = per_size[f"{min(r['size_gb'] for r in results):g}"]
        large = per_size[f"{max(r['size_gb'] for r in results):g}"]
        flat = large <= small * TARGET_RSS_FLAT
    print("ours peak RSS by size: "
          + ", ".join(f"{k} GB {fmt_mb(v)} MB" for k, v in per_size.items())
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


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser_for("bench_full.py", __doc__)
    harness.add_size_gb(parser)
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
    harness.add_settle(parser)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted first run of each method (which warms the "
                             "page cache and the S3 endpoint)")
    parser.add_argument("--no-fixed-cost", action="store_true",
                        help="skip timing both tools on an empty database")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args(argv)
    try:
        args.size_list = ([float(s) for s in args.sizes.split(",") if s.strip()]
                          if args.sizes else [args.size_gb])
    except ValueError:
        parser.error("--sizes takes numbers separated by commas, e.g. 0.25,1.0")
    if not args.size_list or any(s <= 0 for s in args.size_list) or args.repeat < 1:
        parser.error("sizes must be positive and --repeat at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(lab: Lab) -> dict[str, Any]:
        runner = Runner(lab, args.settle)
        fixed: dict[str, float] | None = None
        if not args.no_fixed_cost:
            fixed = fixed_cost(runner, lab.cluster, args.repeat)
            print(f"bench: fixed cost on an empty database: pg_dump {fixed['pg_dump']:.2f}s,"
                  f" ours {fixed['ours']:.2f}s", flush=True)
        results = [bench_size(runner, lab.cluster, size, args.repeat, not args.no_warmup)
                   for size in args.size_list]
        summary = report(results, fixed)
        return {"repeat": args.repeat,
                "targets": {"ours_vs_pg_dump_max": TARGET_VS_PG_DUMP,
                            "ours_vs_dump_then_upload_below": TARGET_VS_DUMP_UPLOAD,
                            "ours_rss_mb_below": TARGET_RSS_MB,
                            "rss_flat_max_ratio": TARGET_RSS_FLAT},
                "fixed_cost_seconds": fixed, "sizes": results, **summary}

    return harness.run_bench(args.s3, harness.ENDPOINTS[args.s3], args.json, body)


if __name__ == "__main__":
    sys.exit(main())
