"""Benchmark of incremental backups: `supabackup backup incremental` against the full.

It starts one throwaway PostgreSQL 17 cluster and a loopback S3 endpoint, creates a
database of SIZE GiB spread over TABLES tables (generated inside the server with
generate_series; deterministic), and makes 1% of the tables (at least one) "hot": they
hold 5% of the bytes. After one uncounted warm-up, each of REPEAT rounds does:

  full            supabackup backup full         (the store is emptied first)
  change          UPDATE every row of the hot tables, then VACUUM them (as autovacuum
                  would), so about 5% of the database's bytes are rewritten
  incremental     supabackup backup incremental  (parent: that full)
  scan alone      the incremental's change detection (supabackup.inventory.scan_tables)
                  timed by itself in a REPEATABLE READ transaction, and the full's
                  count-only variant
  no-change       supabackup backup incremental again, with nothing changed: the floor
                  of an incremental (fixed costs + scan + schema-only dump)

It prints medians of wall time, bytes stored (sum of the object sizes in each manifest)
and peak RSS of the supabackup process, the ratios incremental/full next to the
project's targets (PASS/MISS, never asserted: the exit status is 0), and where the
incremental's time goes. Every figure goes to bench/results/incremental.json. Everything
it starts or writes is removed at the end, also on Ctrl-C. Method: bench/README.md.

  python bench/bench_incremental.py                     # 1 GiB, 100 tables, 3 rounds
  python bench/bench_incremental.py --size-gb 0.25 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import harness
from harness import BUCKET, GIB, MIB, SUPABACKUP, Lab, Sample, fmt_mb, measure, verdict

if TYPE_CHECKING:
    from devkit.pg import Cluster

STORE_PREFIX = "bench-incr"
STORE_URL = f"s3://{BUCKET}/{STORE_PREFIX}"
RESULTS = harness.REPO / "bench" / "results" / "incremental.json"

# Targets from the issue (printed as PASS/MISS, never asserted).
TARGET_TIME = 0.10   # incremental wall time / full wall time
TARGET_BYTES = 0.10  # incremental bytes stored / full bytes stored

# --- the data set ------------------------------------------------------------------------

# Rows per GiB of pg_database_size(), calibrated on PostgreSQL 17 with the table below:
# ~433 bytes of heap and ~23 bytes of primary key per row (a fixed constant, so that a
# size always gives the same rows and the same bytes).
ROWS_PER_GB = 2_340_000
EMPTY_DATABASE_BYTES = 7_500_000

TABLE_SQL = """
CREATE TABLE %(t)s (
    id          bigint NOT NULL,
    account_id  integer NOT NULL,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    amount      numeric(14,2),
    title       text NOT NULL,
    body        text NOT NULL,
    payload     jsonb NOT NULL
);
INSERT INTO %(t)s
SELECT i,
       1 + (i * 2654435761 + %(seed)s) %% 100000,
       (ARRAY['new','paid','shipped','refunded'])[1 + (i + %(seed)s) %% 4],
       timestamptz '2024-01-01 00:00:00+00' + (i + %(seed)s) * interval '3 seconds',
       timestamptz '2024-01-01 00:00:00+00' + (i + %(seed)s) * interval '3 seconds'
           + (i %% 1000) * interval '1 minute',
       CASE WHEN i %% 7 = 0 THEN NULL ELSE ((i * 104729 + %(seed)s) %% 10000000) / 100.0 END,
       initcap(w[1 + (i * 7) %% n]) || ' ' || w[1 + (i * 11 + %(seed)s) %% n] || ' #' || i,
       concat_ws(' ', w[1 + (i * 3) %% n], w[1 + (i * 5 + %(seed)s) %% n], w[1 + (i * 17) %% n],
                 w[1 + (i * 19) %% n], w[1 + (i * 23) %% n], w[1 + (i * 29) %% n])
         || '. ref ' || md5((i + %(seed)s::bigint * 100000000)::text)
         || repeat(' the quick brown fox jumps over the lazy dog', (i %% 4)::int)
         || '. ' || w[1 + (i * 41) %% n] || '.',
       jsonb_build_object(
           'ip', '10.' || (i %% 256) || '.' || ((i / 256) %% 256) || '.' || ((i * 7) %% 256),
           'session', substr(md5('s' || (i / 10) || ':' || %(seed)s), 1, 20),
           'items', jsonb_build_array(
               jsonb_build_object('sku', 'SKU-' || (i %% 5000), 'qty', 1 + i %% 4)),
           'total', ((i * 104729) %% 10000000) / 100.0,
           'gift', i %% 11 = 0)
