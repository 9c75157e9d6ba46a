"""Benchmark against a peer: `supabackup backup full` beside jameshy/pgdump-aws-lambda.

pgdump-aws-lambda is the most used Lambda pg_dump tool: its handler spawns one pg_dump
and streams its output into S3 (aws-sdk v2 `s3.upload`, 5 MiB parts, one at a time),
and does nothing else. This bench runs it with node, in the same run as ours, on the
same database, against the same loopback S3 endpoint (moto's server) and with the same
pg_dump (the one supabackup picks). Its code is not in this repository: --peer names a
checkout of it (bench/README.md says how to get one), and the few lines of node that
point its AWS SDK at the endpoint are written to a temporary directory at run time.

It builds bench_full.py's data set, runs each method once uncounted (warm-up), then
REPEAT times each, in a rotating order:

  pg_dump    pg_dump -Fc --compress=zstd > /dev/null  (the baseline)
  ours       supabackup backup full --store s3://... (the loopback endpoint)
  peer       node: pgdump-aws-lambda's handler(event), its pg_dump pointed at ours,
             with PGDUMP_ARGS (--peer-args, by default the baseline's --compress=zstd)

It prints medians, the ratios against the baseline of the same run, peak RSS and where
the CPU time went, and writes every figure to bench/results/peer.json. Before the
measured runs it checks that the peer's object is the dump: not empty, the TOC that
pg_restore --list reads from it has every table's data, and its size is that of the
same pg_dump written to a file. Everything it starts or writes is removed at the end,
also on Ctrl-C; the checkout is left as it was (but for `npm ci`, below).

  python bench/bench_peer.py --peer build/peer/pgdump-aws-lambda            # 0.5 GiB
  python bench/bench_peer.py --peer build/peer/pgdump-aws-lambda --peer-args ''
      # the peer as it ships: pg_dump -Fc -Z1 (gzip level 1)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import bench_full
import harness
from harness import BUCKET, MIB, Lab, fmt_mb, measure

RESULTS = harness.REPO / "bench" / "results" / "peer.json"
PEER_PREFIX = "bench-peer"   # the event's ROOT: its keys are ROOT/YYYY-MM-DD/DB-TIME.backup
METHODS = ("pg_dump", "ours", "peer")

# The peer's own pg_dump arguments (lib/pgdump.js); PGDUMP_ARGS come after them, and a
# later --compress wins, so the default --peer-args makes the baseline's archive.
PEER_BUILTIN_ARGS = ("-Fc", "-Z1")
PEER_ARGS = "--compress=zstd"

# Written to the lab's temporary directory at run time. aws-sdk v2 does not read
# AWS_ENDPOINT_URL(_S3), and the peer builds its S3 client from the SDK's global config
# (lib/upload-s3.js), so the endpoint is set there, with path-style addressing, before
# the handler is loaded. The event comes in an environment variable, not argv.
WRAPPER_JS = """\
// Written by supabackup's bench/bench_peer.py: run pgdump-aws-lambda's handler once.
const peer = process.argv[2];
const AWS = require(require.resolve('aws-sdk', { paths: [peer] }));
AWS.config.update({ endpoint: process.env.AWS_ENDPOINT_URL_S3, s3ForcePathStyle: true });
const { handler } = require(peer);
handler(JSON.parse(process.env.PEER_EVENT)).then(
  (location) => { process.stderr.write(`peer: stored ${location}\\n`); },
  (error) => { process.stderr.write(`peer: failed: ${error.stack || error}\\n`); process.exit(1); },
);
"""


# --- the peer's checkout -----------------------------------------------------------------

def peer_checkout(path: Path) -> Path:
    """The checkout, with its runtime dependencies installed (`npm ci --omit=dev`)."""
    path = path.resolve()
    if not (path / "lib" / "handler.js").exists() or not (path / "package.json").exists():
        raise SystemExit(f"bench: {path} is not a checkout of jameshy/pgdump-aws-lambda "
                         "(no lib/handler.js); see bench/README.md")
    if not (path / "node_modules" / "aws-sdk").exists():
        print(f"bench: installing the peer's dependencies: npm ci --omit=dev in {path}",
              flush=True)
        subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"], cwd=path,
                       check=True, stdout=subprocess.DEVNULL)
    return path


def peer_version(path: Path) -> dict[str, Any]:
    package = json.loads((path / "package.json").read_text())
    sdk = json.loads((path / "node_modules" / "aws-sdk" / "package.json").read_text())
    node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return {"path": str(path), "version": package.get("version"),
            "aws_sdk": sdk.get("version"), "node": node}


# --- the methods -------------------------------------------------------------------------

class PeerRunner(bench_full.Runner):
    """bench_full's pg_dump and ours, and the peer's handler run by node."""

    def __init__(self, lab: Lab, settle_seconds: float, peer: Path, peer_args: str) -> None:
        super().__init__(lab, settle_seconds)
        self.peer, self.peer_args = peer, peer_args
        self.wrapper = lab.workdir / "run-peer.js"
        self.wrapper.write_text(WRAPPER_JS)
        self.pg_restore = str(Path(lab.pg_dump).with_name("pg_restore"))

    def run(self, method: str, url: str) -> dict[str, Any]:
        if method != "peer":
            return super().run(method, url)
        busy_before = harness.settle(self.settle_seconds) if self.settle_seconds > 0 else None
        res = self.peer_run(url)
        res["busy_cpus_before"] = busy_before
        res["s3_rss_mb"] = self.s3.rss_mb()
        return res

    def event(self, url: str) -> dict[str, Any]:
        """The Lambda event the peer's README shows, for our database and endpoint."""
        u = urlsplit(url)
        return {"PGDATABASE": unquote(u.path.lstrip("/")), "PGUSER": unquote(u.username or ""),
                "PGPASSWORD": unquote(u.password or ""), "PGHOST": u.hostname,
                "PGPORT": str(u.port), "S3_BUCKET": BUCKET, "ROOT": PEER_PREFIX,
                "S3_REGION": "us-east-1", "PGDUMP_PATH": str(Path(self.lab.pg_dump).parent),
                "PGDUMP_ARGS": self.peer_args.split()}

    def peer_argv(self) -> list[str]:
        return ["node", str(self.wrapper), str(self.peer)]

    def peer_env(self, url: str) -> dict[str, str]:
        """The endpoint's environment, and the event for the wrapper to pass on."""
        return {**self.env, "PEER_EVENT": json.dumps(self.event(url)),
                "AWS_SDK_JS_SUPPRESS_MAINTENANCE_MODE_MESSAGE": "1"}

    def peer_run(self, url: str) -> dict[str, Any]:
        before = self.account.snapshot()
        s = measure(self.peer_argv(), self.peer_env(url))
        dump = s.cpu.get("pg_dump", 0.0)
        cpu = {"pg_dump": dump, "node": max(0.0, s.cpu_tree - dump),
               **self.account.since(before, s.cpu_tree)}
        objects = self.peer_objects()
        stored = self.s3.empty(PEER_PREFIX + "/")
        if len(objects) != 1 or objects[0]["Size"] == 0:
            raise RuntimeError(f"the peer stored {objects!r}, not one archive")
        return {"wall": s.wall, "rss_mb": {"node": s.rss_mb("node"),
                                           "pg_dump": s.rss_mb("pg_dump"),
                                           "tree": s.rss_tree_kb / 1024},
                "cpu": cpu, "stored_bytes": stored}

    def peer_objects(self) -> list[dict[str, Any]]:
        listing = self.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PEER_PREFIX + "/")
        return listing.get("Contents", [])

    # --- is the peer's object the dump? ---

    def toc_data(self, path: Path) -> list[str]:
        """The TABLE DATA entries pg_restore --list reads from an archive."""
        out = subprocess.run([self.pg_restore, "--list", str(path)], capture_output=True,
                             text=True, check=True).stdout
        return sorted(" ".join(line.split()[3:]) for line in out.splitlines()
                      if " TABLE DATA " in line and not line.startswith(";"))

    def check_peer(self, url: str) -> dict[str, Any]:
        """Run the peer once; its object must be the archive pg_dump itself makes."""
        reference, fetched = self.lab.workdir / "reference.dump", self.lab.workdir / "peer.dump"
        try:
            subprocess.run([self.pg_dump, *PEER_BUILTIN_ARGS, *self.peer_args.split(),
                            "--no-sync", "-f", str(reference), "-d", url], check=True,
                           env=self.env, capture_output=True)
            subprocess.run(self.peer_argv(), env=self.peer_env(url), check=True,
                           stdout=subprocess.DEVNULL)
            objects = self.peer_objects()
            if len(objects) != 1:
                raise RuntimeError(f"the peer stored {len(objects)} objects, not one archive")
            key, size = objects[0]["Key"], objects[0]["Size"]
            self.s3.client().download_file(BUCKET, key, str(fetched))
            ref_size, ref_toc, toc = reference.stat().st_size, self.toc_data(reference), \
                self.toc_data(fetched)
        finally:
            self.s3.empty(PEER_PREFIX + "/")
            for p in (reference, fetched):
                p.unlink(missing_ok=True)
        same_toc = toc == ref_toc
        # The archives differ only in the header's timestamp and the like.
        same_size = abs(size - ref_size) <= max(1024, ref_size // 1000)
        print(f"   check: the peer stored {key} ({size / MIB:.1f} MiB; pg_dump -f: "
              f"{ref_size / MIB:.1f} MiB); pg_restore --list: {len(toc)} TABLE DATA entries, "
              f"{'the same as' if same_toc else 'NOT the same as'} pg_dump's", flush=True)
        if not (size > 0 and toc and same_toc and same_size):
            raise RuntimeError("the peer's object is not the archive pg_dump makes")
        return {"key": key, "bytes": size, "reference_bytes": ref_size,
                "table_data_entries": len(toc)}


# --- one size ----------------------------------------------------------------------------

def bench_size(runner: PeerRunner, size_gb: float, repeat: int,
               warmup: bool) -> dict[str, Any]:
    cluster = runner.lab.cluster
    dbname = f"bench_{str(size_gb).replace('.', '_')}"
    print(f"\n== {size_gb:g} GB: generating database {dbname} ...", flush=True)
    data = bench_full.generate(cluster, dbname, size_gb)
    print(f"   {data['database_bytes'] / 2**30:.2f} GiB in {data['generate_seconds']:.0f}s",
          flush=True)
    url = cluster.url(dbname)
    try:
        check = runner.check_peer(url)
        runs = harness.rounds(METHODS, repeat, warmup, lambda m: runner.run(m, url),
                              lambda res: "CPU s: " + "  ".join(
                                  f"{k} {v:.1f}" for k, v in res["cpu"].items()))
    finally:
        cluster.drop_database(dbname)
    med: dict[str, Any] = {m: harness.summarize_runs(runs[m], ("stored_bytes",))
                           for m in METHODS}
    base, ours, peer = (med[m]["wall"] for m in METHODS)
    med["ratios"] = {"ours_vs_pg_dump": ours / base, "peer_vs_pg_dump": peer / base,
                     "ours_vs_peer": ours / peer,
                     "ours_vs_pg_dump_best": med["ours"]["wall_min"] / med["pg_dump"]["wall_min"],
                     "peer_vs_pg_dump_best": med["peer"]["wall_min"] / med["pg_dump"]["wall_min"]}
    return {"size_gb": size_gb, "data": data, "peer_check": check, "runs": runs, "median": med}


def report(res: dict[str, Any], peer_args: str) -> None:
    m, d, check = res["median"], res["data"], res["peer_check"]
    print(f"\nsize {res['size_gb']:g} GB: database {d['database_bytes'] / 2**30:.2f} GiB, "
          f"the peer's archive {check['bytes'] / MIB:.0f} MiB; "
          f"median of {len(res['runs']['ours'])} runs")
    print(f"  {'method':<44}{'wall s':>7}{'(best)':>8}{'x pg_dump':>10}   peak RSS MB")
    peer_dump = " ".join([*PEER_BUILTIN_ARGS, *peer_args.split()])
    rows = [
        *bench_full.baseline_rows(m),
        (f"pgdump-aws-lambda ({peer_dump})", m["peer"],
         f"node {fmt_mb(m['peer']['rss_mb']['node'])}, pg_dump "
         f"{fmt_mb(m['peer']['rss_mb']['pg_dump'])}"),
    ]
    for label, entry, rss in rows:
        print(f"  {label:<44}{entry['wall']:7.2f}{entry['wall_min']:8.2f}"
              f"{entry['wall'] / m['pg_dump']['wall']:9.2f}x   {rss}")
    harness.print_cpu_table(
        [(label, m[key]["cpu"]) for label, key in (("pg_dump > /dev/null", "pg_dump"),
                                                   ("ours", "ours"), ("peer", "peer"))],
        ("pg_dump", "postgres", "supabackup", "node", "s3", "others"), 44)
    r = m["ratios"]
    print(f"  ours / peer {r['ours_vs_peer']:.2f}x; best run against best run: ours "
          f"{r['ours_vs_pg_dump_best']:.2f}x, peer {r['peer_vs_pg_dump_best']:.2f}x pg_dump")
    harness.print_noise_note(res["runs"].values())


# --- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser_for("bench_peer.py", __doc__)
    parser.add_argument("--peer", type=Path, required=True, metavar="DIR",
                        help="a checkout of jameshy/pgdump-aws-lambda (bench/README.md says "
                             "how to get one; its node_modules are installed if missing)")
    parser.add_argument("--peer-args", default=PEER_ARGS, metavar="ARGS",
                        help="the event's PGDUMP_ARGS, added after the peer's own -Fc -Z1 "
                             f"(default: {PEER_ARGS!r}, the baseline's archive; '' for the "
                             "peer as it ships, gzip level 1)")
    parser.add_argument("--size-gb", type=float, default=0.5,
                        help="database size to generate, in GiB of pg_database_size "
                             "(default: 0.5)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured runs of each method; medians are reported (default: 3)")
    harness.add_settle(parser)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the uncounted first run of each method")
    harness.add_json(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.repeat < 1:
        parser.error("--size-gb must be positive and --repeat at least 1")
    if shutil.which("node") is None:
        parser.error("node is not on PATH (the peer runs on Node.js 20)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peer = peer_checkout(args.peer)
    about = {**peer_version(peer), "pgdump_args": args.peer_args}
    print(f"bench: peer pgdump-aws-lambda {about['version']} (aws-sdk {about['aws_sdk']}, "
          f"node {about['node']}) at {peer}", flush=True)

    def body(lab: Lab) -> dict[str, Any]:
        runner = PeerRunner(lab, args.settle, peer, args.peer_args)
        res = bench_size(runner, args.size_gb, args.repeat, not args.no_warmup)
        report(res, args.peer_args)
        return {"repeat": args.repeat, "peer": about, "size": res}

    return harness.run_bench("process", harness.ENDPOINTS["process"], args.json, body)


if __name__ == "__main__":
    sys.exit(main())
