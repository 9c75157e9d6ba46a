"""Choosing a backup from the store: by id, `latest`, or the newest at or before a time."""

from __future__ import annotations

from .errors import BackupNotFound, ConfigError
from .manifest import Manifest, parse_time
from .store import Store


def resolve_database_id(store: Store, database_id: str | None) -> str:
    """The database to act on: the one named, or the store's only one."""
    if database_id:
        return database_id
    ids = store.database_ids()
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise BackupNotFound(f"no backups in {store.url}", "check --store, or take a backup first")
    raise ConfigError(f"{store.url} holds backups of several databases: {', '.join(ids)}",
                      "name one with --database-id")


def select_backup(store: Store, database_id: str, at: str = "latest") -> Manifest:
    """`latest`, a backup id, or an ISO time (the newest backup taken at or before it)."""
    manifests = store.manifests(database_id)
    if not manifests:
        raise BackupNotFound(f"no committed backup of {database_id} in {store.url}",
                             "take a backup first, or check --store and --database-id")
    if at == "latest":
        return manifests[-1]
    for manifest in manifests:
        if manifest.backup_id == at:
            return manifest
    try:
        when = parse_time(at)
    except ValueError:
        raise BackupNotFound(f"no backup {at!r} of {database_id} in {store.url}",
                             "use latest, a backup id from `supabackup list`, or an ISO time"
                             ) from None
    earlier = [m for m in manifests if parse_time(m.snapshot_at) <= when]
    if not earlier:
        raise BackupNotFound(f"no backup of {database_id} was taken at or before {at}",
                             f"the oldest is {manifests[0].backup_id}")
    return earlier[-1]
