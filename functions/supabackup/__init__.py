"""supabackup: serverless, incremental, verifiable backups for Supabase and PostgreSQL."""

__version__ = "0.1.0"
