"""Lambda entry point of the state machine's Plan step: where a backup or a restore runs,
on Lambda or on an ECS Fargate task (route.py decides; this reads what it decides from).

Input, the state machine's own: {"operation": "backup" | "restore", "event": the backup
or restore function's event}. The event is checked here as its function checks it
(events.py), so bad input is refused before anything runs, in the same one line and with
the same SNS message; it is passed on unchanged. Then:

  - a backup: the database secret's connection gives the database's size now
    (pg_database_size) and its id; the store gives its committed backups, whose pace
    predicts this one. A schedule tick that has its backup already goes to Lambda,
    which says it is a duplicate and does nothing;
  - a restore: the store alone (no connection to the target): the backup `at` names, or
    the base a restore to a time replays from, and the size of the database it holds.
    A dry run goes to Lambda without reading anything.

Output: {"operation", "event", "path", "estimate_seconds", "limit_seconds", "reason"}.

Environment: SUPABACKUP_STORE, SUPABACKUP_DB_SECRET_ARN, SUPABACKUP_SNS_TOPIC_ARN,
SUPABACKUP_LAMBDA_TIMEOUT (the backup and restore functions' timeout, FunctionTimeout,
seconds), SUPABACKUP_FARGATE ("true" when the stack has task subnets; else every run goes
to Lambda), and optionally SUPABACKUP_ROUTE_MARGIN (the share of the estimate kept spare,
default route.MARGIN), SUPABACKUP_PROFILE and SUPABACKUP_DATABASE_ID, as the functions.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import psycopg2
from aws_lambda_powertools.utilities.typing import LambdaContext

from .. import route
from ..backup import parent_for, tick_backup_ids
from ..capture.pointintime import covering
from ..catalog import restore_point
from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import ConfigError, ConnectionFailed
from ..manifest import utcnow
from ..profiles import resolve_profile
from ..store import Store
from ..tabledata import default_jobs
from .common import Invocation, database_in, env_int, logger, metrics, read_secret, store
from .events import parse_backup_event, parse_restore_event

TIMEOUT_ENV = "SUPABACKUP_LAMBDA_TIMEOUT"
FARGATE_ENV = "SUPABACKUP_FARGATE"
MARGIN_ENV = "SUPABACKUP_ROUTE_MARGIN"
INPUT_FIELDS = ("operation", "event")
EXAMPLE = '{"operation": "backup", "event": {"kind": "full", "label": "before migration 42"}}'


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    run = Invocation(_kind_of(event), "Plan")
    with run.refusing():
        operation, inner = _checked(event)
        limit, fargate, margin = _settings()
        backups = store()
        if operation == "backup":
            chosen = _backup_route(backups, inner, limit, fargate, margin)
        else:
            chosen = _restore_route(backups, inner, limit, fargate, margin)
    logger.info("%s goes to %s: %s", operation, chosen.path, chosen.reason)
    return run.succeeded({"operation": operation, "event": inner, **chosen.as_dict()})


def _kind_of(event: Any) -> str:
    """What the run's SNS message and metrics are named by: the backup's kind, or restore."""
    inner = event.get("event") if isinstance(event, dict) else None
    if isinstance(event, dict) and event.get("operation") == "restore":
        return "restore"
    kind = inner.get("kind") if isinstance(inner, dict) else None
    return str(kind or "full")[:32]


def _checked(event: Any) -> tuple[str, dict[str, Any]]:
    """The state machine's input: an operation and the function's event (checked later)."""
    if not isinstance(event, dict):
        raise ConfigError("the state machine's input is not a JSON object",
                          f"start it with e.g. {EXAMPLE}")
    unknown = sorted(set(event) - set(INPUT_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) in the state machine's input: {', '.join(unknown)}",
                          f"allowed: {', '.join(INPUT_FIELDS)}, as in {EXAMPLE}")
    operation = event.get("operation")
    if operation not in route.OPERATIONS:
        raise ConfigError(f"unknown operation {str(operation)[:40]!r} in the state machine's "
                          "input", f"use one of: {', '.join(route.OPERATIONS)}")
    inner = event.get("event", {})
    if not isinstance(inner, dict):
        raise ConfigError("field 'event' of the state machine's input is not a JSON object",
                          "give the function's own event there (see the samples in events/)")
    return str(operation), inner


def _settings() -> tuple[int, bool, float]:
    """The Lambda's timeout, whether the Fargate path is on, and the margin."""
    limit = env_int(TIMEOUT_ENV)
    if limit is None or limit <= 0:
        raise ConfigError(f"the function's environment lacks {TIMEOUT_ENV} (the backup and "
                          "restore functions' timeout, in seconds)", "redeploy the stack")
    fargate = os.environ.get(FARGATE_ENV, "false").strip().lower()
    if fargate not in ("true", "false"):
        raise ConfigError(f"the function's environment variable {FARGATE_ENV} is neither "
                          f"true nor false: {fargate[:40]!r}", "redeploy the stack")
    text = os.environ.get(MARGIN_ENV, "").strip()
    try:
        margin = float(text) if text else route.MARGIN
    except ValueError:
        margin = -1.0
    if not 0 <= margin <= 10:
        raise ConfigError(f"the function's environment variable {MARGIN_ENV} must be a "
                          f"number from 0 to 10: {text[:40]!r}",
                          f"e.g. {route.MARGIN} keeps half the estimate spare")
    return limit, fargate == "true", margin


