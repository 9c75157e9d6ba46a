"""Shared fixtures: real PostgreSQL 15 and 17 servers, moto for AWS, fault injection.

Clusters are started once per session (as the `postgres` OS user) on free loopback
ports; each test gets fresh databases in them. AWS is moto: in-process (`aws`) for the
engine and handler tests, its server on loopback (`local_s3`) for the CLI subprocesses.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from supabackup.handlers import common
from supabackup.store import BOTO_CONFIG, MIB, Store, StoreURL

from devkit.pg import Cluster, bindir_for, logical_cluster
from devkit.s3 import FAKE_CREDENTIALS, LocalS3, MotoProcess

from .helpers import BUCKET, PASSWORD, Inbox

# Never reach real AWS from a test, whatever the developer's shell has set.
for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
             "SUPABACKUP_PG_BINDIR", "SUPABACKUP_STORE", "SUPABACKUP_DATABASE_URL"):
    os.environ.pop(_var, None)
os.environ.update(FAKE_CREDENTIALS)


# A test that uses none of these and is not marked `tools` or `server` is a unit test
# (`pytest -m unit`).
SERVER_FIXTURES = frozenset({"pg15", "pg17", "cluster", "logical", "new_db", "local_s3",
                             "storage_servers",
                             "deployed", "restore_target"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if not (uses & SERVER_FIXTURES or item.get_closest_marker("tools")
                or item.get_closest_marker("server")):
            item.add_marker(pytest.mark.unit)


_clusters: dict[int, Cluster] = {}


def _cluster(major: int) -> Cluster:
    if major not in _clusters:
        _clusters[major] = Cluster(bindir_for(major)).start()
    return _clusters[major]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for cluster in _clusters.values():
        cluster.stop()


@pytest.fixture(scope="session")
def pg15() -> Cluster:
    return _cluster(15)


@pytest.fixture(scope="session")
def pg17() -> Cluster:
    return _cluster(17)


@pytest.fixture(scope="module", params=[(15, "wal2json"), (17, "pgoutput")],
                ids=["pg15-wal2json", "pg17-pgoutput"])
def logical(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A server with wal_level=logical (adapted to the release) for change capture, and the
    plugin capture will find on it: wal2json on PostgreSQL 15 from Debian
    (postgresql-15-wal2json), pgoutput on the pinned 17, which has no wal2json."""
    major, plugin = request.param
    cluster = logical_cluster(major).start()
    cluster.plugin = plugin  # type: ignore[attr-defined]
    yield cluster
    cluster.stop()


@pytest.fixture(params=[15, 17], ids=["pg15", "pg17"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Each test that takes `cluster` runs against PostgreSQL 15 and 17."""
    return _cluster(request.param)


_names = itertools.count()


@pytest.fixture
def new_db(request: pytest.FixtureRequest) -> Iterator[Callable[[Cluster], str]]:
    """Factory: a fresh, empty database on a cluster; returns its name. Dropped after."""
    made: list[tuple[Cluster, str]] = []

    def make(cluster: Cluster) -> str:
        name = f"t{os.getpid()}_{next(_names)}"
        cluster.create_database(name)
        made.append((cluster, name))
        return name

    yield make
    for cluster, name in made:
        cluster.drop_database(name)


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


@pytest.fixture
def s3(aws: None) -> Any:
    """S3 as the engine talks to it on Lambda: botocore's standard retries (BOTO_CONFIG)."""
    client = boto3.client("s3", region_name="us-east-1", config=BOTO_CONFIG)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def store(s3: Any) -> Store:
    # Small parts so that modest test databases span several parts, as real ones do.
    return Store(StoreURL.parse(f"s3://{BUCKET}/backups"), s3, min_part_size=5 * MIB,
                 concurrency=2)


@pytest.fixture
def inbox(aws: None) -> Inbox:
    return Inbox(boto3.client("sns", region_name="us-east-1"),
                 boto3.client("sqs", region_name="us-east-1"))


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


@pytest.fixture(scope="session")
def _storage_servers() -> Iterator[tuple[MotoProcess, MotoProcess]]:
    with MotoProcess() as source, MotoProcess() as target:
        yield source, target


@pytest.fixture
def storage_servers(_storage_servers: tuple[MotoProcess, MotoProcess]
                    ) -> tuple[MotoProcess, MotoProcess]:
    """Two S3 endpoints of their own (moto's server in its own process, emptied for each
    test), standing in for the Supabase Storage of a source project and of a target."""
    for server in _storage_servers:
        server.reset()
    return _storage_servers


# --- the stack, as the Lambda handlers see it -------------------------------------------

@pytest.fixture
def deployed(pg15: Cluster, new_db: Any, s3: Any, inbox: Inbox,
             monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the stack provides: a bucket, a topic, a secret in the RDS shape."""
    db = new_db(pg15)
    pg15.execute(f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sb_lambda')"
                 f" THEN CREATE ROLE sb_lambda LOGIN SUPERUSER PASSWORD '{PASSWORD}'; END IF;"
                 f" END$$; CREATE TABLE orders (id int PRIMARY KEY); "
                 f"INSERT INTO orders SELECT generate_series(1, 100)", db)
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="supabackup/db", SecretString=json.dumps({
        "host": "127.0.0.1", "port": pg15.port, "username": "sb_lambda",
        "password": PASSWORD, "dbname": db}))["ARN"]
    monkeypatch.setenv("SUPABACKUP_STORE", f"s3://{BUCKET}/prod")
    monkeypatch.setenv("SUPABACKUP_DB_SECRET_ARN", arn)
    monkeypatch.setenv("SUPABACKUP_SNS_TOPIC_ARN", inbox.topic_arn)
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "supabackup")
    monkeypatch.setattr(common, "clients", {
        "s3": s3, "secretsmanager": secrets, "sns": inbox.sns})
    return {"db": db, "secrets": secrets, "arn": arn}


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """The handlers' structured log lines, formatted by Powertools' own formatter (every
    handler logs through common.logger)."""
    buffer = io.StringIO()
    extra = logging.StreamHandler(buffer)
    extra.setFormatter(common.logger.registered_formatter)
    common.logger.addHandler(extra)
    yield buffer
    common.logger.removeHandler(extra)
