"""Restore a backup (full, or any incremental of a chain) into an empty database.

Modules: plan (which archives and entries, in order; the dry run), target (the empty
database and its roles), pipeline (pg_restore fed from S3 into one psql transaction),
supabase (into a fresh Supabase project), toc (pg_restore's table of contents).
"""

from .pipeline import RestoreReport, run_restore
from .plan import RestoreOptions, describe_plan, select_tables
from .target import drop_roles

__all__ = ["RestoreOptions", "RestoreReport", "describe_plan", "drop_roles", "run_restore",
           "select_tables"]
