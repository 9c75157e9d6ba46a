"""Past one Lambda run (issue 17), the engine's side: where a run goes (route.py, a pure
function, at its edges), the state machine's Plan step (handlers/plan.py, called as Lambda
calls it, on real PostgreSQL and moto), and the ECS task's runner (`python -m
supabackup.handlers.task`, a process of its own with the environment a task has, against
moto's server on loopback): a backup, a restore, bad input and a SIGTERM mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from supabackup import budget, route
from supabackup.errors import ConfigError, TimeLimitExceeded
from supabackup.handlers import backup as backup_handler
from supabackup.handlers import plan
from supabackup.manifest import Manifest, StoredObject, iso, parse_time

from devkit.compare import differences
from devkit.pg import Cluster
from devkit.s3 import FAKE_CREDENTIALS, MotoProcess

from .helpers import (
    BUCKET,
    PASSWORD,
    REPO,
    FakeContext,
    Inbox,
    child_pids,
    load_event,
    open_uploads,
    stored_keys,
)

GB = 10**9
TIMEOUT = 900  # the Lambda's, in seconds


def _backup(kind: str, size: int, seconds: float, day: int = 1) -> Manifest:
    """A committed backup as the store lists it: only its kind, size and duration count."""
    started = parse_time(f"2026-11-{day:02d}T03:00:00Z")
    return Manifest(
        backup_id=f"202611{day:02d}T030000Z-{'full' if kind == 'full' else 'incr'}",
        database_id="db", kind=kind, profile="postgres", retention="daily",
        started_at=iso(started), finished_at=iso(started + timedelta(seconds=seconds)),
        snapshot_at=iso(started), snapshot_id="s", server_version="17.0", database="app",
        database_size=size, pg_dump="pg_dump", pg_dump_version="17.0",
        objects=[StoredObject("schema.dump", "schema", 1, "0" * 64, "custom")])


def _fits(estimate: float, margin: float = route.MARGIN) -> bool:
    return estimate * (1 + margin) + budget.MARGIN <= TIMEOUT


# --- the decision ----------------------------------------------------------------------------

def test_with_no_history_a_small_database_goes_to_lambda_and_a_large_one_to_fargate() -> None:
    small = route.choose("backup", "full", GB, [], TIMEOUT, fargate=True)
    assert small.path == "lambda" and small.limit_seconds == TIMEOUT
    assert small.estimate_seconds == pytest.approx(GB / route.DEFAULT_BYTES_PER_SECOND, 0.01)
    assert "no earlier backup to go by: 11.6 MB/s" in small.reason
    # the largest that fits blind: (900 - 60) / 1.5 s at the default pace, some 6.5 GB
    edge = int((TIMEOUT - budget.MARGIN) / (1 + route.MARGIN) * route.DEFAULT_BYTES_PER_SECOND)
    assert route.choose("backup", "full", edge, [], TIMEOUT, fargate=True).path == "lambda"
    large = route.choose("backup", "full", edge + 10**6, [], TIMEOUT, fargate=True)
    assert large.path == "fargate" and large.reason.endswith("more than the Lambda's 15m00s: "
                                                              "on Fargate")
    assert len(large.reason.splitlines()) == 1


def test_a_growing_database_grows_the_estimate_at_the_pace_of_the_last_three() -> None:
    # 300 s per GB over the last three fulls (an old, slow one no longer counts)
    history = [_backup("full", GB, 2000, 1), _backup("full", GB, 290, 8),
               _backup("full", GB, 300, 15), _backup("full", GB, 310, 22)]
    today = route.choose("backup", "full", GB, history, TIMEOUT, fargate=True)
    assert (today.path, today.estimate_seconds) == ("lambda", 300.0)
    assert "at the pace of the last full backups" in today.reason
    grown = route.choose("backup", "full", 2 * GB, history, TIMEOUT, fargate=True)
    assert (grown.path, grown.estimate_seconds) == ("fargate", 600.0)


def test_the_margin_is_the_edge() -> None:
    # estimate x 1.5 + 60 s <= 900 s: 560 s is the most that goes to Lambda
    history = [_backup("full", GB, 560)]
    assert route.choose("backup", "full", GB, history, TIMEOUT, True).path == "lambda"
    over = route.choose("backup", "full", GB + GB // 1000, history, TIMEOUT, True)
    assert over.path == "fargate" and not _fits(over.estimate_seconds)
    assert "with 50% spare and 60 s to stop cleanly it needs 15m01s" in over.reason
    # a smaller margin sends it back; none at all keeps budget.MARGIN
    assert route.choose("backup", "full", GB + GB // 1000, history, TIMEOUT, True,
                        margin=0.4).path == "lambda"
    assert route.choose("backup", "full", GB, [_backup("full", GB, 841)], TIMEOUT, True,
                        margin=0).path == "fargate"


def test_an_incremental_goes_by_the_incrementals_else_by_the_fulls() -> None:
    fulls = [_backup("full", GB, 700)]
    first = route.choose("backup", "incremental", GB, fulls, TIMEOUT, True)
    assert first.path == "fargate" and "none incremental yet" in first.reason
    later = route.choose("backup", "incremental", GB, [*fulls, _backup("incremental", GB, 40, 2)],
                         TIMEOUT, True)
    assert (later.path, later.estimate_seconds) == ("lambda", 40.0)


def test_runs_with_more_workers_count_slower_for_a_run_with_fewer() -> None:
    """A database that moved to Fargate (8 workers) must not look fast enough to come
    back to Lambda (2 workers), where it would run out of time every week."""
    lambda_run = replace(_backup("full", 20 * GB, 1200), jobs=2)
    fargate_runs = [replace(_backup("full", 20 * GB, 450, day), jobs=8) for day in (8, 15, 22)]
    history = [lambda_run, *fargate_runs]
    on_lambda = route.choose("backup", "full", 20 * GB, history, TIMEOUT, True, jobs=2)
    assert (on_lambda.path, on_lambda.estimate_seconds) == ("fargate", 1800.0)
    # the same history for a run as wide as theirs: their own pace
    assert budget.estimate_seconds(history, "full", 20 * GB, 8) == 450
    # a run with fewer workers than this one counts as it was: never shorter
    assert budget.estimate_seconds([lambda_run], "full", 20 * GB, 8) == 1200
    # a restore is paced by the same fulls, so it goes by the same rule
    assert route.choose("restore", "backup", 20 * GB, history, TIMEOUT, True,
                        jobs=2).path == "fargate"
    # and the Lambda's own budget agrees with the plan: it refuses before anything runs
    with pytest.raises(TimeLimitExceeded, match="would take about 30m"):
        budget.Budget(TIMEOUT).check("full", 20 * GB, history, 2)


def test_with_fargate_off_every_run_goes_to_lambda_saying_so() -> None:
    chosen = route.choose("backup", "full", 100 * GB, [], TIMEOUT, fargate=False)
    assert chosen.path == "lambda" and chosen.estimate_seconds > TIMEOUT
    assert "the Fargate path is off (the stack has no TaskSubnetIds): on Lambda" in chosen.reason
    restore = route.choose("restore", "backup", 100 * GB, [], TIMEOUT, fargate=False)
    assert restore.path == "lambda" and "Fargate path is off" in restore.reason


def test_a_restore_takes_the_fulls_pace_times_the_restore_factor() -> None:
    # the restored backup is an incremental: its own few seconds say nothing of a restore
    history = [_backup("full", GB, 250), _backup("incremental", GB, 5, 2)]
    chosen = route.choose("restore", "backup", GB, history, TIMEOUT, True)
    assert chosen.estimate_seconds == 250 * route.RESTORE_FACTOR
    assert chosen.path == "lambda" and "x2 for the index builds" in chosen.reason
    bigger = route.choose("restore", "backup", int(1.2 * GB), history, TIMEOUT, True)
    assert bigger.path == "fargate" and bigger.reason.startswith("a restore of 1.1 GiB")
    blind = route.choose("restore", "replay", GB, [], TIMEOUT, True)
    assert blind.estimate_seconds == pytest.approx(
        GB / route.DEFAULT_BYTES_PER_SECOND * route.RESTORE_FACTOR, 0.01)
    assert "(its base: the replay of the changes after it is not counted)" in blind.reason


def test_a_run_that_does_no_work_goes_to_lambda() -> None:
    chosen = route.on_lambda("a dry run plans from the store", TIMEOUT)
    assert chosen.as_dict() == {"path": "lambda", "estimate_seconds": 0.0,
                                "limit_seconds": TIMEOUT,
                                "reason": "a dry run plans from the store: on Lambda"}
    with pytest.raises(ValueError, match="unknown operation 'verify'"):
        route.choose("verify", "full", GB, [], TIMEOUT, True)


# --- the Plan step, as the state machine invokes it ---------------------------------------------

@pytest.fixture
def planning(deployed: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The PlanFunction's environment: the stack's, the functions' timeout, Fargate on."""
    monkeypatch.setenv(plan.TIMEOUT_ENV, str(TIMEOUT))
    monkeypatch.setenv(plan.FARGATE_ENV, "true")
    return deployed


