"""The SAM stack: template.yaml linted, translated by SAM and deployed into moto; the layer's
Makefile; samconfig.toml. Fast and offline: no Docker, no network, no AWS account.

`sam deploy` sends CloudFormation the template after `sam package` has replaced the local
CodeUri/ContentUri with S3 addresses; the SAM transform then runs in CloudFormation. Here
aws-sam-translator (the library behind that transform) runs on the same input.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from cfnlint.api import lint
from cfnlint.config import ManualArgs
from cfnlint.decode import decode
from cfnlint.helpers import REGIONS
from moto import mock_aws
from samtranslator.translator.transform import transform
from supabackup.dburl import ConnectionInfo
from supabackup.events import parse_backup_event
from supabackup.manifest import RETENTION_CLASSES

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "template.yaml"
EVENTS = REPO / "events"
LAYERS = REPO / "layers"
REGION = "us-east-1"
EXISTING_SECRET = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:supabase-db-AbCdEf"

# cfn-lint runs with every rule, informational and experimental ones included, in every
# region. Errors and warnings fail the test; these informational findings are accepted:
#   I4010  experimental: asks for Metadata "com.aws.cloudformation.Context" describing the
#          architecture on the template and its resources, which nothing here consumes.
ACCEPTED_LINT = {"I4010"}

# Actions whose Resource must never be "*" in the function's policies.
SCOPED_SERVICES = ("s3:", "secretsmanager:", "kms:", "sns:")


# ------------------------------------------------------------------ helpers


def sam_template() -> dict[str, Any]:
    """template.yaml as CloudFormation reads it (short-form intrinsics made long-form)."""
    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    assert template is not None
    return template


def translate(parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """What CloudFormation deploys after the SAM transform, as after `sam package`."""
    template = sam_template()
    resources = template["Resources"]
    resources["BackupFunction"]["Properties"]["CodeUri"] = "s3://artifacts/function.zip"
    resources["PostgresClientLayer"]["Properties"]["ContentUri"] = "s3://artifacts/layer.zip"

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


def function_statements(cfn: dict[str, Any]) -> list[dict[str, Any]]:
    """Every policy statement that applies to the function's role."""
    fn = cfn["Resources"]["BackupFunction"]["Properties"]
    role_id = fn["Role"]["Fn::GetAtt"][0]
    role = cfn["Resources"][role_id]["Properties"]
    documents = [p["PolicyDocument"] for p in role.get("Policies", [])]
    for resource in cfn["Resources"].values():
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::RolePolicy"):
            props = resource["Properties"]
            attached = [*props.get("Roles", []), props.get("RoleName")]
            if {"Ref": role_id} in attached:
                documents.append(props["PolicyDocument"])
    return [s for doc in documents for s in as_list(doc["Statement"])]


def lint_errors(text: str) -> list[str]:
    matches = lint(text, config=ManualArgs(regions=REGIONS, include_checks=["I"],
                                           include_experimental=True))
    return [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches
            if m.rule.id not in ACCEPTED_LINT]


# ------------------------------------------------------------------ lint and translation


def test_cfn_lint_passes_on_the_sam_template() -> None:
    assert lint_errors(TEMPLATE.read_text()) == []


def test_cfn_lint_passes_on_the_translated_template(cfn: dict[str, Any]) -> None:
    assert lint_errors(json.dumps(cfn, indent=1)) == []


def test_translates_with_every_architecture_and_an_existing_secret() -> None:
    for arch in ("arm64", "x86_64"):
        out = translate({"Architecture": arch, "DatabaseSecretArn": EXISTING_SECRET})
        assert one(out, "AWS::Lambda::Function")[1]["Properties"]["ReservedConcurrentExecutions"] == 1


def test_globals_and_parameters(sam: dict[str, Any]) -> None:
    params, fn = sam["Parameters"], sam["Globals"]["Function"]
    assert fn["Runtime"] == "python3.12"
    assert fn["Tracing"] == "Active"
    assert fn["Architectures"] == [{"Ref": "Architecture"}]
    assert params["Architecture"]["Default"] == "arm64"
    assert set(params["Architecture"]["AllowedValues"]) == {"arm64", "x86_64"}
    assert default(sam, fn["Timeout"]) == 900
    assert default(sam, fn["MemorySize"]) == 1024
    assert params["DatabasePassword"]["NoEcho"] is True
    assert params["ScheduleTimezone"]["Default"] == "UTC"
    assert set(params["ScheduleState"]["AllowedValues"]) == {"ENABLED", "DISABLED"}


