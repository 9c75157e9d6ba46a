"""Lambda events: validated into a request (backup, verify, restore), or refused clearly.

The schedules send `{"kind": "full", "trigger": "schedule", "retention": "weekly",
"tick": "<scheduled time>"}`;
users invoke by hand with a label and a retention class (see events/). Unknown fields
and wrong types are refused rather than ignored: a typo in "retention" must not turn a
pinned pre-migration backup into one that expires in 14 days. No event carries a
secret: the functions read database credentials from Secrets Manager.

Supabase Storage files (see supabackup.files):

  - a backup copies them when the stack names a Storage endpoint (the template's
    StorageEndpoint and StorageBuckets: SUPABACKUP_STORAGE_ENDPOINT and
    SUPABACKUP_STORAGE_BUCKETS), scheduled runs included. An event may say otherwise:
    `"storage": {"endpoint": "https://<ref>.storage.supabase.co/storage/v1/s3",
    "buckets": ["avatars"]}` (events/backup-full-with-storage.json); without "endpoint",
    the stack's; without "buckets", the stack's StorageBuckets for the stack's endpoint
    and every bucket for another;
  - a restore writes them into the target project's Storage when the event says where:
    `"target_storage": {"endpoint": "https://<target-ref>.storage.supabase.co/storage/v1/s3"}`
    (events/restore-with-storage-files.json), after the database.

Neither carries a key: the handlers read the S3 keys from Secrets Manager
(common.with_storage_keys) once a run needs them. What is parsed here is the endpoint's
address, checked (https, or http on loopback only), with placeholder keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..backup import BackupRequest
from ..errors import ConfigError
from ..files import CopyRequest, StorageEndpoint
from ..manifest import iso, new_backup_id, parse_time, utcnow
from ..restore import RestoreOptions
from ..tabledata import JOBS_ENV, checked_jobs

FIELDS: dict[str, type] = {"kind": str, "trigger": str, "retention": str, "label": str,
                           "profile": str, "database_id": str, "tick": str, "jobs": int,
                           "storage": dict}
VERIFY_FIELDS: dict[str, type] = {"trigger": str, "backup_id": str, "drill": bool,
                                  "database_id": str}
RESTORE_FIELDS: dict[str, type] = {"at": str, "tables": list, "profile": str, "dry_run": bool,
                                   "database_id": str, "jobs": int, "target_storage": dict}
STORAGE_FIELDS: dict[str, type] = {"endpoint": str, "buckets": list}
TARGET_STORAGE_FIELDS: dict[str, type] = {"endpoint": str}
CAPTURE_FIELDS: dict[str, type] = {"trigger": str, "action": str, "for": int,
                                   "flush_interval": int}
CAPTURE_ACTIONS = ("run", "start", "status")
TRIGGERS = ("schedule", "manual")
TYPE_NAMES = {str: "string", bool: "boolean (true or false)", list: "list",
              int: "whole number", dict: "JSON object"}
STORAGE_ENDPOINT_ENV = "SUPABACKUP_STORAGE_ENDPOINT"
STORAGE_BUCKETS_ENV = "SUPABACKUP_STORAGE_BUCKETS"
# An endpoint as an event names it has no keys yet: these stand in until the handler
# reads the real ones (never empty: boto3 would fall back to the function's own role).
NO_KEYS = {"access_key_id": "unset", "secret_access_key": "unset", "region": "unset"}


def _checked(event: Any, fields: dict[str, type], example: str) -> dict[str, Any]:
    """The event as a dict of known fields of the right types, or a clear refusal."""
    if not isinstance(event, dict):
        raise ConfigError("the event is not a JSON object", f"invoke with e.g. {example}")
    unknown = sorted(set(event) - set(fields))
    if unknown:
        raise ConfigError(f"unknown event field(s): {', '.join(unknown)}",
                          f"allowed: {', '.join(fields)}")
    for name, value in event.items():
        if value is not None and not isinstance(value, fields[name]):
            raise ConfigError(f"event field {name!r} must be a {TYPE_NAMES[fields[name]]}",
                              "see the samples in events/")
    trigger = event.get("trigger") or "manual"
    if trigger not in TRIGGERS:
        raise ConfigError(f"unknown trigger {trigger!r}", f"use one of: {', '.join(TRIGGERS)}")
    return event


def parse_backup_event(event: Any, default_profile: str | None = None) -> BackupRequest:
    """A backup request, with its backup id. A schedule's `tick` (its scheduled time) makes
    the run idempotent: every delivery of one tick names the same backup (see locks.py); a
    manual run is named by the time now. `default_profile` (the stack's) applies when the
    event names none. Storage files are copied from the event's "storage", else the
    stack's (SUPABACKUP_STORAGE_ENDPOINT); the request's endpoint has no keys yet."""
    event = _checked(event, FIELDS, '{"kind": "full", "label": "before migration 42"}')
    files = _backup_storage(event.get("storage"))
    tick = event.get("tick")
    if tick is not None:
        try:
            tick = iso(parse_time(tick))
        except ValueError:
            raise ConfigError(f"event field 'tick' is not a time: {tick[:40]!r}",
                              'the schedule sends "<aws.scheduler.scheduled-time>"') from None
    request = BackupRequest(
        tick=tick,
        kind=event.get("kind") or "full",
        profile=event.get("profile") or default_profile,
        retention=event.get("retention") or "daily",
        label=event.get("label"),
        trigger=event.get("trigger") or "manual",
        database_id=event.get("database_id"),
        jobs=_jobs(event),
        files=files,
    )
    return request.with_backup_id(new_backup_id(parse_time(tick) if tick else utcnow(),
                                                request.kind))


def _backup_storage(asked: dict[str, Any] | None) -> CopyRequest | None:
    """The Storage files a backup copies: the event's "storage" over the stack's."""
    stack = os.environ.get(STORAGE_ENDPOINT_ENV, "").strip()
    if asked is None:
        return (CopyRequest(unkeyed(stack), _buckets(os.environ.get(STORAGE_BUCKETS_ENV, ""),
                                                     STORAGE_BUCKETS_ENV))
                if stack else None)
    asked = _checked_object(asked, "storage", STORAGE_FIELDS)
    if "endpoint" not in asked and not stack:
        raise ConfigError("event field 'storage' names no endpoint, and the stack has none "
                          "(its StorageEndpoint parameter is empty)",
                          'add "endpoint": "https://<ref>.storage.supabase.co/storage/v1/s3"')
    if "buckets" in asked:
        buckets = asked["buckets"]
        if not all(isinstance(b, str) and b.strip() for b in buckets):
            raise ConfigError("event field 'storage.buckets' must list bucket names",
                              'e.g. "buckets": ["avatars", "documents"] (left out: every bucket)')
        names = _buckets(",".join(buckets), "event field 'storage.buckets'")
    elif "endpoint" in asked:  # another endpoint than the stack's: its every bucket
        names = ()
    else:
        names = _buckets(os.environ.get(STORAGE_BUCKETS_ENV, ""), STORAGE_BUCKETS_ENV)
    return CopyRequest(unkeyed(asked.get("endpoint") or stack), names)


def _checked_object(value: dict[str, Any], name: str, fields: dict[str, type]
                    ) -> dict[str, Any]:
    """An event's sub-object (its Storage endpoint): known keys of the right types only."""
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in event field {name!r}: {', '.join(unknown)}",
                          f"allowed: {', '.join(fields)}; the Storage S3 keys are read from "
                          "Secrets Manager, never from an event")
    for key, item in value.items():
        if not isinstance(item, fields[key]) or (isinstance(item, str) and not item.strip()):
            raise ConfigError(f"event field '{name}.{key}' must be a "
                              f"{'non-empty ' if fields[key] is str else ''}"
                              f"{TYPE_NAMES[fields[key]]}", "see the samples in events/")
    return value