def _slow(s3: Any, key: str, days: int = 365) -> None:
    """Make the stored backup at `key` look as if it took `days`."""
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    doc["started_at"] = iso(parse_time(doc["finished_at"]) - timedelta(days=days))
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(doc))


def _manifest_key(s3: Any, backup_id: str) -> str:
    return next(k for k in stored_keys(s3) if k.endswith(f"{backup_id}/manifest.json"))


def test_plan_sends_a_first_backup_of_a_small_database_to_lambda(
        planning: dict[str, Any], s3: Any, inbox: Inbox) -> None:
    event = load_event("backup-full-scheduled.json")
    result = plan.handler({"operation": "backup", "event": event}, FakeContext())
    assert result["operation"] == "backup" and result["event"] == event  # passed on as is
    assert (result["path"], result["limit_seconds"]) == ("lambda", TIMEOUT)
    assert 0 < result["estimate_seconds"] < 5
    assert "no earlier backup to go by" in result["reason"]
    assert stored_keys(s3) == [] and inbox.messages() == []  # it reads, and says nothing


def test_plan_reads_the_pace_of_the_stored_backups(planning: dict[str, Any], s3: Any,
                                                   inbox: Inbox,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    full = backup_handler.handler(load_event("backup-full-manual.json"), FakeContext())
    _slow(s3, _manifest_key(s3, full["backup_id"]))
    event = {"operation": "backup", "event": load_event("backup-full-manual.json")}
    chosen = plan.handler(event, FakeContext())
    assert chosen["path"] == "fargate" and chosen["estimate_seconds"] > 300 * 86400
    assert "at the pace of the last full backups" in chosen["reason"]
    restore = plan.handler({"operation": "restore", "event": load_event("restore-latest.json")},
                           FakeContext())
    assert restore["path"] == "fargate" and "x2 for the index builds" in restore["reason"]
    monkeypatch.setenv(plan.FARGATE_ENV, "false")
    off = plan.handler(event, FakeContext())
    assert off["path"] == "lambda" and "the Fargate path is off" in off["reason"]


def test_plan_paces_an_incremental_whose_chain_cannot_go_on_as_the_full_it_will_be(
        planning: dict[str, Any], s3: Any) -> None:
    full = backup_handler.handler(load_event("backup-full-manual.json"), FakeContext())
    incremental = backup_handler.handler(load_event("backup-incremental-manual.json"),
                                         FakeContext())
    _slow(s3, _manifest_key(s3, full["backup_id"]))  # fulls are slow, incrementals quick
    event = {"operation": "backup", "event": load_event("backup-incremental-manual.json")}
    chained = plan.handler(event, FakeContext())
    assert chained["path"] == "lambda", chained["reason"]
    key = _manifest_key(s3, full["backup_id"])   # now the chain's base is too old to go on
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    doc["snapshot_at"] = iso(parse_time(doc["snapshot_at"]) - timedelta(days=60))
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(doc))
    escalated = plan.handler(event, FakeContext())
    assert escalated["path"] == "fargate", escalated["reason"]
    assert "a full backup of" in escalated["reason"]
    assert "asked for an incremental: the chain's base" in escalated["reason"]
    assert incremental["kind"] == "incremental"  # the chain did go on before


