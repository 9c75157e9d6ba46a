"""Find the PostgreSQL client binaries (pg_dump, pg_dumpall, pg_restore, psql), give them
their environment (`child_env`) and run them (`Child`).

Where we look, in order: the directories named by SUPABACKUP_PG_BINDIR (and only those,
when it is set), the Lambda layer's /opt/bin, this checkout's build/layer/bin and
build/postgresql-*/bin, every directory on PATH, and Debian's /usr/lib/postgresql/*/bin.
We choose the newest pg_dump whose major version is at least the server's: pg_dump can
dump older servers, never newer ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

from .dburl import ConnectionInfo
from .errors import ToolError

CHECKOUT_BUILD = Path(__file__).resolve().parents[2] / "build"
TOOLS = ("pg_dump", "pg_dumpall", "pg_restore", "psql")
STDERR_KEEP = 64 * 1024  # the tail of a child's stderr kept for its error message


@dataclass(frozen=True)
class PgTools:
    """One directory holding a matching set of client binaries."""

    bindir: Path
    version: str  # e.g. "17.11"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def path(self, tool: str) -> str:
        return str(self.bindir / tool)

    @property
    def supports_zstd(self) -> bool:
        """pg_dump learned zstd compression in 16; our layer's build links libzstd."""
        return self.major >= 16


def candidate_dirs() -> list[Path]:
    explicit = os.environ.get("SUPABACKUP_PG_BINDIR")
    if explicit:
        return [Path(p) for p in explicit.split(os.pathsep) if p]
    dirs = [Path("/opt/bin"), CHECKOUT_BUILD / "layer" / "bin"]
    dirs += sorted(CHECKOUT_BUILD.glob("postgresql-*/bin"))
    dirs += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return dirs


@lru_cache(maxsize=64)
def _version_of(pg_dump: Path) -> str | None:
    try:
        out = subprocess.run([str(pg_dump), "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    return f"{match.group(1)}.{match.group(2) or 0}" if match else None


def available() -> list[PgTools]:
    """Every complete set of client binaries we can find, newest first, no duplicates."""
    found: dict[Path, PgTools] = {}
    for directory in candidate_dirs():
        pg_dump = directory / "pg_dump"
        if not all((directory / t).is_file() and os.access(directory / t, os.X_OK) for t in TOOLS):
            continue
        target = pg_dump.resolve()
        # Debian's pg_wrapper (a Perl script, ~30 ms a run) only dispatches to the
        # /usr/lib/postgresql/*/bin directories, which are probed anyway.
        if target.name == "pg_wrapper":
            continue
        real = target.parent
        if real in found:
            continue
        version = _version_of(pg_dump)
        if version:
            found[real] = PgTools(bindir=directory, version=version)
    return sorted(found.values(), key=lambda t: tuple(int(x) for x in t.version.split(".")),
                  reverse=True)


def find_tools(min_major: int, purpose: str = "dump") -> PgTools:
    """The newest client set whose major version is at least `min_major`."""
    sets = available()
    for tools in sets:
        if tools.major >= min_major:
            return tools
    seen = ", ".join(f"{t.version} in {t.bindir}" for t in sets) or "none"
    raise ToolError(
        f"no pg_dump/pg_restore of version {min_major} or newer to {purpose} with "
        f"(found: {seen})",
        f"install PostgreSQL {min_major}+ client binaries (the Lambda layer ships them; "
        "locally run `make setup`) or point SUPABACKUP_PG_BINDIR at their bin directory",
    )


def child_env(conn: ConnectionInfo | None, application: str | None = None) -> dict[str, str]:
    """Environment for a PostgreSQL client program: connection through PG* variables.

    Nothing else is inherited but PATH, the library path and the locale, so no stray PG*
    setting of the caller's can redirect a dump or a restore.
    """
    keep = ("PATH", "LD_LIBRARY_PATH", "HOME", "TZ", "LANG", "LC_ALL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    if conn is not None:
        env.update(conn.libpq_env())
    if application:
        env["PGAPPNAME"] = application
    return env


class Child:
    """A client program with the pipes a caller asks for, and its stderr drained in the
    background (a child whose stderr pipe fills up would stop), keeping the last
    STDERR_KEEP bytes for the error message. The one way this package runs a program.

    `raw` gives an unbuffered stdout, whose reads return what the pipe holds at once
    (pg_dump's stream into multipart parts).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, *,
                 stdin: bool = False, stdout: bool = False, raw: bool = False) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, env=env if env is not None else child_env(None),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE, bufsize=0 if raw else -1)
        self._stderr: deque[bytes] = deque()
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        kept = 0
        for line in self.proc.stderr:
            self._stderr.append(line)
            kept += len(line)
            while kept > STDERR_KEEP and len(self._stderr) > 1:
                kept -= len(self._stderr.popleft())

    def wait(self) -> tuple[int, str]:
        """(exit status, negative for a signal; the tail of stderr) once the child ends."""
        code = self.proc.wait()
        self._drain.join()
        return code, b"".join(self._stderr).decode("utf-8", "replace")

    def stop(self) -> None:
        """Kill the child without waiting (from a watchdog thread)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        """Kill the child if it still runs, and reap it."""
        self.stop()
        self.proc.wait()

    def end_input(self) -> None:
        """Close the child's stdin: for psql, the end of the script (and its COMMIT)."""
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:  # the child is gone; so is what it would read
                pass

    def close(self) -> None:
        """Close our ends of the pipes, once the child is done (or killed)."""
        self.end_input()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


def exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