def _buckets(text: str, where: str) -> tuple[str, ...]:
    names = tuple(b.strip() for b in text.split(",") if b.strip())
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} names a bucket twice: {text[:200]}")
    return names


def unkeyed(url: str) -> StorageEndpoint:
    """The Storage endpoint at `url`, its address checked, with placeholder keys: enough
    for a plan (a dry run shows where files would go); the handlers put the real keys in
    (common.with_storage_keys) before anything is read or written there."""
    parts = urlsplit(url.strip())
    if parts.username or parts.password:  # not echoed: it holds a key
        raise ConfigError("the Storage endpoint URL carries credentials",
                          "give the bare endpoint; the S3 keys are read from Secrets Manager "
                          "(StorageSecretArn, TargetStorageSecretArn)")
    return StorageEndpoint.of(url.strip(), NO_KEYS, list(NO_KEYS))


def _jobs(event: dict[str, Any]) -> int | None:
    """The event's "jobs", else the function's SUPABACKUP_JOBS, else None (derived)."""
    value = event.get("jobs", os.environ.get(JOBS_ENV) or None)
    return None if value is None else checked_jobs(value, "event field 'jobs'")


@dataclass(frozen=True)
class VerifyRequest:
    backup_id: str | None = None   # None: every backup
    drill: bool = True             # restore on the drill server too, when one is configured
    database_id: str | None = None


