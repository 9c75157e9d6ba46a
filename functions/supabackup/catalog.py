"""Choosing what to restore: a backup by id, `latest`, or a time.

`--at TIME` means one thing everywhere (the command line, the restore Lambda, its events):
when change capture covers the time, replay it (the base of the epoch that covers it, then
every captured transaction committed up to it); otherwise restore the newest backup taken
at or before it. `restore_point` decides, and what it decided is said in the restore's
output and SNS message.

Capture covers a time while the base of its epoch is stored: retention keeps every base
the last keep_days days need and lets older ones go (retention.capture_needs). A time in
an epoch whose base is gone is no longer capture's: it is the newest backup at or before
it, as for a time before capture began; when there is none, the refusal names the
window capture still reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .capture.pointintime import covering, replays
from .capture.state import epochs
from .capture.window import window
from .errors import BackupNotFound, ConfigError
from .files.putback import describe_files
from .manifest import Manifest, parse_time
from .restore import RestoreOptions, describe_plan
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


@dataclass(frozen=True)
class RestorePoint:
    """What `--at` resolved to: a backup to restore, or a time to replay capture to."""

    database_id: str
    at: str                        # as asked: latest, a backup id, or a time
    when: datetime | None = None   # the time asked for (None: latest or a backup id)
    manifest: Manifest | None = None  # the backup to restore (None: replay capture)

    @property
    def replay(self) -> bool:
        return self.manifest is None

    @property
    def method(self) -> str:
        """How the restore gets there, as results and SNS messages name it."""
        return "replay" if self.replay else "backup"

    def check(self, options: RestoreOptions | None) -> None:
        """A replay gives the whole database as it was: it takes no choice of tables or
        profile (a backup does)."""
        if self.replay and options is not None and (options.tables or
                                                    options.profile != RestoreOptions.profile):
            raise ConfigError("a restore by replaying change capture takes no tables or "
                              "profile", "restore a backup with them instead (--at BACKUP_ID)")
        if self.replay and options is not None and options.storage is not None:
            raise ConfigError("a restore to a time between backups cannot bring back Storage "
                              "files as of that time: Storage keeps no versions of a file",
                              "restore the database to the time without "
                              "--target-storage-endpoint, or a backup (--at BACKUP_ID) with "
                              "its files")

    def describe(self) -> str:
        """One line: which of the two meanings of a time applied, and why."""
        if self.when is None:
            assert self.manifest is not None
            return f"restoring backup {self.manifest.backup_id}"
        if self.manifest is None:
            return (f"restoring {self.database_id} as of {self.when.isoformat()} by replaying "
                    "change capture")
        return (f"no change capture covers {self.when.isoformat()}: restoring the newest "
                f"backup taken at or before it, {self.manifest.backup_id} (its snapshot is "
                f"of {self.manifest.snapshot_at})")


def restore_point(store: Store, database_id: str, at: str = "latest") -> RestorePoint:
    """`latest` or a backup id: that backup. A time: a replay where capture covers it
    (capture.pointintime.replays), else the newest backup taken at or before it."""
    when = _as_time(at)
    if when is not None and replays(store, database_id, when):
        return RestorePoint(database_id, at, when)
    try:
        return RestorePoint(database_id, at, when, select_backup(store, database_id, at))
    except BackupNotFound as exc:
        if when is None or not epochs(store, database_id):
            raise
        found = window(store, database_id)
        raise BackupNotFound(f"{exc.message}, and change capture of {database_id} reaches "
                             f"{found.describe()}: {when.isoformat()} is outside it",
                             "restore a time in the window, or a later backup"
                             + (f" ({exc.hint})" if exc.hint else "")) from None


def _as_time(at: str) -> datetime | None:
    """`at` as a time (not latest, not a backup id), or None."""
    if at == "latest" or at.endswith(("-full", "-incr")):
        return None
    try:
        return parse_time(at)
    except ValueError:
        return None


def describe_point(store: Store, point: RestorePoint, options: RestoreOptions | None = None
                   ) -> list[str]:
    """What a restore of `point` would do, in order, touching no database (--dry-run)."""
    point.check(options)
    if point.manifest is not None:
        files = (describe_files(point.manifest, options.storage)
                 if options is not None and options.storage is not None else [])
        return ([point.describe()] if point.when else []) + describe_plan(
            store, point.manifest, options) + files
    assert point.when is not None
    found = covering(store, point.database_id, point.when)
    return [point.describe(), *describe_plan(store, found.base),
            f"then replay every captured transaction committed up to {point.when.isoformat()}"
            f" (capture covers times up to {found.progress.verified_at})"]
