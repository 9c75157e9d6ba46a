"""The Lambda handlers with Supabase Storage files: the stack's endpoint and the sample
events (events/backup-full-with-storage.json, events/restore-with-storage-files.json),
their S3 keys read from Secrets Manager, bad input refused before anything is stored, and
no key in a log line, a result or an SNS message.

Each project is a database with Supabase's storage schema (devkit/sql/supabase_platform.sql)
and a moto server of its own standing in for its Storage (conftest's `storage_servers`,
devkit.storage_peer writing storage.objects as Supabase does). The samples name https
endpoints of Supabase's shape: a test routes them to those servers, keys and all, as DNS
would route them to Supabase.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from supabackup.errors import ConfigError
from supabackup.files import StorageEndpoint
from supabackup.files.copy import blob_key
from supabackup.handlers import backup as backup_handler
from supabackup.handlers import restore as restore_handler
from supabackup.store import Store, StoreURL

from devkit.pg import Cluster
from devkit.s3 import MotoProcess
from devkit.storage_peer import StoragePeer, attach

from .helpers import (
    BUCKET,
    PASSWORD,
    SQL,
    FakeContext,
    Inbox,
    load_event,
    open_uploads,
    stored_keys,
)

# The project's S3 keys, as Storage's settings issue them: neither may appear anywhere.
KEY_ID, SECRET_KEY, REGION = "STORAGEKEYID4HANDLER42", "storage-Secret-sk-handler-42", "eu-west-2"
TARGET_KEY_ID, TARGET_SECRET_KEY = "TARGETKEYID4HANDLER42", "target-Secret-sk-handler-42"
SECRETS = (PASSWORD, KEY_ID, SECRET_KEY, TARGET_KEY_ID, TARGET_SECRET_KEY)

FILES = {("avatars", "u1/avatar.png"): (b"\x89PNG" + bytes(range(256)) * 4, "image/png"),
         ("documents", "reports/q1 summary.pdf"): (b"%PDF-1.7 q1", "application/pdf"),
         ("private", "keys/not-copied.txt"): (b"outside the buckets asked for", "text/plain")}


def _endpoint(event: str, field: str) -> str:
    return str(load_event(event)[field]["endpoint"])


SOURCE_URL = _endpoint("backup-full-with-storage.json", "storage")
TARGET_URL = _endpoint("restore-with-storage-files.json", "target_storage")


@dataclass
class Project:
    db: str
    server: MotoProcess
    peer: StoragePeer

    def files(self) -> dict[str, bytes]:
        client, out = self.server.client(), {}
        for bucket in (b["Name"] for b in client.list_buckets()["Buckets"]):
            for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                out[f"{bucket}/{item['Key']}"] = client.get_object(
                    Bucket=bucket, Key=item["Key"])["Body"].read()
        return out


def _project(pg15: Cluster, new_db: Any, server: MotoProcess) -> Project:
    db = new_db(pg15)
    pg15.psql_file(SQL / "supabase_platform.sql", db)
    return Project(db, server, StoragePeer(server.client(), pg15.url(db)))


def _db_secret(pg15: Cluster, db: str, **extra: str) -> str:
    return json.dumps({"host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda",
                       "password": PASSWORD, "dbname": db, **extra})


@pytest.fixture
def source(deployed: dict[str, Any], pg15: Cluster, new_db: Any,
           storage_servers: tuple[MotoProcess, MotoProcess],
           monkeypatch: pytest.MonkeyPatch) -> Project:
    """The stack's database, a Supabase project with three buckets of files."""
    project = _project(pg15, new_db, storage_servers[0])
    pg15.execute("CREATE TABLE public.orders (id int PRIMARY KEY); "
                 "INSERT INTO public.orders SELECT generate_series(1, 10)", project.db)
    for bucket in ("avatars", "documents", "private"):
        project.peer.create_bucket(bucket)
    for (bucket, key), (body, content_type) in FILES.items():
        project.peer.put(bucket, key, body, content_type)
    deployed["secrets"].put_secret_value(SecretId=deployed["arn"],
                                         SecretString=_db_secret(pg15, project.db))
    monkeypatch.setenv("SUPABACKUP_PROFILE", "supabase")  # the template's BackupProfile
    return project