def parse_verify_event(event: Any) -> VerifyRequest:
    event = _checked(event, VERIFY_FIELDS, '{"trigger": "manual", "drill": true}')
    drill = event.get("drill")
    return VerifyRequest(backup_id=event.get("backup_id"),
                         drill=True if drill is None else drill,
                         database_id=event.get("database_id"))


@dataclass(frozen=True)
class RestoreRequest:
    at: str = "latest"
    options: RestoreOptions = field(default_factory=RestoreOptions)
    dry_run: bool = False
    database_id: str | None = None


def parse_restore_event(event: Any) -> RestoreRequest:
    """A restore request. With "target_storage", its options' `storage` is that endpoint
    without keys (a dry run needs none): the handler puts them in for a real restore."""
    event = _checked(event, RESTORE_FIELDS, '{"at": "latest", "dry_run": true}')
    tables = event.get("tables") or []
    if not all(isinstance(t, str) and t for t in tables):
        raise ConfigError("event field 'tables' must list table names",
                          'e.g. "tables": ["public.todos"]')
    storage = None
    if event.get("target_storage") is not None:
        target = _checked_object(event["target_storage"], "target_storage",
                                 TARGET_STORAGE_FIELDS)
        if "endpoint" not in target:
            raise ConfigError("event field 'target_storage' names no endpoint",
                              '"target_storage": {"endpoint": '
                              '"https://<target-ref>.storage.supabase.co/storage/v1/s3"}')
        storage = unkeyed(target["endpoint"])
    return RestoreRequest(at=event.get("at") or "latest",
                          options=RestoreOptions(tables=tuple(tables),
                                                 profile=event.get("profile") or "postgres",
                                                 jobs=_jobs(event), storage=storage),
                          dry_run=bool(event.get("dry_run")),
                          database_id=event.get("database_id"))


@dataclass(frozen=True)
class CaptureRequest:
    action: str                       # run (the schedule's), start or status
    seconds: int | None = None        # run: stream for this long ("for"), else drain once
    flush_interval: int | None = None  # run: seconds between stores while streaming


def parse_capture_event(event: Any) -> CaptureRequest:
    """The change-capture action an event asks for, and how long a run streams."""
    event = _checked(event, CAPTURE_FIELDS, '{"action": "status"}')
    action = event.get("action") or "run"
    if action not in CAPTURE_ACTIONS:
        raise ConfigError(f"unknown capture action {action!r}",
                          f"use one of: {', '.join(CAPTURE_ACTIONS)}")
    for name in ("for", "flush_interval"):
        if name in event and (event[name] <= 0 or action != "run"):
            raise ConfigError(f"event field {name!r} must be a positive number of seconds, "
                              "with action run", '{"action": "run", "for": 285}')
    return CaptureRequest(str(action), event.get("for"), event.get("flush_interval"))
