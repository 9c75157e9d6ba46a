"""Helpers the tests share (fixtures live in conftest.py): paths and names, the sample
events, reading the store and SNS, child processes, the Lambda context, and what the
template deploys (read from template.yaml itself, so that a test never restates a number
the stack sets)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfnlint.decode import decode

REPO = Path(__file__).resolve().parent.parent
EVENTS = REPO / "events"
SQL = REPO / "devkit" / "sql"
BUCKET = "sb-test-bucket"
PASSWORD = "handler-Secret-pw-42"
TEMPLATE = REPO / "template.yaml"


def load_event(name: str) -> dict[str, Any]:
    """The sample events users invoke with are the ones tests use."""
    return json.loads((EVENTS / name).read_text())


class Inbox:
    """An SNS topic with an SQS queue subscribed, to read what was published."""

    def __init__(self, sns: Any, sqs: Any) -> None:
        self.sns, self.sqs = sns, sqs
        self.topic_arn = sns.create_topic(Name="supabackup-test")["TopicArn"]
        self.queue_url = sqs.create_queue(QueueName="supabackup-inbox")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                             AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=queue_arn)

    def messages(self) -> list[dict[str, Any]]:
        """Each published message: Subject, Message (parsed JSON), MessageAttributes."""
        out = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            if not got.get("Messages"):
                return out
            for msg in got["Messages"]:
                envelope = json.loads(msg["Body"])
                envelope["Message"] = json.loads(envelope["Message"])
                out.append(envelope)
                self.sqs.delete_message(QueueUrl=self.queue_url,
                                        ReceiptHandle=msg["ReceiptHandle"])


def stored_keys(client: Any, bucket: str = BUCKET) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def open_uploads(client: Any, bucket: str = BUCKET) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def child_pids(name: str, parent: int | None = None) -> list[int]:
    """PIDs of the child processes called `name` (e.g. the running pg_dump) of `parent`
    (default: this process)."""
    me, found = os.getpid() if parent is None else parent, []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and comm == name:
            found.append(int(stat.parent.name))
    return found


def kill_children(name: str) -> int:
    pids = child_pids(name)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


@dataclass
class FakeContext:
    function_name: str = "supabackup-backup"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:supabackup-backup"
    aws_request_id: str = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000



def sam_template() -> dict[str, Any]:
    """template.yaml as CloudFormation reads it (short-form intrinsics made long-form)."""
    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    assert template is not None
    return template


def _resolved(template: dict[str, Any], value: Any, parameters: dict[str, Any]) -> Any:
    """A {"Ref": Parameter} (or a {"Fn::FindInMap"} keyed by one) as the stack would
    resolve it: the value given, else the parameter's default."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        name = value["Ref"]
        return parameters.get(name, template["Parameters"][name]["Default"])
    if isinstance(value, dict) and set(value) == {"Fn::FindInMap"}:
        table, key, field = (_resolved(template, part, parameters)
                             for part in value["Fn::FindInMap"])
        return template["Mappings"][table][str(key)][field]
    return value


def lifecycle_rules(parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The backup bucket's expiration rules as S3's API holds them once a stack is deployed
    with `parameters` (moto's CloudFormation drops lifecycle rules, so tests put these)."""
    template = sam_template()
    rules = template["Resources"]["BackupBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    out = []
    for rule in rules:
        if "ExpirationInDays" not in rule:
            continue
        [tag] = rule["TagFilters"]
        out.append({"ID": rule["Id"], "Status": rule["Status"], "Filter": {"Tag": tag},
                    "Expiration": {"Days": int(_resolved(template, rule["ExpirationInDays"],
                                                         parameters or {}))}})
    return out


def retention_days(parameters: dict[str, Any] | None = None) -> dict[str, int]:
    """{retention class: days} of a stack deployed with `parameters` (defaults otherwise)."""
    return {rule["Filter"]["Tag"]["Value"]: rule["Expiration"]["Days"]
            for rule in lifecycle_rules(parameters)}


# --- change capture -----------------------------------------------------------------------

def server_now(cluster: Any, db: str) -> Any:
    """The server's clock_timestamp(): the time a restore to "now" means."""
    return cluster.execute("SELECT clock_timestamp()", db)[0][0]


def restore_at(cluster: Any, store: Any, database_id: str, when: Any,
               name: str) -> dict[str, Any]:
    """Restore `database_id` as of `when` into a fresh database `name`; its fingerprints."""
    from supabackup import capture
    from supabackup.dburl import ConnectionInfo

    from devkit.compare import table_fingerprints
    cluster.drop_database(name)
    cluster.create_database(name)
    capture.restore_to_time(store, database_id, ConnectionInfo.from_url(cluster.url(name)),
                            when)
    return table_fingerprints(cluster.url(name))


def stored_commits(store: Any, database_id: str) -> list[str]:
    """The commit LSN of every stored transaction, in store order, duplicates kept."""
    import gzip

    from supabackup import capture
    lsns = []
    for segment in capture.segments(store, database_id):
        raw = store.read_small(segment.key)
        assert raw is not None
        lsns += [json.loads(line)["commit_lsn"] for line in gzip.decompress(raw).splitlines()]
    return lsns