@pytest.fixture
def target(deployed: dict[str, Any], pg15: Cluster, new_db: Any,
           storage_servers: tuple[MotoProcess, MotoProcess], clients: Clients,
           monkeypatch: pytest.MonkeyPatch) -> Project:
    """A fresh project: the restore function's target (RestoreTargetSecretArn)."""
    project = _project(pg15, new_db, storage_servers[1])
    clients.rows[project.server.endpoint] = pg15.url(project.db)
    arn = deployed["secrets"].create_secret(Name="supabackup/target",
                                            SecretString=_db_secret(pg15, project.db))["ARN"]
    monkeypatch.setenv("SUPABACKUP_RESTORE_SECRET_ARN", arn)
    return project


@dataclass
class Clients:
    """Every endpoint the engine made a client of, with the keys it signs with."""

    seen: list[StorageEndpoint] = field(default_factory=list)
    rows: dict[str, str] = field(default_factory=dict)  # server -> database of its rows


@pytest.fixture
def clients(storage_servers: tuple[MotoProcess, MotoProcess],
            monkeypatch: pytest.MonkeyPatch) -> Clients:
    """The samples' https addresses go to the moto servers; a target's server writes
    storage.objects as Supabase's does (`rows`)."""
    made, found = StorageEndpoint.client, Clients()
    routes = {SOURCE_URL: storage_servers[0].endpoint, TARGET_URL: storage_servers[1].endpoint}

    def client(self: StorageEndpoint) -> Any:
        found.seen.append(self)
        url = routes.get(self.url, self.url)
        made_client = made(replace(self, url=url))
        if url in found.rows:
            attach(made_client, found.rows[url])
        return made_client
    monkeypatch.setattr(StorageEndpoint, "client", client)
    return found


def _storage_secret(deployed: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch,
                    variable: str, **values: str) -> str:
    arn = str(deployed["secrets"].create_secret(Name=name,
                                                SecretString=json.dumps(values))["ARN"])
    monkeypatch.setenv(variable, arn)
    return arn


