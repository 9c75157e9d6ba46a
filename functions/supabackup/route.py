"""Where a run goes, Lambda or Fargate: a pure decision from the database's size and the
store's history, made by the state machine's Plan step (handlers/plan.py) before the run.

Lambda ends a run at its timeout (15 minutes at most) wherever it is; an ECS Fargate task
runs the same engine for as long as it takes. A run goes to Lambda only when it should
fit there with room to spare:

    estimate x (1 + margin) + budget.MARGIN <= the Lambda's timeout

  - a backup's estimate is budget.estimate_seconds: the pace of the last backups of that
    kind (seconds per byte of database) times the database's size now, so a growing
    database grows its estimate. An incremental with no incremental before it takes the
    full backups' pace (it is at most a full, and escalates to one without a base); with
    no history at all, DEFAULT_BYTES_PER_SECOND, so that a first backup of a large
    database is not sent to Lambda blind;
  - a restore's estimate is the same pace of full backups (a restore writes the whole
    database whichever backup of a chain it restores) times the size of the database the
    backup holds, times RESTORE_FACTOR: a restore also builds the indexes a backup never
    reads;
  - `margin` covers what the median of three runs does not know: a slower network or
    server today, a database that grew since the plan. The Lambda's own budget then
    rarely refuses a run the plan sent it (budget.Budget.check), and a restore, which
    has no budget, is not killed at the timeout.

With the Fargate path off (the stack has no task subnets), every run goes to Lambda, as
before the state machine: the Lambda refuses a backup it cannot fit, in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import budget
from .manifest import Manifest
from .notify import human_bytes, human_duration

LAMBDA, FARGATE = "lambda", "fargate"
OPERATIONS = ("backup", "restore")

# What a backup carries with no history to go by, in bytes of database per second: one
# stream through a far link (bench/README.md, "parallel backups and restores": 8 MB/s of
# COPY text per connection is 11.6 MB/s of database, the model's single worker). It is
# the slowest figure measured there, so a first backup is estimated as if one worker
# crossed a slow link: 9 GiB fill a 14-minute run, and larger ones go to Fargate.
DEFAULT_BYTES_PER_SECOND = 11.6e6
# A restore against the backup it restores: the same bytes go the other way, and the
# target then builds every index and checks every constraint, which a backup never does.
# Measured 1.16 on the bench's data set (restore --jobs 4 8.21 s, backup --jobs 4 7.10 s,
# 0.25 GiB through the slow link, bench/README.md), whose tables have a primary key each
# and no other index; a Supabase project's tables carry more, and index builds run on the
# target's CPUs, not faster with more streams: twice the backup's time.
RESTORE_FACTOR = 2.0
# The share of the estimate kept spare by default (SUPABACKUP_ROUTE_MARGIN): a run goes
# to Lambda when it should take at most two thirds of what the timeout leaves.
MARGIN = 0.5


@dataclass(frozen=True)
class Route:
    """Where a run goes, and why: what the state machine's Choice reads (`path`) and
    what a person reads in its history (`reason`, one line with the figures)."""

    path: str               # "lambda" or "fargate"
    estimate_seconds: float  # how long the run should take (0: a run that does no work)
    limit_seconds: float     # the Lambda's timeout it was measured against
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(operation: str, kind: str, database_size: int, history: Sequence[Manifest],
           lambda_timeout: float, fargate: bool, margin: float = MARGIN,
           jobs: int | None = None) -> Route:
    """Route a `kind` backup (full, incremental) of a database of `database_size` bytes,
    or a restore (`operation`; `kind` its method: backup, or replay from a base) of a
    backup holding that many, given the database's committed backups, oldest first
    (`history`; for a restore, those up to the one restored)."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    estimate, basis = _estimate(operation, kind, database_size, list(history), jobs)
    needed = estimate * (1 + margin) + budget.MARGIN
    article = "an" if kind == "incremental" else "a"
    what = (f"{article} {kind} backup of {human_bytes(database_size)}" if operation == "backup"
            else f"a restore of {human_bytes(database_size)}" + (
                " (its base: the replay of the changes after it is not counted)"
                if kind == "replay" else ""))
    figures = (f"{what} should take about {human_duration(estimate)} ({basis}); with "
               f"{margin:.0%} spare and {budget.MARGIN:.0f} s to stop cleanly it needs "
               f"{human_duration(needed)}")
    limit = f"the Lambda's {human_duration(lambda_timeout)}"
    if needed <= lambda_timeout:
        return Route(LAMBDA, round(estimate, 1), lambda_timeout,
                     f"{figures}, within {limit}: on Lambda")
    if not fargate:
        return Route(LAMBDA, round(estimate, 1), lambda_timeout,
                     f"{figures}, more than {limit}, but the Fargate path is off (the stack "
                     "has no TaskSubnetIds): on Lambda")
    return Route(FARGATE, round(estimate, 1), lambda_timeout,
                 f"{figures}, more than {limit}: on Fargate")


def on_lambda(why: str, lambda_timeout: float) -> Route:
    """A run that does no real work (a restore's dry run, a schedule tick that has its
    backup already): Lambda answers it in seconds, whatever the database's size."""
    return Route(LAMBDA, 0.0, lambda_timeout, f"{why}: on Lambda")


def _estimate(operation: str, kind: str, database_size: int, history: list[Manifest],
              jobs: int | None) -> tuple[float, str]:
    """Seconds the run should take on Lambda with `jobs` workers, and what the figure
    comes from (budget.estimate_seconds: runs that had more workers count slower)."""
    paced = kind if operation == "backup" else "full"
    found = budget.estimate_seconds(history, paced, database_size, jobs)
    basis = f"at the pace of the last {paced} backups"
    if found is None and paced == "incremental":
        found = budget.estimate_seconds(history, "full", database_size, jobs)
        basis = "at the pace of the last full backups, none incremental yet"
    if found is None:
        found = database_size / DEFAULT_BYTES_PER_SECOND
        basis = (f"no earlier backup to go by: {DEFAULT_BYTES_PER_SECOND / 1e6:.1f} MB/s, "
                 "one stream over a slow link")
    if operation == "restore":
        return found * RESTORE_FACTOR, f"{basis}, x{RESTORE_FACTOR:g} for the index builds"
    return found, basis
