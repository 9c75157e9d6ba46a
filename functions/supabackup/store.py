"""The S3 store: layout, streaming uploads, the manifest commit, and listing.

Layout:  s3://BUCKET/PREFIX/<database-id>/backups/<backup-id>/{roles.sql,database.dump,manifest.json}

A backup exists if and only if its manifest exists. `BackupWriter` uploads data objects
first, then the manifest with `IfNoneMatch: *` so that it is never overwritten; on any
failure, `discard()` aborts the run's multipart uploads and deletes what it wrote.
Uploads use boto3's transfer manager on a non-seekable stream: memory is bounded by part
size times the number of parts in flight, and the part size grows with the expected size
so that no archive needs more than 10,000 parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import ConfigError, StoreError
from .manifest import Manifest, StoredObject

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

MIB = 1024 * 1024
MIN_PART = 8 * MIB
MAX_PARTS = 10_000
# The archive is compressed and almost always smaller than the database; twice the
# database size leaves room for the rare archive that is not.
SIZE_SAFETY = 2
CONCURRENCY = 4
# Part buffers held at once (about 2 x slots + 1: in flight, read ahead, being read) stay
# near this whatever the part size, so memory does not grow with the database: 8 MiB parts
# keep 4 upload slots, 16 MiB parts 2, larger parts 1 (bench/README.md has the figures).
PART_MEMORY = 80 * MIB
MANIFEST = "manifest.json"
BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5},
                     connect_timeout=10, read_timeout=60)


def s3_client() -> S3Client:
    """An S3 client with botocore's standard retries; endpoint from AWS_ENDPOINT_URL_S3."""
    return aws_client("s3")


def aws_client(service: str) -> Any:
    """A boto3 client, or a clear error when the environment's endpoint or region is not
    one (AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION)."""
    try:
        return boto3.client(service, config=BOTO_CONFIG)  # type: ignore[call-overload]
    except (ValueError, BotoCoreError) as exc:
        raise ConfigError(f"cannot create the {service} client: {' '.join(str(exc).split())}",
                          "check AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL and AWS_DEFAULT_REGION"
                          ) from None


def part_size_for(expected_bytes: int, minimum: int = MIN_PART) -> int:
    """Smallest whole-MiB part size, at least `minimum`, that fits the archive in 10,000 parts."""
    needed = math.ceil(expected_bytes * SIZE_SAFETY / MAX_PARTS)
    return max(minimum, math.ceil(needed / MIB) * MIB)


class Readable(Protocol):
    """Anything with read(n): a file, a BytesIO, a running pg_dump."""

    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """A child's stdin, or any sink with write and close."""

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...


class HashingReader:
    """Wraps a readable stream; counts bytes and computes sha256 as they pass."""

    def __init__(self, raw: Readable) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    @property
    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


