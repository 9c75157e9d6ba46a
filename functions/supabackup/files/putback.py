"""A restore's files: written into the target's buckets, and its rows made the backup's.

    the database is restored first (storage.buckets and storage.objects come back with it)
    -> keep the restored rows of storage.objects aside (they are the backup's)
    -> create each bucket the target's endpoint does not have (on Supabase the restored
       storage.buckets row is the bucket)
    -> write every file, bytes checked against the backup's sha256 before they count,
       with its content type, cache control and user metadata
    -> in one transaction, make storage.objects the backup's rows again

Supabase's S3 endpoint writes a row of its own for every upload (a new id and version,
no owner, metadata of now; an upload over an existing name updates that row), so the
last step deletes the rows an upload changed or added, where the backup's differ, and
inserts the backup's: by (bucket_id, name), which is unique, so nothing is doubled, and
by insert rather than update, which the table's update_updated_at trigger would stamp.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from psycopg2 import sql

from ..db import connect
from ..dburl import ConnectionInfo
from ..errors import ConfigError, StoreError
from ..manifest import FileSet, Manifest, StoredFile
from ..notify import human_bytes
from ..store import HashingReader, Store, store_error
from .copy import FILE_WORKERS, LARGE_PART, SMALL, blob_key
from .endpoint import StorageEndpoint, endpoint_error
from .instep import has_objects_table

log = logging.getLogger(__name__)
KEPT = "supabackup_backup_objects"  # the temporary table the backup's rows wait in


@dataclass
class FilesRestore:
    endpoint: str
    files: int = 0
    bytes: int = 0
    buckets_created: list[str] = field(default_factory=list)
    rows_restored: int = 0     # rows of storage.objects the uploads had changed, put back
    inexact: list[str] = field(default_factory=list)  # what is not as the backup held it

    def lines(self) -> list[str]:
        out = [f"files: wrote {self.files} file(s), {human_bytes(self.bytes)}, to "
               f"{self.endpoint}" + (f"; created bucket(s) {', '.join(self.buckets_created)}"
                                     if self.buckets_created else "")]
        if self.rows_restored:
            out.append(f"files: {self.rows_restored} row(s) of storage.objects written by "
                       "the uploads were put back as the backup has them")
        return out


def files_of(manifest: Manifest) -> FileSet:
    if manifest.files is None:
        raise ConfigError(f"backup {manifest.backup_id} holds no Storage files (it was "
                          "taken without a Storage endpoint)",
                          "restore without a target Storage endpoint "
                          "(--target-storage-endpoint, or an event's target_storage), or "
                          "pick a backup with files (`supabackup list` shows them)")
    return manifest.files


def describe_files(manifest: Manifest, endpoint: StorageEndpoint) -> list[str]:
    """What a restore would write (the dry run), a line per file after a summary."""
    files = files_of(manifest)
    out = [f"would write {len(files.files)} file(s), {human_bytes(files.total_bytes)}, into "
           f"bucket(s) {', '.join(files.buckets) or '-'} at {endpoint.display()}, then make "
           "storage.objects the backup's rows"]
    out += [f"  {f.path} ({f.size} bytes, {f.content_type or 'no content type'})"
            for f in files.files]
    out += [f"would not be as of the backup: {line}" for line in _known_inexact(files)]
    return out


def _known_inexact(files: FileSet) -> list[str]:
    out = [f"file {line}" for line in files.out_of_step()]
    if not files.complete:
        out.append(f"{len(files.missing)} file(s) were not copied by this backup (it ran out "
                   f"of time), e.g. {', '.join(files.missing[:5])}")
    return out


def restore_files(store: Store, manifest: Manifest, endpoint: StorageEndpoint,
                  target: ConnectionInfo, workers: int = FILE_WORKERS) -> FilesRestore:
    """Write the backup's files to `endpoint` and make `target`'s rows the backup's."""
    files = files_of(manifest)
    report = FilesRestore(endpoint=endpoint.display(), inexact=_known_inexact(files))
    client = endpoint.client()
    conn = connect(target)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            rows = has_objects_table(cur)
            if rows:
                cur.execute(sql.SQL("CREATE TEMP TABLE {} AS SELECT * FROM storage.objects "
                                    "WHERE bucket_id = ANY(%s)").format(sql.Identifier(KEPT)),
                            (files.buckets,))
                report.inexact += _rows_of_other_buckets(cur, files.buckets)
            else:
                report.inexact.append("the target database has no storage.objects: the "
                                      "files were written, their rows were not")
        report.buckets_created = _ensure_buckets(client, endpoint, files.buckets)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="putback") as pool:
            for stored, problem in pool.map(lambda f: put_file(store, manifest, client, f),
                                            files.files):
                if problem:
                    report.inexact.append(f"file {stored.path}: {problem}")
                else:
                    report.files += 1
                    report.bytes += stored.size
        if rows:
            report.rows_restored, versions = _rows_as_backed_up(conn, files)
            if versions:
                report.inexact.append(
                    f"storage.objects.version of {versions} row(s) is the target's own, not "
                    "the backup's: Storage finds each file's bytes by it")
    finally:
        conn.close()
    log.info("restored %d file(s) of %s to %s", report.files, manifest.backup_id,
             endpoint.display())
    return report


def _rows_of_other_buckets(cur: Any, copied: list[str]) -> list[str]:
    """A line for the restored rows of storage.objects in buckets the backup did not copy
    (it named others with --storage-buckets): the database has them, the target's
    Storage has no file for them."""
    cur.execute("SELECT bucket_id, count(*) FROM storage.objects "
                "WHERE NOT (bucket_id = ANY(%s)) GROUP BY bucket_id ORDER BY bucket_id",
                (copied,))
    return [f"bucket {bucket}: {n} row(s) of storage.objects came back with the database, "
            "but the backup did not copy this bucket's files (it named its buckets): the "
            "target has no file for them" for bucket, n in cur.fetchall()]


