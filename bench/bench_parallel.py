"""Benchmark of parallel backups and restores (format 2) against pg_dump and pg_restore.

It starts one throwaway PostgreSQL 17 cluster, a loopback S3 endpoint (moto's server)
and a slow link: bench/slowlink.py in its own process, a proxy that paces every
connection to RATE MB/s each way. It builds bench_full.py's data set plus six archive
tables of the same shape, so that one table (`events`) holds about half the table
bytes, then runs each method once uncounted (warm-up), then REPEAT times each, in a
rotating order. Plain local (every tool connects to the server directly):

  pg_dump            pg_dump -Fc --compress=zstd > /dev/null  (the baseline)
  backup-j1          supabackup backup full --jobs 1 --store s3://...
  peer               jameshy/pgdump-aws-lambda's handler, as bench_peer.py runs it
  backup-j4          supabackup backup full --jobs 4 (peak RSS; what the machine reaches)

Through the slow link (every tool connects to the server through the proxy):

  pg_dump/slow       pg_dump -Fc --compress=zstd > /dev/null  (the baseline)
  backup-j4/slow     supabackup backup full --jobs 4
  pg_restore/slow    pg_restore -d NEW from a local file made by that pg_dump
  pg_restore-j4/slow pg_restore -j 4 -d NEW from the same file
  restore-j4/slow    supabackup restore --jobs 4 --target-url NEW, of a backup of the data

Every restore goes into a new, empty database and is checked (every table's row count,
the number of indexes and constraints). Then the same data set at --rss-size (1 GiB),
with the plain local methods only: the RSS row's second size, and the local rows again
where fixed costs weigh less. It prints medians, ratios against the baselines of the same
run, where the CPU time went (the proxy's own CPU is `link`), where a backup's time went,
the project's targets as PASS/MISS (never asserted), and the largest database one
14-minute Lambda run would back up by a model (bench/README.md), and writes every figure
to bench/results/parallel.json. Method, model and caveats: bench/README.md.

  python bench/bench_parallel.py              # 0.25 GiB, then 1 GiB (make bench-parallel)
  python bench/bench_parallel.py --quick      # no 1 GiB run (the RSS row says so)
  python bench/bench_parallel.py --rate 20 --size 0.5
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import bench_full
import bench_peer
import harness
from harness import BUCKET, GIB, MIB, SUPABACKUP, Lab, fmt_mb, measure, verdict

RESULTS = harness.REPO / "bench" / "results" / "parallel.json"
SLOWLINK = Path(__file__).resolve().parent / "slowlink.py"
DEFAULT_PEER = harness.REPO / "build" / "peer" / "pgdump-aws-lambda"
RESTORE_PREFIX = "bench-parallel"   # the backup every restore-j4 run reads
TARGET_DB = "bench_target"          # each restore's new, empty database
JOBS_ENV = "SUPABACKUP_JOBS"        # what the CLI's --jobs defaults to
MB = 1_000_000                      # the link's rates are in MB/s, as slowlink.py's

# Targets the project set (printed as PASS/MISS, never asserted).
TARGET_BACKUP_SLOW = 0.35      # backup-j4/slow / pg_dump/slow
TARGET_RESTORE_SLOW = 0.5      # restore-j4/slow / pg_restore/slow
TARGET_RESTORE_J4 = 1.2        # restore-j4/slow / pg_restore-j4/slow
TARGET_BACKUP_LOCAL = bench_full.TARGET_VS_PG_DUMP   # backup-j1 / pg_dump, and < the peer's
TARGET_SERVER_CPU = 1.1        # postgres CPU during backup-j1 / during pg_dump
TARGET_RSS_MB = 250.0          # backup-j4's Python process, at both sizes
TARGET_RSS_FLAT = bench_full.TARGET_RSS_FLAT

LAMBDA_SECONDS = 14 * 60       # one run's budget in the model (Lambda stops at 15 minutes)
MODEL_WORKERS = (1, 4, 8)

# --- the data set ------------------------------------------------------------------------

# bench_full's tables, and ARCHIVES more tables of the events shape (events_archive_N),
# holding between them what events holds less line_items and accounts: events is then
# half the table bytes. Each archive gets a primary key, as events has.
ARCHIVES = 6
# bench_full.generate's size that makes a database of 1 GiB in all (calibrated on 17).
BASE_PER_GB = 0.64


def archive_sql(name: str, first: int, last: int, accounts: int) -> str:
    """bench_full's events statement, for another table of the same shape and other rows."""
    sql = bench_full.SCHEMA_EVENTS.replace("TABLE events (", f"TABLE {name} (").replace(
        "INTO events\n", f"INTO {name}\n")
    return sql % {"accounts": accounts, "first": first, "last": last,
                  "words": harness.words_sql(), "nwords": len(harness.WORDS)}


