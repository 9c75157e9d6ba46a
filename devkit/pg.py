"""Throwaway PostgreSQL clusters on free loopback ports.

PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres`
OS user (through `setpriv`); otherwise as ourselves. Each cluster uses password (scram)
authentication over TCP, so tests can exercise wrong-password failures for real.

Two things adapt to the machine rather than fail on it:
- the settings: every server is started through `server_options`, which checks each one
  against the release's own `postgres --describe-config` (minor releases add settings,
  e.g. output_plugin_libraries in newer 15.x) and applies the optional ones only where
  the release has them;
- where the server's programs run from: a checkout in a folder the `postgres` user cannot
  enter (a root home directory is 0700) holds build/postgresql-17 out of its reach, so the
  installation is mirrored once into a world-readable cache in /tmp (`server_bindir`).
  Data directories and sockets live in a temporary directory the server user can reach.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import quote

import psycopg2

REPO = Path(__file__).resolve().parent.parent
PG15_BINDIR = Path("/usr/lib/postgresql/15/bin")
PG17_BINDIR = REPO / "build" / "postgresql-17" / "bin"
SUPERUSER_PASSWORD = "devkit-superuser-pw"
SERVER_USER = "postgres"
# World-traversable on every Unix (TMPDIR may not be); a mirror there is reused only when it
# is ours and writable by nobody else (_is_complete_mirror).
MIRROR_BASE = Path("/tmp")  # noqa: S108
COMPLETE = ".supabackup-mirror-complete"

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A throwaway server could not be set up; the message says why in one line."""


def bindir_for(major: int) -> Path:
    """Where the server binaries of one major version live on this machine."""
    return {15: PG15_BINDIR, 17: PG17_BINDIR}[major]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user() -> list[str]:
    """The command prefix that runs a program as the OS user that owns the cluster."""
    if os.geteuid() != 0:
        return []
    pw = pwd.getpwnam(SERVER_USER)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(SERVER_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def server_can_reach(*paths: Path) -> bool:
    """Whether the server's OS user can use these paths (programs: run; others: read).

    Asked of the user itself (`test` under setpriv), so group membership and ACLs count as
    they will for the server; when we are not root the server runs as us."""
    if os.geteuid() != 0:
        return True
    tests: list[str] = []
    for path in paths:
        tests += [*(["-a"] if tests else []), "-x" if path.is_dir() or os.access(path, os.X_OK)
                  else "-r", str(path)]
    return subprocess.run([*_as_server_user(), "test", *tests],
                          capture_output=True).returncode == 0


@cache
def server_tmp() -> Path:
    """A temporary directory the server user can enter: the usual one, else /tmp."""
    usual = Path(tempfile.gettempdir())
    return usual if server_can_reach(usual) else MIRROR_BASE


def _version(bindir: Path) -> str:
    """`postgres --version`'s number (e.g. "17.11"), run as ourselves."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[2] if len(out) > 2 else out[-1]


def _is_complete_mirror(path: Path) -> bool:
    """Ours (owned by us, writable by nobody else) and finished (the marker is written
    before the rename that makes the mirror appear)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (path / COMPLETE).is_file())


def _world_readable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(0o755 if path.is_dir() or mode & stat.S_IXUSR else 0o644)


def mirror_installation(bindir: Path, base: Path | None = None) -> Path:
    """The bindir of a world-readable copy of bindir's installation (bindir's parent, which
    holds bin/, lib/ and share/: the binaries find the rest relative to themselves).

    Made once per release into base/supabackup-postgresql-<major>-<version>: copied into a
    temporary directory beside it, then renamed into place, so a mirror that exists is
    complete; one made by another process meanwhile is reused."""
    version = _version(bindir)
    base = base or MIRROR_BASE
    final = base / f"supabackup-postgresql-{version.split('.')[0]}-{version}"
    if not _is_complete_mirror(final):
        if final.exists():  # not ours, or left half-done by hand: start over if we may
            if final.lstat().st_uid != os.geteuid():
                raise ClusterError(f"{final} exists but belongs to someone else: remove it, "
                                   f"or give {SERVER_USER} access to {bindir}")
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
        try:
            shutil.copytree(bindir.parent, staging, symlinks=True, dirs_exist_ok=True)
            (staging / COMPLETE).write_text(version + "\n")
            _world_readable(staging)
            try:
                staging.rename(final)
            except OSError:
                if not _is_complete_mirror(final):  # not a mirror that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final / bindir.name


@cache
def server_bindir(bindir: Path) -> Path:
    """The directory the server user runs bindir's programs from: bindir itself where it
    can reach them, else a mirror (`mirror_installation`)."""
    programs = [bindir / name for name in ("postgres", "initdb", "pg_ctl")]
    if not all(p.exists() for p in programs):
        raise ClusterError(f"no PostgreSQL server programs in {bindir} (run `make setup`; "
                           "`python -m devkit.preflight test` names what is missing)")
    if server_can_reach(*programs, bindir.parent):
        return bindir
    mirrored = mirror_installation(bindir)
    log.warning("devkit.pg: user %s cannot reach %s; its servers run from a copy in %s",
                SERVER_USER, bindir.parent, mirrored.parent)
    return mirrored