def test_plan_sends_a_restore_by_its_backup_without_reaching_the_target(
        planning: dict[str, Any], inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> None:
    backup_handler.handler(load_event("backup-full-manual.json"), FakeContext())
    monkeypatch.delenv("SUPABACKUP_RESTORE_SECRET_ARN", raising=False)  # never read
    result = plan.handler({"operation": "restore", "event": load_event("restore-latest.json")},
                          FakeContext())
    assert result["path"] == "lambda" and result["estimate_seconds"] > 0
    assert result["reason"].startswith("a restore of ")
    dry = plan.handler({"operation": "restore",
                        "event": load_event("restore-tables-dry-run.json")}, FakeContext())
    assert (dry["path"], dry["estimate_seconds"]) == ("lambda", 0.0)
    assert "a dry run" in dry["reason"]


def test_plan_sends_a_tick_that_has_its_backup_to_lambda(planning: dict[str, Any], s3: Any,
                                                         inbox: Inbox) -> None:
    tick = load_event("backup-full-scheduled.json")
    done = backup_handler.handler(tick, FakeContext())
    _slow(s3, _manifest_key(s3, done["backup_id"]))  # a second run would go to Fargate
    again = plan.handler({"operation": "backup", "event": tick}, FakeContext())
    assert (again["path"], again["estimate_seconds"]) == ("lambda", 0.0)
    assert f"already has its backup, {done['backup_id']}" in again["reason"]


@pytest.mark.parametrize("event, match", [
    (["backup"], "the state machine's input is not a JSON object"),
    ({"operation": "verify", "event": {}}, "unknown operation 'verify'"),
    ({"operation": "backup", "event": {}, "extra": 1}, "unknown field.*: extra"),
    ({"operation": "backup", "event": "full"}, "field 'event' of the state machine's input"),
    ({"operation": "backup", "event": {"kind": "differential"}},
     "unknown backup kind 'differential'"),
    ({"operation": "restore", "event": {"tables": "public.orders"}},
     "event field 'tables' must be a list"),
])
def test_plan_refuses_bad_input_in_one_line_and_says_so_on_sns(
        planning: dict[str, Any], s3: Any, inbox: Inbox, event: Any, match: str,
        capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=match) as refused:
        plan.handler(event, FakeContext())
    assert len(str(refused.value).splitlines()) == 1
    assert stored_keys(s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert '"PlanFailed":[1.0]' in capfd.readouterr().out


@pytest.mark.parametrize("name, value, match", [
    (plan.TIMEOUT_ENV, "", "lacks SUPABACKUP_LAMBDA_TIMEOUT"),
    (plan.TIMEOUT_ENV, "15m", "SUPABACKUP_LAMBDA_TIMEOUT is not a whole number"),
    (plan.FARGATE_ENV, "yes", "SUPABACKUP_FARGATE is neither true nor false"),
    (plan.MARGIN_ENV, "half", "SUPABACKUP_ROUTE_MARGIN must be a number from 0 to 10"),
])
def test_plan_refuses_a_bad_environment(planning: dict[str, Any], inbox: Inbox,
                                        monkeypatch: pytest.MonkeyPatch, name: str,
                                        value: str, match: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=match):
        plan.handler({"operation": "backup", "event": {}}, FakeContext())


# --- the ECS task's runner, a process of its own -------------------------------------------------

@pytest.fixture(scope="module")
def _aws_server() -> Iterator[MotoProcess]:
    with MotoProcess() as server:
        yield server


@pytest.fixture
def task_stack(_aws_server: MotoProcess, pg15: Cluster, new_db: Any) -> dict[str, Any]:
    """What a task finds: the stack's bucket, topic and secrets in AWS (moto's server on
    loopback, reached through AWS_ENDPOINT_URL as boto3 reads it), the database to back
    up, an empty one to restore into, and the functions' environment."""
    _aws_server.reset()
    source, target = new_db(pg15), new_db(pg15)
    pg15.execute(f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sb_lambda')"
                 f" THEN CREATE ROLE sb_lambda LOGIN SUPERUSER PASSWORD '{PASSWORD}'; END IF;"
                 f" END$$; CREATE TABLE orders (id int PRIMARY KEY, note text); "
                 f"INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 100) i;"
                 f"CREATE TABLE lines (order_id int REFERENCES orders, n int);"
                 f"INSERT INTO lines SELECT i % 100 + 1, i FROM generate_series(1, 1000) i",
                 source)
    s3, secrets = _aws_server.client("s3"), _aws_server.client("secretsmanager")
    s3.create_bucket(Bucket=BUCKET)
    inbox = Inbox(_aws_server.client("sns"), _aws_server.client("sqs"))

    def secret(name: str, db: str) -> str:
        return str(secrets.create_secret(Name=name, SecretString=json.dumps({
            "host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda",
            "password": PASSWORD, "dbname": db}))["ARN"])

    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "SUPABACKUP_", "POWERTOOLS_"))}
    env = {**keep, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": _aws_server.endpoint,
           "PYTHONPATH": str(REPO / "functions"),
           "SUPABACKUP_STORE": f"s3://{BUCKET}/prod",
           "SUPABACKUP_DB_SECRET_ARN": secret("supabackup/db", source),
           "SUPABACKUP_RESTORE_SECRET_ARN": secret("supabackup/restore-target", target),
           "SUPABACKUP_SNS_TOPIC_ARN": inbox.topic_arn,
           "POWERTOOLS_METRICS_NAMESPACE": "supabackup", "SUPABACKUP_JOBS": "2"}
    return {"env": env, "s3": s3, "inbox": inbox, "source": source, "target": target}


