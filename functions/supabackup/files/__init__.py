"""Supabase Storage files, backed up with the database and put back with it.

Supabase Storage speaks S3 (`https://<ref>.storage.supabase.co/storage/v1/s3`, path-style),
and the database holds only the files' rows (`storage.objects`). So a backup with a
Storage endpoint copies the files themselves into the store, content-addressed, and
compares what it copied with the rows of its own snapshot; a restore writes them into
the target's buckets and makes the target's rows agree with the backup's.

Modules: endpoint (the Storage endpoint: address, credentials, listing), copy (the
content-addressed copy into the store), instep (files against the snapshot's rows),
putback (a restore's files and rows), retain (which stored files no live backup
references, and their removal), check (verify and the drill).
"""

from .copy import FILE_WORKERS, CopyRequest, copy_files
from .endpoint import StorageEndpoint, parse_buckets
from .putback import FilesRestore, describe_files, restore_files
from .run import files_lines

__all__ = ["FILE_WORKERS", "CopyRequest", "FilesRestore", "StorageEndpoint", "copy_files",
           "describe_files", "files_lines", "parse_buckets", "restore_files"]