def _backup_route(backups: Store, event: dict[str, Any], limit: int, fargate: bool,
                  margin: float) -> route.Route:
    request = parse_backup_event(event, os.environ.get("SUPABACKUP_PROFILE"))
    conn = read_secret("SUPABACKUP_DB_SECRET_ARN")
    history = backups.manifests(request.database_of(conn))
    if request.tick:
        stored = {m.backup_id for m in history}
        done = [i for i in tick_backup_ids(request.tick) if i in stored]
        if done:
            return route.on_lambda(f"schedule tick {request.tick} already has its backup, "
                                   f"{done[0]} (the function says so and does nothing)", limit)
    # Paced as what the run will be: an incremental whose chain cannot go on is a full
    # (backup.parent_for decides, as the run will), with as many workers as the run.
    kind, why = request.kind, ""
    if kind == "incremental":
        parent, why = parent_for(history, resolve_profile(request.profile, conn), utcnow())
        kind = "incremental" if parent is not None else "full"
    chosen = route.choose("backup", kind, _database_size(conn), history, limit, fargate,
                          margin, request.jobs or default_jobs())
    return replace(chosen, reason=f"{chosen.reason} (asked for an incremental: {why})"
                   ) if why else chosen


def _restore_route(backups: Store, event: dict[str, Any], limit: int, fargate: bool,
                   margin: float) -> route.Route:
    request = parse_restore_event(event)
    if request.dry_run:
        return route.on_lambda("a dry run plans from the store and touches no database",
                               limit)
    database_id = database_in(backups, request.database_id)
    point = restore_point(backups, database_id, request.at)
    backup = point.manifest
    if backup is None:  # a restore to a time: its base, then the replay
        assert point.when is not None
        backup = covering(backups, database_id, point.when).base
    history = [m for m in backups.manifests(database_id) if m.backup_id <= backup.backup_id]
    return route.choose("restore", point.method, backup.database_size, history, limit,
                        fargate, margin, request.options.jobs or default_jobs())


def _database_size(conn: ConnectionInfo) -> int:
    """pg_database_size of the database now: what the backup's own snapshot will read."""
    db = connect(conn)
    try:
        with db.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            row = cur.fetchone()
    except psycopg2.Error as exc:
        raise ConnectionFailed(f"cannot read the size of {conn.display()}: "
                               f"{conn.redact(str(exc).strip())}",
                               "check the database user's rights and the network") from None
    finally:
        db.close()
    return int(row[0]) if row else 0