FROM generate_series(1::bigint, %(rows)s) AS i,
     LATERAL (SELECT %(words)s::text[] AS w, %(nwords)s AS n) AS words;
ALTER TABLE %(t)s ADD PRIMARY KEY (id);
"""

# One round's change to a hot table: every row gets a new version (the whole tuple is
# rewritten), touching text, numeric, timestamptz and jsonb columns.
CHANGE_SQL = """
UPDATE %(t)s SET
    updated_at = updated_at + %(round)s * interval '1 hour',
    status = (ARRAY['new','paid','shipped','refunded'])[1 + (id + %(round)s) %% 4],
    amount = coalesce(amount, 0) + %(round)s,
    payload = payload || jsonb_build_object('rev', %(round)s,
                                            'editor', 'user' || (id * %(round)s) %% 1000)
"""


@dataclass
class Layout:
    """Which tables exist, how many rows each has, and which ones the rounds change."""

    names: list[str]
    rows: dict[str, int]
    hot: list[str]

    @classmethod
    def plan(cls, size_gb: float, tables: int, changed_pct: float,
             changed_share: float) -> Layout:
        total = max(tables * 100, round((size_gb * GIB - EMPTY_DATABASE_BYTES)
                                        / GIB * ROWS_PER_GB))
        k = min(tables, max(1, round(tables * changed_pct / 100)))
        names = [f"t_{i + 1:03d}" for i in range(tables)]
        # Spread the hot tables over the name order (t_001 first), so that pg_dump does
        # not meet them all at the start or at the end.
        hot = [names[(j * tables) // k] for j in range(k)]
        share = 1.0 if k == tables else changed_share
        rows = {}
        for name in names:
            if name in hot:
                rows[name] = max(100, round(total * share / k))
            else:
                rows[name] = max(100, round(total * (1 - share) / (tables - k)))
        return cls(names=names, rows=rows, hot=hot)


def generate(cluster: Cluster, dbname: str, layout: Layout) -> dict[str, Any]:
    """Create and fill one database; returns what was made and how long it took."""
    started = time.monotonic()
    cluster.create_database(dbname)
    words = harness.words_sql()
    # Two connections (2 cores), tables balanced by rows; each table is created, filled
    # and given its key in one transaction, which with wal_level=minimal writes no WAL.
    lanes: list[list[str]] = [[], []]
    load = [0, 0]
    for seed, name in sorted(enumerate(layout.names, 1), key=lambda s: -layout.rows[s[1]]):
        lane = load.index(min(load))
        load[lane] += layout.rows[name]
        lanes[lane].append(TABLE_SQL % {"t": name, "seed": seed, "rows": layout.rows[name],
                                        "words": words, "nwords": len(harness.WORDS)})
    harness.parallel(cluster, dbname, lanes)
    loaded = time.monotonic() - started
    harness.vacuum_and_checkpoint(cluster, dbname)
    return {"tables": len(layout.names), "rows": sum(layout.rows.values()),
            "changed_tables": layout.hot, "changed_rows": sum(layout.rows[t] for t in layout.hot),
            **sizes(cluster, dbname, layout), "load_seconds": round(loaded, 1),
            "generate_seconds": round(time.monotonic() - started, 1)}


def sizes(cluster: Cluster, dbname: str, layout: Layout) -> dict[str, Any]:
    """pg_database_size, and the share of it the hot tables hold (heap + index)."""
    hot = ",".join(f"'{t}'" for t in layout.hot)
    db, changed = cluster.execute(
        "SELECT pg_database_size(current_database()), "
        f"(SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY[{hot}]::regclass[]) c)",
        dbname)[0]
    return {"database_bytes": int(db), "changed_bytes": int(changed),
            "changed_share": int(changed) / int(db)}


def change(cluster: Cluster, dbname: str, layout: Layout, round_no: int) -> dict[str, Any]:
    """Rewrite every row of the hot tables, then VACUUM them, as autovacuum would.

    The VACUUM keeps the hot tables from growing by one copy per round and sets their
    visibility map back, as on a database that autovacuum looks after. It does not
    change any row's xmin (vacuum_freeze_min_age is 50M; a frozen tuple keeps its raw
    xmin anyway), so it cannot hide the change from the incremental.
    """
    started = time.monotonic()
    updated = 0
    conn = cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            for t in layout.hot:
                cur.execute(CHANGE_SQL % {"t": t, "round": round_no})
                updated += cur.rowcount
            cur.execute("VACUUM " + ", ".join(layout.hot))
            cur.execute("CHECKPOINT")
    finally:
        conn.close()
    return {"rows_updated": updated, "seconds": round(time.monotonic() - started, 2),
            **sizes(cluster, dbname, layout)}



# --- reading a backup's timeline ---------------------------------------------------------

def decided_at(tl: Sample) -> float | None:
    """When the engine logged its first line about the backup (--debug).

    It is logged once the run knows which tables to dump, i.e. for an incremental
    right after the change-detection scan, and before the roles and pg_dump start.
    """
    return next((t for t, text in tl.lines
                 if "supabackup.backup: backup " in text
                 and not any(w in text for w in (" committed", " failed"))), None)


def connected_at(tl: Sample, dbname: str) -> float | None:
    """When the run's first backend on the database appeared: its snapshot session."""
    return next((t for t, title in tl.backends
                 if f" {dbname} " in title and "parallel worker" not in title), None)