def generate(lab: Lab, dbname: str, size_gb: float) -> dict[str, Any]:
    """bench_full's database, and the archive tables that make events half of it."""
    cluster = lab.cluster
    data = bench_full.generate(cluster, dbname, size_gb * BASE_PER_GB)
    sizes = table_bytes(cluster, dbname)
    events = data["events"]
    others = sizes["line_items"] + sizes["accounts"]
    per_archive = max(1, round(events * (sizes["events"] - others) / sizes["events"]
                               / ARCHIVES))
    names = [f"events_archive_{i}" for i in range(1, ARCHIVES + 1)]
    statements = [archive_sql(name, events + 1 + i * per_archive, events + (i + 1) * per_archive,
                              data["accounts"]) for i, name in enumerate(names)]
    harness.parallel(cluster, dbname, [statements[0::2], statements[1::2]])
    for name in names:
        cluster.execute(f"ALTER TABLE {name} ADD PRIMARY KEY (id)", dbname)
    harness.vacuum_and_checkpoint(cluster, dbname)
    sizes = table_bytes(cluster, dbname)
    data.update(archive_rows=per_archive * ARCHIVES, table_bytes=sizes,
                events_share=sizes["events"] / sum(sizes.values()),
                database_bytes=int(cluster.execute(
                    "SELECT pg_database_size(current_database())", dbname)[0][0]))
    return data


def table_bytes(cluster: Any, dbname: str) -> dict[str, int]:
    rows = cluster.execute("SELECT relname, pg_table_size(oid) FROM pg_class WHERE relkind = 'r'"
                           " AND relnamespace = 'public'::regnamespace", dbname)
    return {name: int(size) for name, size in rows}


def contents(cluster: Any, dbname: str) -> dict[str, int]:
    """Every table's row count, and how many indexes and constraints: what a restore
    must give back."""
    tables = [r[0] for r in cluster.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
        "'public'::regnamespace ORDER BY 1", dbname)]
    counts = cluster.execute(" UNION ALL ".join(
        f"SELECT '{t}', count(*) FROM public.{t}" for t in tables) + " UNION ALL "
        "SELECT '(indexes)', count(*) FROM pg_indexes WHERE schemaname = 'public' UNION ALL "
        "SELECT '(constraints)', count(*) FROM pg_constraint WHERE connamespace = "
        "'public'::regnamespace", dbname)
    return {name: int(n) for name, n in counts}


# --- the slow link -----------------------------------------------------------------------