def _no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_a_scheduled_backup_copies_the_stacks_files_with_the_keys_of_their_secret(
        deployed: dict[str, Any], source: Project, s3: Any, inbox: Inbox,
        clients: Clients, log_buffer: io.StringIO,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # what template.yaml sets with StorageEndpoint, StorageBuckets and StorageSecretArn
    monkeypatch.setenv("SUPABACKUP_STORAGE_ENDPOINT", source.server.endpoint)
    monkeypatch.setenv("SUPABACKUP_STORAGE_BUCKETS", "avatars,documents")
    _storage_secret(deployed, "supabackup/storage", monkeypatch, "SUPABACKUP_STORAGE_SECRET_ARN",
                    access_key_id=KEY_ID, secret_access_key=SECRET_KEY, region=REGION)
    result = backup_handler.handler(load_event("backup-full-scheduled.json"), FakeContext())
    assert {(e.access_key_id, e.secret_access_key, e.region) for e in clients.seen} == {
        (KEY_ID, SECRET_KEY, REGION)}
    assert result["files"]["files"] == 2 and result["files"]["buckets"] == ["avatars",
                                                                           "documents"]
    store = Store(StoreURL.parse(f"s3://{BUCKET}/prod"), s3)
    [manifest] = store.manifests(result["database_id"])
    assert manifest.files is not None and manifest.files.complete
    assert manifest.files.out_of_step() == []
    for stored in manifest.files.files:
        body, _ = FILES[(stored.bucket, stored.key)]
        blob = s3.get_object(Bucket=BUCKET, Key=blob_key(store, manifest.database_id,
                                                         stored.sha256))
        assert blob["Body"].read() == body
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "succeeded"
    assert msg["Message"]["backup"]["files"]["files"] == 2
    assert msg["Subject"].endswith(", 2 files"), msg["Subject"]
    _no_secret_in(capfd.readouterr().out + log_buffer.getvalue(), json.dumps(msg),
                  json.dumps(result), manifest.to_json().decode())


def test_the_sample_events_back_up_files_and_restore_them_into_a_fresh_project(
        deployed: dict[str, Any], source: Project, target: Project, pg15: Cluster,
        inbox: Inbox, clients: Clients, log_buffer: io.StringIO,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # no StorageSecretArn: the keys are optional keys of the database secret
    deployed["secrets"].put_secret_value(SecretId=deployed["arn"], SecretString=_db_secret(
        pg15, source.db, storage_access_key_id=KEY_ID, storage_secret_access_key=SECRET_KEY,
        storage_region=REGION))
    backup = backup_handler.handler(load_event("backup-full-with-storage.json"), FakeContext())
    assert backup["files"]["endpoint"] == SOURCE_URL and backup["files"]["files"] == 2
    _storage_secret(deployed, "supabackup/target-storage", monkeypatch,
                    "SUPABACKUP_TARGET_STORAGE_SECRET_ARN", access_key_id=TARGET_KEY_ID,
                    secret_access_key=TARGET_SECRET_KEY, region=REGION)
    restored = restore_handler.handler(load_event("restore-with-storage-files.json"),
                                       FakeContext())
    assert restored["backup_id"] == backup["backup_id"] and restored["files"] == 2
    assert target.files() == {f"{b}/{k}": body for (b, k), (body, _) in FILES.items()
                              if b != "private"}
    # the database is the snapshot's, every row; the files, those of the buckets asked for
    rows = "SELECT bucket_id, name FROM storage.objects ORDER BY 1, 2"
    assert pg15.execute(rows, target.db) == pg15.execute(rows, source.db) == sorted(FILES)
    assert pg15.execute("SELECT count(*) FROM public.orders", target.db) == [(10,)]
    keys = {(e.url, e.access_key_id, e.secret_access_key) for e in clients.seen}
    assert keys == {(SOURCE_URL, KEY_ID, SECRET_KEY),
                    (TARGET_URL, TARGET_KEY_ID, TARGET_SECRET_KEY)}
    messages = inbox.messages()
    assert [m["MessageAttributes"]["status"]["Value"] for m in messages] == [
        "succeeded", "succeeded"]
    _no_secret_in(capfd.readouterr().out + log_buffer.getvalue(), json.dumps(messages),
                  json.dumps(backup), json.dumps(restored))


STORAGE_KEYS = {"access_key_id": KEY_ID, "secret_access_key": SECRET_KEY, "region": REGION}


@pytest.mark.parametrize("event, secret, match", [
    ("backup-full-with-storage.json", {k: v for k, v in STORAGE_KEYS.items()
                                       if k != "secret_access_key"},
     r"needs its S3 keys: the Storage secret .* \(SUPABACKUP_STORAGE_SECRET_ARN\) lacks "
     r"secret_access_key;"),
    ("backup-full-with-storage.json", None,  # nor in the database secret
     r"the database secret .* lacks storage_access_key_id, storage_secret_access_key, "
     r"storage_region;"),
    ("backup-full-with-storage.json", "not json", r"the Storage secret .* is not a JSON object"),
    ({"storage": {"endpoint": "http://storage.example.com/storage/v1/s3"}}, STORAGE_KEYS,
     "is plain http: its keys and files would cross the network unencrypted"),
    ({"storage": {"endpoint": SOURCE_URL, "secret_access_key": SECRET_KEY}}, STORAGE_KEYS,
     "unknown key.* in event field 'storage': secret_access_key"),
    ({"storage": {"buckets": ["avatars"]}}, STORAGE_KEYS,
     "event field 'storage' names no endpoint, and the stack has none"),
    ({"storage": {"endpoint": SOURCE_URL, "buckets": ["avatars", "nope"]}}, STORAGE_KEYS,
     r"no bucket nope at https://abcdefghijklmnopqrst\.storage\.supabase\.co/storage/v1/s3 "
     r"\(it has: avatars, documents, private\)"),
])
def test_bad_storage_input_fails_clearly_and_stores_nothing(
        deployed: dict[str, Any], s3: Any, inbox: Inbox, log_buffer: io.StringIO,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str], event: Any, secret: Any, match: str) -> None:
    if "no bucket" in match:  # found out at the endpoint, after the database's dump
        request.getfixturevalue("source")
        request.getfixturevalue("clients")
    if secret is not None:
        arn = deployed["secrets"].create_secret(
            Name="supabackup/storage",
            SecretString=secret if isinstance(secret, str) else json.dumps(secret))["ARN"]
        monkeypatch.setenv("SUPABACKUP_STORAGE_SECRET_ARN", arn)
    with pytest.raises(ConfigError, match=match):
        backup_handler.handler(load_event(event) if isinstance(event, str) else event,
                               FakeContext())
    assert stored_keys(s3) == [] and open_uploads(s3) == []
    (msg,) = inbox.messages()
    assert msg["MessageAttributes"]["status"]["Value"] == "failed"
    _no_secret_in(capfd.readouterr().out + log_buffer.getvalue(), json.dumps(msg))


def test_a_restore_plans_files_without_keys_and_refuses_without_them(
        deployed: dict[str, Any], source: Project, target: Project, pg15: Cluster,
        inbox: Inbox, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABACKUP_STORAGE_ENDPOINT", source.server.endpoint)
    _storage_secret(deployed, "supabackup/storage", monkeypatch, "SUPABACKUP_STORAGE_SECRET_ARN",
                    **STORAGE_KEYS)
    backup_handler.handler(load_event("backup-full-manual.json"), FakeContext())
    inbox.messages()
    sample = load_event("restore-with-storage-files.json")
    plan = restore_handler.handler({**sample, "dry_run": True}, FakeContext())
    assert any(line.startswith("would write 3 file(s)") and TARGET_URL in line
               for line in plan["plan"]), plan["plan"]
    # no TargetStorageSecretArn, and the target's secret has no storage_* keys
    before = pg15.execute("SELECT count(*) FROM pg_class", target.db)
    with pytest.raises(ConfigError, match=r"the database secret .* "
                       r"\(SUPABACKUP_RESTORE_SECRET_ARN\) lacks storage_access_key_id"):
        restore_handler.handler(sample, FakeContext())
    assert pg15.execute("SELECT count(*) FROM pg_class", target.db) == before
    assert target.files() == {}
    (msg,) = inbox.messages()
    assert "give the stack TargetStorageSecretArn" in msg["Message"]["what_to_do"]


# --- the stack's parameters -----------------------------------------------------------------

STORAGE_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:storage-keys-AbCdEf"


def _decided(value: Any, conditions: dict[str, bool]) -> Any:
    """A variable as CloudFormation sets it, its Fn::If decided by `conditions`."""
    if isinstance(value, dict) and "Fn::If" in value:
        condition, then, otherwise = value["Fn::If"]
        return then if conditions[condition] else otherwise
    return value


@pytest.mark.parametrize("given", [False, True], ids=["defaults", "storage-given"])
def test_the_storage_parameters_reach_the_backup_function_as_addresses_and_an_arn(
        given: bool) -> None:
    from .test_template import function_statements, translate
    parameters = {"StorageEndpoint": SOURCE_URL, "StorageBuckets": "avatars,documents",
                  "StorageSecretArn": STORAGE_SECRET} if given else {}
    cfn = translate(parameters)
    for name in parameters:
        assert cfn["Parameters"][name]["Default"] == ""  # off unless given
    conditions = {"HasStorage": given, "HasStorageSecret": given}
    env = cfn["Resources"]["BackupFunction"]["Properties"]["Environment"]["Variables"]
    storage = {name: _decided(value, conditions) for name, value in env.items()
               if name.startswith("SUPABACKUP_STORAGE_")}
    absent = {"Ref": "AWS::NoValue"}
    assert storage == ({"SUPABACKUP_STORAGE_ENDPOINT": {"Ref": "StorageEndpoint"},
                        "SUPABACKUP_STORAGE_BUCKETS": {"Ref": "StorageBuckets"},
                        "SUPABACKUP_STORAGE_SECRET_ARN": {"Ref": "StorageSecretArn"}}
                       if given else dict.fromkeys(storage, absent))
    # GetSecretValue on StorageSecretArn only when it is given; no other function may
    policy = cfn["Resources"]["BackupFunctionPolicy"]["Properties"]["PolicyDocument"]
    [conditional] = [s for s in policy["Statement"] if "Fn::If" in s]
    assert conditional["Fn::If"][0] == "HasStorageSecret"
    assert conditional["Fn::If"][1]["Resource"] == {"Ref": "StorageSecretArn"}
    assert conditional["Fn::If"][2] == absent
    assert cfn["Conditions"]["HasStorageSecret"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "StorageSecretArn"}, ""]}]}
    for other in ("VerifyFunction", "RestoreFunction"):
        assert {"Ref": "StorageSecretArn"} not in [
            s["Resource"] for s in function_statements(cfn, other)]
    assert "StorageBucketsNeedAnEndpoint" in cfn["Rules"]