def main_dump(tl: Sample) -> tuple[float, float] | None:
    """(start, end) of the pg_dump that streamed the archive: the longest-lived one.

    (find_tools also runs `pg_dump --version`, which lives a few milliseconds.)
    """
    dumps = [(last - first, first, last) for name, first, last in tl.procs
             if name == "pg_dump"]
    if not dumps:
        return None
    _, first, last = max(dumps)
    return first, last


def phases(tl: Sample, dbname: str) -> dict[str, float] | None:
    """Where a backup's wall time went, from its three clocks (None if one is missing)."""
    connected, scanned, dump = connected_at(tl, dbname), decided_at(tl), main_dump(tl)
    if connected is None or scanned is None or dump is None:
        return None
    return {"until_connected": connected,  # start, imports, store, parent manifest
            "snapshot_and_scan": scanned - connected,
            "roles": dump[0] - scanned,  # pg_dumpall --roles-only + its upload
            "dump_and_upload": dump[1] - dump[0],
            "finish": tl.wall - dump[1]}  # last part, complete, manifest, exit


# --- one backup through the CLI ----------------------------------------------------------

class Bench:
    """The cluster, the endpoint and the database under test; runs and reads backups."""

    def __init__(self, lab: Lab, dbname: str, settle_seconds: float) -> None:
        from supabackup.store import Store, StoreURL
        self.cluster, self.s3, self.dbname = lab.cluster, lab.s3, dbname
        self.url = lab.cluster.url(dbname)
        self.settle_seconds = settle_seconds
        self.account = harness.CpuAccount(lab.cluster, lab.s3)
        self.env = lab.s3.env()
        self.store = Store(StoreURL.parse(STORE_URL), client=lab.s3.client())
        self.last_start = 0.0

    def backup(self, kind: str) -> dict[str, Any]:
        """`supabackup --debug backup KIND`; its figures, and those of its manifest."""
        if self.settle_seconds > 0:
            harness.settle(self.settle_seconds)
        # Backup ids have one-second resolution: never start two in the same second.
        time.sleep(max(0.0, self.last_start + 1.1 - time.time()))
        self.last_start = time.time()
        tl, cpu = self.account.measure_engine(
            [str(SUPABACKUP), "--debug", "backup", kind, "--database-url", self.url,
             "--store", STORE_URL], self.env, self.account.postmaster)
        manifest = self.latest_manifest()
        roles = next((first for name, first, _ in tl.procs if name == "pg_dumpall"), None)
        return {
            "wall": tl.wall, "backup_id": manifest.backup_id, "kind": manifest.kind,
            "escalation": manifest.escalation, "bytes": manifest.total_bytes,
            "objects": {o.name: o.size for o in manifest.objects},
            "tables_dumped": manifest.tables_dumped, "tables_total": len(manifest.tables),
            "dumped": sorted(f"{t.name}: {t.reason}" for t in manifest.tables
                             if t.reason and t.reason != "full backup"),
            "snapshot_xmin": manifest.snapshot_xmin, "engine_seconds": manifest.duration_seconds,
            "rss_mb": {"python": tl.rss_kb.get("python", 0) / 1024,
                       "pg_dump": tl.rss_kb.get("pg_dump", 0) / 1024},
            "cpu": cpu, "phases": phases(tl, self.dbname),
            "pg_dumpall_started": roles, "log": [(round(t, 3), text) for t, text in tl.lines],
            "backends": [(round(t, 3), title) for t, title in tl.backends],
        }

    def latest_manifest(self) -> Any:
        ids = self.store.database_ids()
        if len(ids) != 1:
            raise RuntimeError(f"expected one database in {STORE_URL}, found {ids}")
        return self.store.manifests(ids[0])[-1]

    def scan_alone(self, since_xmin: int | None) -> dict[str, float]:
        """The engine's change detection, timed by itself in a REPEATABLE READ snapshot.

        The same function (supabackup.inventory.scan_tables) the run calls, with the same
        isolation, schema exclusions and the parent's snapshot xmin; since_xmin None is
        the full's variant (exact counts only).
        """
        from supabackup.dburl import ConnectionInfo
        from supabackup.inventory import scan_tables
        from supabackup.profiles import resolve_profile
        excluded = resolve_profile(None, ConnectionInfo.from_url(self.url)).exclude_schemas
        if self.settle_seconds > 0:
            harness.settle(min(self.settle_seconds, 3.0))
        conn = self.cluster.connect(self.dbname)
        try:
            conn.autocommit = False
            conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with conn.cursor() as cur:
                cur.execute("SELECT 1")  # take the snapshot, as the run has by then
            pg0 = self.account.postgres()
            t0 = time.perf_counter()
            scanned = scan_tables(conn, excluded, since_xmin)
            seconds = time.perf_counter() - t0
            pg = self.account.postgres() - pg0
            conn.rollback()
        finally:
            conn.close()
        return {"seconds": seconds, "postgres_cpu": pg, "tables": len(scanned),
                "new_rows": sum(max(0, s[7]) for s in scanned)}


