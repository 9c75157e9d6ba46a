"""Session settings that fix the text form of values, for every reader and writer of them.

The text a server gives for a value depends on the session: DateStyle, IntervalStyle,
TimeZone, extra_float_digits (0 or less rounds floats), bytea_output, lc_monetary,
xmloption, array_nulls (off reads NULL in an array as a string); and a type's or a
regclass value's name depends on search_path (a name is qualified only when the path does
not find it). A database or a role may set any of them
(ALTER DATABASE ... SET), and every session then inherits them. Change capture decodes
values in its own session and replay parses them in another, on another server: both
pin the same settings, so a value reads back as exactly the value it was. With an empty
search_path every name outside pg_catalog comes qualified, and resolves the same anywhere.
"""

from __future__ import annotations

from typing import Any

STABLE = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",
    "array_nulls": "on",
    "search_path": "",
}


# Content fingerprints (fingerprint.py) hash row text under these: STABLE as it was before
# search_path and array_nulls joined it (a fingerprint recorded by an earlier backup must
# still compare equal), and row_security off as in pg_dump, so that a policy that would
# hide rows is an error, not a short count.
FINGERPRINT = {**{k: v for k, v in STABLE.items() if k not in ("search_path", "array_nulls")},
               "row_security": "off"}


def pin(cur: Any, local: bool = False, settings: dict[str, str] = STABLE) -> None:
    """SET (or SET LOCAL, for one transaction) `settings` on `cur`'s session."""
    scope = "SET LOCAL" if local else "SET"
    cur.execute("; ".join(f"{scope} {name} = %s" for name in settings),
                tuple(settings.values()))
