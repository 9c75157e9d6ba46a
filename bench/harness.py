"""What the benchmarks share: the lab they run in, how they measure, how they report.

A benchmark (bench_full.py, bench_incremental.py, bench_capture.py) keeps only its data
(how it builds its database), its methods (what it runs) and its targets and figures.
Everything else is here, once:

- the lab: one throwaway PostgreSQL 17 cluster and one loopback S3 endpoint (moto's
  server in its own process or in a thread, via devkit.s3.LocalS3; or bench/s3sink.py),
  removed at the end, also on Ctrl-C or SIGTERM (`run_bench`);
- measuring one command: wall time from fork to reap, GNU time's tree totals, and a
  sampler of /proc that follows every process of the tree (peak RSS, CPU, when it was
  first and last seen) and the server's new backends (`measure`);
- where the machine's CPU time went during a run (`CpuAccount`), and waiting for the
  machine to be idle before one (`settle`);
- medians, best runs and the rotating order of methods;
- the report's common pieces (PASS/MISS, the CPU table, the noise note) and the results
  JSON.

Method and caveats: bench/README.md.
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
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # devkit, when run without the editable install

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from devkit.pg import Cluster, bindir_for, free_port  # noqa: E402
from devkit.s3 import FAKE_CREDENTIALS, LocalS3  # noqa: E402

BUCKET = "supabackup-bench"
SUPABACKUP = Path(sys.executable).parent / "supabackup"
SINK = Path(__file__).resolve().parent / "s3sink.py"
GNU_TIME = "/usr/bin/time"  # apt package `time`
MIB = 1024 * 1024
GIB = 1 << 30
POLL_SECONDS = 0.02

# The throwaway server: durability off, WAL-free bulk load (wal_level=minimal), no
# autovacuum or checkpoint kicking in while a run is timed.
CLUSTER_SETTINGS = {
    "wal_level": "minimal", "max_wal_senders": "0", "max_wal_size": "8GB",
    "checkpoint_timeout": "30min", "maintenance_work_mem": "256MB",
    "shared_buffers": "256MB", "autovacuum": "off",
}

# What the S3 endpoint modes are, as the benches announce them.
ENDPOINTS = {"process": "moto server in its own process",
             "thread": "moto server in a thread of this process",
             "sink": "the null sink, bench/s3sink.py"}

# The supabackup CLI is a Python process; its program name depends on how it was started.
PY_NAMES = {"supabackup": "python", "python": "python", "python3": "python",
            "python3.12": "python"}


# --- building a database ---------------------------------------------------------------

# The vocabulary both generated data sets draw their text from.
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu order invoice refund shipment customer payment checkout cart discount coupon "
         "warehouse parcel tracking delivered pending failed retry webhook session login "
         "logout signup profile avatar settings billing plan upgrade downgrade trial "
         "renewal receipt").split()


def words_sql() -> str:
    """WORDS as an SQL array literal, for the generating statements' `%(words)s`."""
    return "ARRAY[" + ",".join(f"'{w}'" for w in WORDS) + "]"


def parallel(cluster: Cluster, dbname: str, lanes: list[list[str]]) -> None:
    """Run each lane's statements on a connection of its own, each in one transaction.

    One transaction per statement is what makes a CREATE + INSERT write no WAL with
    wal_level=minimal; the lanes run side by side (the machine has 2 cores).
    """
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


def vacuum_and_checkpoint(cluster: Cluster, dbname: str) -> None:
    """Set hint bits and the visibility map now, so no measured run pays for them, and
    flush the dirty buffers before anything is timed."""
    cluster.execute("VACUUM (ANALYZE)", dbname)
    cluster.execute("CHECKPOINT", dbname)


# --- reading /proc -----------------------------------------------------------------------

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


def children(pid: int) -> list[int]:
    """The live children of a process (of all its threads)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def proc_status(pid: int) -> tuple[str, int] | None:
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


def cmdline(pid: int) -> str:
    """A process's command line; for a server backend, its title (user, database, state)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --- measuring one command ---------------------------------------------------------------