def startup_seconds(env: dict[str, str], n: int = 3) -> float:
    """`supabackup --version`: process start and every import, nothing else."""
    walls = [measure([str(SUPABACKUP), "--version"], env).wall for _ in range(n)]
    return statistics.median(walls)


# --- the rounds --------------------------------------------------------------------------

def run_rounds(bench: Bench, layout: Layout, repeat: int, warmup: bool) -> list[dict[str, Any]]:
    if warmup:
        # Warms the page cache, the endpoint's memory and the bytecode cache.
        print("   warm-up: one full and one incremental, not counted ...", flush=True)
        bench.s3.empty(STORE_PREFIX + "/")
        bench.backup("full")
        bench.backup("incremental")
    rounds = []
    for r in range(1, repeat + 1):
        bench.s3.empty(STORE_PREFIX + "/")
        full = bench.backup("full")
        changed = change(bench.cluster, bench.dbname, layout, r)
        incr = bench.backup("incremental")
        scan_incr = bench.scan_alone(full["snapshot_xmin"])
        scan_full = bench.scan_alone(None)
        floor = bench.backup("incremental")
        stored = bench.s3.empty(STORE_PREFIX + "/")
        rnd = {"round": r, "full": full, "change": changed, "incremental": incr,
               "no_change": floor, "scan": scan_incr, "scan_full": scan_full,
               "s3_bytes_after_round": stored}
        rounds.append(rnd)
        print(f"   round {r}/{repeat}: full {full['wall']:.2f}s {full['bytes'] / MIB:.1f} MiB"
              f" | change {changed['rows_updated']:,} rows in {changed['seconds']:.1f}s"
              f" | incremental {incr['wall']:.2f}s {incr['bytes'] / MIB:.2f} MiB "
              f"({incr['tables_dumped']}/{incr['tables_total']} tables)"
              f" | scan alone {scan_incr['seconds']:.2f}s"
              f" | no-change {floor['wall']:.2f}s ({floor['tables_dumped']} tables)",
              flush=True)
        check(rnd, layout)
    return rounds


