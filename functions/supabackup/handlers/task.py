"""`python -m supabackup.handlers.task`: the backup or restore function's handler, run as
an ECS Fargate task for a run that does not fit in one Lambda run (route.py).

The very handler functions Lambda runs, so a task's run is the same run: the same checks
of its event, the same SNS message (the engine publishes it), the same metrics (EMF lines
on stdout, which CloudWatch Logs extracts from the task's awslogs stream: the dead man's
switch counts a backup on Fargate as one on Lambda) and the same logs. What Lambda gives a
handler, TaskContext gives here.

Environment: the backup and restore functions' own (SUPABACKUP_STORE, the secrets'
ARNs, SUPABACKUP_SNS_TOPIC_ARN, ...), and

  - SUPABACKUP_OPERATION: backup or restore;
  - SUPABACKUP_EVENT: the function's event, as JSON text (the state machine's
    States.JsonToString($.event));
  - SUPABACKUP_TIME_LIMIT (optional): seconds a backup may take, counted from the task's
    start, which the engine's budget keeps to as it keeps to Lambda's remaining time
    (budget.py: it refuses a run that cannot fit, and stops one cleanly before the
    state's timeout would kill it); without it, none. A restore has no budget, on Lambda
    or here.

SIGTERM (a Fargate Spot interruption, StopTask, the state's timeout) stops the run as
Ctrl-C stops the command line's: its workers stop, its uploads abort, what it wrote is
removed and its lease given back, so nothing of it counts; it exits 143. A second SIGTERM
during that is ignored (ECS sends SIGKILL after the container's StopTimeout).

Exit status, which the state machine routes by: 0 success (a duplicate tick too), 10 the
run failed (the engine said why on SNS), 12 refused, bad input (said on SNS), 143 stopped
by SIGTERM, 70 an unexpected error (a bug: the state machine reports it). Not 1 and 2,
the command line's: Python itself exits 1 when it dies before the engine can say anything
(an import that fails, say), and that the state machine must report. The handler's
result is the last line of stdout, one JSON object; a failure is one line on stderr.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aws_lambda_powertools.utilities.typing import LambdaContext

from ..errors import ConfigError, SupabackupError
from . import backup, restore
from .common import Invocation, env_int, metrics

OPERATION_ENV = "SUPABACKUP_OPERATION"
EVENT_ENV = "SUPABACKUP_EVENT"
TIME_LIMIT_ENV = "SUPABACKUP_TIME_LIMIT"
METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"
HANDLERS: dict[str, Callable[[dict[str, Any], LambdaContext], dict[str, Any]]] = {
    "backup": backup.handler, "restore": restore.handler}
EXIT_STOPPED = 128 + signal.SIGTERM  # 143, as a container stopped by SIGTERM exits
EXIT_BUG = 70                        # as the command line's (cli.py)
EXIT_FAILED = 10                     # the run failed, and the engine said why on SNS
EXIT_REFUSED = 12                    # bad input, refused, and said so on SNS


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is. A KeyboardInterrupt, not an Exception: every
    cleanup the engine does for Ctrl-C runs (its `except BaseException` paths), and no
    `except Exception` on the way mistakes it for a failure to work around."""

    def __str__(self) -> str:
        return ("stopped by SIGTERM (a Fargate Spot interruption, StopTask or the state "
                "machine's timeout): a backup keeps nothing of the run, a restore leaves "
                "its target incomplete")


@dataclass
class TaskContext:
    """What a handler reads from Lambda's context (Powertools' logger names the run by
    it): the ECS task's ARN and memory when its metadata endpoint answers, and the time
    left of SUPABACKUP_TIME_LIMIT (infinite without one: the budget then sets no limit)."""

    operation: str
    time_limit: float = math.inf
    started: float = field(default_factory=time.monotonic)
    task_arn: str = ""
    memory_limit_in_mb: int = 0
    local_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # one id a run

    @property
    def function_name(self) -> str:
        return f"supabackup-task-{self.operation}"

    @property
    def invoked_function_arn(self) -> str:
        return self.task_arn or f"local:{self.function_name}"

    @property
    def aws_request_id(self) -> str:
        return self.task_arn.rsplit("/", 1)[-1] if self.task_arn else self.local_id

    def get_remaining_time_in_millis(self) -> float:
        return (self.time_limit - (time.monotonic() - self.started)) * 1000

    @classmethod
    def here(cls, operation: str, time_limit: float) -> TaskContext:
        metadata = _task_metadata()
        limits = metadata.get("Limits")
        memory = limits.get("Memory") if isinstance(limits, dict) else None
        return cls(operation, time_limit, task_arn=str(metadata.get("TaskARN") or ""),
                   memory_limit_in_mb=int(memory) if isinstance(memory, int | float) else 0)


def _task_metadata() -> dict[str, Any]:
    """The task's metadata (ECS's v4 endpoint), or {} where there is none (a local run)."""
    base = os.environ.get(METADATA_ENV, "")
    if not base.startswith("http://"):
        return {}
    try:
        with urllib.request.urlopen(f"{base}/task", timeout=2) as answer:  # noqa: S310 - ECS's own
            found = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _request() -> tuple[str, dict[str, Any], float]:
    """The operation, its event and the time limit, from the task's environment."""
    operation = os.environ.get(OPERATION_ENV, "").strip()
    if operation not in HANDLERS:
        raise ConfigError(f"{OPERATION_ENV} must be one of {', '.join(HANDLERS)}, not "
                          f"{operation[:40]!r}", "the state machine sets it: redeploy the stack")
    try:
        event = json.loads(os.environ.get(EVENT_ENV) or "")
    except ValueError:
        raise ConfigError(f"{EVENT_ENV} is not JSON text",
                          "the state machine sets it from the execution's event") from None
    limit = env_int(TIME_LIMIT_ENV)
    if limit is not None and limit <= 0:
        raise ConfigError(f"{TIME_LIMIT_ENV} must be a positive number of seconds, not {limit}",
                          "leave it unset for no limit")
    return operation, event, math.inf if limit is None else float(limit)


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup must not be cut short
    raise Terminated


def run() -> int:
    """Run the handler the environment names; the exit status as the docstring says."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        operation, event, limit = _read_request()
        result = HANDLERS[operation](event, cast(LambdaContext, TaskContext.here(operation,
                                                                                 limit)))
    except SupabackupError as exc:
        _say(f"supabackup: error: {exc}")
        return EXIT_REFUSED if isinstance(exc, ConfigError) else EXIT_FAILED
    except Terminated as exc:
        _say(f"supabackup: {exc}")
        return EXIT_STOPPED
    except Exception as exc:  # noqa: BLE001 - one line for the state machine's report
        _say(f"supabackup: unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_BUG
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: a stop now must not undo it
    sys.stdout.write(json.dumps(result, default=str) + "\n")  # the last line
    return 0


def _say(line: str) -> None:
    """One line on stderr, whatever the error's text holds (the task's log shows it)."""
    sys.stderr.write(" ".join(line.split()) + "\n")


def _read_request() -> tuple[str, dict[str, Any], float]:
    """The task's request; a bad one gets the SNS message and the metric of a refusal,
    as a bad event does in the handler."""
    operation = os.environ.get(OPERATION_ENV, "").strip()
    refusal = Invocation(operation if operation in HANDLERS else "task", "Task")
    try:
        with refusal.refusing():
            return _request()
    except SupabackupError:
        metrics.flush_metrics()
        raise


if __name__ == "__main__":
    sys.exit(run())
