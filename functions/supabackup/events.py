"""Lambda events: validated into a BackupRequest, or refused with a clear error.

The schedules send `{"kind": "full", "trigger": "schedule", "retention": "weekly"}`;
users invoke by hand with a label and a retention class (see events/). Unknown fields
and wrong types are refused rather than ignored: a typo in "retention" must not turn a
pinned pre-migration backup into one that expires in 14 days.
"""

from __future__ import annotations

from typing import Any

from .backup import BackupRequest
from .errors import ConfigError

FIELDS: dict[str, type] = {"kind": str, "trigger": str, "retention": str, "label": str,
                           "profile": str, "database_id": str}
TRIGGERS = ("schedule", "manual")


def parse_backup_event(event: Any) -> BackupRequest:
    if not isinstance(event, dict):
        raise ConfigError("the event is not a JSON object",
                          'invoke with e.g. {"kind": "full", "label": "before migration 42"}')
    unknown = sorted(set(event) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown event field(s): {', '.join(unknown)}",
                          f"allowed: {', '.join(FIELDS)}")
    for name, value in event.items():
        if value is not None and not isinstance(value, FIELDS[name]):
            raise ConfigError(f"event field {name!r} must be a string",
                              'see the samples in events/')
    trigger = event.get("trigger") or "manual"
    if trigger not in TRIGGERS:
        raise ConfigError(f"unknown trigger {trigger!r}", f"use one of: {', '.join(TRIGGERS)}")
    return BackupRequest(
        kind=event.get("kind") or "full",
        profile=event.get("profile"),
        retention=event.get("retention") or "daily",
        label=event.get("label"),
        trigger=trigger,
        database_id=event.get("database_id"),
    )