def _task(stack: dict[str, Any], operation: str, event: Any, **extra: str
          ) -> subprocess.Popen[str]:
    env = {**stack["env"], "SUPABACKUP_OPERATION": operation,
           "SUPABACKUP_EVENT": event if isinstance(event, str) else json.dumps(event), **extra}
    return subprocess.Popen([sys.executable, "-m", "supabackup.handlers.task"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ran(stack: dict[str, Any], operation: str, event: Any) -> tuple[int, str, str]:
    proc = _task(stack, operation, event)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _manifests(s3: Any) -> list[str]:
    return [k for k in stored_keys(s3) if k.endswith("/manifest.json")]


def _emf(out: str) -> dict[str, Any]:
    (doc,) = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    return doc  # type: ignore[no-any-return]


def test_a_task_backs_up_and_restores_as_the_functions_do(task_stack: dict[str, Any],
                                                          pg15: Cluster) -> None:
    s3, inbox = task_stack["s3"], task_stack["inbox"]
    code, out, err = _ran(task_stack, "backup", load_event("backup-full-scheduled.json"))
    assert (code, err) == (0, ""), err
    result = json.loads(out.splitlines()[-1])  # the handler's result, the last line
    assert result["retention"] == "weekly" and result["trigger"] == "schedule"
    assert _manifests(s3) == [k for k in stored_keys(s3)
                              if k.endswith(f"{result['backup_id']}/manifest.json")] != []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert msg["Message"]["retention_changes"] == [f"{result['backup_id']}: weekly -> monthly"]
    metrics = _emf(out)  # what the dead man's switch counts, as from Lambda
    assert metrics["BackupSucceeded"] == [1.0] and metrics["kind"] == "full"
    assert metrics["service"] == "supabackup"
    logs = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    assert any(log.get("function_name") == "supabackup-task-backup" for log in logs), out
    # a second delivery of the tick is a duplicate: a success that does nothing
    code, out, err = _ran(task_stack, "backup", load_event("backup-full-scheduled.json"))
    assert code == 0 and json.loads(out.splitlines()[-1])["duplicate"] is True, err
    assert len(_manifests(s3)) == 1 and inbox.messages() == []

    code, out, err = _ran(task_stack, "restore", load_event("restore-latest.json"))
    assert (code, err) == (0, ""), err
    restored = json.loads(out.splitlines()[-1])
    assert restored["backup_id"] == result["backup_id"] and restored["method"] == "backup"
    assert differences(pg15.url(task_stack["source"]), pg15.url(task_stack["target"])) == []
    (msg,) = inbox.messages()
    assert msg["Subject"].startswith(f"supabackup: restore of {result['database_id']} succeeded")
    assert _emf(out)["RestoreSucceeded"] == [1.0]
    assert PASSWORD not in out + err + repr(msg)


@pytest.mark.parametrize("operation, event, match", [
    ("verify", {}, "SUPABACKUP_OPERATION must be one of backup, restore, not 'verify'"),
    ("backup", '{"kind": "full"', "SUPABACKUP_EVENT is not JSON text"),
    ("backup", {"kind": "differential"}, "unknown backup kind 'differential'"),
    ("restore", {"tables": "public.orders"}, "event field 'tables' must be a list"),
])
def test_a_task_refuses_bad_input_with_exit_2_one_line_and_nothing_stored(
        task_stack: dict[str, Any], operation: str, event: Any, match: str) -> None:
    code, out, err = _ran(task_stack, operation, event)
    assert code == 12 and len(err.splitlines()) == 1, (code, err)
    assert err.startswith("supabackup: error: ") and match in err, err
    assert stored_keys(task_stack["s3"]) == []
    assert 'Failed":[1.0]' in out  # TaskFailed, BackupFailed, RestoreFailed: as counted on Lambda
    (msg,) = task_stack["inbox"].messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"


def _terminated_while_frozen(stack: dict[str, Any], name: str, wait: float
                             ) -> tuple[int | None, str, str, list[str]]:
    """A backup task sent SIGTERM while its child `name` (pg_dumpall, psql) is frozen
    (SIGSTOP: a client that takes its time, deterministically): its exit status, or None
    when it did not end within `wait` seconds (the child is then killed so that it can);
    its stdout and stderr; and what the store held as the signal was sent."""
    run = _task(stack, "backup", load_event("backup-full-manual.json"))
    child = None
    try:
        deadline = time.monotonic() + 60
        while (child := next(iter(child_pids(name, run.pid)), None)) is None:
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, f"the run never started {name}"
            time.sleep(0.001)
        os.kill(child, signal.SIGSTOP)
        held = stored_keys(stack["s3"])
        run.send_signal(signal.SIGTERM)
        try:
            out, err = run.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            os.kill(child, signal.SIGKILL)
            out, err = run.communicate(timeout=60)
            return None, out, err, held
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
    assert not _running(child)
    return run.returncode, out, err, held


STOPPED = ("supabackup: stopped by SIGTERM (a Fargate Spot interruption, StopTask or the "
           "state machine's timeout): a backup keeps nothing of the run, a restore leaves "
           "its target incomplete")


def test_sigterm_mid_run_exits_143_and_keeps_nothing(task_stack: dict[str, Any]) -> None:
    s3, inbox = task_stack["s3"], task_stack["inbox"]
    # GIVEN a run that holds the lease and its snapshot, dumping the roles
    # WHEN the task is told to stop (Spot's two minutes' warning, StopTask)
    code, out, err, held = _terminated_while_frozen(task_stack, "pg_dumpall", 60)
    assert [k for k in held if k.endswith("/locks/backup.json")], held
    # THEN it stops cleanly: 143, one line, no backup, nothing left open, the lease back
    assert code == 143, (out, err)
    assert err.splitlines() == [STOPPED], err
    assert stored_keys(s3) == [] and open_uploads(s3) == []
    assert _emf(out)["BackupFailed"] == [1.0]
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert "stopped by SIGTERM" in msg["Message"]["error"], msg


def test_sigterm_during_the_copies_exits_143_at_once(task_stack: dict[str, Any],
                                                     pg15: Cluster) -> None:
    # a table whose COPY lasts long enough for the poll to see its psql (the fixture's
    # tables are copied in milliseconds, sometimes before the poll looks)
    pg15.execute("CREATE TABLE wide AS SELECT i, repeat(md5(i::text), 8) AS t "
                 "FROM generate_series(1, 150000) i", task_stack["source"])
    code, out, err, held = _terminated_while_frozen(task_stack, "psql", 10)
    assert [k for k in held if k.endswith("/schema.dump")], held
    assert code == 143, (out, err)
    assert stored_keys(task_stack["s3"]) == []


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
