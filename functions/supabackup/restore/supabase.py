"""Restoring into a fresh Supabase project: `supabackup restore --profile supabase`.

A fresh project already has the platform's schemas (auth, storage, ...) with their tables,
functions, indexes, grants and default privileges, and owns them through roles the
restoring user (`postgres`) is not. So the restore

  - skips the definitions of platform objects, and everything in the platform's internal
    schemas (realtime, graphql, vault, ...), keeping what belongs to the user in them:
    table data, sequence values, and policies and triggers the project does not already
    have (a policy on storage.objects, a trigger on auth.users);
  - loads data with `session_replication_role = replica`, so triggers (the platform's,
    and the user's on auth.users) do not fire a second time for rows that already
    carry their effects, and foreign keys between platform tables are not checked
    row by row;
  - gives every restored object the exact grants of the backup: the project's default
    privileges grant anon, authenticated and service_role access to every new table and
    function in public, which the source may have revoked. The restore revokes what
    default privileges granted to the objects it created, then applies the backup's own
    grants (ACL entries go last, in a pass of their own);
  - leaves alone the platform's default privileges (they belong to roles the user is
    not) and the reserved roles, and creates the user's own roles without passwords.

The target is "empty" when nothing outside the platform's schemas holds a relation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch

import psycopg2.extensions

from ..db import user_schemas
from ..inventory import schema_like
from ..manifest import Manifest
from ..profiles import PROFILES, SUPABASE_MIGRATION_TABLES
from ..roles import quote_literal
from .toc import TocEntry

# What a backup holds in a platform schema that belongs to the user.
USER_DATA = frozenset({"TABLE DATA", "SEQUENCE SET"})
USER_ADDITIONS = frozenset({"POLICY", "TRIGGER"})  # restored unless the project has them
GRANTS = frozenset({"ACL", "DEFAULT ACL"})

_EXISTING = """
SELECT 'POLICY', n.nspname, c.relname || ' ' || p.polname FROM pg_policy p
  JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT 'TRIGGER', n.nspname, c.relname || ' ' || t.tgname FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE NOT t.tgisinternal
UNION ALL
SELECT 'PUBLICATION', '-', pubname FROM pg_publication
UNION ALL
SELECT 'EVENT TRIGGER', '-', evtname FROM pg_event_trigger
"""
# Objects outside any schema that a project creates itself, matched by name.
PROJECT_WIDE = frozenset({"PUBLICATION", "EVENT TRIGGER"})


@dataclass
class SupabaseTarget:
    platform: frozenset[str]      # schemas whose definitions the project has
    internal: tuple[str, ...]     # schema patterns the project owns whole
    existing: frozenset[tuple[str, str, str]]  # (POLICY|TRIGGER, schema, "table name"),
                                               # (PROJECT_WIDE desc, -, name)
    user: str                     # the restoring role
    is_reserved: Callable[[str], bool]
    skipped: int = 0              # platform definitions left out (for the report)
    kept: list[str] = field(default_factory=list)  # user additions restored in them

    @classmethod
    def read(cls, conn: psycopg2.extensions.connection, manifest: Manifest) -> SupabaseTarget:
        """What the target project already has, read before anything is restored."""
        profile = PROFILES["supabase"]
        with conn.cursor() as cur:
            cur.execute(_EXISTING)
            existing = frozenset((d, s, n) for d, s, n in cur.fetchall())
            cur.execute("SELECT current_user")
            user = cur.fetchone()[0]
        return cls(platform=frozenset(profile.platform_schemas) | set(manifest.platform_schemas),
                   internal=profile.exclude_schemas, existing=existing, user=user,
                   is_reserved=profile.is_reserved)

    @property
    def ignored_schemas(self) -> list[str]:
        """LIKE patterns of the schemas a fresh project fills itself."""
        return [schema_like(p) for p in (*sorted(self.platform), *self.internal)]

    def _is_internal(self, schema: str) -> bool:
        return any(fnmatch(schema, pattern) for pattern in self.internal)

    def keep(self, entry: TocEntry) -> bool:
        """The main pass: everything the project lacks; grants wait for their own pass."""
        schema = entry.name if entry.desc == "SCHEMA" else entry.schema
        if entry.desc in GRANTS:
            return False
        if entry.desc == "COMMENT" and entry.name.startswith("EXTENSION "):
            return False  # the project's extensions are not the user's to comment on
        if entry.desc in PROJECT_WIDE and (entry.desc, "-", entry.name) in self.existing:
            self.skipped += 1  # supabase_realtime, pgrst_ddl_watch, ...; the tables users
            return False       # add to a publication are kept
        if self._is_internal(schema):
            return False
        if schema not in self.platform:
            return True
        if entry.desc in USER_DATA:
            return not (entry.desc == "TABLE DATA" and
                        f"{entry.schema}.{entry.name}" in SUPABASE_MIGRATION_TABLES)
        if entry.desc in USER_ADDITIONS and (entry.desc, schema, entry.name) not in self.existing:
            self.kept.append(f"{entry.desc.lower()} {schema}.{entry.name}")
            return True
        self.skipped += 1
        return False

    def keep_grant(self, entry: TocEntry) -> bool:
        """The last pass: the backup's grants, but not the platform roles' default privileges."""
        if entry.desc == "DEFAULT ACL":
            return not self.is_reserved(entry.owner) or entry.owner == self.user
        return entry.desc == "ACL" and not self._is_internal(entry.schema)

    def prologue(self) -> bytes:
        return b"SET session_replication_role = replica;\n"

    def reset_default_grants(self) -> bytes:
        """Revoke what default privileges gave the objects the restore created.

        Every relation, sequence and routine in a schema that is not the platform's was
        created by this restore (the target had none). Grants to roles other than the
        owner (and PUBLIC's EXECUTE on routines, which is PostgreSQL's own default) came
        from the project's default privileges; the backup's grants follow this.
        """
        skip = ", ".join(quote_literal(p) for p in self.ignored_schemas)
        return f"""DO $supabackup$
DECLARE r record;
BEGIN
  FOR r IN
    WITH mine AS (
      SELECT oid FROM pg_namespace
      WHERE {user_schemas("")} AND NOT nspname LIKE ANY (ARRAY[{skip}]))
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind,
           c.oid::regclass::text AS obj, a.grantee
    FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
    WHERE c.relnamespace IN (SELECT oid FROM mine) AND a.grantee <> c.relowner
    UNION
    SELECT 'ROUTINE', p.oid::regprocedure::text, a.grantee
    FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a
    WHERE p.pronamespace IN (SELECT oid FROM mine) AND a.grantee NOT IN (p.proowner, 0)
  LOOP
    EXECUTE format('REVOKE ALL ON %s %s FROM %s', r.kind, r.obj,
                   CASE r.grantee WHEN 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END);
  END LOOP;
END $supabackup$;
""".encode()

    def notes(self) -> list[str]:
        out = [f"supabase profile: left out {self.skipped} platform definition(s) the project "
               "already has; user data in platform schemas loaded with triggers off "
               "(session_replication_role = replica); grants as in the backup"]
        if self.kept:
            out.append(f"restored into platform schemas: {', '.join(self.kept)}")
        return out