def _ensure_buckets(client: Any, endpoint: StorageEndpoint, buckets: list[str]) -> list[str]:
    created = []
    for bucket in buckets:
        try:
            client.head_bucket(Bucket=bucket)
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket",
                                                                 "NotFound"):
                raise endpoint_error(exc, f"{endpoint.display()}/{bucket}") from None
        except BotoCoreError as exc:
            raise endpoint_error(exc, f"{endpoint.display()}/{bucket}") from None
        extra = ({} if endpoint.region == "us-east-1" else
                 {"CreateBucketConfiguration": {"LocationConstraint": endpoint.region}})
        try:
            client.create_bucket(Bucket=bucket, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise endpoint_error(exc, f"creating bucket {bucket}") from None
        created.append(bucket)
    return created


def put_file(store: Store, manifest: Manifest, client: Any, stored: StoredFile
         ) -> tuple[StoredFile, str]:
    """Write one file; ("" when written, else why not). Bytes that do not hash to the
    manifest's sha256 are never left at the target."""
    key = blob_key(store, manifest.database_id, stored.sha256)
    try:
        body = store.s3.get_object(Bucket=store.url.bucket, Key=key)["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return stored, "its stored content is missing (run `supabackup verify`)"
        raise store_error(exc, key) from None
    except BotoCoreError as exc:
        raise store_error(exc, key) from None
    extra: dict[str, Any] = {"Metadata": stored.metadata}
    if stored.content_type:
        extra["ContentType"] = stored.content_type
    if stored.cache_control:
        extra["CacheControl"] = stored.cache_control
    try:
        if stored.size <= SMALL:
            data = body.read()
            if len(data) != stored.size or hashlib.sha256(data).hexdigest() != stored.sha256:
                return stored, "its stored content is damaged (run `supabackup verify`)"
            client.put_object(Bucket=stored.bucket, Key=stored.key, Body=data, **extra)
            return stored, ""
        reader = HashingReader(body)
        config = TransferConfig(multipart_threshold=LARGE_PART, multipart_chunksize=LARGE_PART,
                                max_concurrency=2)
        client.upload_fileobj(reader, stored.bucket, stored.key, Config=config,
                              ExtraArgs=extra)
    except (ClientError, BotoCoreError) as exc:
        raise endpoint_error(exc, stored.path) from None
    if reader.size != stored.size or reader.hexdigest != stored.sha256:
        try:
            client.delete_object(Bucket=stored.bucket, Key=stored.key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"{stored.path}: damaged content was written and could not be "
                             f"removed: {exc}", "delete it by hand") from None
        return stored, "its stored content is damaged (run `supabackup verify`)"
    return stored, ""


def _rows_as_backed_up(conn: Any, files: FileSet) -> tuple[int, int]:
    """Make the rows at the written names the backup's again, in one transaction: delete
    each row an upload changed or added (where no backup row equals it but for `version`)
    and insert the backup's, with the version the upload gave it: Supabase Storage finds
    a file's bytes by that version, so the backup's would point at nothing. Returns the
    rows put back and how many of them carry a version other than the backup's."""
    kept = sql.Identifier(KEPT)
    with conn.cursor() as cur:
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'storage.objects'"
                    "::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' "
                    "ORDER BY attnum")
        names = [c for (c,) in cur.fetchall()]
        same = [c for c in names if c != "version"]

        def row(alias: str) -> sql.Composable:
            return sql.SQL("ROW({})").format(sql.SQL(", ").join(
                sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c))
                for c in same))
        values = sql.SQL(", ").join(
            sql.SQL("coalesce(g.version, b.version)") if c == "version"
            else sql.SQL("b.{}").format(sql.Identifier(c)) for c in names)
        written = ([f.bucket for f in files.files], [f.key for f in files.files])
        conn.autocommit = False
        try:
            # Supabase refuses a DELETE on its tables but from its own server (0055)
            cur.execute("SELECT set_config('storage.allow_delete_query', 'true', true)")
            cur.execute(sql.SQL(
                "CREATE TEMP TABLE supabackup_replaced ON COMMIT DROP AS WITH gone AS ("
                "DELETE FROM storage.objects o USING unnest(%s::text[], %s::text[]) AS w(b, n) "
                "WHERE o.bucket_id = w.b AND o.name = w.n AND NOT EXISTS (SELECT FROM {k} b "
                "WHERE b.bucket_id = o.bucket_id AND b.name = o.name "
                "AND {b} IS NOT DISTINCT FROM {o}) RETURNING o.bucket_id, o.name, o.version) "
                "SELECT * FROM gone").format(k=kept, b=row("b"), o=row("o")), written)
            cur.execute(sql.SQL(
                "INSERT INTO storage.objects ({c}) SELECT {v} FROM {k} b "
                "LEFT JOIN supabackup_replaced g ON g.bucket_id = b.bucket_id AND g.name = b.name "
                "WHERE NOT EXISTS (SELECT FROM storage.objects o WHERE o.bucket_id = b.bucket_id "
                "AND o.name = b.name)").format(
                    c=sql.SQL(", ").join(sql.Identifier(c) for c in names), v=values, k=kept))
            restored = cur.rowcount
            # the rows the uploads left alone but for their version
            cur.execute(sql.SQL(
                "SELECT count(*) FROM storage.objects o JOIN {k} b ON b.bucket_id = o.bucket_id "
                "AND b.name = o.name WHERE o.version IS DISTINCT FROM b.version").format(k=kept))
            versions = int(cur.fetchone()[0])
            cur.execute(sql.SQL("DROP TABLE {}").format(kept))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return restored, versions