class TreePoller(threading.Thread):
    """Samples every process of a tree: peak RSS (VmHWM), CPU, first and last time seen.

    Processes are named by program (the Python ones as `python`, see PY_NAMES). With
    `postmaster`, it also notes when each new server process appears, and its title: a
    run's first backend on its database is its first session.
    """

    def __init__(self, pid: int, t0: float, postmaster: int | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.postmaster = pid, t0, postmaster
        self.seen: dict[int, list[Any]] = {}  # pid -> [name, hwm KiB, cpu s, first, last]
        self.old_backends = set(children(postmaster)) if postmaster else set()
        self.backends: dict[int, tuple[float, str]] = {}  # pid -> (first seen, title)
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            stopping = self.stop.is_set()
            now = time.perf_counter() - self.t0
            self._sample_tree(now)
            if self.postmaster:
                self._note_backends(self.postmaster, now)
            if stopping or self.stop.wait(POLL_SECONDS):
                if stopping:
                    return

    def _sample_tree(self, now: float) -> None:
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            got = proc_status(pid)
            if got:
                name = PY_NAMES.get(got[0], got[0])
                first = self.seen[pid][3] if pid in self.seen else now
                self.seen[pid] = [name, got[1], process_cpu(pid), first, now]
            todo += children(pid)

    def _note_backends(self, postmaster: int, now: float) -> None:
        for pid in children(postmaster):
            if pid not in self.old_backends and pid not in self.backends:
                self.backends[pid] = (now, cmdline(pid))


@dataclass
class Sample:
    """One measured command: GNU time's totals for the tree and what the sampler saw."""

    wall: float
    rss_tree_kb: int                            # GNU time %M: the tree's peak
    cpu_tree: float                             # GNU time %U + %S: the whole tree
    rss_kb: dict[str, int]                      # peak VmHWM per program name
    cpu: dict[str, float]                       # CPU seconds per program name
    procs: list[tuple[str, float, float]]       # (name, first seen, last seen), by start
    lines: list[tuple[float, str]] = field(default_factory=list)  # stderr, with arrival
    backends: list[tuple[float, str]] = field(default_factory=list)  # new server processes

    def rss_mb(self, name: str) -> float | None:
        kb = self.rss_kb.get(name)
        return None if kb is None else kb / 1024


def measure(argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL,
            postmaster: int | None = None) -> Sample:
    """Run one command; wall time from fork to reap, peak RSS from GNU time and /proc.

    The command runs under `/usr/bin/time`, whose ru_maxrss is the peak of the command
    and its children. (Not wait4() from here: a child's ru_maxrss also counts the pages
    of the parent it was forked from, before exec, and this process is ~80 MB.) The
    poller samples each process's own VmHWM, to tell supabackup from its pg_dump.
    stderr is read line by line and each line stamped as it arrives (with --debug the
    engine logs when it has decided what to dump and when the backup is committed).
    """
    fd, name = tempfile.mkstemp(prefix="sbbench-time-")
    os.close(fd)
    timefile = Path(name)
    started = time.perf_counter()
    # A process group of its own, so that an interrupted run can be stopped whole.
    proc = subprocess.Popen([GNU_TIME, "-f", "%M %U %S", "-o", str(timefile), "--", *argv],
                            env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.PIPE, start_new_session=True)
    poller = TreePoller(proc.pid, started, postmaster)
    poller.start()
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append((time.perf_counter() - started, raw.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        code = proc.wait()
        wall = time.perf_counter() - started
        reader.join()
        gnu = (timefile.read_text().strip().splitlines() or ["0 0 0"])[-1].split()
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
        text = "\n".join(t for _, t in lines)
        raise RuntimeError(f"{argv[0]} exited {code}: {text.strip()[-2000:]}")
    return _sample(wall, gnu, poller, lines)


def _sample(wall: float, gnu: list[str], poller: TreePoller,
            lines: list[tuple[float, str]]) -> Sample:
    """Sum the sampler's processes by program name (leaving out GNU time itself)."""
    rss: dict[str, int] = {}
    cpu: dict[str, float] = {}
    procs = []
    for pname, hwm, secs, first, last in poller.seen.values():
        if pname == "time":
            continue
        rss[pname] = max(rss.get(pname, 0), hwm)
        cpu[pname] = cpu.get(pname, 0.0) + secs
        procs.append((pname, first, last))
    procs.sort(key=lambda p: p[1])
    return Sample(wall=wall, rss_tree_kb=int(gnu[0]), cpu_tree=float(gnu[1]) + float(gnu[2]),
                  rss_kb=rss, cpu=cpu, procs=procs, lines=lines,
                  backends=sorted(poller.backends.values()))


# --- where the CPU time went -------------------------------------------------------------

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

    def postgres(self) -> float:
        """CPU seconds the server has used so far."""
        total = process_cpu(self.postmaster, children=True)
        return total + sum(process_cpu(p) for p in children(self.postmaster))

    def snapshot(self) -> tuple[float, float, float, float]:
        me = os.times()
        return (machine_busy(), self.postgres(), self.s3.cpu_seconds(), me.user + me.system)

    def since(self, before: tuple[float, float, float, float], command: float) -> dict[str, float]:
        after = self.snapshot()
        busy, pg, s3, me = (a - b for a, b in zip(after, before, strict=True))
        if self.s3.mode == "thread":
            me = 0.0  # s3 is this process
        return {"postgres": pg, "s3": s3,
                "others": max(0.0, busy - command - pg - s3 - me)}

    def measure_engine(self, argv: list[str], env: dict[str, str],
                       postmaster: int | None = None) -> tuple[Sample, dict[str, float]]:
        """Measure a supabackup command, and split its CPU time: its pg_dump and
        pg_dumpall, the Python process, the server, the endpoint, the rest."""
        before = self.snapshot()
        s = measure(argv, env, postmaster=postmaster)
        others = self.since(before, s.cpu_tree)
        dumps = s.cpu.get("pg_dump", 0.0) + s.cpu.get("pg_dumpall", 0.0)
        return s, {"pg_dump": dumps, "supabackup": max(0.0, s.cpu_tree - dumps), **others}


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

# botocore's standard retries, as the engine's own client has them.
CLIENT_CONFIG = Config(retries={"max_attempts": 5, "mode": "standard"})


class S3Endpoint:
    """moto's server, in its own process (default) or a thread of this one; or the sink.

    The thread mode is devkit.s3.LocalS3. A context manager, or start() and stop().
    """

    def __init__(self, mode: str, bucket: str = BUCKET) -> None:
        self.mode, self.bucket = mode, bucket
        self.local = LocalS3() if mode == "thread" else None
        self.port = self.local.port if self.local else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """This process's environment with the endpoint as the only AWS configuration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.url,
                "AWS_ENDPOINT_URL_S3": self.url,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self, config: Config = CLIENT_CONFIG) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            config=config)

    def start(self) -> S3Endpoint:
        if self.local is not None:
            self.local.__enter__()
        else:
            server = (["-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
                      if self.mode == "process" else [str(SINK), "--port", str(self.port)])
            # A session of its own: a Ctrl-C reaches us, and we stop it in order.
            self.proc = subprocess.Popen([sys.executable, *server], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        self._wait_listening()
        if self.mode != "sink":
            urllib.request.urlopen(self.url + "/moto-api/", timeout=10).read()  # noqa: S310
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _wait_listening(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc and self.proc.poll() is not None:
                    raise RuntimeError("moto server exited at start") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time the endpoint has used so far (this whole process in thread mode)."""
        return process_cpu(self.proc.pid if self.proc else os.getpid())

    def rss_mb(self) -> float | None:
        """The endpoint's resident memory now (None in thread mode: it is this process)."""
        return None if self.proc is None else rss_mb(self.proc.pid)

    def empty(self, prefix: str = "") -> int:
        """Delete every object and abort every upload under prefix; return bytes deleted."""
        s3, total, bucket = self.client(), 0, self.bucket
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                total += obj["Size"]
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
        for up in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        return total

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.local is not None:
            self.local.__exit__(None, None, None)

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the lab: the cluster, the endpoint, the pg_dump -------------------------------------

@dataclass
class Lab:
    """What a bench runs against; all of it is removed when the bench ends."""

    cluster: Cluster
    s3: S3Endpoint
    pg_dump: str
    pg_dump_version: str
    workdir: Path


def open_lab(stack: ExitStack, s3_mode: str, endpoint: str) -> Lab:
    """Start the cluster and the endpoint; each is stopped when `stack` closes."""
    workdir = Path(tempfile.mkdtemp(prefix="sbbench-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    print(f"bench: starting PostgreSQL 17 and the S3 endpoint ({endpoint}) ...", flush=True)
    cluster = Cluster(bindir_for(17), settings=CLUSTER_SETTINGS)
    stack.callback(cluster.stop)
    cluster.start()
    s3 = S3Endpoint(s3_mode)
    stack.callback(s3.stop)
    s3.start()
    pg_dump, version = pg_dump_for(cluster.major)
    print(f"bench: pg_dump {version} at {pg_dump}; {os.cpu_count()} CPUs", flush=True)
    return Lab(cluster=cluster, s3=s3, pg_dump=pg_dump, pg_dump_version=version,
               workdir=workdir)


def pg_dump_for(major: int) -> tuple[str, str]:
    """The pg_dump supabackup itself would choose for this server."""
    from supabackup.pgtools import find_tools
    tools = find_tools(major)
    return tools.path("pg_dump"), tools.version


# --- medians, best runs, the order of methods --------------------------------------------

def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that were measured (None where a figure was missing)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def medians(groups: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Key by key, the median over several runs' dicts (the keys of the first run)."""
    return {k: median([g.get(k) for g in groups]) for k in groups[0]}


def summarize_runs(runs: Sequence[dict[str, Any]], extra: Iterable[str] = ()
                   ) -> dict[str, Any]:
    """The median run: wall time (and the best), rss_mb and cpu key by key, and `extra`."""
    entry: dict[str, Any] = {"wall": median([r["wall"] for r in runs]),
                             "wall_min": min(r["wall"] for r in runs)}
    for group in ("rss_mb", "cpu"):
        entry[group] = medians([r[group] for r in runs])
    for key in extra:
        if key in runs[0]:
            entry[key] = median([r[key] for r in runs])
    return entry


def rotated(methods: Sequence[str], round_no: int) -> list[str]:
    """The methods in the order of round `round_no` (from 0): no method always goes first."""
    k = round_no % len(methods)
    return [*methods[k:], *methods[:k]]


def rounds(methods: Sequence[str], repeat: int, warmup: bool,
           run: Callable[[str], dict[str, Any]],
           describe: Callable[[dict[str, Any]], str]) -> dict[str, list[dict[str, Any]]]:
    """Each method once, not counted (warm-up: the page cache, the S3 endpoint's memory,
    the bytecode cache), then `repeat` counted rounds in rotated order; every run printed
    with `describe` as it ends. Returns the counted runs of each method."""
    if warmup:
        print("   warm-up: each method once, not counted ...", flush=True)
        for method in methods:
            run(method)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    width = max(len(m) for m in methods) + 2
    for r in range(repeat):
        for method in rotated(methods, r):
            res = run(method)
            runs[method].append(res)
            print(f"   run {r + 1}/{repeat} {method:<{width}}{res['wall']:7.2f}s   "
                  f"{describe(res)}", flush=True)
    return runs


# --- the report --------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def fmt_mb(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}"


def fmt_cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_cpu_table(rows: Iterable[tuple[str, dict[str, float]]], cols: Sequence[str],
                    width: int) -> None:
    """CPU seconds by where they went (cols), one row per method."""
    print(f"  {'CPU seconds':<{width}}" + "".join(f"{c:>11}" for c in cols))
    for label, cpu in rows:
        print(f"  {label:<{width}}" + "".join(f"{fmt_cpu(cpu.get(c)):>11}" for c in cols))


def print_noise_note(groups: Iterable[Sequence[dict[str, Any]]]) -> None:
    """Warn when other work kept the machine busy: `others` CPU per wall second of a group."""
    others = max(sum(r["cpu"]["others"] for r in runs) / sum(r["wall"] for r in runs)
                 for runs in groups)
    if others > 0.2:
        print(f"  note: other programs kept {others:.1f} CPUs busy during some runs; "
              "the figures are noisy")


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def engine_modified() -> bool | None:
    """Whether the engine's sources differ from the commit (figures of a working tree)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                              "functions"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def environment() -> dict[str, Any]:
    """When, on which commit and on what machine: the head of every results file."""
    return {"when": datetime.now(UTC).isoformat(timespec="seconds"), "git": git_rev(),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "platform": platform.platform()}}


def write_results(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nbench: figures written to {path} ({out['seconds']:.0f}s in all)")


# --- a bench's run from start to end -----------------------------------------------------

INTERRUPTED = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop at once; the ExitStack in run_bench() removes everything."""
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


def run_bench(s3_mode: str, endpoint: str, json_path: Path,
              body: Callable[[Lab], dict[str, Any]]) -> int:
    """Open the lab, run `body` in it, close it, write the figures; the exit status.

    `body` prints its report and returns the figures for the results file; this adds
    the machine, the pg_dump, the endpoint mode and how long it all took.
    """
    code = prepare()
    if code is not None:
        return code
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            lab = open_lab(stack, s3_mode, endpoint)
            figures = body(lab)
            left = lab.s3.empty()
            if left:
                print(f"bench: warning: {left} bytes were left in the bucket after the runs")
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - report, clean up, exit
        return failed(exc)
    out = {**environment(),
           "pg_dump": {"path": lab.pg_dump, "version": lab.pg_dump_version}, "s3": s3_mode,
           "seconds": round(time.monotonic() - started, 1), **figures}
    write_results(json_path, out)
    return 0


def parser_for(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help is the bench's docstring (first paragraph, then rest)."""
    return argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doc.split("\n\n", 1)[0], epilog=doc.split("\n\n", 1)[1])


def add_size_gb(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="database size to generate, in GiB of pg_database_size "
                             "(default: 1.0)")


def add_json(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--json", type=Path, default=default,
                        help="where to write the figures "
                             f"(default: {default.relative_to(REPO)})")


def add_settle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                        help="before each run, wait up to this long for the machine to be "
                             "idle (default: 10; 0 disables)")


def rss_mb(pid: int) -> float | None:
    """A process's resident memory now, in MB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