@cache
def described_settings(bindir: Path) -> frozenset[str]:
    """The names (lower case) of every setting this release has: `postgres --describe-config`
    of the binary itself, not its version number, decides."""
    described = subprocess.run([*_as_server_user(), str(server_bindir(bindir) / "postgres"),
                                "--describe-config"], capture_output=True, text=True)
    if described.returncode != 0:
        raise ClusterError(f"{bindir / 'postgres'} --describe-config failed: "
                           f"{described.stderr.strip()}")
    return frozenset(line.split("\t", 1)[0].lower() for line in described.stdout.splitlines())


def knows_setting(bindir: Path, name: str) -> bool:
    """Whether this server release has the setting (minor releases add some)."""
    return name.lower() in described_settings(bindir)


def server_options(bindir: Path, settings: dict[str, str],
                   where_known: dict[str, str] | None = None) -> dict[str, str]:
    """The settings to start bindir's server with: all of `settings`, which this release
    must know (a misspelt or newer setting is named here, not in a failed pg_ctl), and
    those of `where_known` that it has."""
    known = described_settings(bindir)
    unknown = sorted(name for name in settings if name.lower() not in known)
    if unknown:
        raise ClusterError(f"PostgreSQL {_version(bindir)} in {bindir} has no setting "
                           f"{', '.join(unknown)}: pass it in where_known if it is optional")
    return {**settings, **{name: value for name, value in (where_known or {}).items()
                           if name.lower() in known}}


def _run_as_server(command: list[str], what: str, log_file: Path | None = None) -> None:
    """Run a server program as the server user; a failure is one ClusterError that carries
    the program's own words (and the server log's last lines), not a bare exit status."""
    done = subprocess.run([*_as_server_user(), *command], capture_output=True, text=True)
    if done.returncode == 0:
        return
    said = (done.stderr or done.stdout).strip().splitlines()
    if log_file is not None and log_file.exists():
        said += log_file.read_text(errors="replace").strip().splitlines()[-5:]
    raise ClusterError(f"{what} failed (exit {done.returncode}): " + " | ".join(said[-8:]))


@dataclass
class Cluster:
    """One running PostgreSQL server; use as a context manager or call stop().

    `settings` must all exist in the release; `where_known` are applied where they do."""

    bindir: Path
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sbpg-",
                                                                     dir=server_tmp())))
    settings: dict[str, str] = field(default_factory=dict)
    where_known: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def server_bindir(self) -> Path:
        """Where the server user runs initdb, pg_ctl and postgres from (see server_bindir)."""
        return server_bindir(self.bindir)

    def start(self) -> Cluster:
        options = server_options(self.bindir, {
            "listen_addresses": "127.0.0.1", "port": str(self.port),
            "unix_socket_directories": str(self.root), "fsync": "off",
            "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "50", "shared_buffers": "64MB", **self.settings,
        }, self.where_known)
        os.chmod(self.root, 0o755)
        _chown_to_server_user(self.root)
        pwfile = self.root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        _chown_to_server_user(pwfile)
        _run_as_server(
            [str(self.server_bindir / "initdb"), "-D", str(self.datadir),
             "-U", "postgres", "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
             "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            f"initdb of {self.bindir}")
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        _run_as_server(
            [str(self.server_bindir / "pg_ctl"), "-D", str(self.datadir),
             "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start"],
            f"starting {self.bindir / 'postgres'}", self.root / "log")
        return self

    def stop(self) -> None:
        if self.datadir.exists():
            subprocess.run(
                [*_as_server_user(), str(self.server_bindir / "pg_ctl"), "-D",
                 str(self.datadir), "-m", "immediate", "-w", "stop"],
                capture_output=True,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start the server (as a crash would not: a clean restart)."""
        _run_as_server(
            [str(self.server_bindir / "pg_ctl"), "-D", str(self.datadir),
             "-l", str(self.root / "log"), "-w", "-t", "60", "-m", "fast", "restart"],
            f"restarting {self.bindir / 'postgres'}", self.root / "log")

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, dbname: str = "postgres", user: str = "postgres",
            password: str = SUPERUSER_PASSWORD) -> str:
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@127.0.0.1:{self.port}/{quote(dbname, safe='')}")

    def connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self.url(dbname))
        conn.autocommit = True
        return conn

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql_file(self, path: Path, dbname: str) -> None:
        """Load a SQL file with psql, stopping at the first error."""
        subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-d", self.url(dbname), "-f", str(path)],
            check=True, capture_output=True, text=True,
        )

    @property
    def major(self) -> int:
        return int(self.execute("SHOW server_version_num")[0][0]) // 10000


# A server for change capture: logical decoding, and commits flushed before it reads them.
LOGICAL = {"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "4",
           "synchronous_commit": "on", "track_commit_timestamp": "on"}


def logical_cluster(major: int) -> Cluster:
    """A server for capture, not started (`.start()`, or use it as a context manager).

    Where the release restricts which output plugins a replication user may load
    (output_plugin_libraries, in newer minor releases), wal2json joins the default list;
    older releases have no such setting and would refuse it."""
    return Cluster(bindir_for(major), settings=dict(LOGICAL), where_known={
        "output_plugin_libraries": "'pgoutput, test_decoding, wal2json'"})
