"""The built artifact, run as Lambda runs it.

`sam build` (x86_64, this machine's architecture) makes .aws-sam/build/<Function>/ and the
layer; each function then runs from that directory under AWS's own runtime interface
client (awslambdaric, pinned in requirements-lambdaric.txt), in a sandbox laid out as
Lambda's (devkit/lambda_runtime.py: the code at /var/task and the layer at /opt, both
read-only, the rest of the file system read-only, only /tmp writable, no /dev/shm, an
unprivileged user, Lambda's environment variables and the function's own from the
translated template), fed by a local Runtime API. The handler string is the translated
template's. Each sandbox stays up for the whole module and takes every invocation of its
function, so the warm starts Lambda makes are made here too.

The invocations are the sample events of events/, against real PostgreSQL 17 (with
wal_level=logical, for capture) and moto's server; what is checked is what the handler
tests check: the result, the stored manifest, the SNS message, the EMF metrics printed,
the restored database compared whole with the source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from supabackup.budget import MARGIN
from supabackup.manifest import Manifest

from devkit.compare import differences
from devkit.lambda_runtime import Function, Result, Sandbox
from devkit.pg import SUPERUSER_PASSWORD, Cluster, logical_cluster
from devkit.s3 import MotoProcess

from .helpers import REPO, TEMPLATE, Inbox, load_event, stored_keys
from .test_task_command import Resolver, layer_id, secret_for
from .test_template import tool, translate

pytestmark = pytest.mark.tools  # builds the artifact and runs it

ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}.get(os.uname().machine)
RUNTIME = REPO / "build" / "tools" / "lambdaric"
BUCKET = "supabackup-backupbucket-abc123"
STACK = "supabackup"
# The sandbox's mount points (Lambda's paths, not this machine's).
READ_ONLY = ("/", "/var", "/var/lang", "/var/runtime", "/var/task", "/opt", "/dev/shm")  # noqa: S108
TMP = "/tmp"  # noqa: S108
FUNCTIONS = ("BackupFunction", "VerifyFunction", "RestoreFunction", "PlanFunction",
             "CaptureFunction")


# ------------------------------------------------------------------ the artifact


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sam build` for this machine's architecture, as a user runs it (the layer's
    Makefile takes ARCH, README: Deploy)."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox's mount namespace needs root (unshare --mount)")
    assert ARCH, f"no Lambda architecture for {os.uname().machine}"
    assert (RUNTIME / ".installed").exists(), "make test installs awslambdaric (TOOLS)"
    root = tmp_path_factory.mktemp("artifact")
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "ARCH": os.uname().machine,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([tool("sam", "sam"), "build", "--template-file", str(TEMPLATE),
                          "--build-dir", str(root / "build"), "--cache-dir", str(root / "cache"),
                          "--parallel", "--parameter-overrides", f"Architecture={ARCH}"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root / "build"


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return translate({"Architecture": ARCH or "x86_64"})


def site_packages(venv: Path) -> Path:
    [found] = venv.glob("lib/python3.12/site-packages")
    return found


# ------------------------------------------------------------------ the stack, here


@pytest.fixture(scope="module")
def server() -> Iterator[Cluster]:
    """PostgreSQL 17 with wal_level=logical: backups, restores, drills and capture."""
    with logical_cluster(17) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoProcess]:
    with MotoProcess() as moto:
        yield moto


@dataclass
class Stack:
    source: str
    target: str
    inbox: Inbox
    moto: MotoProcess
    sandboxes: dict[str, Sandbox]
    cfn: dict[str, Any]

    def invoke(self, function: str, event: Any, timeout_seconds: float | None = None
               ) -> Result:
        return self.sandboxes[function].invoke(event, timeout_seconds)

    def manifest(self, backup_id: str) -> Manifest:
        s3 = self.moto.client("s3")
        [key] = [k for k in stored_keys(s3, BUCKET) if k.endswith(f"{backup_id}/manifest.json")]
        return Manifest.from_json(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key)


SCHEMA = """
CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE customers (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL,
                        profile jsonb, joined timestamptz DEFAULT '2025-01-01 00:00+00');
CREATE TABLE orders (id int PRIMARY KEY, customer bigint REFERENCES customers,
                     state status, total numeric(12, 2), tags text[], note bytea);
INSERT INTO customers (email, profile)
    SELECT 'c' || g || '@example.com', jsonb_build_object('n', g) FROM generate_series(1, 500) g;