def check(rnd: dict[str, Any], layout: Layout) -> None:
    """Warn (never fail) if a run was not what the round meant it to be."""
    full, incr, floor = rnd["full"], rnd["incremental"], rnd["no_change"]
    if full["kind"] != "full":
        print(f"   warning: the full came out as {full['kind']}")
    for label, run, expect in (("incremental", incr, set(layout.hot)),
                               ("no-change incremental", floor, set())):
        if run["kind"] != "incremental":
            print(f"   warning: the {label} escalated to a full: {run['escalation']}")
            continue
        got = {d.split(":")[0] for d in run["dumped"]}
        if got != expect:
            print(f"   warning: the {label} dumped {sorted(got)}, expected {sorted(expect)}")



# --- the report --------------------------------------------------------------------------

RUNS = ("full", "incremental", "no_change")


def summarize_backups(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median backup of one kind, over the rounds."""
    out = harness.summarize_runs(runs, ("bytes", "tables_dumped"))
    out["tables_total"] = runs[0]["tables_total"]
    if all(x["phases"] for x in runs):
        out["phases"] = harness.medians([x["phases"] for x in runs])
    return out


def summarize(rounds: list[dict[str, Any]], startup: float) -> dict[str, Any]:
    med: dict[str, Any] = {k: summarize_backups([r[k] for r in rounds]) for k in RUNS}
    scan: dict[str, Any] = harness.medians([r["scan"] for r in rounds])
    scan_full: dict[str, Any] = harness.medians([r["scan_full"] for r in rounds])
    db_gib = statistics.median([r["change"]["database_bytes"] for r in rounds]) / GIB
    full, incr = med["full"], med["incremental"]
    ratios = {"time": incr["wall"] / full["wall"], "bytes": incr["bytes"] / full["bytes"],
              "time_best": incr["wall_min"] / full["wall_min"],
              "no_change_time": med["no_change"]["wall"] / full["wall"]}
    med.update({
        "ratios": ratios, "startup_seconds": startup, "database_gib": db_gib,
        "scan": {"seconds": scan["seconds"], "postgres_cpu": scan["postgres_cpu"],
                 "seconds_per_gib": scan["seconds"] / db_gib,
                 "vs_full_wall": scan["seconds"] / full["wall"],
                 "vs_incremental_wall": scan["seconds"] / incr["wall"]},
        "scan_full": {"seconds": scan_full["seconds"], "postgres_cpu": scan_full["postgres_cpu"],
                      "seconds_per_gib": scan_full["seconds"] / db_gib,
                      "vs_full_wall": scan_full["seconds"] / full["wall"]},
        "change_seconds": harness.median([r["change"]["seconds"] for r in rounds]),
        "targets": {"time": ratios["time"] <= TARGET_TIME,
                    "bytes": ratios["bytes"] <= TARGET_BYTES},
    })
    return med


ROWS = (("full", "full"), ("incremental (after the change)", "incremental"),
        ("incremental (nothing changed)", "no_change"))


def report(size_gb: float, data: dict[str, Any], rounds: list[dict[str, Any]],
           m: dict[str, Any]) -> None:
    last_change = rounds[-1]["change"]
    print(f"\nsize {size_gb:g} GB: database {data['database_bytes'] / GIB:.2f} GiB in "
          f"{data['tables']} tables ({data['rows']:,} rows), generated in "
          f"{data['generate_seconds']:.0f}s; median of {len(rounds)} rounds")
    print(f"  changed each round: {len(data['changed_tables'])} of {data['tables']} tables "
          f"({', '.join(data['changed_tables'])}), every row rewritten: "
          f"{data['changed_rows']:,} rows, {data['changed_share']:.1%} of the database's "
          f"bytes; change (UPDATE + VACUUM) {m['change_seconds']:.1f}s")
    print(f"  (after the rounds the changed tables' files are "
          f"{last_change['changed_share']:.1%} of a {last_change['database_bytes'] / GIB:.2f}"
          " GiB database: VACUUM frees the old row versions but keeps the space in the file;"
          " the live data, and so the dump, stay the same size)")
    print(f"  {'backup':<36}{'wall s':>7}{'(best)':>8}{'stored MiB':>12}{'tables':>10}"
          f"   peak RSS MB")
    for label, key in ROWS:
        e = m[key]
        print(f"  {label:<36}{e['wall']:7.2f}{e['wall_min']:8.2f}{e['bytes'] / MIB:12.2f}"
              f"{e['tables_dumped']:>6.0f}/{e['tables_total']:<3}   supabackup "
              f"{fmt_mb(e['rss_mb']['python'])}, pg_dump {fmt_mb(e['rss_mb']['pg_dump'])}")
    r = m["ratios"]
    print(f"  {'incremental / full':<36}{r['time']:6.3f}x{r['time_best']:7.3f}x"
          f"{r['bytes']:11.4f}x")
    harness.print_cpu_table([(label, m[key]["cpu"]) for label, key in ROWS],
                            ("pg_dump", "supabackup", "postgres", "s3", "others"), 36)
    print(f"  target  incremental time / full    {r['time']:6.3f}x  (<= {TARGET_TIME}x)  "
          f"{verdict(m['targets']['time'])}")
    print(f"  target  incremental bytes / full   {r['bytes']:6.4f}x (<= {TARGET_BYTES}x)  "
          f"{verdict(m['targets']['bytes'])}")
    report_scan(m)
    report_phases(m)
    harness.print_noise_note([r[k]] for r in rounds for k in RUNS)


def report_scan(m: dict[str, Any]) -> None:
    """What change detection costs the database, timed alone."""
    s, sf = m["scan"], m["scan_full"]
    print(f"\n  change detection (supabackup.inventory.scan_tables, timed alone, REPEATABLE READ):"
          f"\n    incremental's scan (counts + rows newer than the parent): {s['seconds']:.2f}s"
          f" = {s['seconds_per_gib']:.2f}s per GiB; postgres CPU {s['postgres_cpu']:.2f}s;"
          f"\n      {s['vs_full_wall']:.1%} of the full's wall time, "
          f"{s['vs_incremental_wall']:.0%} of the incremental's"
          f"\n    the full's variant (exact counts only): {sf['seconds']:.2f}s"
          f" = {sf['seconds_per_gib']:.2f}s per GiB, {sf['vs_full_wall']:.1%} of the full")


def report_phases(m: dict[str, Any]) -> None:
    """Where the incremental's time goes (nothing if a clock was missing in a round)."""
    ph = m["incremental"].get("phases")
    if not ph:
        return
    wall = m["incremental"]["wall"]
    print("\n  where the incremental's time goes (medians; from the process tree, the "
          "server's new backends and the --debug log line)")
    parts = [
        ("until its snapshot session connects", ph["until_connected"],
         f"of which process start + imports {m['startup_seconds']:.2f}s (--version); "
         "then store check, parent's manifest"),
        ("snapshot + change detection, until pg_dump may start", ph["snapshot_and_scan"],
         f"the scan alone: {m['scan']['seconds']:.2f}s"),
        ("roles: pg_dumpall --roles-only + upload", ph["roles"], ""),
        ("pg_dump (schema + changed tables) + streamed upload", ph["dump_and_upload"], ""),
        ("finish: last part, complete upload, manifest, exit", ph["finish"], ""),
    ]
    for label, secs, note in parts:
        print(f"    {label:<54}{secs:6.2f}s {secs / wall:5.0%}"
              + (f"   ({note})" if note else ""))
    print(f"    {'total (wall)':<54}{wall:6.2f}s")
    fph = m["full"].get("phases")
    if fph:
        print(f"    (the full: {fph['until_connected']:.2f}s until connected, "
              f"{fph['snapshot_and_scan']:.2f}s from snapshot to pg_dump, "
              f"{fph['dump_and_upload']:.2f}s pg_dump + upload, "
              f"{fph['finish']:.2f}s finish)")
    nc = m["no_change"]
    print(f"    (nothing changed: {nc['wall']:.2f}s = {m['ratios']['no_change_time']:.3f}x the "
          "full: the floor of an incremental on this database)")


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser_for("bench_incremental.py", __doc__)
    harness.add_size_gb(parser)
    parser.add_argument("--tables", type=int, default=100,
                        help="number of tables (default: 100)")
    parser.add_argument("--changed-pct", type=float, default=1.0, metavar="PCT",
                        help="percentage of the tables each round changes, at least one "
                             "table (default: 1)")
    parser.add_argument("--changed-share", type=float, default=0.05, metavar="FRACTION",
                        help="fraction of the rows (so, about, of the bytes) the changed "
                             "tables hold; the other tables share the rest equally "
                             "(default: 0.05)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of full, change, incremental; medians are reported "
                             "(default: 3)")
    parser.add_argument("--s3", choices=("process", "thread"), default="process",
                        help="the loopback S3 endpoint: moto's server as a separate process "
                             "(default) or in a thread of this process. (bench_full's "
                             "`sink` keeps no objects, and an incremental must read its "
                             "parent's manifest back.)")
    harness.add_settle(parser)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted full + incremental before the rounds")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.repeat < 1 or args.tables < 1:
        parser.error("--size-gb must be positive, --repeat and --tables at least 1")
    if not 0 < args.changed_share < 1 or not 0 <= args.changed_pct <= 100:
        parser.error("--changed-share must be in (0, 1) and --changed-pct in [0, 100]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = Layout.plan(args.size_gb, args.tables, args.changed_pct, args.changed_share)
    dbname = "bench_incr"

    def body(lab: Lab) -> dict[str, Any]:
        print(f"\n== {args.size_gb:g} GB in {args.tables} tables: generating database "
              f"{dbname} ...", flush=True)
        data = generate(lab.cluster, dbname, layout)
        print(f"   {data['database_bytes'] / GIB:.2f} GiB, {data['rows']:,} rows, in "
              f"{data['generate_seconds']:.0f}s; changed each round: "
              f"{', '.join(layout.hot)} ({data['changed_share']:.1%} of the bytes)",
              flush=True)
        bench = Bench(lab, dbname, args.settle)
        startup = startup_seconds(lab.s3.env())
        rounds = run_rounds(bench, layout, args.repeat, not args.no_warmup)
        med = summarize(rounds, startup)
        report(args.size_gb, data, rounds, med)
        return {"engine_modified": harness.engine_modified(),
                "size_gb": args.size_gb, "repeat": args.repeat, "warmup": not args.no_warmup,
                "targets": {"incremental_time_vs_full_max": TARGET_TIME,
                            "incremental_bytes_vs_full_max": TARGET_BYTES},
                "data": data, "median": med, "rounds": rounds}

    return harness.run_bench(args.s3, f"moto, {args.s3}", args.json, body)


if __name__ == "__main__":
    sys.exit(main())
