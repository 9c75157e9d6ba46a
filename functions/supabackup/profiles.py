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
# them. Source: supabase/cli, internal/utils/misc.go (reserved roles) and the
# init scripts of supabase/postgres.
SUPABASE_RESERVED_ROLES = frozenset({
    "anon", "authenticated", "authenticator", "dashboard_user", "pgbouncer", "postgres",
    "service_role", "supabase_admin", "supabase_auth_admin", "supabase_functions_admin",
    "supabase_read_only_user", "supabase_realtime_admin", "supabase_replication_admin",
    "supabase_storage_admin", "supabase_etl_admin", "supabase_privileged_role",
    "pgsodium_keyholder", "pgsodium_keyiduser", "pgsodium_keymaker", "pgtle_admin",
})

# Schemas the platform owns and fills entirely itself: nothing of the user's lives there
# that a backup could restore into a new project, and `postgres` may not even read them.
SUPABASE_INTERNAL_SCHEMAS = (
    "_analytics", "_realtime", "_supavisor", "pgbouncer", "pgsodium", "pgsodium_masks",
    "pgtle", "repack", "tiger", "tiger_data", "topology", "timescaledb_*",
    "_timescaledb_*", "supabase_functions", "net", "graphql", "graphql_public", "realtime",
)

# Platform schemas whose definitions a fresh project already has, but whose data (and
# user additions) belong to the user and are kept.
SUPABASE_PLATFORM_SCHEMAS = ("auth", "storage", "extensions", "vault", "cron", "pgmq",
                             "supabase_migrations")

# Migration bookkeeping of the platform's services: a fresh project has its own.
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
