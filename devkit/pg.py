"""Throwaway PostgreSQL clusters on free loopback ports.

PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres`
OS user (through `setpriv`); otherwise as ourselves. Each cluster uses password (scram)
authentication over TCP, so tests can exercise wrong-password failures for real.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg2

REPO = Path(__file__).resolve().parent.parent
PG15_BINDIR = Path("/usr/lib/postgresql/15/bin")
PG17_BINDIR = REPO / "build" / "postgresql-17" / "bin"
SUPERUSER_PASSWORD = "devkit-superuser-pw"


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
    pw = pwd.getpwnam("postgres")
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class Cluster:
    """One running PostgreSQL server; use as a context manager or call stop()."""

    bindir: Path
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sbpg-")))
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def start(self) -> Cluster:
        os.chmod(self.root, 0o755)
        _chown_to_server_user(self.root)
        pwfile = self.root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        _chown_to_server_user(pwfile)
        subprocess.run(
            [*_as_server_user(), str(self.bindir / "initdb"), "-D", str(self.datadir),
             "-U", "postgres", "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
             "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True,
        )
        options = {
            "listen_addresses": "127.0.0.1", "port": str(self.port),
            "unix_socket_directories": str(self.root), "fsync": "off",
            "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "50", "shared_buffers": "64MB", **self.settings,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        subprocess.run(
            [*_as_server_user(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
             "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start"],
            check=True, capture_output=True,
        )
        return self

    def stop(self) -> None:
        if self.datadir.exists():
            subprocess.run(
                [*_as_server_user(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                 "-m", "immediate", "-w", "stop"],
                capture_output=True,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start the server (as a crash would not: a clean restart)."""
        subprocess.run(
            [*_as_server_user(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
             "-l", str(self.root / "log"), "-w", "-t", "60", "-m", "fast", "restart"],
            check=True, capture_output=True,
        )

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


def knows_setting(bindir: Path, name: str) -> bool:
    """Whether this server release has the setting (minor releases add some)."""
    described = subprocess.run([*_as_server_user(), str(bindir / "postgres"),
                                "--describe-config"], capture_output=True, text=True)
    return any(line.split("\t", 1)[0] == name for line in described.stdout.splitlines())


def logical_cluster(major: int) -> Cluster:
    """A server for capture, not started (`.start()`, or use it as a context manager).

    Where the release restricts which output plugins a replication user may load
    (output_plugin_libraries, in newer minor releases), wal2json joins the default list;
    older releases have no such setting and would refuse it."""
    bindir = bindir_for(major)
    settings = dict(LOGICAL)
    if knows_setting(bindir, "output_plugin_libraries"):
        settings["output_plugin_libraries"] = "'pgoutput, test_decoding, wal2json'"
    return Cluster(bindir, settings=settings)
