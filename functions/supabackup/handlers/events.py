"""Lambda events: validated into a request (backup, verify, restore), or refused clearly.

The schedules send `{"kind": "full", "trigger": "schedule", "retention": "weekly",
"tick": "<scheduled time>"}`;
users invoke by hand with a label and a retention class (see events/). Unknown fields
and wrong types are refused rather than ignored: a typo in "retention" must not turn a
pinned pre-migration backup into one that expires in 14 days. No event carries a
secret: the functions read database credentials from Secrets Manager.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..backup import BackupRequest
from ..errors import ConfigError
from ..manifest import iso, new_backup_id, parse_time, utcnow
from ..restore import RestoreOptions
from ..tabledata import JOBS_ENV, checked_jobs

FIELDS: dict[str, type] = {"kind": str, "trigger": str, "retention": str, "label": str,
                           "profile": str, "database_id": str, "tick": str, "jobs": int}
VERIFY_FIELDS: dict[str, type] = {"trigger": str, "backup_id": str, "drill": bool,
                                  "database_id": str}
RESTORE_FIELDS: dict[str, type] = {"at": str, "tables": list, "profile": str, "dry_run": bool,
                                   "database_id": str, "jobs": int}
CAPTURE_FIELDS: dict[str, type] = {"trigger": str, "action": str, "for": int,
                                   "flush_interval": int}
CAPTURE_ACTIONS = ("run", "start", "status")
TRIGGERS = ("schedule", "manual")
TYPE_NAMES = {str: "string", bool: "boolean (true or false)", list: "list",
              int: "whole number"}


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
    event names none."""
    event = _checked(event, FIELDS, '{"kind": "full", "label": "before migration 42"}')
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
    )
    return request.with_backup_id(new_backup_id(parse_time(tick) if tick else utcnow(),
                                                request.kind))


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
    event = _checked(event, RESTORE_FIELDS, '{"at": "latest", "dry_run": true}')
    tables = event.get("tables") or []
    if not all(isinstance(t, str) and t for t in tables):
        raise ConfigError("event field 'tables' must list table names",
                          'e.g. "tables": ["public.todos"]')
    return RestoreRequest(at=event.get("at") or "latest",
                          options=RestoreOptions(tables=tuple(tables),
                                                 profile=event.get("profile") or "postgres",
                                                 jobs=_jobs(event)),
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