# ------------------------------------------------------------------ schedule and events


def schedules(cfn: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scheduler's schedules, by the kind of backup their input asks for."""
    found = {}
    for resource in cfn["Resources"].values():
        if resource["Type"] == "AWS::Scheduler::Schedule":
            sent = json.loads(resource["Properties"]["Target"]["Input"])
            found[sent["kind"]] = resource["Properties"]
    return found


@pytest.mark.parametrize("kind, cron, state", [
    ("full", "cron(0 3 ? * SUN *)", "ScheduleState"),
    ("incremental", "cron(0 3 ? * MON-SAT *)", "IncrementalScheduleState"),
])
def test_the_schedules_run_weekly_fulls_and_daily_incrementals(
        cfn: dict[str, Any], kind: str, cron: str, state: str) -> None:
    props = schedules(cfn)[kind]
    assert default(cfn, props["ScheduleExpression"]) == cron
    assert props["ScheduleExpressionTimezone"] == {"Ref": "ScheduleTimezone"}
    assert default(cfn, props["ScheduleExpressionTimezone"]) == "UTC"
    assert props["State"] == {"Ref": state}
    assert default(cfn, props["State"]) == "ENABLED"
    assert "Name" not in props  # CloudFormation names it: two stacks must not clash
    target = props["Target"]
    assert target["Arn"] == {"Fn::GetAtt": ["BackupFunction", "Arn"]}
    assert target["RetryPolicy"]["MaximumRetryAttempts"] >= 1
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
    sent = json.loads(schedules(cfn)[kind]["Target"]["Input"])
    assert sent == json.loads((EVENTS / sample).read_text())
    request = parse_backup_event(sent)
    assert (request.kind, request.trigger, request.retention) == (kind, "schedule", retention)


def test_the_sample_events_are_valid_requests() -> None:
    for path in sorted(EVENTS.glob("*.json")):
        parse_backup_event(json.loads(path.read_text()))


def test_failed_asynchronous_runs_go_to_the_dead_letter_queue(cfn: dict[str, Any]) -> None:
    _, config = one(cfn, "AWS::Lambda::EventInvokeConfig")
    props = config["Properties"]
    assert props["FunctionName"] == {"Ref": "BackupFunction"}
    assert props["MaximumRetryAttempts"] <= 2
    queue_id = props["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]
    assert cfn["Resources"][queue_id]["Type"] == "AWS::SQS::Queue"


# ------------------------------------------------------------------ the function


def test_the_function(cfn: dict[str, Any], sam: dict[str, Any]) -> None:
    fn_props = cfn["Resources"]["BackupFunction"]["Properties"]
    assert cfn["Resources"]["BackupFunction"]["Type"] == "AWS::Lambda::Function"
    assert fn_props["ReservedConcurrentExecutions"] == 1
    assert fn_props["Handler"] == "supabackup.handlers.backup.handler"
    assert fn_props["Runtime"] == "python3.12"
    assert fn_props["TracingConfig"] == {"Mode": "Active"}
    assert fn_props["Architectures"] == [{"Ref": "Architecture"}]
    [layer] = fn_props["Layers"]
    layer = cfn["Resources"][layer["Ref"]]
    assert layer["Type"] == "AWS::Lambda::LayerVersion"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layer["Properties"]["CompatibleArchitectures"] == [{"Ref": "Architecture"}]

    # The code SAM packages: functions/ holds the handler and its requirements.
    sam_fn = sam["Resources"]["BackupFunction"]["Properties"]
    code = REPO / sam_fn["CodeUri"]
    assert (code / "supabackup" / "handlers" / "backup.py").is_file()
    assert (code / "requirements.txt").is_file()
    handler_module = importlib.import_module("supabackup.handlers.backup")
    assert callable(handler_module.handler)

    sam_layer = sam["Resources"]["PostgresClientLayer"]
    assert sam_layer["Metadata"]["BuildMethod"] == "makefile"
    assert sam_layer["Properties"]["ContentUri"] == "layers/"


def test_the_function_environment(cfn: dict[str, Any]) -> None:
    env = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    assert set(env) == {"SUPABACKUP_STORE", "SUPABACKUP_DB_SECRET_ARN", "SUPABACKUP_SNS_TOPIC_ARN",
                        "SUPABACKUP_PROFILE", "POWERTOOLS_SERVICE_NAME",
                        "POWERTOOLS_METRICS_NAMESPACE"}
    assert env["SUPABACKUP_STORE"] == {"Fn::Sub": "s3://${BackupBucket}/${BackupPrefix}"}
    assert env["SUPABACKUP_DB_SECRET_ARN"] == {
        "Fn::If": ["CreateDatabaseSecret", {"Ref": "DatabaseSecret"}, {"Ref": "DatabaseSecretArn"}]}
    assert env["SUPABACKUP_SNS_TOPIC_ARN"] == {"Ref": "NotificationTopic"}
    assert default(cfn, env["SUPABACKUP_PROFILE"]) == "supabase"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "supabackup"
    assert env["POWERTOOLS_SERVICE_NAME"] == "supabackup"


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
    assert secret["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["BackupKey", "Arn"]}
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
    assert sse["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": {"Fn::GetAtt": ["BackupKey", "Arn"]}}
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
    # Every retention class the engine writes has a rule, except pinned: never expires.
    assert set(by_tag) == set(RETENTION_CLASSES) - {"pinned"}
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
        "s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:PutObjectTagging",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
        "s3:ListBucket", "s3:ListBucketMultipartUploads",
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
    assert resource_of("secretsmanager:GetSecretValue")["Resource"] == {
        "Fn::If": ["CreateDatabaseSecret", {"Ref": "DatabaseSecret"}, {"Ref": "DatabaseSecretArn"}]}
    assert resource_of("kms:Decrypt")["Resource"] == {"Fn::GetAtt": ["BackupKey", "Arn"]}
    assert resource_of("sns:Publish")["Resource"] == {"Ref": "NotificationTopic"}

    role = cfn["Resources"]["BackupFunctionRole"]["Properties"]
    assert [p["Fn::Sub"] for p in role["ManagedPolicyArns"]] == [
        "arn:${AWS::Partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"]


def test_the_key_policy(cfn: dict[str, Any]) -> None:
    key = cfn["Resources"]["BackupKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    statements = key["KeyPolicy"]["Statement"]
    root = [s for s in statements if s["Principal"] == {
        "AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}}]
    assert [s["Action"] for s in root] == ["kms:*"]
    role = [s for s in statements
            if s["Principal"] == {"AWS": {"Fn::GetAtt": ["BackupFunctionRole", "Arn"]}}]
    assert len(role) == 1
    assert set(role[0]["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey"}
    # Alarms publish to the encrypted topic.
    assert any(s["Principal"] == {"Service": "cloudwatch.amazonaws.com"} for s in statements)
    topic = cfn["Resources"]["NotificationTopic"]["Properties"]
    assert topic["KmsMasterKeyId"] == {"Fn::GetAtt": ["BackupKey", "Arn"]}


def test_the_email_subscription_is_optional(cfn: dict[str, Any]) -> None:
    _, subscription = one(cfn, "AWS::SNS::Subscription")
    assert subscription["Condition"] == "HasNotificationEmail"
    assert subscription["Properties"]["Protocol"] == "email"
    assert cfn["Parameters"]["NotificationEmail"]["Default"] == ""
    condition = json.dumps(cfn["Conditions"]["HasNotificationEmail"])
    assert "Fn::Not" in condition and '"Ref": "NotificationEmail"' in condition


# ------------------------------------------------------------------ alarms


def test_the_errors_alarm(cfn: dict[str, Any]) -> None:
    alarm = cfn["Resources"]["BackupErrorsAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "Errors")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "BackupFunction"}}]
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]


def test_the_missed_backup_alarm_watches_what_the_handler_emits(cfn: dict[str, Any]) -> None:
    alarm = cfn["Resources"]["MissedBackupAlarm"]["Properties"]
    # What Powertools writes for a committed scheduled backup (the handler's own setup).
    metrics = EphemeralMetrics(namespace="supabackup", service="supabackup")
    metrics.add_dimension(name="kind", value="full")
    metrics.add_metric(name="BackupSucceeded", unit=MetricUnit.Count, value=1)
    emf: dict[str, Any] = dict(metrics.serialize_metric_set())
    [directive] = emf["_aws"]["CloudWatchMetrics"]
    [dimension_set] = directive["Dimensions"]
    assert alarm["Namespace"] == directive["Namespace"]
    assert alarm["MetricName"] in [m["Name"] for m in directive["Metrics"]]
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        name: emf[name] for name in dimension_set}
    env = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    assert alarm["Namespace"] == env["POWERTOOLS_METRICS_NAMESPACE"]

    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["ComparisonOperator"] == "LessThanThreshold" and alarm["Threshold"] == 1
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]
    # CloudWatch evaluates at most 7 days; calendar days (wall clock) in the schedule's
    # time zone make a weekly success always fall inside the window.
    period, evaluations = alarm["Period"], default(cfn, alarm["EvaluationPeriods"])
    assert period == 86400 and period * evaluations == 7 * 86400
    assert default(cfn, alarm["DatapointsToAlarm"]) == evaluations
    assert alarm["EvaluationWindow"] == {"WallClockWindow": {"Timezone": {"Ref": "ScheduleTimezone"}}}


# ------------------------------------------------------------------ outputs


def test_outputs(cfn: dict[str, Any]) -> None:
    outputs = cfn["Outputs"]
    assert outputs["BucketName"]["Value"] == {"Ref": "BackupBucket"}
    assert outputs["TopicArn"]["Value"] == {"Ref": "NotificationTopic"}
    assert outputs["BackupFunctionName"]["Value"] == {"Ref": "BackupFunction"}
    command = outputs["ManualBackupCommand"]["Value"]["Fn::Sub"]
    assert command.startswith("aws lambda invoke ")
    for part in ("--function-name ${BackupFunction}", "--cli-binary-format raw-in-base64-out",
                 "--payload file://events/backup-full-manual.json", " out.json"):
        assert part in command
    assert (REPO / "events" / "backup-full-manual.json").is_file()


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
    template = translate({"DatabaseSecretArn": EXISTING_SECRET})
    env = {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    with mock.patch.dict(os.environ, env), mock_aws(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="artifacts")
        for key in ("function.zip", "layer.zip"):
            s3.put_object(Bucket="artifacts", Key=key, Body=empty_zip())
        cf = boto3.client("cloudformation", region_name=REGION)
        cf.create_stack(StackName="supabackup", TemplateBody=json.dumps(template),
                        Capabilities=["CAPABILITY_IAM"],
                        Parameters=[{"ParameterKey": "DatabaseSecretArn",
                                     "ParameterValue": EXISTING_SECRET}])
        stack = cf.describe_stacks(StackName="supabackup")["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}

        bucket = outputs["BucketName"]
        s3.head_bucket(Bucket=bucket)
        [rule] = s3.get_bucket_encryption(Bucket=bucket)[
            "ServerSideEncryptionConfiguration"]["Rules"]
        sse = rule["ApplyServerSideEncryptionByDefault"]
        assert (sse["SSEAlgorithm"], sse["KMSMasterKeyID"]) == ("aws:kms", outputs["KeyArn"])

        fn = boto3.client("lambda", region_name=REGION).get_function(
            FunctionName=outputs["BackupFunctionName"])
        assert fn["Concurrency"]["ReservedConcurrentExecutions"] == 1
        variables = fn["Configuration"]["Environment"]["Variables"]
        assert variables["SUPABACKUP_STORE"] == f"s3://{bucket}/backups"
        assert variables["SUPABACKUP_DB_SECRET_ARN"] == EXISTING_SECRET
        assert variables["SUPABACKUP_SNS_TOPIC_ARN"] == outputs["TopicArn"]
        assert outputs["TopicArn"] in [t["TopicArn"] for t in boto3.client(
            "sns", region_name=REGION).list_topics()["Topics"]]
        assert outputs["ManualBackupCommand"].startswith(
            f"aws lambda invoke --region {REGION} --function-name {outputs['BackupFunctionName']} ")
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
