"""The roles script: pg_dumpall --roles-only output, filtered statement by statement.

pg_dumpall writes one statement per line. We classify each line by the role it is about,
so that a backup can drop the reserved roles of a profile and a restore can leave roles
that already exist on the target exactly as they are (it says which).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_ABOUT_ROLE = re.compile(
    rf"^(?:CREATE ROLE|ALTER ROLE|COMMENT ON ROLE|SECURITY LABEL .*? ON ROLE)\s+({_IDENT})")
_GRANT = re.compile(rf"^GRANT\s+({_IDENT})\s+TO\s+({_IDENT})(.*?)(?:\s+GRANTED BY\s+({_IDENT}))?;$")


def unquote_ident(ident: str) -> str:
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def statements(script: str) -> list[str]:
    """The SQL statements of a roles script, without comments, blank lines and SETs."""
    return [line for line in script.splitlines()
            if line.strip() and not line.startswith("--") and not line.startswith("SET ")
            and not line.startswith("\\")]


def subject_roles(statement: str) -> tuple[str, ...]:
    """The roles a statement defines or changes: for GRANT, the member and the granted role."""
    about = _ABOUT_ROLE.match(statement)
    if about:
        return (unquote_ident(about.group(1)),)
    grant = _GRANT.match(statement)
    if grant:
        return (unquote_ident(grant.group(2)), unquote_ident(grant.group(1)))
    return ()


def drop_reserved(script: str, is_reserved: Callable[[str], bool]) -> str:
    """The script without statements that define or change a reserved role.

    A GRANT of a reserved role to a user's role (GRANT authenticated TO app_user) is
    about the user's role and is kept; one that changes a reserved role is dropped.
    """
    kept = []
    for line in script.splitlines():
        roles = subject_roles(line)
        if roles and is_reserved(roles[0]):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def reserved_roles(script: str, is_reserved: Callable[[str], bool]) -> list[str]:
    """The reserved roles a roles script creates (those `drop_reserved` leaves out)."""
    return sorted({roles[0] for line in script.splitlines()
                   if line.startswith("CREATE ROLE") and (roles := subject_roles(line))
                   and is_reserved(roles[0])})


@dataclass
class RolePlan:
    """What a restore does with the roles script on one target."""

    create: list[str] = field(default_factory=list)    # roles the restore creates
    existing: list[str] = field(default_factory=list)  # roles left exactly as they are
    statements: list[str] = field(default_factory=list)


def plan_roles(script: str, existing_roles: set[str]) -> RolePlan:
    """Keep statements about new roles only; strip GRANTED BY of grantors we cannot name."""
    plan = RolePlan()
    for stmt in statements(script):
        roles = subject_roles(stmt)
        if not roles:
            continue
        member = roles[0]
        if stmt.startswith("CREATE ROLE"):
            (plan.existing if member in existing_roles else plan.create).append(member)
        if member in existing_roles:
            continue
        grant = _GRANT.match(stmt)
        if grant:
            granted = unquote_ident(grant.group(1))
            if granted not in existing_roles and granted not in plan.create:
                continue
            grantor = grant.group(4)
            if grantor and unquote_ident(grantor) not in existing_roles | set(plan.create):
                stmt = stmt[: grant.start(4)].rstrip()
                stmt = re.sub(r"\s+GRANTED BY\s*$", "", stmt) + ";"
        plan.statements.append(stmt)
    return plan


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
