"""The SAM stack: template.yaml linted, translated by SAM and deployed into moto; the layer's
Makefile; samconfig.toml. Fast and offline: no Docker, no network, no AWS account.

`sam deploy` sends CloudFormation the template after `sam package` has replaced the local
CodeUri/ContentUri with S3 addresses; the SAM transform then runs in CloudFormation. Here
aws-sam-translator (the library behind that transform) runs on the same input.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from cfnlint.helpers import REGIONS
from moto import mock_aws
from samtranslator.translator.transform import transform
from supabackup.backup import KINDS as BACKUP_KINDS
from supabackup.budget import MARGIN
from supabackup.capture.state import TAGS as CAPTURE_TAGS
from supabackup.dburl import ConnectionInfo
from supabackup.handlers.capture import RUN_MARGIN
from supabackup.handlers.events import (
    parse_backup_event,
    parse_capture_event,
    parse_restore_event,
    parse_verify_event,
)
from supabackup.handlers.task import HANDLERS as TASK_HANDLERS
from supabackup.manifest import RETENTION_CLASSES
from supabackup.store import Store, StoreURL

from .helpers import EVENTS, REPO, TEMPLATE, sam_template

LAYERS = REPO / "layers"
REGION = "us-east-1"
EXISTING_SECRET = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:supabase-db-AbCdEf"
DRILL_SECRET = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:scratch-db-GhIjKl"
TARGET_SECRET = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:restore-db-MnOpQr"
CAPTURE_SECRET = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:direct-db-StUvWx"

# cfn-lint runs with every rule, informational and experimental ones included, in every
# region. Errors and warnings fail the test; these informational findings are accepted:
#   I4010  experimental: asks for Metadata "com.aws.cloudformation.Context" describing the
#          architecture on the template and its resources, which nothing here consumes.
ACCEPTED_LINT = {"I4010"}

# The stack's key: its own, or the user's (KmsKeyArn).
KEY = {"Fn::If": ["CreateKey", {"Fn::GetAtt": ["BackupKey", "Arn"]}, {"Ref": "KmsKeyArn"}]}

# Actions whose Resource must never be "*" in the function's policies.
SCOPED_SERVICES = ("s3:", "secretsmanager:", "kms:", "sns:")


# ------------------------------------------------------------------ helpers


def translate(parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """What CloudFormation deploys after the SAM transform, as after `sam package`."""
    template = sam_template()
    template["Globals"]["Function"]["CodeUri"] = "s3://artifacts/function.zip"
    template["Resources"]["PostgresClientLayer"]["Properties"]["ContentUri"] = (
        "s3://artifacts/layer.zip")

    class NoManagedPolicies:
        """The loader SAM would use to map managed-policy names to ARNs; none are named."""

        def load(self) -> dict[str, str]:
            return {}

    with mock.patch.dict(os.environ, {"AWS_DEFAULT_REGION": REGION}):
        return transform(template, dict(parameters or {}), NoManagedPolicies())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sam() -> dict[str, Any]:
    return sam_template()


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return translate()


def of_type(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == type_}


def one(template: dict[str, Any], type_: str) -> tuple[str, dict[str, Any]]:
    found = of_type(template, type_)
    assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
    return next(iter(found.items()))


def default(template: dict[str, Any], value: Any) -> Any:
    """A {"Ref": Parameter} resolved to the parameter's default; anything else as is."""
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in template["Parameters"]:
        return template["Parameters"][value["Ref"]]["Default"]
    return value


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def refs(node: Any) -> Iterator[str]:
    """Every name a node refers to: Ref, GetAtt and ${...} in Fn::Sub."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref":
                yield value
            elif key == "Fn::GetAtt":
                yield value[0] if isinstance(value, list) else value.split(".")[0]
            elif key == "Fn::Sub":
                text = value[0] if isinstance(value, list) else value
                for part in text.split("${")[1:]:
                    yield part.split("}")[0].split(".")[0]
            yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


FUNCTIONS = ("BackupFunction", "VerifyFunction", "RestoreFunction")


def function_statements(cfn: dict[str, Any], function: str = "BackupFunction"
                        ) -> list[dict[str, Any]]:
    """Every policy statement that applies to a function's role."""
    fn = cfn["Resources"][function]["Properties"]
    role_id = fn["Role"]["Fn::GetAtt"][0]
    role = cfn["Resources"][role_id]["Properties"]
    documents = [p["PolicyDocument"] for p in role.get("Policies", [])]
    for resource in cfn["Resources"].values():
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::RolePolicy"):
            props = resource["Properties"]
            attached = [*props.get("Roles", []), props.get("RoleName")]
            if {"Ref": role_id} in attached:
                documents.append(props["PolicyDocument"])
    statements = [s for doc in documents for s in as_list(doc["Statement"])]
    # A statement under a condition (a secret given as a parameter): as when it is given.
    return [s["Fn::If"][1] if "Fn::If" in s else s for s in statements]


# cfn-lint's time grows faster than the number of regions it lints in one process: every
# region is linted, both templates in each cfn-lint, the regions shared among a few at once.
LINT_PROCESSES = 2


@pytest.fixture(scope="module")
def lint_findings(cfn: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, list[str]]:
    """cfn-lint's findings, every rule (informational and experimental ones too) in every
    region, on the SAM template (cfn-lint runs the SAM transform itself) and on the
    translated one: {"sam": [...], "translated": [...]}, less ACCEPTED_LINT."""
    where = tmp_path_factory.mktemp("lint")  # no .cfnlintrc of the repository's applies
    translated = where / "translated.json"
    translated.write_text(json.dumps(cfn, indent=1))
    templates = {str(TEMPLATE): "sam", str(translated): "translated"}
    runs = [subprocess.Popen([str(Path(sys.executable).with_name("cfn-lint")), "--format",
                              "json", "--include-checks", "I", "--include-experimental",
                              "--regions", *REGIONS[share::LINT_PROCESSES], "--", *templates],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=where)
            for share in range(LINT_PROCESSES)]
    found: dict[str, set[str]] = {name: set() for name in templates.values()}
    for run in runs:
        out, err = run.communicate(timeout=900)
        # the exit status is a mask of what was found: 2 errors, 4 warnings, 8 informational
        assert run.returncode & ~(2 | 4 | 8) == 0, err[-3000:]
        for match in json.loads(out):
            if match["Rule"]["Id"] not in ACCEPTED_LINT:
                found[templates[match["Filename"]]].add(
                    f"{match['Rule']['Id']} line {match['Location']['Start']['LineNumber']}: "
                    f"{match['Message']}")
    return {name: sorted(lines) for name, lines in found.items()}


# ------------------------------------------------------------------ lint and translation


@pytest.mark.tools
def test_cfn_lint_passes_on_the_sam_template(lint_findings: dict[str, list[str]]) -> None:
    assert lint_findings["sam"] == []


@pytest.mark.tools
def test_cfn_lint_passes_on_the_translated_template(lint_findings: dict[str, list[str]]
                                                    ) -> None:
    assert lint_findings["translated"] == []


@pytest.mark.tools
def test_cfn_lint_serverless_rules_pass() -> None:
    """The serverless rules (cfn-lint-serverless): redrive policies, log retention, ..."""
    run = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(TEMPLATE),
                          "--append-rules", "cfn_lint_serverless.rules"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def tool(venv: str, program: str) -> str:
    """A program from its own venv under build/tools (made by `make test`)."""
    path = REPO / "build" / "tools" / venv / "bin" / program
    assert path.is_file(), f"{path} is missing: run `make setup` (make test does)"
    return str(path)


