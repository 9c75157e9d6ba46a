"""Dump profiles: what a backup holds, and what a restore of it may assume.

`postgres` dumps everything, for restores into plain PostgreSQL.

`supabase` mirrors `supabase db dump` and goes further. Like it, it leaves out the
platform's internal schemas and the data of its migration-tracking tables, and drops
the platform's reserved roles from the roles script. Unlike it, the archive keeps the
platform schemas that hold user data (auth, storage, ...), whole: their data, and also
what users add to them (policies on storage.objects, triggers on auth.users, grants).
The archive therefore holds a superset; `platform_schemas` in the manifest tells a
restore which definitions a fresh Supabase project already has, so it can skip them and
restore only the user's part. The definitions themselves are kept so that the same
backup can also be restored into plain PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dburl import ConnectionInfo
from .errors import ConfigError

# Roles a Supabase project creates itself; a restore into a fresh project must not touch
# them. Sources: supabase/cli internal/utils/misc.go (ReservedRoles) and
# pkg/migration/dump.go (which also reserves every supabase_* and cli_login_* role).
SUPABASE_RESERVED_ROLES = frozenset({
    "anon", "authenticated", "authenticator", "dashboard_user", "pgbouncer", "postgres",
    "service_role", "pgsodium_keyholder", "pgsodium_keyiduser", "pgsodium_keymaker",
    "pgtle_admin",
})
SUPABASE_RESERVED_PREFIXES = ("supabase_", "cli_login_")

# Schemas the platform owns and fills itself, left out whole (definitions and data), as
# `supabase db dump` leaves out their data (supabase/cli pkg/migration/dump.go): nothing
# in them restores into another project, and `postgres` may not be allowed to read them.
SUPABASE_INTERNAL_SCHEMAS = (
    "_analytics", "_realtime", "_supavisor", "etl", "graphql", "graphql_public", "net",
    "pgbouncer", "pgsodium", "pgsodium_masks", "pgtle", "realtime", "repack", "tiger",
    "tiger_data", "timescaledb_*", "_timescaledb_*", "topology", "vault",
)

# Platform schemas whose definitions a fresh project already has, but whose data (and
# user additions: policies, triggers, grants) belong to the user and are kept.
SUPABASE_PLATFORM_SCHEMAS = ("auth", "storage", "extensions", "supabase_functions",
                             "supabase_migrations", "cron", "pgmq")

# Migration bookkeeping of the platform's services: a fresh project has its own.
# (supabase_migrations.schema_migrations is the user's own history and is kept.)
SUPABASE_MIGRATION_TABLES = ("auth.schema_migrations", "storage.migrations",
                             "supabase_functions.migrations")

NAMES = ("supabase", "postgres")


@dataclass(frozen=True)
class Profile:
    name: str
    exclude_schemas: tuple[str, ...] = ()
    exclude_table_data: tuple[str, ...] = ()
    platform_schemas: tuple[str, ...] = ()
    reserved_roles: frozenset[str] = frozenset()
    reserved_prefixes: tuple[str, ...] = ()

    def is_reserved(self, role: str) -> bool:
        return role in self.reserved_roles or any(role.startswith(p)
                                                  for p in self.reserved_prefixes)

    def pg_dump_args(self) -> list[str]:
        args = [f"--exclude-schema={s}" for s in self.exclude_schemas]
        args += [f"--exclude-table-data={t}" for t in self.exclude_table_data]
        return args


PROFILES = {
    "postgres": Profile(name="postgres"),
    "supabase": Profile(
        name="supabase",
        exclude_schemas=SUPABASE_INTERNAL_SCHEMAS,
        exclude_table_data=SUPABASE_MIGRATION_TABLES,
        platform_schemas=SUPABASE_PLATFORM_SCHEMAS,
        reserved_roles=SUPABASE_RESERVED_ROLES,
        reserved_prefixes=SUPABASE_RESERVED_PREFIXES,
    ),
}


def resolve_profile(name: str | None, conn: ConnectionInfo | None = None) -> Profile:
    """The named profile, or the default for the host: supabase for Supabase hosts."""
    if name is None:
        name = "supabase" if conn is not None and conn.is_supabase else "postgres"
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}",
                          f"choose one of: {', '.join(NAMES)}") from None