INSERT INTO orders SELECT g, g % 500 + 1, (ARRAY['new', 'paid', 'shipped'])[g % 3 + 1]::status,
    g * 1.25, ARRAY['t' || g % 7], decode(md5(g::text), 'hex') FROM generate_series(1, 3000) g;
CREATE INDEX orders_state ON orders (state);
CREATE VIEW paid AS SELECT id, total FROM orders WHERE state = 'paid';
"""


@pytest.fixture(scope="module")
def stack(build: Path, cfn: dict[str, Any], server: Cluster, moto_server: MotoProcess,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack as deployed with every optional secret given: each function's sandbox
    started from its built directory, with its environment resolved from the template."""
    source, target = "shop", "shop_restored"
    for name in (source, target):
        server.create_database(name)
    server.execute(SCHEMA, source)
    moto_server.client("s3").create_bucket(Bucket=BUCKET)
    inbox = Inbox(moto_server.client("sns"), moto_server.client("sqs"))
    secrets = {"DatabaseSecretArn": secret_for(moto_server, "db", server, source),
               "CaptureSecretArn": secret_for(moto_server, "direct", server, source),
               "DrillSecretArn": secret_for(moto_server, "drill", server, "postgres"),
               "RestoreTargetSecretArn": secret_for(moto_server, "target", server, target)}
    resolver = Resolver(cfn, secrets, {"BackupBucket": BUCKET,
                                       "NotificationTopic": inbox.topic_arn})
    logs = tmp_path_factory.mktemp("logs")
    sandboxes: dict[str, Sandbox] = {}
    try:
        for name in FUNCTIONS:
            sandbox = Sandbox(function(cfn, resolver, build, name, moto_server), logs / name)
            sandboxes[name] = sandbox.__enter__()  # it imported its handler and polls
        yield Stack(source, target, inbox, moto_server, sandboxes, cfn)
    finally:
        for sandbox in sandboxes.values():
            sandbox.__exit__(None, None, None)


def function(cfn: dict[str, Any], resolver: Resolver, build: Path, name: str,
             moto: MotoProcess) -> Function:
    """The function `name` as this stack configures it."""
    resource = cfn["Resources"][name]
    condition = resource.get("Condition")
    assert condition is None or resolver.condition(condition)  # deployed in this stack
    props = resource["Properties"]
    [layer] = props["Layers"]
    assert layer == {"Ref": layer_id(cfn)}
    variables = {key: resolver.value(value) for key, value in
                 props["Environment"]["Variables"].items()}
    environment = {key: str(value) for key, value in variables.items() if value is not None}
    environment["AWS_ENDPOINT_URL"] = moto.endpoint  # the one variable Lambda would not set
    return Function(
        name=f"{STACK}-{name}-AbC123", code=build / name, handler=props["Handler"],
        layer=build / "PostgresClientLayer", runtime=site_packages(RUNTIME),
        python_home=Path(sys.base_prefix), environment=environment,
        memory_mb=int(resolver.value(props["MemorySize"])),
        timeout_seconds=int(resolver.value(props["Timeout"])))


def emf(result: Result) -> dict[str, Any]:
    """The one EMF document (Powertools' metrics) the invocation printed."""
    [doc] = result.lines('{"_aws"')
    return doc


def outcome(stack: Stack) -> dict[str, Any]:
    """The one SNS message since the last read."""
    [message] = stack.inbox.messages()
    return message


# ------------------------------------------------------------------ the tests


def test_the_build_holds_each_function_and_its_handler_from_the_template(
        build: Path, cfn: dict[str, Any]) -> None:
    built, problems = decode(str(build / "template.yaml"))  # what `sam deploy` would send
    assert not problems and built is not None, problems
    for name in FUNCTIONS:
        handler = cfn["Resources"][name]["Properties"]["Handler"]
        module = handler.rsplit(".", 1)[0].replace(".", "/") + ".py"
        assert (build / name / module).is_file(), (name, handler)
        assert built["Resources"][name]["Properties"]["CodeUri"] == name
        binaries = list((build / name / "psycopg2").glob("_psycopg*.so"))
        assert binaries and all(os.uname().machine in b.name for b in binaries), binaries
    assert {p.name for p in (build / "PostgresClientLayer" / "bin").iterdir()} >= {
        "pg_dump", "pg_dumpall", "pg_restore", "psql"}