class Link:
    """bench/slowlink.py --target in its own process, so its CPU is counted apart (`link`)
    and its threads share no GIL with the sampler (bench/README.md, "The slow link")."""

    def __init__(self, target_port: int, rate_mb: float) -> None:
        self.target_port, self.rate_mb = target_port, rate_mb
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> Link:
        self.proc = subprocess.Popen(
            [sys.executable, str(SLOWLINK), "--target", f"127.0.0.1:{self.target_port}",
             "--rate", f"{self.rate_mb:g}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.match(r"slowlink: 127\.0\.0\.1:(\d+) ", line)
        if not found:
            self.stop()
            raise RuntimeError(f"bench/slowlink.py did not start: {line!r}")
        self.port = int(found.group(1))
        return self

    def url(self, url: str) -> str:
        """The same database's URL, through the link."""
        return url.replace(f":{self.target_port}/", f":{self.port}/")

    def cpu(self) -> float:
        return harness.process_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# --- the methods -------------------------------------------------------------------------

class Account(harness.CpuAccount):
    """The harness's CPU accounting, keeping the last measured engine run's Sample (its
    processes' lifetimes give the phases of a backup)."""

    last: harness.Sample | None = None

    def measure_engine(self, argv: list[str], env: dict[str, str],
                       postmaster: int | None = None) -> tuple[harness.Sample, dict[str, float]]:
        s, cpu = super().measure_engine(argv, env, postmaster)
        self.last = s
        return s, cpu


def backup_phases(s: harness.Sample, jobs: int) -> dict[str, float] | None:
    """Where a backup's time went, from when its processes lived: start-up, snapshot, roles
    and the schema's pg_dump until the first COPY (psql) starts; the COPY workers; the end.
    `busy` is the share of the workers' time a COPY ran (1.0: never idle)."""
    copies = [(first, last) for name, first, last in s.procs if name == "psql"]
    schema = [(first, last) for name, first, last in s.procs if name == "pg_dump"]
    if not copies:
        return None
    start, end = min(f for f, _ in copies), max(e for _, e in copies)
    span = max(end - start, 1e-6)
    return {"until_copy": start, "schema_dump": sum(e - f for f, e in schema),
            "copy": end - start, "finish": s.wall - end,
            "busy": sum(e - f for f, e in copies) / (min(jobs, len(copies)) * span)}


class Runner(bench_peer.PeerRunner):
    """bench_full's pg_dump and ours (with SUPABACKUP_JOBS), bench_peer's peer, and the
    restores; a method named NAME/slow runs through the link."""

    def __init__(self, lab: Lab, settle_seconds: float, peer: Path | None, peer_args: str,
                 link: Link, jobs: int) -> None:
        super().__init__(lab, settle_seconds, peer or DEFAULT_PEER, peer_args)
        self.link, self.jobs = link, jobs
        self.base_env = self.env
        self.account: Account = Account(lab.cluster, lab.s3)
        self.archive = lab.workdir / "baseline.dump"   # pg_restore's input
        self.expected: dict[str, int] = {}

    def run(self, method: str, url: str) -> dict[str, Any]:
        name, _, where = method.partition("/")
        slow = where == "slow"
        link_before = self.link.cpu()
        if name.startswith("backup-j"):
            self.env = {**self.base_env, JOBS_ENV: name.removeprefix("backup-j")}
            try:
                res = super().run("ours", self.link.url(url) if slow else url)
            finally:
                self.env = self.base_env
            if self.account.last is not None:  # the COPY workers apart from Python
                psql = self.account.last.cpu.get("psql", 0.0)
                res["cpu"]["psql"] = psql
                res["cpu"]["supabackup"] = max(0.0, res["cpu"]["supabackup"] - psql)
                res["rss_mb"]["psql"] = self.account.last.rss_mb("psql")
                res["phases"] = backup_phases(self.account.last,
                                              int(name.removeprefix("backup-j")))
        elif name.endswith("restore") or "restore-" in name:
            res = self.restore(name, slow)
        else:  # pg_dump, ours (the fixed cost), peer
            res = super().run(name, self.link.url(url) if slow else url)
        link = self.link.cpu() - link_before
        res["cpu"]["link"] = link
        res["cpu"]["others"] = max(0.0, res["cpu"]["others"] - link)
        return res

    def restore(self, name: str, slow: bool) -> dict[str, Any]:
        """One restore into a new, empty database, checked against the source."""
        busy_before = harness.settle(self.settle_seconds) if self.settle_seconds > 0 else None
        cluster = self.lab.cluster
        target = cluster.create_database(TARGET_DB)
        target = self.link.url(target) if slow else target
        try:
            if name == "pg_restore" or name.startswith("pg_restore-j"):
                jobs = name.removeprefix("pg_restore-j") if "-j" in name else ""
                argv = [self.pg_restore, *(["-j", jobs] if jobs else []), "-d", target,
                        str(self.archive)]
            else:  # restore-jN: ours
                argv = [str(SUPABACKUP), "restore", "--jobs", name.removeprefix("restore-j"),
                        "--store", f"s3://{BUCKET}/{RESTORE_PREFIX}", "--target-url", target]
            before = self.account.snapshot()
            s = measure(argv, self.base_env, postmaster=self.account.postmaster)
            tools, psql = s.cpu.get("pg_restore", 0.0), s.cpu.get("psql", 0.0)
            cpu = {"pg_restore": tools, "psql": psql,
                   "supabackup": max(0.0, s.cpu_tree - tools - psql),
                   **self.account.since(before, s.cpu_tree)}
            got = contents(cluster, TARGET_DB)
        finally:
            cluster.drop_database(TARGET_DB)
        if got != self.expected:
            wrong = {k: (got.get(k), v) for k, v in self.expected.items() if got.get(k) != v}
            raise RuntimeError(f"{name} restored other contents (got, expected): {wrong}")
        return {"wall": s.wall, "busy_cpus_before": busy_before, "cpu": cpu,
                "rss_mb": {"python": s.rss_mb("python"), "pg_restore": s.rss_mb("pg_restore"),
                           "psql": s.rss_mb("psql")},
                "connections": len(s.backends)}

    def prepare(self, dbname: str, peer: bool) -> dict[str, Any]:
        """Before the runs: what a restore must give back, pg_restore's input file, the
        backup restore-jN reads, the COPY text's size; and the peer's check."""
        cluster, url = self.lab.cluster, self.lab.cluster.url(dbname)
        self.expected = contents(cluster, dbname)
        plain = self.lab.workdir / "plain.dump"
        try:
            for path, compress in ((self.archive, "zstd"), (plain, "0")):
                subprocess.run([self.pg_dump, "-Fc", f"--compress={compress}", "--no-sync",
                                "-f", str(path), "-d", url], env=self.env, check=True,
                               capture_output=True)
            copy_bytes = plain.stat().st_size
        finally:
            plain.unlink(missing_ok=True)
        subprocess.run([str(SUPABACKUP), "backup", "full", "--jobs", str(self.jobs),
                        "--database-url", url, "--store", f"s3://{BUCKET}/{RESTORE_PREFIX}"],
                       env=self.env, check=True, capture_output=True)
        stored = sum(o["Size"] for o in self.s3.client().list_objects_v2(
            Bucket=BUCKET, Prefix=RESTORE_PREFIX + "/").get("Contents", []))
        out = {"archive_bytes": self.archive.stat().st_size, "copy_text_bytes": copy_bytes,
               "backup_stored_bytes": stored}
        if peer:
            out["peer_check"] = self.check_peer(url)
        return out

    def finish(self) -> None:
        self.s3.empty(RESTORE_PREFIX + "/")
        self.archive.unlink(missing_ok=True)


# --- one size ----------------------------------------------------------------------------

def methods(jobs: int, peer: bool, slow: bool = True) -> tuple[str, ...]:
    local = ("pg_dump", "backup-j1", *(("peer",) if peer else ()), f"backup-j{jobs}")
    through = ("pg_dump/slow", f"backup-j{jobs}/slow", "pg_restore/slow",
               f"pg_restore-j{jobs}/slow", f"restore-j{jobs}/slow")
    return (*local, *(through if slow else ()))


def _described(res: dict[str, Any]) -> str:
    return "CPU s: " + "  ".join(f"{k} {v:.1f}" for k, v in res["cpu"].items())


def bench_size(runner: Runner, size_gb: float, names: tuple[str, ...], repeat: int,
               warmup: bool, prepare: bool, peer: bool) -> dict[str, Any]:
    cluster = runner.lab.cluster
    dbname = f"bench_{str(size_gb).replace('.', '_')}"
    print(f"\n== {size_gb:g} GB: generating database {dbname} ...", flush=True)
    data = generate(runner.lab, dbname, size_gb)
    print(f"   {data['database_bytes'] / GIB:.2f} GiB in {len(data['table_bytes'])} tables, "
          f"events {data['events_share']:.0%} of the table bytes; generated in "
          f"{data['generate_seconds']:.0f}s (bench_full's part)", flush=True)
    url = cluster.url(dbname)
    try:
        made = runner.prepare(dbname, peer) if prepare else {}
        runs = harness.rounds(names, repeat, warmup, lambda m: runner.run(m, url), _described)
    finally:
        runner.finish()
        cluster.drop_database(dbname)
    extra = ("stored_bytes", "connections")
    med = {m: harness.summarize_runs(r, extra) for m, r in runs.items()}
    for method, results in runs.items():
        if all(r.get("phases") for r in results):
            med[method]["phases"] = harness.medians([r["phases"] for r in results])
    return {"size_gb": size_gb, "data": data, **made, "runs": runs, "median": med}


# --- the report --------------------------------------------------------------------------

LABELS = {
    "pg_dump": "pg_dump -Fc zstd > /dev/null",
    "backup-j1": "supabackup backup full --jobs 1",
    "peer": "pgdump-aws-lambda (-Fc -Z1 {peer_args})",
    "backup-j{jobs}": "supabackup backup full --jobs {jobs}",
    "pg_restore": "pg_restore -d (from a local file)",
    "pg_restore-j{jobs}": "pg_restore -j {jobs} -d (from a local file)",
    "restore-j{jobs}": "supabackup restore --jobs {jobs}",
}
# supabackup: its Python process; psql: the COPY workers it runs (ours, and pg_restore's -j
# workers are pg_restore processes); link: the slow link's own process.
CPU_COLS = ("pg_dump", "pg_restore", "psql", "supabackup", "node", "postgres", "s3", "link",
            "others")


def label(method: str, jobs: int, peer_args: str) -> str:
    name = method.split("/")[0]
    template = name.replace(str(jobs), "{jobs}") if name.endswith(f"j{jobs}") else name
    return LABELS[template].format(jobs=jobs, peer_args=peer_args)


def baseline_of(method: str) -> str:
    """What a method is held to: pg_dump for backups, single-stream pg_restore for restores,
    over the same path (plain local, or the link)."""
    name, _, where = method.partition("/")
    base = "pg_restore" if "restore" in name else "pg_dump"
    return base + ("/" + where if where else "")


def rss_text(entry: dict[str, Any]) -> str:
    return ", ".join(f"{'supabackup' if k == 'python' else k} {fmt_mb(v)}"
                     for k, v in entry["rss_mb"].items() if v is not None and k != "tree")


def report_size(res: dict[str, Any], jobs: int, rate_mb: float, peer_args: str) -> None:
    m, d = res["median"], res["data"]
    made = (f"; COPY text {res['copy_text_bytes'] / MB:.0f} MB, zstd archive "
            f"{res['archive_bytes'] / MIB:.0f} MiB, our backup "
            f"{res['backup_stored_bytes'] / MIB:.0f} MiB" if "archive_bytes" in res else "")
    print(f"\nsize {res['size_gb']:g} GB: database {d['database_bytes'] / GIB:.2f} GiB, "
          f"{len(d['table_bytes'])} tables, events {d['events_share']:.0%} of the table "
          f"bytes{made}; median of {len(next(iter(res['runs'].values())))} runs")
    print(f"  {'method':<46}{'wall s':>7}{'(best)':>8}{'x base':>8}   peak RSS MB")
    for group, title in (("local", "plain local"),
                         ("slow", f"slow link, {rate_mb:g} MB/s per connection each way")):
        shown = [method for method in m if method.endswith("/slow") == (group == "slow")]
        if shown:
            print(f"  {title}:")
        for method in shown:
            entry, base = m[method], m[baseline_of(method)]
            print(f"    {label(method, jobs, peer_args):<44}{entry['wall']:7.2f}"
                  f"{entry['wall_min']:8.2f}{entry['wall'] / base['wall']:7.2f}x   "
                  f"{rss_text(entry)}")
    harness.print_cpu_table([(method, m[method]["cpu"]) for method in m], CPU_COLS, 22)
    print("  where a backup's time goes (medians; from when its processes lived):")
    for method, entry in m.items():
        if p := entry.get("phases"):
            print(f"    {method:<16} until the first COPY {p['until_copy']:5.2f}s (schema "
                  f"pg_dump {p['schema_dump']:.2f}s), COPY workers {p['copy']:5.2f}s "
                  f"({p['busy']:.0%} busy), finish {p['finish']:.2f}s")
    harness.print_noise_note(res["runs"].values())


def figures(sizes: list[dict[str, Any]], fixed: dict[str, float], jobs: int,
            peer: bool) -> list[dict[str, Any]]:
    """The rows of the project's table (figure, measured, target, verdict); the local rows
    at every size that ran them."""
    m = sizes[0]["median"]
    w = {k: v["wall"] for k, v in m.items()}
    j = f"j{jobs}"
    backup_slow = w[f"backup-{j}/slow"] / w["pg_dump/slow"]
    restore_one = w[f"restore-{j}/slow"] / w["pg_restore/slow"]
    restore_par = w[f"restore-{j}/slow"] / w[f"pg_restore-{j}/slow"]
    rows = [
        {"figure": f"backup full --jobs {jobs} / pg_dump -Fc, slow link, one table holding "
                   "half the data", "measured": f"{backup_slow:.2f}x",
         "target": f"<= {TARGET_BACKUP_SLOW}", "ok": backup_slow <= TARGET_BACKUP_SLOW},
        {"figure": f"restore --jobs {jobs} / single-stream pg_restore from a local file, "
                   "slow link", "measured": f"{restore_one:.2f}x",
         "target": f"<= {TARGET_RESTORE_SLOW}", "ok": restore_one <= TARGET_RESTORE_SLOW},
        {"figure": f"restore --jobs {jobs} / pg_restore -j {jobs} from a local file, slow link",
         "measured": f"{restore_par:.2f}x", "target": f"<= {TARGET_RESTORE_J4}",
         "ok": restore_par <= TARGET_RESTORE_J4},
    ]
    for res in sizes:
        rows += local_rows(res, fixed, peer, jobs)
    rows.append(rss_row(sizes, jobs))
    return rows


def local_rows(res: dict[str, Any], fixed: dict[str, float], peer: bool, jobs: int
               ) -> list[dict[str, Any]]:
    """backup --jobs 1 against pg_dump and the peer, and the server's CPU (that of --jobs N
    beside it), at one size."""
    m, at = res["median"], f"{res['data']['database_bytes'] / GIB:.2f} GiB"

    def ratio(method: str, key: str = "wall") -> float:
        return m[method][key] / m["pg_dump"][key]
    local = ratio("backup-j1")
    net = ((m["backup-j1"]["wall"] - fixed["ours"])
           / max(1e-6, m["pg_dump"]["wall"] - fixed["pg_dump"]))
    peer_ratio = ratio("peer") if peer else None
    server = (m["backup-j1"]["cpu"]["postgres"], m["pg_dump"]["cpu"]["postgres"])
    return [
        {"figure": f"backup full / pg_dump -Fc, plain local, 1 worker (--jobs 1), {at}",
         "measured": f"{local:.2f}x (best runs {ratio('backup-j1', 'wall_min'):.2f}x, without "
                     f"fixed costs {net:.2f}x); pgdump-aws-lambda " + (
             f"{peer_ratio:.2f}x (best runs {ratio('peer', 'wall_min'):.2f}x)"
             if peer_ratio is not None else "peer not found, see bench/README.md"),
         "target": f"<= {TARGET_BACKUP_LOCAL}, and below the peer's",
         "ok": both(local <= TARGET_BACKUP_LOCAL,
                    None if peer_ratio is None else local < peer_ratio)},
        {"figure": f"server CPU during backup full (--jobs 1) / during pg_dump -Fc, {at}",
         "measured": f"{server[0] / server[1]:.2f}x ({server[0]:.1f} / {server[1]:.1f} CPU s; "
                     f"--jobs {jobs}: {m[f'backup-j{jobs}']['cpu']['postgres'] / server[1]:.2f}x)",
         "target": f"<= {TARGET_SERVER_CPU}", "ok": server[0] / server[1] <= TARGET_SERVER_CPU},
    ]


def rss_row(sizes: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """The Python process's peak at each size: under the target, and flat."""
    peaks = [(r["data"]["database_bytes"] / GIB, r["median"][f"backup-j{jobs}"]["rss_mb"]
              ["python"]) for r in sizes]
    measured = ", ".join(f"{at:.2f} GiB {fmt_mb(mb)} MB" for at, mb in peaks)
    known = [mb for _, mb in peaks if mb is not None]
    under = None if not known else max(known) <= TARGET_RSS_MB
    flat = (None if len(known) < 2 else known[-1] <= known[0] * TARGET_RSS_FLAT)
    if len(sizes) < 2:
        measured += "; the second size not run (--quick)"
    return {"figure": f"peak RSS, {jobs} workers, 8 MiB parts", "measured": measured,
            "target": f"<= {TARGET_RSS_MB:.0f} MB, flat (<= {TARGET_RSS_FLAT}x)",
            "ok": both(under, flat)}


def both(first: bool | None, second: bool | None) -> bool | None:
    """A target of two conditions: MISS if either is missed, n/a if one is not measured."""
    if first is False or second is False:
        return False
    return None if first is None or second is None else True


def print_figures(rows: list[dict[str, Any]]) -> None:
    """The project's table, as a Markdown table (bench/README.md holds it as printed)."""
    print("\nthe project's targets (medians of this run; PASS/MISS, never asserted):\n")
    print("| figure | measured | target | |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['figure']} | {r['measured']} | {r['target']} | {verdict(r['ok']).strip()} |")


def lambda_model(sizes: list[dict[str, Any]], fixed: dict[str, float], jobs: int,
                 rate_mb: float) -> dict[str, Any]:
    """The largest database one 14-minute run backs up, by workers (bench/README.md).

    rate(N) = min(N x one stream's rate through the link, what this machine reached);
    largest = (LAMBDA_SECONDS - our fixed cost) x rate(N).
    """
    res, largest = sizes[0], sizes[-1]   # the slow-link size; the largest plain local one
    m, size = res["median"], res["data"]["database_bytes"]
    stream = size / m["pg_dump/slow"]["wall"]          # database bytes a second, one stream
    big, big_size = largest["median"][f"backup-j{jobs}"], largest["data"]["database_bytes"]
    cap = big_size / max(1e-6, big["wall"] - fixed["ours"])
    client_cpu = sum(big["cpu"][k] for k in ("supabackup", "psql", "pg_dump")) / (
        big_size / GIB)
    predicted = fixed["ours"] + size / (jobs * stream)
    measured = m[f"backup-j{jobs}/slow"]["wall"]
    rows = []
    for n in MODEL_WORKERS:
        rate = min(n * stream, cap)
        rows.append({"workers": n, "rate_bytes_s": rate, "capped": n * stream > cap,
                     "largest_bytes": (LAMBDA_SECONDS - fixed["ours"]) * rate})
    wire = res["copy_text_bytes"] / size
    print(f"\nthe largest database one {LAMBDA_SECONDS // 60}-minute Lambda run would back up "
          "(model; bench/README.md):")
    print(f"  one stream through the link: {stream / MB:.1f} MB/s of database (pg_dump/slow: "
          f"{size / MB:.0f} MB in {m['pg_dump/slow']['wall']:.1f}s; {wire:.2f} bytes of COPY "
          f"text per database byte, at {rate_mb:g} MB/s on the wire)")
    print(f"  the cap, what this machine reached: {cap / MB:.0f} MB/s of database "
          f"(backup --jobs {jobs}, plain local, {big_size / GIB:.2f} GiB, less the fixed cost "
          f"{fixed['ours']:.2f}s; client CPU {client_cpu:.1f} s per GiB: supabackup, psql, "
          "pg_dump)")
    print("  rate(N) = min(N x one stream, the cap); largest = "
          f"({LAMBDA_SECONDS}s - {fixed['ours']:.2f}s fixed) x rate(N)")
    for r in rows:
        print(f"    {r['workers']} worker{'s' * (r['workers'] > 1):<2} "
              f"{r['rate_bytes_s'] / MB:7.1f} MB/s{' (capped)' if r['capped'] else '':<10}"
              f"{r['largest_bytes'] / GIB:8.1f} GiB")
    print(f"  check at this size: the model gives backup --jobs {jobs} through the link "
          f"{predicted:.2f}s, measured {measured:.2f}s ({measured / predicted:.2f}x)")
    return {"stream_bytes_s": stream, "cap_bytes_s": cap, "fixed_seconds": fixed["ours"],
            "copy_text_per_byte": wire, "client_cpu_s_per_gib": client_cpu,
            "check": {"predicted": predicted, "measured": measured}, "rows": rows}


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser_for("bench_parallel.py", __doc__)
    parser.add_argument("--size", type=float, default=0.25, metavar="GIB",
                        help="database size, in GiB of pg_database_size (default: 0.25)")
    parser.add_argument("--rss-size", type=float, default=1.0, metavar="GIB",
                        help="the second size of the RSS row, backup --jobs N alone "
                             "(default: 1.0)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the second size (the RSS row then says so)")
    parser.add_argument("--rate", type=float, default=8.0, metavar="MB_S",
                        help="the slow link's rate per connection and direction, MB/s "
                             "(10**6 bytes; default: 8)")
    parser.add_argument("--jobs", type=int, default=4,
                        help="workers of the parallel rows (default: 4, as the targets)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured runs of each method; medians are reported (default: 3)")
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, metavar="DIR",
                        help="a checkout of jameshy/pgdump-aws-lambda (default: "
                             f"{DEFAULT_PEER.relative_to(harness.REPO)}); without one the "
                             "row says so")
    parser.add_argument("--peer-args", default=bench_peer.PEER_ARGS, metavar="ARGS",
                        help=f"the peer's PGDUMP_ARGS (default: {bench_peer.PEER_ARGS!r})")
    harness.add_settle(parser)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted first run of each method")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args(argv)
    if min(args.size, args.rss_size, args.rate) <= 0 or args.repeat < 1 or args.jobs < 2:
        parser.error("sizes and --rate must be positive, --repeat at least 1, --jobs at least 2")
    return args


def find_peer(path: Path) -> Path | None:
    """The peer's checkout, its dependencies installed; None (and why) if there is none."""
    if shutil.which("node") is None or not (path / "lib" / "handler.js").exists():
        print(f"bench: peer not found at {path} (or no node); see bench/README.md", flush=True)
        return None
    return bench_peer.peer_checkout(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peer = find_peer(args.peer)

    def body(lab: Lab) -> dict[str, Any]:
        link = Link(lab.cluster.port, args.rate).start()
        try:
            print(f"bench: slow link at 127.0.0.1:{link.port}, {args.rate:g} MB/s per "
                  "connection each way (bench/slowlink.py, its own process)", flush=True)
            runner = Runner(lab, args.settle, peer, args.peer_args, link, args.jobs)
            fixed = bench_full.fixed_cost(runner, lab.cluster, args.repeat)
            print(f"bench: fixed cost on an empty database: pg_dump {fixed['pg_dump']:.2f}s, "
                  f"ours {fixed['ours']:.2f}s", flush=True)
            sizes = [bench_size(runner, args.size, methods(args.jobs, peer is not None),
                                args.repeat, not args.no_warmup, True, peer is not None)]
            if not args.quick:  # the RSS row's second size, and the local rows there too
                sizes.append(bench_size(runner, args.rss_size,
                                        methods(args.jobs, peer is not None, slow=False),
                                        args.repeat, not args.no_warmup, False, False))
        finally:
            link.stop()
        for res in sizes:
            report_size(res, args.jobs, args.rate, args.peer_args)
        from supabackup.store import part_size_for
        biggest = max(sizes[-1]["data"]["table_bytes"].values())
        print(f"\n(part size of the largest table's objects: "
              f"{part_size_for(biggest) // MIB} MiB, store.part_size_for)")
        rows = figures(sizes, fixed, args.jobs, peer is not None)
        print_figures(rows)
        model = lambda_model(sizes, fixed, args.jobs, args.rate)
        return {"repeat": args.repeat, "rate_mb_s": args.rate, "jobs": args.jobs,
                "peer": None if peer is None else bench_peer.peer_version(peer),
                "engine_modified": harness.engine_modified(), "fixed_cost_seconds": fixed,
                "sizes": sizes, "figures": rows, "lambda_model": model}

    return harness.run_bench("process", harness.ENDPOINTS["process"], args.json, body)


if __name__ == "__main__":
    sys.exit(main())
