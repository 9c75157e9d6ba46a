"""Run pg_dump (or pg_dumpall) as a stream that refuses to end badly.

`DumpProcess.read()` hands out pg_dump's stdout. When stdout reaches EOF it waits for
the process and checks its exit status and stderr *before* returning the final empty
read; if pg_dump failed, the read raises instead, so the uploader sees an error rather
than a clean end of stream, and aborts the multipart upload instead of completing it.
A dump that dies half way can therefore never be stored as a whole one.
"""

from __future__ import annotations

import os
from types import TracebackType

from .dburl import ConnectionInfo
from .errors import DumpFailed
from .pgtools import Child, child_env, exit_reason

READ_SIZE = 1024 * 1024


class DumpProcess:
    """A running pg_dump/pg_dumpall whose stdout is read as a file."""

    def __init__(self, argv: list[str], conn: ConnectionInfo, what: str) -> None:
        self.conn = conn
        self.what = what
        self.child = Child(argv, child_env(conn, application=f"supabackup "
                                                            f"{os.path.basename(argv[0])}"),
                           stdout=True, raw=True)
        self.warnings: list[str] = []
        self.finished = False

    def read(self, n: int = -1) -> bytes:
        stdout = self.child.stdout
        data = stdout.read(READ_SIZE if n is None or n < 0 else n)
        if not data:
            self._check_exit()
            return b""
        # A short read is not EOF; keep filling up to n so the uploader gets full parts.
        if n and n > 0:
            chunks = [data]
            got = len(data)
            while got < n:
                more = stdout.read(n - got)
                if not more:
                    break
                chunks.append(more)
                got += len(more)
            data = b"".join(chunks)
        return data

    def _check_exit(self) -> None:
        if self.finished:
            return
        code, stderr = self.child.wait()
        text = self.conn.redact(stderr)
        errors = [ln for ln in text.splitlines()
                  if ": error:" in ln or "FATAL" in ln or ln.startswith("ERROR:")  # psql's
                  or "COPY data transfer failed" in ln
                  or (": detail:" in ln and "Command was" not in ln)]
        self.warnings = [ln for ln in text.splitlines() if ": warning:" in ln]
        if code != 0 or errors:
            lines = text.strip().splitlines()
            detail = "; ".join(errors[-3:]) or (lines[-1] if lines else "")
            raise DumpFailed(f"{self.what} failed ({exit_reason(code)})"
                             f"{': ' + detail if detail else ''}", dump_hint(detail))
        self.finished = True

    def stop(self) -> None:
        """Kill the process from another thread (a watchdog); the reader then sees it die."""
        self.child.stop()

    def kill(self) -> None:
        """Stop the process (used when the upload side fails first)."""
        self.child.kill()

    def __enter__(self) -> DumpProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
        self.child.close()


def dump_hint(detail: str) -> str:
    lowered = detail.lower()
    if "server version mismatch" in lowered or "aborting because of server version" in lowered:
        return "use a pg_dump at least as new as the server (see SUPABACKUP_PG_BINDIR)"
    if "lock timeout" in lowered or ("lock table" in lowered and "timeout" in lowered):
        return ("a table's lock was wanted by another session (a migration?) queued behind "
                "this backup; the backup gave way: run it again when that is done")
    if "permission denied" in lowered:
        return "the database user lacks a privilege; grant it or exclude the object"
    if any(w in lowered for w in ("terminat", "connection", "server closed", "pqgetcopydata")):
        return "the connection was lost mid-dump; check the server and run again"
    if "snapshot" in lowered:
        return "the exported snapshot was lost; use a direct or session-pooler connection"
    return "nothing of this run was kept; fix the cause and run again"
