"""A Supabase Storage S3 endpoint: where it is, the keys to it, and what it lists.

The endpoint is a second S3 service beside the store, with keys of its own (a project's
Storage settings issue them): `--storage-endpoint URL` with SUPABACKUP_STORAGE_ACCESS_KEY_ID,
SUPABACKUP_STORAGE_SECRET_ACCESS_KEY and SUPABACKUP_STORAGE_REGION for a backup's source,
the same with TARGET_ after SUPABACKUP_ for a restore's target (on Lambda: optional keys
of the database secret, or a secret of their own). Requests are path-style, as Supabase
requires, and go over TLS: plain http is taken only on loopback (a local test endpoint).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import ConfigError, StoreError

SOURCE_ENV = "SUPABACKUP_STORAGE"
TARGET_ENV = "SUPABACKUP_TARGET_STORAGE"
# Connections to the endpoint: the copy's workers, and a few for listing alongside.
POOL = 16


@dataclass(frozen=True)
class Listed:
    """One file as the endpoint lists it."""

    bucket: str
    key: str
    size: int
    etag: str            # without quotes
    last_modified: str   # ISO time

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"


@dataclass(frozen=True)
class StorageEndpoint:
    url: str
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def from_env(cls, url: str, env_prefix: str = SOURCE_ENV,
                 environ: Mapping[str, str] | None = None) -> StorageEndpoint:
        """The endpoint at `url` with the keys of `<env_prefix>_ACCESS_KEY_ID`, ..."""
        environ = os.environ if environ is None else environ
        names = [f"{env_prefix}_{n}" for n in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "REGION")]
        return cls.of(url, {n: environ.get(n, "") for n in names}, names)

    @classmethod
    def of(cls, url: str, values: Mapping[str, Any], names: list[str]) -> StorageEndpoint:
        """The endpoint at `url` with keys `values[names[0..2]]` (access key id, secret,
        region); a missing one is a ConfigError that names where it is looked for."""
        _check_url(url)
        missing = [n for n in names if not str(values.get(n) or "").strip()]
        if missing:
            raise ConfigError(f"the Storage endpoint {url} needs {', '.join(missing)}",
                              "set them from the project's Storage settings (S3 access keys; "
                              "the region is the project's)")
        key_id, secret, region = (str(values[n]).strip() for n in names)
        return cls(url=url.rstrip("/"), region=region, access_key_id=key_id,
                   secret_access_key=secret)

    def display(self) -> str:
        """Where the endpoint is, for logs, manifests and SNS (it holds no secret)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" \
               f"{parts.path}"

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=POOL,
                          retries={"mode": "standard", "max_attempts": 5},
                          connect_timeout=10, read_timeout=60,
                          # Supabase's endpoint, like S3 before 2025, checks no CRC headers
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def buckets(self, client: Any, named: tuple[str, ...] = ()) -> list[str]:
        """Every bucket, or the ones named (each must exist: a typo is no empty backup)."""
        try:
            found = sorted(b["Name"] for b in client.list_buckets().get("Buckets", []))
        except (ClientError, BotoCoreError) as exc:
            raise endpoint_error(exc, f"the buckets of {self.display()}") from None
        unknown = [b for b in named if b not in found]
        if unknown:
            raise ConfigError(f"no bucket {', '.join(unknown)} at {self.display()} (it has: "
                              f"{', '.join(found) or 'none'})",
                              "name only buckets it has (--storage-buckets, or the "
                              "event's storage.buckets)")
        return list(named) if named else found

    def files(self, client: Any, bucket: str) -> Iterator[Listed]:
        """Every file of `bucket`, page after page, in key order (no delimiter: the
        "folders" are parts of keys)."""
        paginator = client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    yield Listed(bucket=bucket, key=item["Key"], size=int(item["Size"]),
                                 etag=unquote(item.get("ETag", "")),
                                 last_modified=item["LastModified"].isoformat()
                                 if "LastModified" in item else "")
        except (ClientError, BotoCoreError) as exc:
            raise endpoint_error(exc, f"{self.display()}/{bucket}") from None


def parse_buckets(text: str | None) -> tuple[str, ...]:
    """--storage-buckets A,B as a tuple of names (empty: every bucket)."""
    names = tuple(b.strip() for b in (text or "").split(",") if b.strip())
    if len(set(names)) != len(names):
        raise ConfigError(f"--storage-buckets names a bucket twice: {text}")
    return names


def unquote(etag: str) -> str:
    """An ETag without its quotes: S3 sends `"abc"`; storage.objects holds it either way."""
    return etag.strip().strip('"')


def _check_url(url: str) -> None:
    parts = urlsplit(url or "")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"the Storage endpoint {url!r} is not an http(s) URL",
                          "pass the project's S3 endpoint, e.g. "
                          "https://<ref>.storage.supabase.co/storage/v1/s3")
    if parts.username or parts.password:
        raise ConfigError("the Storage endpoint URL must not carry credentials",
                          "pass the keys in SUPABACKUP_STORAGE_ACCESS_KEY_ID and "
                          "SUPABACKUP_STORAGE_SECRET_ACCESS_KEY")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ConfigError(f"the Storage endpoint {url} is plain http: its keys and files "
                          "would cross the network unencrypted", "use its https:// URL")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_error(exc: Exception, where: str) -> StoreError:
    """A StoreError naming the Storage endpoint's error and what it was about."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "error")
        hint = ("check the Storage S3 access keys and the region (the project's)"
                if code in ("403", "AccessDenied", "InvalidAccessKeyId",
                            "SignatureDoesNotMatch") else
                "check the Storage endpoint URL and that the project is running")
        return StoreError(" ".join(f"Storage {code} on {where}: {err.get('Message', '')}"
                                   .split()).rstrip(": "), hint)
    return StoreError(f"Storage request failed on {where}: {' '.join(str(exc).split())[:300]}",
                      "check the network path to the Storage endpoint; the run can be retried")
