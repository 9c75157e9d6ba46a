"""Compare two databases the way a user would: a plain pg_dump of each, apart from order.

Used by the round-trip tests and by `make demo`. The dumps are taken with the newest
pg_dump available, sorted line by line (pg_dump's order of equal-priority objects may
differ between two databases), and compared.
"""

from __future__ import annotations

import subprocess

from supabackup.dburl import ConnectionInfo
from supabackup.dump import child_env
from supabackup.pgtools import find_tools


def dump_lines(url: str) -> list[str]:
    info = ConnectionInfo.from_url(url)
    tools = find_tools(0)
    argv = [tools.path("pg_dump"), "--no-sync"]
    if _has_restrict_key(argv[0]):
        argv.append("--restrict-key=devkit")
    out = subprocess.run(argv, env=child_env(info), capture_output=True,
                         check=True).stdout.decode()
    return sorted(line for line in out.splitlines()
                  if line.strip() and not line.startswith("--"))


def _has_restrict_key(pg_dump: str) -> bool:
    """pg_dump 17.6+ writes a random \\restrict key per dump; fix it so dumps compare."""
    return "--restrict-key" in subprocess.run([pg_dump, "--help"], capture_output=True,
                                              text=True).stdout


def differences(source_url: str, restored_url: str, limit: int = 20) -> list[str]:
    """Lines only in one of the two dumps ('-' source, '+' restored); empty when equal."""
    a, b = dump_lines(source_url), dump_lines(restored_url)
    only_a = _multiset_minus(a, b)
    only_b = _multiset_minus(b, a)
    return ([f"- {x}" for x in only_a] + [f"+ {x}" for x in only_b])[:limit]


def _multiset_minus(a: list[str], b: list[str]) -> list[str]:
    from collections import Counter
    return sorted((Counter(a) - Counter(b)).elements())
