"""The Lambda handler, called as Lambda calls it, with the sample events from events/."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from supabackup.errors import ConfigError, VerifyFailed
from supabackup.handlers import backup as handler_module
from supabackup.handlers import restore as restore_handler
from supabackup.handlers import verify as verify_handler

from devkit.pg import Cluster

from .helpers import (
    BUCKET,
    PASSWORD,
    FakeContext,
    Inbox,
    load_event,
    open_uploads,
    stored_keys,
)


def _emf(out: str) -> dict[str, Any]:
    """The EMF metrics document Powertools printed."""
    docs = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    assert len(docs) == 1, out
    return docs[0]


def test_scheduled_event_takes_a_weekly_full_backup(deployed: dict[str, Any], s3: Any,
                                                    inbox: Inbox, log_buffer: Any,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    result = handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    assert result["retention"] == "weekly" and result["trigger"] == "schedule"
    keys = stored_keys(s3)
    assert any(k.endswith(f"{result['backup_id']}/manifest.json") for k in keys)
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=next(k for k in keys if k.endswith(".dump")))
    # taken as weekly; the retention pass promoted it, the month's first full, to monthly
    assert {"Key": "retention", "Value": "monthly"} in tags["TagSet"]
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "succeeded"
    # the first full of the month is promoted by the retention pass that follows it
    assert msg["Message"]["retention_changes"] == [f"{result['backup_id']}: weekly -> monthly"]
    out = capfd.readouterr().out
    metrics = _emf(out)
    out += log_buffer.getvalue()
    assert metrics["BackupSucceeded"] == [1.0] or metrics["BackupSucceeded"] == 1.0
    assert metrics["kind"] == "full"
    logs = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    assert any(log.get("correlation_id") == result["backup_id"] for log in logs), out[:3000]
    assert PASSWORD not in out


def test_manual_event_carries_its_label_and_retention(deployed: dict[str, Any],
                                                      inbox: Inbox) -> None:
    result = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    assert (result["label"], result["retention"]) == ("before migration 42", "pinned")
    (msg,) = inbox.messages()
    assert msg["Message"]["backup"]["label"] == "before migration 42"
    assert msg["Message"]["retention_changes"] == []  # pinned stays pinned


@pytest.mark.parametrize("event, match", [
    (["full"], "the event is not a JSON object"),
    ({"kind": "full", "retension": "pinned"}, "unknown event field"),
    ({"kind": "full", "label": 42}, "event field 'label' must be a string"),
    ({"kind": "full", "retention": "forever"}, "unknown retention class 'forever'"),
    ({"kind": "differential"}, "unknown backup kind 'differential'"),
    ({"trigger": "cron"}, "unknown trigger 'cron'"),
])
def test_malformed_event_fails_clearly_and_stores_nothing(
        deployed: dict[str, Any], s3: Any, inbox: Inbox, event: Any, match: str,
        capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=match):
        handler_module.handler(event, FakeContext())
    assert stored_keys(s3) == [] and open_uploads(s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert _emf(capfd.readouterr().out)["BackupFailed"] == [1.0]


def test_missing_secret_fails_clearly(deployed: dict[str, Any], s3: Any, inbox: Inbox,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABACKUP_DB_SECRET_ARN", deployed["arn"] + "-gone")
    with pytest.raises(ConfigError, match="cannot read the database secret .*ResourceNotFoundException"):
        handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    assert stored_keys(s3) == []
    (msg,) = inbox.messages()
    assert "check SUPABACKUP_DB_SECRET_ARN" in msg["Message"]["what_to_do"]


def test_failed_backup_fails_the_invocation_and_never_leaks_the_password(
        deployed: dict[str, Any], pg15: Cluster, s3: Any, inbox: Inbox, log_buffer: Any,
        capfd: pytest.CaptureFixture[str]) -> None:
    deployed["secrets"].put_secret_value(SecretId=deployed["arn"], SecretString=json.dumps({
        "host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda",
        "password": PASSWORD + "-wrong", "dbname": deployed["db"]}))
    with pytest.raises(Exception, match="password authentication failed"):
        handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    out = capfd.readouterr().out + log_buffer.getvalue()
    assert '"message":"backup failed: cannot connect to sb_lambda@127.0.0.1' in out
    assert PASSWORD not in out
    assert PASSWORD not in repr(inbox.messages())
    assert _emf(out)["BackupFailed"] == [1.0]


def test_scheduled_incremental_reports_tables_changed_out_of_total(
        deployed: dict[str, Any], pg15: Cluster, inbox: Inbox) -> None:
    full = handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    pg15.execute("CREATE TABLE later (id int); INSERT INTO later VALUES (1);"
                 "INSERT INTO orders VALUES (101)", deployed["db"])
    result = handler_module.handler(load_event("backup-incremental-scheduled.json"),
                                    FakeContext())
    assert result["kind"] == "incremental" and result["parent"] == full["backup_id"]
    assert (result["tables_dumped"], result["tables_total"]) == (2, 2)
    _, msg = inbox.messages()
    assert msg["Subject"].endswith(", 2 of 2 tables")
    assert msg["MessageAttributes"]["kind"]["Value"] == "incremental"


def test_incremental_without_a_base_escalates_and_says_why(deployed: dict[str, Any],
                                                           inbox: Inbox) -> None:
    result = handler_module.handler(load_event("backup-incremental-manual.json"), FakeContext())
    assert result["kind"] == "full" and result["backup_id"].endswith("-full")
    assert result["escalation"] == "no previous backup to chain from"
    (msg,) = inbox.messages()
    assert " succeeded (escalated): " in msg["Subject"]
    assert msg["Message"]["backup"]["escalation"] == "no previous backup to chain from"


# --- verify and restore functions -----------------------------------------------------------


@pytest.fixture
def drill_secret(deployed: dict[str, Any], pg15: Cluster,
                 monkeypatch: pytest.MonkeyPatch) -> str:
    """The scratch server the verify function drills on (here: the same cluster)."""
    arn = deployed["secrets"].create_secret(Name="supabackup/drill", SecretString=json.dumps({
        "host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda",
        "password": PASSWORD, "dbname": "postgres"}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_DRILL_SECRET_ARN", arn)
    return arn


def test_scheduled_verify_drills_the_newest_backup(deployed: dict[str, Any], drill_secret: str,
                                                   inbox: Inbox, log_buffer: Any,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    full = handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    inbox.messages(), capfd.readouterr()
    result = verify_handler.handler(load_event("verify-scheduled.json"), FakeContext())
    assert result["verified"] == [full["backup_id"]] and result["problems"] == []
    assert result["drill"]["backup_id"] == full["backup_id"]
    assert (result["drill"]["tables"], result["drill"]["rows"]) == (1, 100)
    (msg,) = inbox.messages()
    assert msg["Subject"].endswith("succeeded: 1 backup(s) whole; drill: 1 tables match")
    assert msg["MessageAttributes"]["kind"]["Value"] == "verify"
    out = capfd.readouterr().out
    emf = _emf(out)
    assert emf["VerifySucceeded"] == [1.0]
    # the drill's own result, for the dashboard's last drill: it passed
    assert emf["DrillPassed"] == [1.0] and emf["kind"] == "verify"
    assert {"Name": "DrillPassed", "Unit": "Count"} in emf["_aws"]["CloudWatchMetrics"][0][
        "Metrics"]
    assert PASSWORD not in out + log_buffer.getvalue() + repr(msg)


def test_manual_verify_without_drill_names_a_damaged_object(
        deployed: dict[str, Any], drill_secret: str, s3: Any, inbox: Inbox,
        capfd: pytest.CaptureFixture[str]) -> None:
    full = handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    inbox.messages(), capfd.readouterr()
    key = next(k for k in stored_keys(s3) if k.endswith("roles.sql"))
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"-- tampered\n")
    with pytest.raises(Exception, match=f"{full['backup_id']}/roles.sql: size 12 bytes"):
        verify_handler.handler(load_event("verify-manual.json"), FakeContext())
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    assert msg["Message"]["details"]["drill"] is None  # the manual sample skips the drill
    emf = _emf(capfd.readouterr().out)
    assert emf["VerifyFailed"] == [1.0]
    assert "DrillPassed" not in emf  # no drill was asked for: no drill result


@pytest.mark.parametrize("damaged, drill_passed", [
    ("newest", 0.0),  # its chain failed to verify: the drill is not run, which is no pass
    ("older", 1.0),   # the drill of the newest passes, though the verify fails
    ("recorded", 0.0),  # the newest verifies, but the drill restores what it did not record
])
def test_the_drill_result_is_the_drills_own_not_the_verify_runs(
        deployed: dict[str, Any], drill_secret: str, s3: Any, inbox: Inbox, damaged: str,
        drill_passed: float, capfd: pytest.CaptureFixture[str]) -> None:
    older = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    time.sleep(1.1)  # backup ids have one-second resolution
    newest = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    inbox.messages(), capfd.readouterr()
    backup_id = (older if damaged == "older" else newest)["backup_id"]
    if damaged == "recorded":  # the manifest says the table held one row fewer
        key = next(k for k in stored_keys(s3) if k.endswith(f"{backup_id}/manifest.json"))
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        [orders] = [t for t in manifest["tables"] if t["name"] == "orders"]
        orders["rows"] -= 1
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(manifest).encode())
        problem = "public.orders: 100 rows restored, the backup's snapshot held 99"
    else:
        key = next(k for k in stored_keys(s3) if k.endswith(f"{backup_id}/roles.sql"))
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"-- tampered\n")
        problem = "roles.sql: size 12 bytes"
    with pytest.raises(VerifyFailed, match=f"{backup_id}/{problem}"):
        verify_handler.handler(load_event("verify-scheduled.json"), FakeContext())
    (msg,) = inbox.messages()
    drilled = msg["Message"]["details"]["drill"]
    assert (drilled or {}).get("backup_id") == (None if damaged == "newest"
                                                else newest["backup_id"])
    emf = _emf(capfd.readouterr().out)
    assert emf["VerifyFailed"] == [1.0] and emf["DrillPassed"] == [drill_passed]


def test_a_drill_that_could_not_restore_is_a_drill_that_did_not_pass(
        deployed: dict[str, Any], pg15: Cluster, inbox: Inbox,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The drill's user may not create its scratch database: the drill restores nothing,
    and the last drill shows a failure."""
    pg15.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sb_nodb')"
                 f" THEN CREATE ROLE sb_nodb LOGIN NOCREATEDB PASSWORD '{PASSWORD}'; END IF;"
                 " END$$", "postgres")
    arn = deployed["secrets"].create_secret(Name="supabackup/drill-nodb", SecretString=json.dumps({
        "host": "127.0.0.1", "port": pg15.port, "username": "sb_nodb", "password": PASSWORD,
        "dbname": "postgres"}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_DRILL_SECRET_ARN", arn)
    handler_module.handler(load_event("backup-full-scheduled.json"), FakeContext())
    inbox.messages(), capfd.readouterr()
    with pytest.raises(VerifyFailed, match="drill could not create a scratch database"):
        verify_handler.handler(load_event("verify-scheduled.json"), FakeContext())
    emf = _emf(capfd.readouterr().out)
    assert emf["VerifyFailed"] == [1.0] and emf["DrillPassed"] == [0.0]


@pytest.mark.parametrize("event, match", [
    ({"drill": "yes"}, "event field 'drill' must be a boolean"),
    ({"backup": "x"}, "unknown event field"),
])
def test_malformed_verify_event_fails_clearly(deployed: dict[str, Any], inbox: Inbox,
                                              event: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        verify_handler.handler(event, FakeContext())
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"


@pytest.fixture
def restore_target(deployed: dict[str, Any], pg15: Cluster, new_db: Any,
                   monkeypatch: pytest.MonkeyPatch) -> str:
    target = new_db(pg15)
    arn = deployed["secrets"].create_secret(Name="supabackup/restore-target",
                                            SecretString=json.dumps({
                                                "host": "127.0.0.1", "port": pg15.port,
                                                "username": "sb_lambda", "password": PASSWORD,
                                                "dbname": target}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_RESTORE_SECRET_ARN", arn)
    return target


def test_restore_function_restores_the_latest_backup_into_its_target(
        deployed: dict[str, Any], restore_target: str, pg15: Cluster, inbox: Inbox) -> None:
    full = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    inbox.messages()
    result = restore_handler.handler(load_event("restore-latest.json"), FakeContext())
    assert result["backup_id"] == full["backup_id"]
    assert pg15.execute("SELECT count(*) FROM orders", restore_target) == [(100,)]
    (msg,) = inbox.messages()
    assert msg["Subject"].startswith(f"supabackup: restore of {full['database_id']} succeeded")
    assert PASSWORD not in repr(msg) + repr(result)


def test_restore_function_dry_run_plans_and_touches_nothing(
        deployed: dict[str, Any], restore_target: str, pg15: Cluster, inbox: Inbox) -> None:
    pg15.execute("CREATE TABLE public.todos (id int)", deployed["db"])  # named by the sample
    full = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    inbox.messages()
    result = restore_handler.handler(load_event("restore-tables-dry-run.json"), FakeContext())
    assert result["dry_run"] is True and result["backup_id"] == full["backup_id"]
    assert result["plan"][-1] == "  table data of: public.todos only"
    assert pg15.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                        restore_target) == [(0,)]
    assert inbox.messages() == []


def test_restore_function_refuses_a_bad_event_without_touching_the_target(
        deployed: dict[str, Any], restore_target: str, pg15: Cluster, inbox: Inbox) -> None:
    handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    inbox.messages()
    with pytest.raises(ConfigError, match="table 'public.nope' is not in the backup"):
        restore_handler.handler({"tables": ["public.nope"]}, FakeContext())
    with pytest.raises(ConfigError, match="event field 'tables' must be a list"):
        restore_handler.handler({"tables": "public.orders"}, FakeContext())
    assert pg15.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                        restore_target) == [(0,)]
    assert [m["MessageAttributes"]["status"]["Value"] for m in inbox.messages()] == [
        "failed", "failed"]


def test_restore_function_restores_into_a_fresh_supabase_project(
        deployed: dict[str, Any], pg15: Cluster, new_db: Any, inbox: Inbox,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from .helpers import SQL
    project = new_db(pg15)
    pg15.psql_file(SQL / "supabase_platform.sql", project)
    arn = deployed["secrets"].create_secret(Name="supabackup/project", SecretString=json.dumps({
        "host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda", "password": PASSWORD,
        "dbname": project}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_RESTORE_SECRET_ARN", arn)
    handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    result = restore_handler.handler(load_event("restore-into-supabase.json"), FakeContext())
    assert any("supabase profile" in line for line in result["lines"])
    # the rows, and the source's grants: the project's default privileges do not leak in
    assert pg15.execute("SELECT count(*), has_table_privilege('anon', 'public.orders', "
                        "'SELECT') FROM public.orders", project) == [(100, False)]


def test_a_failed_publish_is_counted_and_the_backup_still_succeeds(
        deployed: dict[str, Any], s3: Any, inbox: Inbox,
        capfd: pytest.CaptureFixture[str]) -> None:
    from botocore.awsrequest import AWSResponse
    from moto.core.botocore_stubber import MockRawResponse
    body = (b"<ErrorResponse><Error><Type>Sender</Type><Code>AuthorizationError</Code>"
            b"<Message>injected</Message></Error></ErrorResponse>")
    inbox.sns.meta.events.register_first(
        "before-send.sns.Publish",
        lambda request, **_: AWSResponse(request.url, 403, {}, MockRawResponse(body)))
    result = handler_module.handler(load_event("backup-full-manual.json"), FakeContext())
    assert any(k.endswith(f"{result['backup_id']}/manifest.json") for k in stored_keys(s3))
    metrics = _emf(capfd.readouterr().out)
    assert metrics["BackupSucceeded"] == [1.0]
    assert metrics["NotifyFailed"] == [1.0]
