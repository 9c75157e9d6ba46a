"""Run pg_dump (or pg_dumpall) as a stream that refuses to end badly.

`DumpProcess.read()` hands out pg_dump's stdout. When stdout reaches EOF it waits for
the process and checks its exit status and stderr *before* returning the final empty
read; if pg_dump failed, the read raises instead, so the uploader sees an error rather
than a clean end of stream, and aborts the multipart upload instead of completing it.
A dump that dies half way can therefore never be stored as a whole one.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import deque
from types import TracebackType

from .dburl import ConnectionInfo
from .errors import DumpFailed

STDERR_KEEP = 64 * 1024
READ_SIZE = 1024 * 1024


class DumpProcess:
    """A running pg_dump/pg_dumpall whose stdout is read as a file."""

    def __init__(self, argv: list[str], conn: ConnectionInfo, what: str) -> None:
        self.argv = argv
        self.conn = conn
        self.what = what
        env = child_env(conn, application=f"supabackup {os.path.basename(argv[0])}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, bufsize=0)
        self._stderr: deque[bytes] = deque()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.warnings: list[str] = []
        self.finished = False

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        kept = 0
        for line in self.proc.stderr:
            self._stderr.append(line)
            kept += len(line)
            while kept > STDERR_KEEP and len(self._stderr) > 1:
                kept -= len(self._stderr.popleft())

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(READ_SIZE if n is None or n < 0 else n)
        if not data:
            self._check_exit()
            return b""
        # A short read is not EOF; keep filling up to n so the uploader gets full parts.
        if n and n > 0:
            chunks = [data]
            got = len(data)
            while got < n:
                more = self.proc.stdout.read(n - got)
                if not more:
                    break
                chunks.append(more)
                got += len(more)
            data = b"".join(chunks)
        return data

    def _check_exit(self) -> None:
        if self.finished:
            return
        code = self.proc.wait()
        self._stderr_thread.join()
        text = self.conn.redact(b"".join(self._stderr).decode("utf-8", "replace"))
        errors = [ln for ln in text.splitlines()
                  if ": error:" in ln or "FATAL" in ln
                  or (": detail:" in ln and "Command was" not in ln)]
        self.warnings = [ln for ln in text.splitlines() if ": warning:" in ln]
        if code != 0 or errors:
            reason = _exit_reason(code)
            lines = text.strip().splitlines()
            detail = "; ".join(errors[-3:]) or (lines[-1] if lines else "")
            raise DumpFailed(f"{self.what} failed ({reason}){': ' + detail if detail else ''}",
                             dump_hint(detail))
        self.finished = True

    def stop(self) -> None:
        """Kill the process from another thread (a watchdog); the reader then sees it die."""
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        """Stop the process (used when the upload side fails first)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> DumpProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def dump_hint(detail: str) -> str:
    lowered = detail.lower()
    if "server version mismatch" in lowered or "aborting because of server version" in lowered:
        return "use a pg_dump at least as new as the server (see SUPABACKUP_PG_BINDIR)"
    if "permission denied" in lowered:
        return "the database user lacks a privilege; grant it or exclude the object"
    if any(w in lowered for w in ("terminat", "connection", "server closed", "pqgetcopydata")):
        return "the connection was lost mid-dump; check the server and run again"
    if "snapshot" in lowered:
        return "the exported snapshot was lost; use a direct or session-pooler connection"
    return "nothing of this run was kept; fix the cause and run again"


def child_env(conn: ConnectionInfo, application: str | None = None) -> dict[str, str]:
    """Environment for a PostgreSQL client program: connection through PG* variables.

    Nothing else is inherited but PATH, the library path and the locale, so no stray PG*
    setting of the caller's can redirect a dump or a restore.
    """
    keep = ("PATH", "LD_LIBRARY_PATH", "HOME", "TZ", "LANG", "LC_ALL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(conn.libpq_env())
    if application:
        env["PGAPPNAME"] = application
    return env
