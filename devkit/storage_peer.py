"""Supabase Storage's S3 endpoint, as far as a backup can see it: moto for the bytes, and
the rows Storage's own code writes to `storage.objects` for each request.

What it writes is read from supabase/storage (migrations/tenant and src/):
  - PutObject and CompleteMultipartUpload (src/storage/uploader.ts completeUpload ->
    src/storage/database/pg.ts upsertObject):
        INSERT INTO storage.objects (name, owner, owner_id, bucket_id, metadata,
                                     user_metadata, version) ...
        ON CONFLICT (name, bucket_id) DO UPDATE SET metadata, user_metadata, version
    with owner/owner_id left out for S3 access keys (no JWT sub), so an overwrite keeps
    id, created_at, owner and last_accessed_at, takes a new version (randomUUID), and the
    update_objects_updated_at trigger stamps updated_at. metadata is the backend's:
    {eTag (quoted), size, mimetype (Content-Type, else application/octet-stream),
    cacheControl (Cache-Control, else no-cache), lastModified, contentLength,
    httpStatusCode: 200}; user_metadata the x-amz-meta-* headers, keys lowercased, {}
    when there are none.
  - DeleteObject (src/storage/object.ts deleteObject): the row is deleted in the request's
    scope, which sets storage.allow_delete_query (migration 0055's guard).
  - CreateBucket (s3-handler.ts createBucket): a storage.buckets row, id = name.
  - ListObjectsV2 lists the rows (LastModified = updated_at, ETag = metadata.eTag);
    moto lists its own objects, which hold the same keys here.
`attach(client, dsn)` makes a boto3 client of the moto endpoint write those rows after
each such call, so code under test that uploads through it meets Storage's behaviour.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg2

UPSERT = """
INSERT INTO storage.objects (name, bucket_id, metadata, user_metadata, version)
VALUES (%(name)s, %(bucket)s, %(metadata)s, %(user_metadata)s, %(version)s)
ON CONFLICT (name, bucket_id) DO UPDATE SET metadata = EXCLUDED.metadata,
    user_metadata = EXCLUDED.user_metadata, version = EXCLUDED.version
"""


class StoragePeer:
    """A moto S3 client whose writes also write Storage's rows into `dsn`'s database."""

    def __init__(self, client: Any, dsn: str) -> None:
        self.client = client
        self.dsn = dsn

    def create_bucket(self, name: str, public: bool = False) -> None:
        self.client.create_bucket(Bucket=name)
        self._sql("INSERT INTO storage.buckets (id, name, public) VALUES (%s, %s, %s) "
                  "ON CONFLICT DO NOTHING", (name, name, public))

    def put(self, bucket: str, key: str, body: bytes, content_type: str | None = None,
            cache_control: str | None = None, metadata: dict[str, str] | None = None) -> str:
        """Upload as a client of Supabase's S3 endpoint; the new row's version."""
        extra: dict[str, Any] = {"Metadata": metadata or {}}
        if content_type:
            extra["ContentType"] = content_type
        if cache_control:
            extra["CacheControl"] = cache_control
        self.client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        return self.record_upload(bucket, key)

    def record_upload(self, bucket: str, key: str) -> str:
        """The row Storage writes once an upload of `key` is complete (its backend's HEAD)."""
        head = self.client.head_object(Bucket=bucket, Key=key)
        metadata = {"eTag": head["ETag"], "size": head["ContentLength"],
                    "mimetype": head.get("ContentType") or "application/octet-stream",
                    "cacheControl": head.get("CacheControl") or "no-cache",
                    "lastModified": head["LastModified"].isoformat(),
                    "contentLength": head["ContentLength"], "httpStatusCode": 200}
        version = str(uuid.uuid4())
        user = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        self._sql(UPSERT, {"name": key, "bucket": bucket, "metadata": json.dumps(metadata),
                           "user_metadata": json.dumps(user), "version": version})
        return version

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)
        self.forget(bucket, key)

    def forget(self, bucket: str, key: str) -> None:
        """What Storage's DeleteObject does to the row (in its request's scope)."""
        self._sql("SELECT set_config('storage.allow_delete_query', 'true', true); "
                  "DELETE FROM storage.objects WHERE bucket_id = %s AND name = %s",
                  (bucket, key))

    def _sql(self, statement: str, params: Any) -> None:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
        finally:
            conn.close()


def attach(client: Any, dsn: str) -> StoragePeer:
    """Make `client` (of the moto endpoint) write Storage's rows after each PutObject,
    CompleteMultipartUpload, DeleteObject and CreateBucket it sends."""
    peer = StoragePeer(client, dsn)

    def keep(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["storage_peer"] = (params.get("Bucket"), params.get("Key"))

    def after(event_name: str, context: dict[str, Any], http_response: Any,
              **_: Any) -> None:
        if http_response.status_code >= 300 or "storage_peer" not in context:
            return
        bucket, key = context["storage_peer"]
        op = event_name.rsplit(".", 1)[-1]
        if op in ("PutObject", "CompleteMultipartUpload"):
            peer.record_upload(bucket, key)
        elif op == "DeleteObject":
            peer.forget(bucket, key)
        elif op == "CreateBucket":
            peer._sql("INSERT INTO storage.buckets (id, name) VALUES (%s, %s) "
                      "ON CONFLICT DO NOTHING", (bucket, bucket))

    for op in ("PutObject", "CompleteMultipartUpload", "DeleteObject", "CreateBucket"):
        client.meta.events.register(f"before-parameter-build.s3.{op}", keep)
        client.meta.events.register(f"after-call.s3.{op}", after)
    return peer
