"""Find the PostgreSQL client binaries (pg_dump, pg_dumpall, pg_restore, psql).

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ToolError

CHECKOUT_BUILD = Path(__file__).resolve().parents[2] / "build"
TOOLS = ("pg_dump", "pg_dumpall", "pg_restore", "psql")


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