@pytest.mark.tools
def test_sam_validate_lint_passes() -> None:
    run = subprocess.run([tool("sam", "sam"), "validate", "--lint", "--template-file",
                          str(TEMPLATE), "--region", REGION], capture_output=True, text=True,
                         env={**os.environ, "SAM_CLI_TELEMETRY": "0"}, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is a valid SAM Template" in run.stdout + run.stderr


@pytest.mark.tools
def test_checkov_passes_and_every_skip_says_why() -> None:
    run = subprocess.run([tool("checkov", "checkov"), "--file", str(TEMPLATE), "--framework",
                          "cloudformation", "--skip-download", "--compact", "--quiet",
                          "--output", "json"], capture_output=True, text=True)
    report = json.loads(run.stdout)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [] and run.returncode == 0, failed
    assert report["summary"]["passed"] > 50
    # A skip without a reason is not a justification.
    for resource in sam_template()["Resources"].values():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert len(skip.get("comment", "")) > 40, skip


@pytest.mark.tools
def test_sam_build_works_without_docker(tmp_path: Path) -> None:
    """`sam build` as a user runs it: the layer through layers/Makefile, the functions with
    their pinned requirements for arm64, all without a container."""
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0",
           # SAM's Python workflow runs `python3.12`: the project's venv has one.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([tool("sam", "sam"), "build", "--template-file", str(TEMPLATE),
                          "--build-dir", str(tmp_path / "out"), "--cache-dir",
                          str(tmp_path / "cache"), "--parallel"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    for function in FUNCTIONS:
        assert (out / function / "supabackup" / "handlers" / "common.py").is_file()
        binaries = list((out / function / "psycopg2").glob("_psycopg*.so"))
        assert binaries and all("aarch64" in b.name for b in binaries), binaries
    layer = out / "PostgresClientLayer"
    assert {p.name for p in (layer / "bin").iterdir()} >= {"pg_dump", "pg_restore", "psql"}


def test_translates_with_every_architecture_and_an_existing_secret() -> None:
    for arch in ("arm64", "x86_64"):
        out = translate({"Architecture": arch, "DatabaseSecretArn": EXISTING_SECRET})
        functions = of_type(out, "AWS::Lambda::Function")
        assert set(functions) == {*FUNCTIONS, "CaptureFunction", "PlanFunction"}
        assert all(f["Properties"]["ReservedConcurrentExecutions"] == 1
                   for f in functions.values())


def test_globals_and_parameters(sam: dict[str, Any]) -> None:
    params, fn = sam["Parameters"], sam["Globals"]["Function"]
    assert fn["Runtime"] == "python3.12"
    assert fn["Tracing"] == "Active"
    assert fn["Architectures"] == [{"Ref": "Architecture"}]
    assert params["Architecture"]["Default"] == "arm64"
    assert set(params["Architecture"]["AllowedValues"]) == {"arm64", "x86_64"}
    assert default(sam, fn["Timeout"]) == 900
    # A backup keeps the last MARGIN seconds to stop cleanly: a timeout must leave room.
    assert params["FunctionTimeout"]["MinValue"] >= 3 * MARGIN
    assert default(sam, fn["MemorySize"]) == 1024
    assert params["CaptureMemorySize"]["Default"] == 256  # a stream peaks near 105 MB
    assert params["DatabasePassword"]["NoEcho"] is True
    assert params["ScheduleTimezone"]["Default"] == "UTC"
    assert set(params["ScheduleState"]["AllowedValues"]) == {"ENABLED", "DISABLED"}


# ------------------------------------------------------------------ schedule and events


def schedules(cfn: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scheduler's schedules, by the kind of backup their input asks for (or verify).
    The backups' start the state machine with {"operation": "backup", "event": ...}."""
    found = {}
    for resource in cfn["Resources"].values():
        if resource["Type"] == "AWS::Scheduler::Schedule":
            sent = json.loads(resource["Properties"]["Target"]["Input"])
            target = resource["Properties"]["Target"]["Arn"]
            if target == {"Ref": "RunStateMachine"}:
                found[sent["event"]["kind"]] = resource["Properties"]
            else:
                function = target["Fn::GetAtt"][0]
                found[function.removesuffix("Function").lower()] = resource["Properties"]
    return found


@pytest.mark.parametrize("kind, cron, state, target", [
    ("full", "cron(0 3 ? * SUN *)", "ScheduleState", {"Ref": "RunStateMachine"}),
    ("incremental", "cron(0 3 ? * MON-SAT *)", "IncrementalScheduleState",
     {"Ref": "RunStateMachine"}),
    ("verify", "cron(0 5 ? * SUN *)", "VerifyScheduleState",
     {"Fn::GetAtt": ["VerifyFunction", "Arn"]}),
    ("capture", "rate(5 minutes)", "CaptureScheduleState",
     {"Fn::GetAtt": ["CaptureFunction", "Arn"]}),
])
def test_the_schedules_run_weekly_fulls_daily_incrementals_and_weekly_verify(
        cfn: dict[str, Any], kind: str, cron: str, state: str, target: dict[str, Any]) -> None:
    props = schedules(cfn)[kind]
    assert default(cfn, props["ScheduleExpression"]) == cron
    assert props["ScheduleExpressionTimezone"] == {"Ref": "ScheduleTimezone"}
    assert default(cfn, props["ScheduleExpressionTimezone"]) == "UTC"
    assert props["State"] == {"Ref": state}
    assert default(cfn, props["State"]) == "ENABLED"
    assert "Name" not in props  # CloudFormation names it: two stacks must not clash
    assert props["Target"]["Arn"] == target
    target = props["Target"]
    # capture runs every 5 minutes: the next run is its retry
    assert target["RetryPolicy"]["MaximumRetryAttempts"] >= (0 if kind == "capture" else 1)
    queue_id = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
    queue = cfn["Resources"][queue_id]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"].get("SqsManagedSseEnabled") or queue["Properties"].get("KmsMasterKeyId")
    # The scheduler may invoke the function and write to its dead-letter queue, nothing more.
    role = cfn["Resources"][target["RoleArn"]["Fn::GetAtt"][0]]["Properties"]
    for policy in role["Policies"]:
        for statement in as_list(policy["PolicyDocument"]["Statement"]):
            assert statement["Resource"] != "*"


@pytest.mark.parametrize("kind, sample, retention", [
    ("full", "backup-full-scheduled.json", "weekly"),
    ("incremental", "backup-incremental-scheduled.json", "daily"),
])
def test_the_schedules_send_the_sample_scheduled_events(cfn: dict[str, Any], kind: str,
                                                        sample: str, retention: str) -> None:
    # through the state machine, which gives the backup function the event alone
    # (tests/test_state_machine.py runs it)
    started = json.loads(schedules(cfn)[kind]["Target"]["Input"])
    assert set(started) == {"operation", "event"} and started["operation"] == "backup"
    sent = started["event"]
    sample_event = json.loads((EVENTS / sample).read_text())
    # The scheduler puts the tick's time in place of its context attribute.
    assert sent.pop("tick") == "<aws.scheduler.scheduled-time>"
    assert sent == {k: v for k, v in sample_event.items() if k != "tick"}
    request = parse_backup_event({**sent, "tick": sample_event["tick"]})
    assert request.tick == sample_event["tick"].replace("Z", ".000000Z")
    assert (request.kind, request.trigger, request.retention) == (kind, "schedule", retention)


def test_the_capture_schedule_sends_the_sample_and_streams_between_its_runs(
        cfn: dict[str, Any]) -> None:
    sent = json.loads(schedules(cfn)["capture"]["Target"]["Input"])
    assert sent == json.loads((EVENTS / "capture-scheduled.json").read_text())
    request = parse_capture_event(sent)
    assert (request.action, request.seconds) == ("run", 285)
    assert request.flush_interval is None  # the engine's own: 5 s, the recovery point
    # One run streams for less than the 300 s between two, leaving time to connect and
    # for the last flush; the function's timeout leaves the handler its margin too, and
    # room for a new epoch's base backup before the stream.
    assert default(cfn, schedules(cfn)["capture"]["ScheduleExpression"]) == "rate(5 minutes)"
    assert request.seconds is not None and request.seconds <= 300 - 10
    timeout = cfn["Resources"]["CaptureFunction"]["Properties"]["Timeout"]
    assert timeout == 900 and request.seconds + RUN_MARGIN < timeout / 2


def test_the_verify_schedule_sends_the_sample_and_drills() -> None:
    cfn = translate()
    sent = json.loads(schedules(cfn)["verify"]["Target"]["Input"])
    assert sent == json.loads((EVENTS / "verify-scheduled.json").read_text())
    assert parse_verify_event(sent).drill is True


PARSERS = {"backup": parse_backup_event, "verify": parse_verify_event,
           "restore": parse_restore_event, "capture": parse_capture_event}


def test_the_sample_events_are_valid_requests() -> None:
    samples = sorted(EVENTS.glob("*.json"))
    assert {p.name.split("-")[0] for p in samples} == set(PARSERS)
    for path in samples:
        event = json.loads(path.read_text())
        operation = path.name.split("-")[0]
        if path.name.endswith("-large.json"):  # the state machine's input, around the event
            assert event["operation"] == operation and operation in ("backup", "restore")
            event = event["event"]
        PARSERS[operation](event)


def test_failed_asynchronous_runs_go_to_the_dead_letter_queue(cfn: dict[str, Any]) -> None:
    configs = {c["Properties"]["FunctionName"]["Ref"]: c["Properties"]
               for c in of_type(cfn, "AWS::Lambda::EventInvokeConfig").values()}
    assert set(configs) == {"BackupFunction", "VerifyFunction", "CaptureFunction"}
    # capture runs every minute and its next run picks up where a failed one stopped
    capture = configs.pop("CaptureFunction")
    assert capture["MaximumRetryAttempts"] == 0 and not capture.get("DestinationConfig")
    for props in configs.values():
        assert props["MaximumRetryAttempts"] <= 2
        queue_id = props["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]
        assert cfn["Resources"][queue_id]["Type"] == "AWS::SQS::Queue"


# ------------------------------------------------------------------ the function


@pytest.mark.parametrize("function, handler", [
    ("BackupFunction", "supabackup.handlers.backup.handler"),
    ("VerifyFunction", "supabackup.handlers.verify.handler"),
    ("RestoreFunction", "supabackup.handlers.restore.handler"),
    ("CaptureFunction", "supabackup.handlers.capture.handler"),
])
def test_the_functions(cfn: dict[str, Any], sam: dict[str, Any], function: str,
                       handler: str) -> None:
    fn_props = cfn["Resources"][function]["Properties"]
    assert cfn["Resources"][function]["Type"] == "AWS::Lambda::Function"
    assert fn_props["ReservedConcurrentExecutions"] == 1
    assert fn_props["Handler"] == handler
    assert fn_props["Runtime"] == "python3.12"
    assert fn_props["TracingConfig"] == {"Mode": "Active"}
    assert fn_props["Architectures"] == [{"Ref": "Architecture"}]
    # capture's is its own: a stream, and now and then a new epoch's base backup first
    assert fn_props["Timeout"] == (900 if function == "CaptureFunction"
                                   else {"Ref": "FunctionTimeout"})
    # capture runs all the time: its memory is most of its cost, and its own to set
    assert fn_props["MemorySize"] == {"Ref": "CaptureMemorySize" if function == "CaptureFunction"
                                      else "FunctionMemorySize"}
    [layer] = fn_props["Layers"]
    layer = cfn["Resources"][layer["Ref"]]
    assert layer["Type"] == "AWS::Lambda::LayerVersion"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layer["Properties"]["CompatibleArchitectures"] == [{"Ref": "Architecture"}]
    # No VPC unless subnets are given (then dual-stack, for Supabase's IPv6 direct host).
    vpc = fn_props["VpcConfig"]["Fn::If"]
    assert vpc[0] == "InVpc" and vpc[2] == {"Ref": "AWS::NoValue"}
    assert vpc[1]["Ipv6AllowedForDualStack"] is True

    # The code SAM packages: functions/ holds the handler and its requirements.
    code = REPO / sam["Globals"]["Function"]["CodeUri"]
    module = handler.rsplit(".", 1)[0]
    assert (code / (module.replace(".", "/") + ".py")).is_file()
    assert (code / "requirements.txt").is_file()
    assert callable(importlib.import_module(module).handler)

    sam_layer = sam["Resources"]["PostgresClientLayer"]
    assert sam_layer["Metadata"]["BuildMethod"] == "makefile"
    assert sam_layer["Properties"]["ContentUri"] == "layers/"


COMMON_ENV = {"SUPABACKUP_STORE", "SUPABACKUP_SNS_TOPIC_ARN", "POWERTOOLS_SERVICE_NAME",
              "POWERTOOLS_METRICS_NAMESPACE"}


def test_the_function_environment(cfn: dict[str, Any]) -> None:
    env = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    assert set(env) == COMMON_ENV | {"SUPABACKUP_DB_SECRET_ARN", "SUPABACKUP_PROFILE",
                                     "SUPABACKUP_KEEP_DAYS", "SUPABACKUP_STORAGE_ENDPOINT",
                                     "SUPABACKUP_STORAGE_BUCKETS",
                                     "SUPABACKUP_STORAGE_SECRET_ARN"}
    # Storage files only with StorageEndpoint (off by default); their keys come from a
    # secret, never a variable
    assert cfn["Parameters"]["StorageEndpoint"]["Default"] == ""
    assert env["SUPABACKUP_STORAGE_ENDPOINT"] == {
        "Fn::If": ["HasStorage", {"Ref": "StorageEndpoint"}, {"Ref": "AWS::NoValue"}]}
    assert env["SUPABACKUP_STORAGE_BUCKETS"] == {
        "Fn::If": ["HasStorage", {"Ref": "StorageBuckets"}, {"Ref": "AWS::NoValue"}]}
    assert env["SUPABACKUP_STORAGE_SECRET_ARN"] == {
        "Fn::If": ["HasStorageSecret", {"Ref": "StorageSecretArn"}, {"Ref": "AWS::NoValue"}]}
    assert env["SUPABACKUP_STORE"] == {"Fn::Sub": "s3://${BackupBucket}/${BackupPrefix}"}
    assert env["SUPABACKUP_DB_SECRET_ARN"] == {
        "Fn::If": ["CreateDatabaseSecret", {"Ref": "DatabaseSecret"}, {"Ref": "DatabaseSecretArn"}]}
    assert env["SUPABACKUP_SNS_TOPIC_ARN"] == {"Ref": "NotificationTopic"}
    assert default(cfn, env["SUPABACKUP_PROFILE"]) == "supabase"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "supabackup"
    assert env["POWERTOOLS_SERVICE_NAME"] == "supabackup"


@pytest.mark.parametrize("function, variable, parameter", [
    ("VerifyFunction", "SUPABACKUP_DRILL_SECRET_ARN", "DrillSecretArn"),
    ("RestoreFunction", "SUPABACKUP_RESTORE_SECRET_ARN", "RestoreTargetSecretArn"),
    ("CaptureFunction", "SUPABACKUP_CAPTURE_SECRET_ARN", "CaptureSecretArn"),
])
def test_verify_restore_and_capture_read_their_own_secret_only(
        cfn: dict[str, Any], function: str, variable: str, parameter: str) -> None:
    env = cfn["Resources"][function]["Properties"]["Environment"]["Variables"]
    extra = ({"SUPABACKUP_MAX_RETAINED_WAL", "SUPABACKUP_KEEP_DAYS"}
             if function == "CaptureFunction" else set())
    if function == "RestoreFunction":  # and the target project's Storage keys, when given
        extra = {"SUPABACKUP_TARGET_STORAGE_SECRET_ARN"}
        assert env["SUPABACKUP_TARGET_STORAGE_SECRET_ARN"] == {"Fn::If": [
            "HasTargetStorageSecret", {"Ref": "TargetStorageSecretArn"}, {"Ref": "AWS::NoValue"}]}
    assert set(env) == COMMON_ENV | {variable} | extra
    assert env[variable] == {"Ref": parameter}
    assert default(cfn, env[variable]) == ""  # optional: the handler then does without
    # Neither may read the source database's secret.
    assert "DatabaseSecret" not in set(refs(env))


@pytest.mark.parametrize("function", ["BackupFunction", "CaptureFunction"])
def test_the_point_in_time_window_reaches_backup_and_capture(cfn: dict[str, Any],
                                                             function: str) -> None:
    env = cfn["Resources"][function]["Properties"]["Environment"]["Variables"]
    assert env["SUPABACKUP_KEEP_DAYS"] == {"Ref": "PointInTimeDays"}
    param = cfn["Parameters"]["PointInTimeDays"]
    assert param["Default"] == "7"
    assert param["AllowedValues"] == ["1", "3", "7", "14", "21", "28", "30", "35"]
    # Verify and restore do not keep anything: they do not get it.
    for other in ("VerifyFunction", "RestoreFunction"):
        variables = cfn["Resources"][other]["Properties"]["Environment"]["Variables"]
        assert "SUPABACKUP_KEEP_DAYS" not in variables


def test_database_parameters_reach_only_the_secret(cfn: dict[str, Any]) -> None:
    """The password (and the rest of the connection) never lands in plain configuration."""
    secret_params = {"DatabaseHost", "DatabasePort", "DatabaseUser", "DatabasePassword",
                     "DatabaseName"}
    for name, resource in cfn["Resources"].items():
        if name != "DatabaseSecret":
            assert not secret_params & set(refs(resource)), name
    assert not secret_params & set(refs(cfn["Outputs"]))


def test_the_created_secret_is_what_the_handler_reads(cfn: dict[str, Any]) -> None:
    secret = cfn["Resources"]["DatabaseSecret"]
    assert secret["Condition"] == "CreateDatabaseSecret"
    [left, right] = cfn["Conditions"]["CreateDatabaseSecret"]["Fn::Equals"]
    assert {json.dumps(left), json.dumps(right)} == {'""', '{"Ref": "DatabaseSecretArn"}'}
    assert secret["Properties"]["KmsKeyId"] == KEY
    text = secret["Properties"]["SecretString"]["Fn::Sub"]
    values = {"DatabaseHost": "db.abcdefghijklmnop.supabase.co", "DatabasePort": "5432",
              "DatabaseUser": "postgres", "DatabasePassword": "s3cr3t pass'word",
              "DatabaseName": "postgres"}
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    info = ConnectionInfo.from_secret(text)
    assert (info.host, info.port, info.user, info.password, info.dbname) == (
        "db.abcdefghijklmnop.supabase.co", 5432, "postgres", "s3cr3t pass'word", "postgres")
    # A quote or backslash would break the JSON: the parameters refuse them.
    for name in ("DatabaseHost", "DatabaseUser", "DatabasePassword", "DatabaseName"):
        assert cfn["Parameters"][name]["AllowedPattern"] == '^[^"\\\\]*$'
    # Either an existing secret or a host and password: a rule refuses neither.
    assert "DatabaseConnectionGiven" in cfn["Rules"]


# ------------------------------------------------------------------ the bucket


def test_the_bucket_is_private_versioned_and_encrypted(cfn: dict[str, Any]) -> None:
    bucket = cfn["Resources"]["BackupBucket"]
    assert bucket["Type"] == "AWS::S3::Bucket"
    assert bucket["DeletionPolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True,
        "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    [sse] = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KEY}
    assert sse["BucketKeyEnabled"] is True
    assert cfn["Resources"]["BackupKey"]["Type"] == "AWS::KMS::Key"
    assert cfn["Resources"]["BackupKey"]["DeletionPolicy"] == "Retain"


def test_lifecycle_rules_per_retention_tag(cfn: dict[str, Any]) -> None:
    rules = cfn["Resources"]["BackupBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert all(rule["Status"] == "Enabled" for rule in rules)
    by_tag: dict[str, dict[str, Any]] = {}
    for rule in rules:
        for tag in rule.get("TagFilters", []):
            assert tag["Key"] == "retention"
            by_tag[tag["Value"]] = rule
    # Every retention class the engine writes has a rule, except pinned: never expires;
    # and change capture's own (below).
    capture = by_tag.pop(CAPTURE_TAGS["retention"])
    assert set(by_tag) == set(RETENTION_CLASSES) - {"pinned"}
    assert capture_expiration_days(cfn, capture) == 7 + 2  # PointInTimeDays' default
    assert "Transitions" not in capture
    days = {tag: default(cfn, rule["ExpirationInDays"]) for tag, rule in by_tag.items()}
    assert days == {"daily": 14, "weekly": 35, "monthly": 365}
    [transition] = by_tag["monthly"]["Transitions"]
    assert transition["StorageClass"] == "GLACIER_IR"
    assert default(cfn, transition["TransitionInDays"]) == 30
    assert "Transitions" not in by_tag["daily"] and "Transitions" not in by_tag["weekly"]
    # Every period is a parameter.
    periods = [rule["ExpirationInDays"] for rule in by_tag.values()] + [
        transition["TransitionInDays"]]
    untagged = [rule for rule in rules if not rule.get("TagFilters")]
    assert len(untagged) == 1
    cleanup = untagged[0]
    assert "ExpirationInDays" not in cleanup  # untagged objects are never expired
    assert cleanup["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    noncurrent = cleanup["NoncurrentVersionExpiration"]["NoncurrentDays"]
    assert default(cfn, noncurrent) == 7
    for period in [*periods, noncurrent]:
        assert set(period) == {"Ref"} and period["Ref"] in cfn["Parameters"]


def capture_expiration_days(cfn: dict[str, Any], rule: dict[str, Any],
                            point_in_time_days: str | None = None) -> int:
    """The days a rule's ExpirationInDays comes to: its Fn::FindInMap, keyed by
    PointInTimeDays (its default unless given), looked up in the template's Mappings."""
    name, key, attribute = rule["ExpirationInDays"]["Fn::FindInMap"]
    assert key == {"Ref": "PointInTimeDays"}
    value = default(cfn, key) if point_in_time_days is None else point_in_time_days
    days = cfn["Mappings"][name][str(value)][attribute]
    assert isinstance(days, int)
    return days


def capture_rule(cfn: dict[str, Any]) -> dict[str, Any]:
    rules = cfn["Resources"]["BackupBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    [rule] = [r for r in rules if {"Key": "retention", "Value": CAPTURE_TAGS["retention"]}
              in r.get("TagFilters", [])]
    return rule


@pytest.mark.parametrize("point_in_time_days", ["1", "7", "30", "35"])
def test_captured_changes_expire_two_days_after_the_point_in_time_window(
        point_in_time_days: str) -> None:
    """S3 keeps capture's segments and index entries (tag retention=capture) for
    PointInTimeDays + 2 days: a mapping, as CloudFormation cannot add."""
    cfn = translate({"PointInTimeDays": point_in_time_days})
    rule = capture_rule(cfn)
    assert rule["Status"] == "Enabled" and rule["TagFilters"] == [
        {"Key": "retention", "Value": "capture"}]
    assert capture_expiration_days(cfn, rule, point_in_time_days) == int(point_in_time_days) + 2


def test_the_capture_expiration_mapping_covers_every_allowed_window(cfn: dict[str, Any]) -> None:
    rule = capture_rule(cfn)
    name, _, attribute = rule["ExpirationInDays"]["Fn::FindInMap"]
    allowed = cfn["Parameters"]["PointInTimeDays"]["AllowedValues"]
    assert set(cfn["Mappings"][name]) == set(allowed)
    for value in allowed:
        assert cfn["Mappings"][name][value] == {attribute: int(value) + 2}


def test_the_bucket_policy_denies_insecure_transport(cfn: dict[str, Any]) -> None:
    _, policy = one(cfn, "AWS::S3::BucketPolicy")
    assert policy["Properties"]["Bucket"] == {"Ref": "BackupBucket"}
    denials = [s for s in as_list(policy["Properties"]["PolicyDocument"]["Statement"])
               if s["Effect"] == "Deny"
               and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    assert len(denials) == 1
    [deny] = denials
    assert deny["Principal"] == "*"
    assert deny["Action"] in ("s3:*", ["s3:*"])
    assert {"Fn::GetAtt": ["BackupBucket", "Arn"]} in deny["Resource"]
    assert {"Fn::Sub": "${BackupBucket.Arn}/*"} in deny["Resource"]


# ------------------------------------------------------------------ IAM and KMS


def test_the_function_role_is_least_privilege(cfn: dict[str, Any]) -> None:
    statements = function_statements(cfn)
    actions: set[str] = set()
    for statement in statements:
        assert statement["Effect"] == "Allow"
        acts = as_list(statement["Action"])
        actions.update(acts)
        assert not any(a.endswith("*") for a in acts), statement
        if any(a.startswith(SCOPED_SERVICES) for a in acts):
            for resource in as_list(statement["Resource"]):
                assert resource != "*", statement
                if isinstance(resource, str):
                    assert "*" not in resource, statement
    # What the engine needs, and no more (no s3:PutBucket*, no secretsmanager:List*, ...).
    assert actions == {
        "logs:CreateLogStream", "logs:PutLogEvents", "sqs:SendMessage",
        "s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:GetObjectTagging",
        "s3:PutObjectTagging",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
        "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetLifecycleConfiguration",
        "secretsmanager:GetSecretValue", "kms:Decrypt", "kms:GenerateDataKey", "sns:Publish"}

    def resource_of(action: str) -> Any:
        [found] = [s for s in statements if action in as_list(s["Action"])]
        return found

    objects = resource_of("s3:PutObject")
    assert objects["Resource"] == {"Fn::Sub": "${BackupBucket.Arn}/${BackupPrefix}/*"}
    listing = resource_of("s3:ListBucket")
    assert listing["Resource"] == {"Fn::GetAtt": ["BackupBucket", "Arn"]}
    prefixes = next(iter(listing["Condition"].values()))["s3:prefix"]
    assert {"Fn::Sub": "${BackupPrefix}/*"} in prefixes
    assert resource_of("s3:ListBucketMultipartUploads")["Resource"] == {
        "Fn::GetAtt": ["BackupBucket", "Arn"]}
    assert resource_of("s3:GetLifecycleConfiguration")["Resource"] == {
        "Fn::GetAtt": ["BackupBucket", "Arn"]}
    secrets = [s["Resource"] for s in statements
               if "secretsmanager:GetSecretValue" in as_list(s["Action"])]
    assert secrets == [
        {"Fn::If": ["CreateDatabaseSecret", {"Ref": "DatabaseSecret"},
                    {"Ref": "DatabaseSecretArn"}]},
        {"Ref": "StorageSecretArn"}]  # Storage's S3 keys, only when that secret is given
    assert resource_of("kms:Decrypt")["Resource"] == KEY
    assert resource_of("sns:Publish")["Resource"] == {"Ref": "NotificationTopic"}

    role = cfn["Resources"]["BackupFunctionRole"]["Properties"]
    xray, eni = role["ManagedPolicyArns"]
    assert xray["Fn::Sub"] == "arn:${AWS::Partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"
    # ENI management only in a VPC, where Lambda needs it to attach the function.
    assert eni["Fn::If"][0] == "InVpc" and eni["Fn::If"][2] == {"Ref": "AWS::NoValue"}


@pytest.mark.parametrize("function, secret", [("VerifyFunction", "DrillSecretArn"),
                                              ("RestoreFunction", "RestoreTargetSecretArn")])
def test_verify_and_restore_roles_only_read_but_verify_records_its_result(cfn: dict[str, Any], function: str,
                                            secret: str) -> None:
    statements = function_statements(cfn, function)
    actions = {a for s in statements for a in as_list(s["Action"])}
    writes = [s for s in statements if {"s3:PutObject", "s3:DeleteObject", "s3:PutObjectTagging",
                                        "s3:PutObjectAcl"} & set(as_list(s["Action"]))]
    if function == "VerifyFunction":
        # Verify writes the record of its own result, tagged, and nothing else: exactly
        # <prefix>/*/checks/*, never a backup, a capture segment, a lock or a file.
        [write] = writes
        assert sorted(as_list(write["Action"])) == ["s3:PutObject", "s3:PutObjectTagging"]
        assert write["Resource"] == {"Fn::Sub": "${BackupBucket.Arn}/${BackupPrefix}/*/checks/*"}
        assert "Condition" not in write
        # (IAM's * matches across "/", as fnmatch's does; the bucket's ARN, resolved here as
        # arn:BackupBucket, is followed by the key)
        granted = resolve(cfn, write["Resource"], {})
        store = Store(StoreURL.parse(f"s3://bucket/{default(cfn, {'Ref': 'BackupPrefix'})}"),
                      None)
        assert fnmatch.fnmatchcase("arn:BackupBucket/" + store.key(
            "db", "checks", "20261129T050000Z.json"), granted)
        for key in [store.backup_key("db", "20261129T030000Z-full", "manifest.json"),
                    store.backup_key("db", "20261129T030000Z-full", "tables/16384.0.copy.zst"),
                    store.key("db", "locks", "backup.json"), store.key("db", "cdc", "state.json"),
                    store.key("db", "files", "ab", "ab" * 32), store.key("checks", "x.json"),
                    "elsewhere/db/checks/x.json"]:
            assert not fnmatch.fnmatchcase(f"arn:BackupBucket/{key}", granted), key
        # the bucket's SSE-KMS key: the write needs a data key, through S3 only
        [key_use] = [s for s in statements if "kms:GenerateDataKey" in as_list(s["Action"])]
        assert key_use["Resource"] == KEY
        assert {"Fn::Sub": "s3.${AWS::Region}.amazonaws.com"} in key_use["Condition"][
            "StringEquals"]["kms:ViaService"]
    else:
        assert writes == []  # restore only reads the store
    assert actions <= {"logs:CreateLogStream", "logs:PutLogEvents", "sqs:SendMessage",
                       "s3:GetObject", "s3:ListBucket", "secretsmanager:GetSecretValue",
                       "kms:Decrypt", "kms:GenerateDataKey", "sns:Publish"} | (
        {"s3:PutObject", "s3:PutObjectTagging"} if function == "VerifyFunction" else set())
    reads = [s["Resource"] for s in statements
             if "secretsmanager:GetSecretValue" in as_list(s["Action"])]
    # the restore also reads the target project's Storage keys, when given
    assert reads == [{"Ref": secret}] + ([{"Ref": "TargetStorageSecretArn"}]
                                         if function == "RestoreFunction" else [])
    [get] = [s for s in statements if "s3:GetObject" in as_list(s["Action"])]
    assert get["Resource"] == {"Fn::Sub": "${BackupBucket.Arn}/${BackupPrefix}/*"}
    for statement in statements:
        for resource in as_list(statement["Resource"]):
            assert resource != "*", statement
    # The secret statement exists only when the parameter is given.
    policy = next(r for r in cfn["Resources"].values() if r["Type"] == "AWS::IAM::Policy"
                  and {"Ref": f"{function}Role"} in r["Properties"]["Roles"])
    conditional = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
                   if "Fn::If" in s]
    assert conditional and all(c["Fn::If"][2] == {"Ref": "AWS::NoValue"} for c in conditional)


def test_the_key_policy(cfn: dict[str, Any]) -> None:
    key = cfn["Resources"]["BackupKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    statements = key["KeyPolicy"]["Statement"]
    root = [s for s in statements if s["Principal"] == {
        "AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}}]
    assert [s["Action"] for s in root] == ["kms:*"]
    [roles] = [s for s in statements if "AWS" in s["Principal"]
               and isinstance(s["Principal"]["AWS"], list)]
    assert roles["Principal"]["AWS"] == [
        *({"Fn::GetAtt": [f"{f}Role", "Arn"]} for f in FUNCTIONS),
        {"Fn::If": ["HasCapture", {"Fn::GetAtt": ["CaptureFunctionRole", "Arn"]},
                    {"Ref": "AWS::NoValue"}]},
        # past one Lambda run: the plan, the Fargate task, the state machine's report
        *({"Fn::GetAtt": [r, "Arn"]} for r in ("PlanFunctionRole", "TaskRole",
                                               "RunStateMachineRole"))]
    assert set(roles["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey"}
    # Alarms publish to the encrypted topic.
    assert any(s["Principal"] == {"Service": "cloudwatch.amazonaws.com"} for s in statements)
    topic = cfn["Resources"]["NotificationTopic"]["Properties"]
    assert topic["KmsMasterKeyId"] == KEY


def test_a_key_of_the_users_replaces_the_stacks() -> None:
    mine = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    cfn = translate({"KmsKeyArn": mine})
    assert cfn["Resources"]["BackupKey"]["Condition"] == "CreateKey"
    assert cfn["Resources"]["BackupKeyAlias"]["Condition"] == "CreateKey"
    assert cfn["Conditions"]["CreateKey"] == {"Fn::Equals": [{"Ref": "KmsKeyArn"}, ""]}
    # Every use of the key goes through the same choice.
    assert json.dumps(cfn).count(json.dumps(KEY)) >= 7
    assert '"Fn::GetAtt": ["BackupKey", "Arn"]' not in json.dumps(cfn).replace(json.dumps(KEY), "")


def test_object_lock_is_a_parameter() -> None:
    cfn = translate({"ObjectLockMode": "COMPLIANCE", "ObjectLockDays": 10})
    bucket = cfn["Resources"]["BackupBucket"]["Properties"]
    assert bucket["ObjectLockEnabled"] == {"Fn::If": ["HasObjectLock", True,
                                                      {"Ref": "AWS::NoValue"}]}
    condition, config, off = bucket["ObjectLockConfiguration"]["Fn::If"]
    assert condition == "HasObjectLock" and off == {"Ref": "AWS::NoValue"}
    assert config == {"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {
        "Mode": {"Ref": "ObjectLockMode"}, "Days": {"Ref": "ObjectLockDays"}}}}
    params = cfn["Parameters"]
    assert params["ObjectLockMode"]["Default"] == "NONE"
    assert set(params["ObjectLockMode"]["AllowedValues"]) == {"NONE", "GOVERNANCE", "COMPLIANCE"}


def test_the_email_subscription_is_optional(cfn: dict[str, Any]) -> None:
    _, subscription = one(cfn, "AWS::SNS::Subscription")
    assert subscription["Condition"] == "HasNotificationEmail"
    assert subscription["Properties"]["Protocol"] == "email"
    assert cfn["Parameters"]["NotificationEmail"]["Default"] == ""
    condition = json.dumps(cfn["Conditions"]["HasNotificationEmail"])
    assert "Fn::Not" in condition and '"Ref": "NotificationEmail"' in condition


# ------------------------------------------------------------------ alarms


def alarm_metrics(alarm: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The metrics an alarm sums (MetricStat entries) and its expression."""
    stats = [m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m]
    [expression] = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    return stats, expression["Expression"]


@pytest.mark.parametrize("alarm_id, metric", [("FunctionErrorsAlarm", "Errors"),
                                              ("FunctionThrottlesAlarm", "Throttles")])
def test_errors_and_throttles_of_every_function_alarm(cfn: dict[str, Any], alarm_id: str,
                                                      metric: str) -> None:
    alarm = cfn["Resources"][alarm_id]["Properties"]
    stats, expression = alarm_metrics(alarm)
    assert expression == "SUM(METRICS())"
    assert [(s["Metric"]["Namespace"], s["Metric"]["MetricName"], s["Stat"]) for s in stats] == [
        ("AWS/Lambda", metric, "Sum")] * 3
    assert [s["Metric"]["Dimensions"] for s in stats] == [
        [{"Name": "FunctionName", "Value": {"Ref": f}}] for f in FUNCTIONS]
    assert alarm["Threshold"] == 1
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


def test_the_missed_backup_alarm_watches_what_the_handler_emits(cfn: dict[str, Any]) -> None:
    alarm = cfn["Resources"]["MissedBackupAlarm"]["Properties"]
    stats, expression = alarm_metrics(alarm)
    assert expression == "SUM(METRICS())"  # a full or an incremental: either counts
    env = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    watched = set()
    for kind in ("full", "incremental"):
        # What Powertools writes for a committed backup (the handler's own setup).
        metrics = EphemeralMetrics(namespace="supabackup", service="supabackup")
        metrics.add_dimension(name="kind", value=kind)
        metrics.add_metric(name="BackupSucceeded", unit=MetricUnit.Count, value=1)
        emf: dict[str, Any] = dict(metrics.serialize_metric_set())
        [directive] = emf["_aws"]["CloudWatchMetrics"]
        [dimension_set] = directive["Dimensions"]
        [stat] = [s for s in stats if {"Name": "kind", "Value": kind}
                  in s["Metric"]["Dimensions"]]
        assert stat["Metric"]["Namespace"] == directive["Namespace"]
        assert stat["Metric"]["Namespace"] == env["POWERTOOLS_METRICS_NAMESPACE"]
        assert stat["Metric"]["MetricName"] in [m["Name"] for m in directive["Metrics"]]
        assert {d["Name"]: d["Value"] for d in stat["Metric"]["Dimensions"]} == {
            name: emf[name] for name in dimension_set}
        assert (stat["Period"], stat["Stat"]) == (3600, "Sum")
        watched.add(kind)
    assert watched == {"full", "incremental"} and len(stats) == 2

    # Hourly periods, all of the last MissedBackupHours (26) without a success: alarm.
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["ComparisonOperator"] == "LessThanThreshold" and alarm["Threshold"] == 1
    hours = default(cfn, alarm["EvaluationPeriods"])
    assert hours == 26 and default(cfn, alarm["DatapointsToAlarm"]) == hours
    assert cfn["Parameters"]["MissedBackupHours"]["MaxValue"] * 3600 <= 7 * 86400
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


def capture_emf(metric: str, unit: MetricUnit) -> tuple[dict[str, Any], dict[str, Any]]:
    """What Powertools writes for one of the capture handler's metrics, as the handler sets
    it up (Invocation("capture", ...): dimension kind=capture): (the EMF, its directive)."""
    metrics = EphemeralMetrics(namespace="supabackup", service="supabackup")
    metrics.add_dimension(name="kind", value="capture")
    metrics.add_metric(name=metric, unit=unit, value=1)
    emf: dict[str, Any] = dict(metrics.serialize_metric_set())
    [directive] = emf["_aws"]["CloudWatchMetrics"]
    return emf, directive


CAPTURE_METRIC_ALARMS = {  # alarm: (the metric the handler emits, its unit)
    "RetainedWalAlarm": ("RetainedWalBytes", MetricUnit.Bytes),
    "SafeWalAlarm": ("SafeWalSize", MetricUnit.Bytes),
    "CaptureSlotLostAlarm": ("CaptureSlotLost", MetricUnit.Count),
}


def handler_metric_names() -> set[str]:
    """Every metric name handlers/capture.py passes to add_metric (its source, read)."""
    source = (REPO / "functions" / "supabackup" / "handlers" / "capture.py").read_text()
    return set(re.findall(r'add_metric\(name="(\w+)"', source))


@pytest.mark.parametrize("alarm_id", sorted(CAPTURE_METRIC_ALARMS))
def test_the_capture_alarms_watch_what_its_handler_emits(cfn: dict[str, Any],
                                                         alarm_id: str) -> None:
    resource = cfn["Resources"][alarm_id]
    assert resource["Condition"] == "HasCapture"
    alarm = resource["Properties"]
    name, unit = CAPTURE_METRIC_ALARMS[alarm_id]
    assert name in handler_metric_names()
    emf, directive = capture_emf(name, unit)
    assert (alarm["Namespace"], alarm["MetricName"]) == (directive["Namespace"], name)
    assert [m["Name"] for m in directive["Metrics"]] == [name]
    env = cfn["Resources"]["CaptureFunction"]["Properties"]["Environment"]["Variables"]
    assert alarm["Namespace"] == env["POWERTOOLS_METRICS_NAMESPACE"]
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        dimension: emf[dimension] for dimension in directive["Dimensions"][0]}
    # One reading per run, every 5 minutes: a 5-minute period may fall between two runs, so
    # the alarm looks at two periods and one reading alarms.
    assert alarm["Period"] == 300
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (2, 1)
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


def test_the_capture_alarm_thresholds(cfn: dict[str, Any]) -> None:
    params = cfn["Parameters"]
    retained = cfn["Resources"]["RetainedWalAlarm"]["Properties"]
    assert retained["Threshold"] == {"Ref": "RetainedWalAlarmBytes"}
    assert (retained["Statistic"], retained["ComparisonOperator"]) == (
        "Maximum", "GreaterThanThreshold")
    # Too little room left before max_slot_wal_keep_size invalidates the slot: the lowest
    # reading counts. A server without the cap emits no SafeWalSize: missing is not breaching.
    safe = cfn["Resources"]["SafeWalAlarm"]["Properties"]
    assert safe["Threshold"] == {"Ref": "SafeWalAlarmBytes"}
    assert default(cfn, safe["Threshold"]) == 128 << 20
    assert (safe["Statistic"], safe["ComparisonOperator"]) == ("Minimum", "LessThanThreshold")
    # Well under Supabase's max_slot_wal_keep_size (512 MB), or it would always fire.
    assert params["SafeWalAlarmBytes"]["Default"] < 512 * 10**6
    lost = cfn["Resources"]["CaptureSlotLostAlarm"]["Properties"]
    assert (lost["Statistic"], lost["Threshold"], lost["ComparisonOperator"]) == (
        "Sum", 1, "GreaterThanOrEqualToThreshold")


def test_the_capture_errors_alarm_fires_on_the_first_failed_run(cfn: dict[str, Any]) -> None:
    errors = cfn["Resources"]["CaptureErrorsAlarm"]
    assert errors["Condition"] == "HasCapture"
    alarm = errors["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == (
        "AWS/Lambda", "Errors", "Sum")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "CaptureFunction"}}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1, "GreaterThanOrEqualToThreshold")
    assert alarm["DatapointsToAlarm"] == 1  # one failed run
    # Lambda stamps Errors with the invocation's start and sends it at its end: the range
    # evaluated must reach back past the longest run (the timeout) and one period more.
    timeout = cfn["Resources"]["CaptureFunction"]["Properties"]["Timeout"]
    assert alarm["Period"] * alarm["EvaluationPeriods"] >= timeout + alarm["Period"]
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]
    # the capture function is made only with a direct connection's secret
    assert cfn["Resources"]["CaptureFunction"]["Condition"] == "HasCapture"
    assert cfn["Parameters"]["CaptureSecretArn"]["Default"] == ""


# ------------------------------------------------------------------ dashboard

STACK = "supabackup"


def evaluate(cfn: dict[str, Any], name: str, parameters: dict[str, Any]) -> bool:
    """A condition of the template, for these parameter values (defaults for the rest)."""
    def value(node: Any) -> Any:
        if isinstance(node, dict):
            [(fn, arg)] = node.items()
            if fn == "Ref":
                return parameters.get(arg, cfn["Parameters"][arg].get("Default"))
            if fn == "Fn::Join":
                return arg[0].join(as_list(value(arg[1])))
            if fn == "Fn::Equals":
                return value(arg[0]) == value(arg[1])
            if fn == "Fn::Not":
                return not value(arg[0])
            if fn == "Condition":
                return evaluate(cfn, arg, parameters)
            raise AssertionError(f"no evaluation of {fn} here")
        return node
    return bool(value(cfn["Conditions"][name]))


def resolve(cfn: dict[str, Any], node: Any, parameters: dict[str, Any]) -> Any:
    """A value of the template as CloudFormation would make it, with test names for what
    only a deployment knows: a resource's Ref is "ref:<id>", its ARN "arn:<id>"."""
    def name(text: str) -> str:
        if text == "AWS::Region":
            return REGION
        if text == "AWS::StackName":
            return STACK
        if text in cfn["Parameters"]:
            return str(parameters.get(text, cfn["Parameters"][text].get("Default")))
        resource, _, attribute = text.partition(".")
        assert resource in cfn["Resources"], f"${{{text}}} names nothing in the template"
        condition = cfn["Resources"][resource].get("Condition")
        assert condition is None or evaluate(cfn, condition, parameters), (
            f"{text} is used where its resource ({condition}) is not deployed")
        return f"arn:{resource}" if attribute == "Arn" else f"ref:{resource}"

    if isinstance(node, list):
        return [resolve(cfn, item, parameters) for item in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"Ref"}:
        return name(node["Ref"])
    if set(node) == {"Fn::GetAtt"}:
        return name(".".join(node["Fn::GetAtt"]))
    if set(node) == {"Fn::If"}:
        condition, yes, no = node["Fn::If"]
        return resolve(cfn, yes if evaluate(cfn, condition, parameters) else no, parameters)
    if set(node) == {"Fn::Sub"}:
        text, variables = (node["Fn::Sub"], {}) if isinstance(node["Fn::Sub"], str) \
            else node["Fn::Sub"]
        values = {k: resolve(cfn, v, parameters) for k, v in variables.items()}
        return re.sub(r"\$\{([^}!]+)\}",
                      lambda m: str(values[m.group(1)]) if m.group(1) in values
                      else name(m.group(1)), text)
    return {k: resolve(cfn, v, parameters) for k, v in node.items()}


WITH_CAPTURE = {"CaptureSecretArn": CAPTURE_SECRET}


@pytest.fixture(scope="module")
def cfn_with_capture() -> dict[str, Any]:
    return translate(WITH_CAPTURE)


@pytest.fixture(params=[False, True], ids=["without-capture", "with-capture"])
def stack(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The translated template and its parameters: without change capture (the default),
    and with it."""
    if request.param:
        return request.getfixturevalue("cfn_with_capture"), WITH_CAPTURE
    return request.getfixturevalue("cfn"), {}


def dashboard_body(cfn: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    [(_, dashboard)] = of_type(cfn, "AWS::CloudWatch::Dashboard").items()
    body = resolve(cfn, dashboard["Properties"]["DashboardBody"], parameters)
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def widget_metrics(body: dict[str, Any]) -> list[tuple[str, str, dict[str, str],
                                                        dict[str, Any]]]:
    """Every metric of every metric widget: (namespace, name, dimensions, options), each
    row written out whole (no "." shorthand, no expression)."""
    found = []
    for widget in body["widgets"]:
        if widget["type"] != "metric":
            continue
        for row in widget["properties"]["metrics"]:
            options = row[-1] if isinstance(row[-1], dict) else {}
            fields = row[:-1] if options else row
            assert "expression" not in options and "." not in fields, row
            namespace, metric, *pairs = fields
            assert len(pairs) % 2 == 0, row
            found.append((namespace, metric, dict(zip(pairs[::2], pairs[1::2], strict=True)),
                          options))
    return found


# The kinds each handler's Invocation gives its metrics (dimension kind): a backup's
# kind; the plan's, a backup's kind or restore; the Fargate task's refusal, its operation.
HANDLER_KINDS: dict[str, tuple[str, ...]] = {
    "backup": BACKUP_KINDS, "verify": ("verify",), "restore": ("restore",),
    "capture": ("capture",), "plan": (*BACKUP_KINDS, "restore"),
    "task": (*TASK_HANDLERS, "task")}


def handler_emits(module: str) -> set[str]:
    """Every metric name a handler can emit, read from its source and common.py's: its
    add_metric names, its Invocation's {metric}{outcome} counts, and NotifyFailed."""
    handlers = REPO / "functions" / "supabackup" / "handlers"
    source, common_source = (handlers / f"{module}.py").read_text(), (
        handlers / "common.py").read_text()
    outcomes = set(re.findall(r'count\("(\w+)"\)', common_source))
    assert outcomes == {"Failed", "Succeeded"}
    [metric] = set(re.findall(r'Invocation\([^;]*?, "(\w+)"\)', source))
    return ({f"{metric}{o}" for o in outcomes} | set(re.findall(r'add_metric\(name="(\w+)"',
                                                               source))
            | set(re.findall(r'add_metric\(name="(\w+)"', common_source)))


def emitted(cfn: dict[str, Any], parameters: dict[str, Any]
            ) -> dict[tuple[str, str, frozenset[tuple[str, str]]], str]:
    """What the deployed handlers emit, as Powertools serializes it for each one's own
    setup (common.metrics' namespace and service, the dimension kind): (namespace, name,
    dimensions) -> the handler module."""
    from supabackup.handlers import common
    runs_in = {"task": "TaskDefinition"}  # the Fargate task runs the task handler
    for resource_id, resource in of_type(cfn, "AWS::Lambda::Function").items():
        runs_in[resource["Properties"]["Handler"].split(".")[-2]] = resource_id
    assert set(runs_in) == set(HANDLER_KINDS)
    found = {}
    for module, kinds in HANDLER_KINDS.items():
        resource = cfn["Resources"][runs_in[module]]
        if resource.get("Condition") and not evaluate(cfn, resource["Condition"], parameters):
            continue  # not deployed
        if module == "task":
            [container] = resource["Properties"]["ContainerDefinitions"]
            env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
        else:
            env = resource["Properties"]["Environment"]["Variables"]
        for kind in kinds:
            for name in handler_emits(module):
                metrics = EphemeralMetrics(namespace=common.metrics.namespace,
                                           service=common.metrics.service)
                metrics.add_dimension(name="kind", value=kind)
                metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
                emf: dict[str, Any] = dict(metrics.serialize_metric_set())
                [directive] = emf["_aws"]["CloudWatchMetrics"]
                assert directive["Namespace"] == env["POWERTOOLS_METRICS_NAMESPACE"]
                [dimension_set] = directive["Dimensions"]
                found[(directive["Namespace"], name,
                       frozenset((d, emf[d]) for d in dimension_set))] = module
    return found


def deployed(cfn: dict[str, Any], parameters: dict[str, Any], type_: str) -> set[str]:
    return {rid for rid, r in of_type(cfn, type_).items()
            if not r.get("Condition") or evaluate(cfn, r["Condition"], parameters)}


def test_the_dashboards_metrics_are_the_ones_the_functions_emit(
        stack: tuple[dict[str, Any], dict[str, Any]]) -> None:
    cfn, parameters = stack
    body = dashboard_body(cfn, parameters)
    handlers = emitted(cfn, parameters)
    functions = {f"ref:{f}" for f in deployed(cfn, parameters, "AWS::Lambda::Function")}
    machines = {f"ref:{m}" for m in deployed(cfn, parameters,
                                               "AWS::StepFunctions::StateMachine")}
    shown = widget_metrics(body)
    assert len(shown) > 20
    for namespace, name, dimensions, _ in shown:
        if namespace == "AWS/Lambda":
            assert name == "Errors" and set(dimensions) == {"FunctionName"}
            assert dimensions["FunctionName"] in functions
        elif namespace == "AWS/States":
            assert name in {"ExecutionsFailed", "ExecutionsTimedOut", "ExecutionsAborted"}
            assert set(dimensions) == {"StateMachineArn"}
            assert dimensions["StateMachineArn"] in machines
        else:
            key = (namespace, name, frozenset(dimensions.items()))
            assert key in handlers, f"no deployed handler emits {key}"
    # every widget reads this stack's region
    assert {w["properties"]["region"] for w in body["widgets"] if w["type"] == "metric"} == {
        REGION}


def test_the_dashboard_shows_every_failure_a_function_counts_and_every_lambda_error(
        stack: tuple[dict[str, Any], dict[str, Any]]) -> None:
    cfn, parameters = stack
    shown = widget_metrics(dashboard_body(cfn, parameters))
    failed = {(name, dims["kind"]) for ns, name, dims, _ in shown if name.endswith("Failed")
              and ns != "AWS/States"}
    counted = {(name, dict(dims)["kind"]) for (_, name, dims) in emitted(cfn, parameters)
               if name.endswith("Failed") and name != "NotifyFailed"}
    assert failed == counted
    capture = "CaptureSecretArn" in parameters
    assert {name for name, _ in failed} == {"BackupFailed", "VerifyFailed", "RestoreFailed",
                                            "PlanFailed", "TaskFailed"} | (
        {"CaptureFailed"} if capture else set())
    errors = {dims["FunctionName"] for ns, name, dims, _ in shown if ns == "AWS/Lambda"}
    assert errors == {f"ref:{f}" for f in deployed(cfn, parameters, "AWS::Lambda::Function")}
    assert ("ref:CaptureFunction" in errors) == capture
    runs = {name for ns, name, _, _ in shown if ns == "AWS/States"}
    assert runs == {"ExecutionsFailed", "ExecutionsTimedOut", "ExecutionsAborted"}


def test_the_dashboards_alarm_widgets_hold_every_alarm_of_the_stack(
        stack: tuple[dict[str, Any], dict[str, Any]]) -> None:
    cfn, parameters = stack
    body = dashboard_body(cfn, parameters)
    widgets = [w["properties"] for w in body["widgets"] if w["type"] == "alarm"]
    listed = [a for w in widgets for a in w["alarms"]]
    alarms = deployed(cfn, parameters, "AWS::CloudWatch::Alarm")
    assert sorted(listed) == sorted(f"arn:{a}" for a in alarms)
    capture_alarms = {"CaptureErrorsAlarm", "RetainedWalAlarm", "SafeWalAlarm",
                      "CaptureSlotLostAlarm"}
    assert alarms & capture_alarms == (capture_alarms if "CaptureSecretArn" in parameters
                                       else set())
    # the dead man's switch first, on its own: no backup for hours, or a run that failed
    assert widgets[0]["alarms"] == ["arn:MissedBackupAlarm", "arn:RunFailedAlarm"]
    assert widgets[0]["title"].startswith("Dead man's switch")
    assert body["widgets"][0]["type"] == "alarm"


def test_the_dashboard_shows_each_backup_kind_and_the_last_drill(cfn: dict[str, Any]) -> None:
    body = dashboard_body(cfn, {})
    by_title = {w["properties"].get("title"): w for w in body["widgets"]}
    for title, name in [("Backup duration (seconds)", "BackupDuration"),
                        ("Backup size (bytes stored)", "BackupBytes")]:
        props = by_title[title]["properties"]
        assert [(m[1], m[5]) for m in props["metrics"]] == [(name, "full"),
                                                            (name, "incremental")]
        assert props["view"] == "timeSeries" and props["stat"] == "Maximum"
    assert "BackupDuration" in handler_emits("backup") and "BackupBytes" in handler_emits(
        "backup")
    # the drill: the weekly verify's, so the widget looks back further than the dashboard
    [drill] = [w["properties"] for w in body["widgets"]
               if any(m[1] == "DrillPassed" for m in w["properties"].get("metrics", []))]
    assert drill["view"] == "singleValue" and drill["stat"] == "Minimum"  # a failure shows
    assert [m[1:6] for m in drill["metrics"]] == [
        ["DrillPassed", "service", "supabackup", "kind", "verify"]]
    assert "DrillPassed" in handler_emits("verify")
    verify_every = default(cfn, schedules(cfn)["verify"]["ScheduleExpression"])
    assert verify_every.startswith("cron(") and verify_every.endswith(" ? * SUN *)")  # weekly
    assert drill["start"] == "-P35D" and drill["period"] == 86400
    assert body["start"] == "-P14D"  # two weekly fulls and a fortnight of incrementals


def test_the_dashboard_without_capture_says_so_and_with_it_shows_its_lag_and_wal(
        stack: tuple[dict[str, Any], dict[str, Any]]) -> None:
    cfn, parameters = stack
    body = dashboard_body(cfn, parameters)
    capture = [m for m in widget_metrics(body) if m[2].get("kind") == "capture"]
    texts = [w["properties"]["markdown"] for w in body["widgets"] if w["type"] == "text"]
    if "CaptureSecretArn" not in parameters:
        assert capture == []
        [text] = texts
        assert "Change capture is off" in text and "CaptureSecretArn" in text
        return
    assert texts == []
    names = {name for _, name, _, _ in capture}
    assert {"CaptureLagSeconds", "RetainedWalBytes", "SafeWalSize", "CaptureFailed"} <= names
    assert names <= handler_emits("capture")
    # retained WAL against safe_wal_size, on one graph, with the two alarms' thresholds
    [wal] = [w["properties"] for w in body["widgets"] if {"RetainedWalBytes", "SafeWalSize"}
             <= {m[1] for m in w["properties"].get("metrics", [])}]
    stats = {m[1]: m[-1]["stat"] for m in wal["metrics"]}
    assert stats == {"RetainedWalBytes": "Maximum", "SafeWalSize": "Minimum"}
    lines = {a["label"]: a["value"] for a in wal["annotations"]["horizontal"]}
    assert lines == {alarm: default(cfn, cfn["Resources"][alarm]["Properties"]["Threshold"])
                     for alarm in ("RetainedWalAlarm", "SafeWalAlarm")}


def test_the_dashboard_layout_fits_the_grid(stack: tuple[dict[str, Any], dict[str, Any]]
                                            ) -> None:
    cfn, parameters = stack
    cells: set[tuple[int, int]] = set()
    for widget in dashboard_body(cfn, parameters)["widgets"]:
        x, y, width, height = (widget[k] for k in ("x", "y", "width", "height"))
        assert 0 <= x and x + width <= 24 and width > 0 and height > 0
        mine = {(x + i, y + j) for i in range(width) for j in range(height)}
        assert not mine & cells, widget["properties"].get("title")  # no two overlap
        cells |= mine


def test_the_dashboard_url_is_in_the_outputs(cfn: dict[str, Any]) -> None:
    [(dashboard_id, dashboard)] = of_type(cfn, "AWS::CloudWatch::Dashboard").items()
    assert "Condition" not in dashboard
    url = resolve(cfn, cfn["Outputs"]["DashboardUrl"]["Value"], {})
    assert url == (f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
                   f"#dashboards:name=ref:{dashboard_id}")
    # dashboards are one list per account: the stack's name and region keep it its own
    assert resolve(cfn, dashboard["Properties"]["DashboardName"], {}) == (
        f"supabackup-{STACK}-{REGION}")


# ------------------------------------------------------------------ outputs


def test_outputs(cfn: dict[str, Any]) -> None:
    outputs = cfn["Outputs"]
    assert outputs["BucketName"]["Value"] == {"Ref": "BackupBucket"}
    assert outputs["TopicArn"]["Value"] == {"Ref": "NotificationTopic"}
    for function in FUNCTIONS:
        assert outputs[f"{function}Name"]["Value"] == {"Ref": function}
    for output, function, payload in [
            ("ManualBackupCommand", "BackupFunction", "file://events/backup-full-manual.json"),
            ("ManualVerifyCommand", "VerifyFunction", "file://events/verify-manual.json"),
            ("RestorePlanCommand", "RestoreFunction", '\'{"at": "latest", "dry_run": true}\'')]:
        command = outputs[output]["Value"]["Fn::Sub"]
        assert command.startswith("aws lambda invoke ")
        for part in (f"--function-name ${{{function}}}", "--cli-binary-format raw-in-base64-out",
                     f"--payload {payload}", " out.json"):
            assert part in command
        if payload.startswith("file://"):
            assert (REPO / payload.removeprefix("file://")).is_file()
        else:
            parse_restore_event(json.loads(payload.strip("'")))


# ------------------------------------------------------------------ deployment (moto)

# Resource types moto's CloudFormation skips with a warning (the stack still completes):
# their properties are checked above against the translated template instead.
MOTO_SKIPS = {"AWS::S3::BucketPolicy", "AWS::CloudWatch::Alarm", "AWS::Lambda::EventInvokeConfig",
              "AWS::Scheduler::Schedule"}


def test_the_stack_deploys_into_moto() -> None:
    """The translated stack creates in moto's CloudFormation: every Ref, GetAtt and Sub resolves.

    moto has no AWS::SecretsManager::Secret, so the stack uses an existing secret here; the
    created-secret branch is covered by the template tests above.
    """
    # With the drill and restore secrets given: moto cannot deploy a statement list that
    # holds an Fn::If whose false branch is AWS::NoValue (CloudFormation can); that branch
    # is linted and checked on the translated template above.
    parameters = {"DatabaseSecretArn": EXISTING_SECRET, "DrillSecretArn": DRILL_SECRET,
                  "RestoreTargetSecretArn": TARGET_SECRET, "CaptureSecretArn": CAPTURE_SECRET,
                  "StorageSecretArn": TARGET_SECRET + "-storage",
                  "TargetStorageSecretArn": TARGET_SECRET + "-target-storage",
                  "PointInTimeDays": "30"}
    template = translate(parameters)
    # moto skips the alarms, so the dashboard's GetAtt of their ARNs cannot resolve: it
    # and its URL are left out here (their every reference is resolved above, with and
    # without capture, in the dashboard's tests).
    [dashboard] = of_type(template, "AWS::CloudWatch::Dashboard")
    del template["Resources"][dashboard], template["Outputs"]["DashboardUrl"]
    env = {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    # moto's LayerVersion has no physical id: a Ref to it (the Fargate task's role and
    # environment name the layer version) would be the model object, not its ARN.
    from moto.awslambda.models import LayerVersion
    layer_ref = mock.patch.object(LayerVersion, "physical_resource_id",
                                  property(lambda self: self.arn), create=True)
    with mock.patch.dict(os.environ, env), mock_aws(), layer_ref, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="artifacts")
        for key in ("function.zip", "layer.zip"):
            s3.put_object(Bucket="artifacts", Key=key, Body=empty_zip())
        cf = boto3.client("cloudformation", region_name=REGION)
        cf.create_stack(StackName="supabackup", TemplateBody=json.dumps(template),
                        Capabilities=["CAPABILITY_IAM"],
                        Parameters=[{"ParameterKey": k, "ParameterValue": v}
                                    for k, v in parameters.items()])
        stack = cf.describe_stacks(StackName="supabackup")["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}

        bucket = outputs["BucketName"]
        s3.head_bucket(Bucket=bucket)
        [rule] = s3.get_bucket_encryption(Bucket=bucket)[
            "ServerSideEncryptionConfiguration"]["Rules"]
        sse = rule["ApplyServerSideEncryptionByDefault"]
        assert (sse["SSEAlgorithm"], sse["KMSMasterKeyID"]) == ("aws:kms", outputs["KeyArn"])

        for function in FUNCTIONS:
            fn = boto3.client("lambda", region_name=REGION).get_function(
                FunctionName=outputs[f"{function}Name"])
            assert fn["Concurrency"]["ReservedConcurrentExecutions"] == 1
        fn = boto3.client("lambda", region_name=REGION).get_function(
            FunctionName=outputs["BackupFunctionName"])
        variables = fn["Configuration"]["Environment"]["Variables"]
        assert variables["SUPABACKUP_STORE"] == f"s3://{bucket}/backups"
        assert variables["SUPABACKUP_DB_SECRET_ARN"] == EXISTING_SECRET
        assert variables["SUPABACKUP_SNS_TOPIC_ARN"] == outputs["TopicArn"]
        assert variables["SUPABACKUP_KEEP_DAYS"] == "30"
        assert outputs["TopicArn"] in [t["TopicArn"] for t in boto3.client(
            "sns", region_name=REGION).list_topics()["Topics"]]
        lam = boto3.client("lambda", region_name=REGION)
        for function, variable, arn in [("Verify", "SUPABACKUP_DRILL_SECRET_ARN", DRILL_SECRET),
                                        ("Restore", "SUPABACKUP_RESTORE_SECRET_ARN",
                                         TARGET_SECRET),
                                        ("Capture", "SUPABACKUP_CAPTURE_SECRET_ARN",
                                         CAPTURE_SECRET)]:
            config = lam.get_function(FunctionName=outputs[f"{function}FunctionName"])
            variables = config["Configuration"]["Environment"]["Variables"]
            assert variables[variable] == arn
            assert "SUPABACKUP_DB_SECRET_ARN" not in variables
            assert variables.get("SUPABACKUP_KEEP_DAYS") == (
                "30" if function == "Capture" else None)
        assert outputs["ManualBackupCommand"].startswith(
            f"aws lambda invoke --region {REGION} --function-name {outputs['BackupFunctionName']} ")
        # past one Lambda run: the state machine exists, and the Fargate task loads the
        # code of the backup function and the very layer version it runs with
        machine = boto3.client("stepfunctions", region_name=REGION).describe_state_machine(
            stateMachineArn=outputs["StateMachineArn"])
        assert machine["roleArn"].split("/")[-1].startswith("supabackup-RunStateMachineRole")
        ecs = boto3.client("ecs", region_name=REGION)
        [task_arn] = ecs.list_task_definitions()["taskDefinitionArns"]
        [container] = ecs.describe_task_definition(taskDefinition=task_arn)[
            "taskDefinition"]["containerDefinitions"]
        # (moto keeps an Fn::If's AWS::NoValue in a list as None; CloudFormation drops it)
        task_env = {e["name"]: e["value"] for e in container["environment"] if e}
        assert task_env["SUPABACKUP_CODE_FUNCTION"] == outputs["BackupFunctionName"]
        # (moto's functions list no layers: the stack's one layer, as the bootstrap reads it)
        [stack_layer] = lam.list_layers()["Layers"]
        arn, version = task_env["SUPABACKUP_LAYER_ARN"].rsplit(":", 1)
        assert arn == stack_layer["LayerArn"]
        assert lam.get_layer_version(LayerName=arn, VersionNumber=int(version))[
            "LayerVersionArn"] == stack_layer["LatestMatchingVersion"]["LayerVersionArn"]
        assert task_env["SUPABACKUP_RESTORE_SECRET_ARN"] == TARGET_SECRET
        assert task_env["SUPABACKUP_DB_SECRET_ARN"] == EXISTING_SECRET
    # Anything else moto skipped would be deployed untested: name it in MOTO_SKIPS first.
    skipped = {m.group(1) for w in caught
               if (m := re.search(r"Tried to parse (\S+) but it's not supported", str(w.message)))}
    assert skipped <= MOTO_SKIPS, skipped - MOTO_SKIPS


def empty_zip() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("placeholder.py", "")
    return buffer.getvalue()


# ------------------------------------------------------------------ layer and samconfig

def test_samconfig() -> None:
    config = tomllib.loads((REPO / "samconfig.toml").read_text())
    deploy = config["default"]["deploy"]["parameters"]
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["confirm_changeset"] is True
    assert deploy["resolve_s3"] is True
    assert "Password" not in deploy.get("parameter_overrides", "")
    assert config["default"]["global"]["parameters"]["stack_name"]


def test_the_capture_role_may_read_the_lifecycle_rules_its_retention_pass_reckons_by(
        cfn: dict[str, Any]) -> None:
    # a new epoch (a rebase, a restart) runs the retention pass, which reads the bucket's
    # lifecycle days (Store.expiration_days): without the right it would fail on Lambda
    policy = cfn["Resources"]["CaptureFunctionPolicy"]["Properties"]["PolicyDocument"]
    [read] = [s for s in policy["Statement"]
              if "s3:GetLifecycleConfiguration" in as_list(s["Action"])]
    assert read["Effect"] == "Allow" and as_list(read["Action"]) == [
        "s3:GetLifecycleConfiguration"]
    assert read["Resource"] == {"Fn::GetAtt": ["BackupBucket", "Arn"]}