def test_full_and_incremental_backups(stack: Stack, server: Cluster) -> None:
    full = stack.invoke("BackupFunction", load_event("backup-full-manual.json"))
    assert full.ok, full.error
    assert (full.payload["kind"], full.payload["label"], full.payload["retention"]) == (
        "full", "before migration 42", "pinned")
    manifest = stack.manifest(full.payload["backup_id"])
    assert manifest.pg_dump == "/opt/bin/pg_dump"  # the layer's, at /opt
    assert manifest.pg_dump_version.split(".")[0] == "17"
    message = outcome(stack)
    assert message["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert message["Message"]["backup"]["backup_id"] == full.payload["backup_id"]
    metrics = emf(full)
    assert (metrics["kind"], metrics["BackupSucceeded"]) == ("full", [1.0])
    assert metrics["BackupBytes"] == [float(manifest.total_bytes)]
    logs = full.lines('{"level"')
    assert logs and all(log["function_name"] == f"{STACK}-BackupFunction-AbC123" for log in logs)
    assert logs[0]["cold_start"] is True
    assert SUPERUSER_PASSWORD not in full.log + json.dumps(message)

    server.execute("INSERT INTO orders VALUES (3001, 1, 'new', 9.99, '{}', NULL);"
                   "CREATE TABLE refunds (order_id int REFERENCES orders, amount numeric);"
                   "INSERT INTO refunds VALUES (17, 1.5)", stack.source)
    incremental = stack.invoke("BackupFunction", load_event("backup-incremental-manual.json"))
    assert incremental.ok, incremental.error
    assert incremental.payload["parent"] == full.payload["backup_id"]
    assert (incremental.payload["tables_dumped"], incremental.payload["tables_total"]) == (2, 3)
    assert outcome(stack)["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert emf(incremental)["kind"] == "incremental"
    assert incremental.lines('{"level"')[0]["cold_start"] is False  # the same sandbox, warm


def test_a_bad_event_fails_the_invocation_and_stores_nothing(stack: Stack) -> None:
    before = stored_keys(stack.moto.client("s3"), BUCKET)
    bad = stack.invoke("BackupFunction", {"kind": "differential"})
    assert bad.error is not None and bad.error["errorType"] == "ConfigError"
    assert "unknown backup kind 'differential'" in bad.error["errorMessage"]
    assert stored_keys(stack.moto.client("s3"), BUCKET) == before
    assert outcome(stack)["MessageAttributes"]["status"]["Value"] == "failed"
    assert emf(bad)["BackupFailed"] == [1.0]


def test_a_run_given_less_time_than_it_needs_refuses_while_it_can_still_say_so(
        stack: Stack) -> None:
    """The deadline Lambda gives (Lambda-Runtime-Deadline-Ms) is the budget's: with less
    left than the budget keeps for cleaning up, the backup refuses at once, reports, and
    stores nothing, instead of being killed at the deadline with nothing said."""
    before = stored_keys(stack.moto.client("s3"), BUCKET)
    short = stack.invoke("BackupFunction", load_event("backup-full-scheduled.json"),
                         timeout_seconds=MARGIN - 10)
    assert not short.timed_out and short.error is not None, short
    assert short.error["errorType"] == "TimeLimitExceeded"
    assert "left before the time limit" in short.error["errorMessage"]
    assert stored_keys(stack.moto.client("s3"), BUCKET) == before
    message = outcome(stack)
    assert message["MessageAttributes"]["status"]["Value"] == "failed"
    assert "time limit" in json.dumps(message["Message"])
    assert emf(short)["BackupFailed"] == [1.0]


def test_verify_with_a_drill(stack: Stack) -> None:
    result = stack.invoke("VerifyFunction", load_event("verify-scheduled.json"))
    assert result.ok, result.error
    assert len(result.payload["verified"]) == 2 and result.payload["problems"] == []
    drill = result.payload["drill"]
    assert drill["backup_id"] == result.payload["verified"][-1]  # the newest: the incremental
    assert (drill["tables"], drill["rows"]) == (3, 500 + 3001 + 1)
    message = outcome(stack)
    assert message["MessageAttributes"]["kind"]["Value"] == "verify"
    assert message["MessageAttributes"]["status"]["Value"] == "succeeded"
    metrics = emf(result)
    assert (metrics["VerifySucceeded"], metrics["DrillPassed"]) == ([1.0], [1.0])
    assert SUPERUSER_PASSWORD not in result.log
    # the result is on record for `supabackup status`, with the grant the role has
    s3 = stack.moto.client("s3")
    key = result.payload["record"]
    assert "/checks/" in key and result.payload.get("record_error", "") == ""
    record = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert (record["ok"], record["drill"]["ok"], record["drill"]["backup_id"]) == (
        True, True, drill["backup_id"])
    assert SUPERUSER_PASSWORD not in json.dumps(record)
    assert s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"] == [
        {"Key": "retention", "Value": "daily"}]


def test_restore_the_latest_into_the_target(stack: Stack, server: Cluster) -> None:
    result = stack.invoke("RestoreFunction", load_event("restore-latest.json"))
    assert result.ok, result.error
    assert result.payload["backup_id"] == stack.manifest(result.payload["backup_id"]).backup_id
    assert differences(server.url(stack.source), server.url(stack.target)) == []
    message = outcome(stack)
    assert message["Subject"].startswith("supabackup: restore of ")
    assert emf(result)["RestoreSucceeded"] == [1.0]


def test_the_plan_routes_a_small_database_to_lambda(stack: Stack) -> None:
    event = load_event("backup-large.json")
    result = stack.invoke("PlanFunction", event)
    assert result.ok, result.error
    assert (result.payload["operation"], result.payload["event"]) == ("backup", event["event"])
    assert result.payload["path"] == "lambda", result.payload


def test_capture_starts_streams_until_its_deadline_and_reports_the_slot(
        stack: Stack, server: Cluster) -> None:
    started = stack.invoke("CaptureFunction", load_event("capture-start.json"))
    assert started.ok, started.error
    assert started.payload["plugin"] == "pgoutput"
    assert stack.manifest(started.payload["base"]).label == "change capture base"
    server.execute("UPDATE customers SET profile = '{\"vip\": true}' WHERE id < 10", stack.source)
    # the schedule's run streams until RUN_MARGIN (20 s) before the deadline Lambda gives it
    ran = stack.invoke("CaptureFunction", load_event("capture-scheduled.json"), 30)
    assert ran.ok, ran.error
    assert ran.payload["transactions"] == 1 and not ran.payload["lost"]
    assert ran.payload["covered_through"]
    metrics = emf(ran)
    assert metrics["kind"] == "capture" and metrics["CapturedTransactions"] == [1.0]
    assert metrics["RetainedWalBytes"] == [float(ran.payload["slot"]["retained_wal_bytes"])]
    [lag] = metrics["CaptureLagSeconds"]
    assert 0 <= lag < 60  # it streamed until moments ago
    status = stack.invoke("CaptureFunction", load_event("capture-status.json"))
    assert status.ok and status.payload["started"] and status.payload["last_commit_captured"]
    assert stack.inbox.messages() == []  # a good run says nothing


def test_each_sandbox_is_shaped_as_lambdas(stack: Stack) -> None:
    """The control: what the functions above ran in, read from the kernel. The runtime
    client itself (no wrapper left: each step exec'd the next), an unprivileged user with
    no capabilities, and Lambda's mounts: the code, the layer and the rest read-only, /tmp
    the one writable file system of the sandbox's own, no /dev/shm to write to."""
    for name, sandbox in stack.sandboxes.items():
        assert sandbox.process is not None and sandbox.process.poll() is None, name  # alive
        proc = Path("/proc") / str(sandbox.process.pid)
        argv = (proc / "cmdline").read_bytes().decode().split("\0")[:-1]
        assert argv == ["/var/lang/bin/python3.12", "-m", "awslambdaric",
                        stack.cfn["Resources"][name]["Properties"]["Handler"]]
        status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines())
        assert status["Uid"].split()[0] != "0" and int(status["CapEff"], 16) == 0
        mounts = {}  # mount point: (what of its file system, options, type); the last wins
        for line in (proc / "mountinfo").read_text().splitlines():
            fields = line.split()
            mounts[fields[4]] = (fields[3], fields[5].split(","), fields[fields.index("-") + 1])
        for point in READ_ONLY:
            assert "ro" in mounts[point][1], (name, point, mounts[point])
        assert "rw" in mounts[TMP][1] and mounts[TMP][2] == "tmpfs"
        function = sandbox.function
        assert (mounts["/var/task"][0], mounts["/opt"][0]) == (str(function.code),
                                                              str(function.layer))
        assert os.readlink(proc / "cwd") == "/var/task"


def test_the_code_ran_from_its_build_and_left_it_as_built(stack: Stack, build: Path) -> None:
    """Lambda's /var/task is read-only: Python could write no bytecode there, and nothing
    the functions did changed their build."""
    for name in FUNCTIONS:
        assert not list((build / name).rglob("__pycache__")), name