@dataclass(frozen=True)
class StoreURL:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"the store {url!r} is not an s3://BUCKET/PREFIX address",
                              "pass --store s3://BUCKET/PREFIX (or set SUPABACKUP_STORE)")
        return cls(bucket=parts.netloc, prefix=parts.path.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


class Store:
    """Narrow interface to one store: the only code that talks to S3."""

    def __init__(self, url: StoreURL, client: S3Client | None = None,
                 min_part_size: int = MIN_PART, concurrency: int = CONCURRENCY) -> None:
        self.url = url
        self.s3 = client or s3_client()
        self.min_part_size = min_part_size
        self.concurrency = concurrency

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.url.prefix, *parts) if p)

    def backup_key(self, database_id: str, backup_id: str, name: str = "") -> str:
        return self.key(database_id, "backups", backup_id, name)

    def check_access(self) -> None:
        """Fail before any dump starts when the bucket is missing or out of reach."""
        try:
            self.s3.head_bucket(Bucket=self.url.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"bucket {self.url.bucket!r} does not exist",
                                 "create it (the SAM stack does) or fix --store") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise StoreError(f"access to bucket {self.url.bucket!r} is denied",
                                 "check the IAM policy and the bucket policy") from None
            raise store_error(exc, f"s3://{self.url.bucket}") from None
        except BotoCoreError as exc:
            raise store_error(exc, f"s3://{self.url.bucket}") from None

    # --- writing -----------------------------------------------------------------------

    def begin(self, database_id: str, backup_id: str) -> BackupWriter:
        """Start writing a backup; refuse an id that already has objects (never overwrite)."""
        prefix = self.backup_key(database_id, backup_id) + "/"
        try:
            listed = self.s3.list_objects_v2(Bucket=self.url.bucket, Prefix=prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, prefix) from None
        if listed.get("KeyCount", 0):
            raise StoreError(f"backup {backup_id} already exists in {self.url}",
                             "another run wrote the same backup id; run again")
        return BackupWriter(self, database_id, backup_id)

    # --- small control objects (locks) ----------------------------------------------------

    def create_exclusive(self, key: str, body: bytes,
                         content_type: str = "application/json") -> bool:
        """Put `body` at `key` unless something is there already (If-None-Match: *)."""
        try:
            self.s3.put_object(Bucket=self.url.bucket, Key=key, Body=body, IfNoneMatch="*",
                               ContentType=content_type)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                             "ConditionalRequestConflict"):
                return False
            raise store_error(exc, key) from None
        except BotoCoreError as exc:
            raise store_error(exc, key) from None
        return True

    def put_small(self, key: str, body: bytes, content_type: str = "",
                  tags: dict[str, str] | None = None) -> None:
        """Put a small object whole (capture's segments, index entries and records)."""
        extra: dict[str, str] = {"ContentType": content_type} if content_type else {}
        if tags:
            extra["Tagging"] = tagging(tags)
        try:
            self.s3.put_object(Bucket=self.url.bucket, Key=key, Body=body, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None

    def read_small(self, key: str) -> bytes | None:
        """A small object's bytes, or None when there is none."""
        try:
            return bytes(self.s3.get_object(Bucket=self.url.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise store_error(exc, key) from None
        except BotoCoreError as exc:
            raise store_error(exc, key) from None

    def delete_key(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.url.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None

    # --- retention ---------------------------------------------------------------------

    def retention_tag(self, manifest: Manifest) -> str:
        """The retention class a backup's manifest object carries now."""
        key = self.backup_key(manifest.database_id, manifest.backup_id, MANIFEST)
        try:
            tags = self.s3.get_object_tagging(Bucket=self.url.bucket, Key=key)["TagSet"]
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None
        return next((t["Value"] for t in tags if t["Key"] == "retention"), manifest.retention)

    def retag(self, manifest: Manifest, retention: str) -> None:
        """Give every object of a backup (its manifest last) the retention class."""
        tags = {"TagSet": [{"Key": "retention", "Value": retention},
                           {"Key": "kind", "Value": manifest.kind}]}
        for name in [o.name for o in manifest.objects] + [MANIFEST]:
            key = self.backup_key(manifest.database_id, manifest.backup_id, name)
            try:
                self.s3.put_object_tagging(Bucket=self.url.bucket, Key=key, Tagging=tags)
            except (ClientError, BotoCoreError) as exc:
                raise store_error(exc, key) from None

    def expiration_days(self) -> dict[str, int]:
        """{retention class: days} as the bucket's lifecycle rules expire our objects.

        The rules are what deletes backups, so the retention pass reads its clock from
        them rather than from a copy of their numbers: a stack deployed with other days,
        or a rule edited by hand, re-tags by the days that really apply. A class no
        enabled rule expires (a bucket without rules, say) is left out: it never expires.
        """
        try:
            rules = self.s3.get_bucket_lifecycle_configuration(Bucket=self.url.bucket)["Rules"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return {}
            raise store_error(exc, f"the lifecycle rules of s3://{self.url.bucket}") from None
        except BotoCoreError as exc:
            raise store_error(exc, f"the lifecycle rules of s3://{self.url.bucket}") from None
        days: dict[str, int] = {}
        for rule in rules:
            retention = self._expired_class(rule)
            if retention is not None:
                days[retention] = min(days.get(retention, rule["Expiration"]["Days"]),
                                      rule["Expiration"]["Days"])
        return days

    def _expired_class(self, rule: dict[str, Any]) -> str | None:
        """The retention class an enabled rule expires after some days, when it applies to
        our prefix and filters on nothing but that tag (and a prefix)."""
        if rule.get("Status") != "Enabled" or "Days" not in rule.get("Expiration", {}):
            return None
        spec = rule.get("Filter", {"Prefix": rule.get("Prefix", "")})
        spec = spec.get("And", spec)
        tags = spec.get("Tags", [spec["Tag"]] if "Tag" in spec else [])
        prefix = spec.get("Prefix", "")
        ours = self.key() + "/" if self.url.prefix else ""
        if len(tags) != 1 or tags[0]["Key"] != "retention" or not ours.startswith(prefix):
            return None
        return str(tags[0]["Value"])

    # --- reading -----------------------------------------------------------------------

    def database_ids(self) -> list[str]:
        prefix = self.key() + "/" if self.url.prefix else ""
        found = []
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.url.bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    found.append(common["Prefix"][len(prefix):].rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, str(self.url)) from None
        return sorted(found)

    def manifests(self, database_id: str) -> list[Manifest]:
        """Every committed backup of a database, oldest first. Only manifests count."""
        return [self.read_manifest_key(k) for k in self.manifest_keys(database_id)]

    def manifest_keys(self, database_id: str) -> list[str]:
        """The keys of every manifest of a database, oldest first."""
        prefix = self.key(database_id, "backups") + "/"
        return sorted(k for k in self.list_keys(prefix) if k.endswith("/" + MANIFEST))

    def object_names(self, database_id: str, backup_id: str) -> set[str]:
        """The names of the objects stored in one backup's folder."""
        prefix = self.backup_key(database_id, backup_id) + "/"
        return {k[len(prefix):] for k in self.list_keys(prefix)}

    def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """Every key under `prefix` (after `start_after`, when given), in key order."""
        keys = []
        paginator = self.s3.get_paginator("list_objects_v2")
        extra = {"StartAfter": start_after} if start_after else {}
        try:
            for page in paginator.paginate(Bucket=self.url.bucket, Prefix=prefix, **extra):
                keys += [o["Key"] for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, str(self.url)) from None
        return keys

    def read_manifest_key(self, key: str) -> Manifest:
        try:
            raw = self.s3.get_object(Bucket=self.url.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None
        return Manifest.from_json(raw, key)

    def stream_to(self, manifest: Manifest, name: str, pipe: Writable,
                  read_all: bool = True) -> tuple[int, str]:
        """Stream one object into a child's stdin; return its size and sha256.

        A reader may stop early and rightly so (pg_restore --section=pre-data reads only the
        head of an archive and exits). With read_all, the rest is still read and hashed, so
        the size and sha256 always describe the whole object; the reader's exit status
        says whether it was content. The pipe is closed at the end.
        """
        digest, size, reading = hashlib.sha256(), 0, True
        for chunk in self.open_object(manifest, name):
            digest.update(chunk)
            size += len(chunk)
            if reading:
                try:
                    pipe.write(chunk)
                except BrokenPipeError:
                    reading = False
                    if not read_all:
                        break
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
        return size, digest.hexdigest()

    def open_object(self, manifest: Manifest, name: str,
                    held_in: str | None = None) -> Iterator[bytes]:
        """Stream one object of a backup in chunks, without a local copy; `held_in`: the
        backup of the same database whose folder holds it (a table part an incremental
        did not dump)."""
        key = self.backup_key(manifest.database_id, held_in or manifest.backup_id, name)
        try:
            body = self.s3.get_object(Bucket=self.url.bucket, Key=key)["Body"]
            yield from body.iter_chunks(chunk_size=1 * MIB)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None


@dataclass
class BackupWriter:
    """Uploads one backup's objects, then commits its manifest; or discards them all."""

    store: Store
    database_id: str
    backup_id: str
    written: list[str] = field(default_factory=list)

    def upload(self, name: str, stream: Readable, expected_bytes: int, tags: dict[str, str],
               *, kind: str, format: str, compression: str = "none",
               share: int = 1) -> StoredObject:
        """Stream `stream` to S3 until EOF (the stream itself decides if EOF is good); the
        object as the manifest records it, with the size and sha256 of what was sent.
        `share`: how many uploads run at once and share PART_MEMORY."""
        reader = HashingReader(stream)
        key = self.store.backup_key(self.database_id, self.backup_id, name)
        part = part_size_for(expected_bytes, self.store.min_part_size)
        slots = max(1, min(self.store.concurrency, (PART_MEMORY // share // part - 1) // 2))
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                max_concurrency=slots)
        # Parts read ahead of the uploaders; boto3's constructor does not expose it.
        config.max_in_memory_upload_chunks = slots
        self.written.append(key)
        try:
            self.store.s3.upload_fileobj(
                reader, self.store.url.bucket, key, Config=config,
                ExtraArgs={"Tagging": tagging(tags), "ContentType": "application/octet-stream"},
            )
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, key) from None
        return StoredObject(name=name, kind=kind, size=reader.size, sha256=reader.hexdigest,
                            format=format, compression=compression)

    def commit(self, manifest: Manifest, tags: dict[str, str]) -> str:
        """Write the manifest last; refuse to overwrite an existing one."""
        key = self.store.backup_key(self.database_id, self.backup_id, MANIFEST)
        # A put can land even when its response is lost: discard() must remove it too.
        self.written.insert(0, key)
        try:
            self.store.s3.put_object(Bucket=self.store.url.bucket, Key=key,
                                     Body=manifest.to_json(), IfNoneMatch="*",
                                     ContentType="application/json", Tagging=tagging(tags))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise StoreError(f"backup {self.backup_id} already exists in {self.store.url}",
                                 "another run committed the same backup id; run again") from None
            raise store_error(exc, key) from None
        return key

    def discard(self) -> None:
        """Abort this run's multipart uploads and delete the objects it wrote.

        The manifest goes first, so the backup stops existing before its data does.
        """
        s3, bucket = self.store.s3, self.store.url.bucket
        prefix = self.store.backup_key(self.database_id, self.backup_id) + "/"
        uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        for upload in uploads:
            if upload["Key"] in self.written:
                s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                          UploadId=upload["UploadId"])
        for key in self.written:
            s3.delete_object(Bucket=bucket, Key=key)


def tagging(tags: dict[str, str]) -> str:
    return urlencode(tags)


def store_error(exc: Exception, where: str) -> StoreError:
    """A StoreError that names the S3 error and the object."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        text = f"S3 {err.get('Code', 'error')} on {where}: {err.get('Message', '')}"
        return StoreError(" ".join(text.split()).rstrip(": "),
                          "check the bucket, its policy and the function's IAM role")
    return StoreError(f"S3 request failed on {where}: {' '.join(str(exc).split())[:500]}",
                      "check the network path and the S3 endpoint; the run can be retried")
