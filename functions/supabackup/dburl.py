"""Database connection settings: parsed from a URL or a Secrets Manager secret.

The password lives only in `ConnectionInfo.password`; it is handed to libpq through the
environment (PGPASSWORD) and never put on a command line, in a log line or in a message.
`redact()` scrubs it from any text that came back from a server or a tool, as a second
line of defence.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError

SUPABASE_DOMAINS = (".supabase.co", ".supabase.com")
TRANSACTION_POOLER_PORT = 6543
# libpq parameters we pass through from a URL's query string.
PASSTHROUGH = {"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout",
               "application_name", "target_session_attrs", "options"}


@dataclass(frozen=True)
class ConnectionInfo:
    host: str
    port: int
    user: str
    dbname: str
    password: str = field(default="", repr=False)
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str) -> ConnectionInfo:
        """Parse postgres:// or postgresql:// URLs; refuse what cannot work."""
        try:
            parts = urlsplit(url)
            port = parts.port or 5432
        except ValueError as exc:
            raise ConfigError("the database URL is malformed",
                              "use postgresql://USER:PASSWORD@HOST:PORT/DBNAME") from exc
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise ConfigError("the database URL is malformed",
                              "use postgresql://USER:PASSWORD@HOST:PORT/DBNAME")
        query = dict(parse_qsl(parts.query))
        unknown = set(query) - PASSTHROUGH
        if unknown:
            raise ConfigError(
                f"unsupported database URL parameter(s): {', '.join(sorted(unknown))}",
                f"supported: {', '.join(sorted(PASSTHROUGH))}")
        info = cls(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
            params=query,
        )
        return info.checked()

    @classmethod
    def from_secret(cls, secret_string: str) -> ConnectionInfo:
        """Read an RDS-shaped secret: host, port, username, password, dbname."""
        try:
            data: dict[str, Any] = json.loads(secret_string)
            if not isinstance(data, dict):
                raise TypeError
            info = cls(
                host=str(data["host"]),
                port=int(data.get("port") or 5432),
                user=str(data["username"]),
                password=str(data.get("password") or ""),
                dbname=str(data.get("dbname") or "postgres"),
                params={k: str(data[k]) for k in PASSTHROUGH if k in data},
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(
                "the database secret is malformed",
                "store JSON with host, port, username, password and dbname (the RDS secret shape)",
            ) from exc
        return info.checked()

    def checked(self) -> ConnectionInfo:
        """Refuse what libpq would trip over later (a NUL character, a connect_timeout that
        is not a number of seconds), and Supabase's transaction pooler, which cannot hold a
        snapshot for pg_dump."""
        if any("\x00" in v for v in (self.host, self.user, self.password, self.dbname,
                                      *self.params.values())):
            raise ConfigError("the database address holds a NUL character",
                              "check the URL or secret for a stray %00")
        if not self.params.get("connect_timeout", "10").strip().isdigit():
            raise ConfigError("connect_timeout must be a whole number of seconds",
                              "e.g. ?connect_timeout=10")
        if self.is_supabase and self.port == TRANSACTION_POOLER_PORT:
            raise ConfigError(
                f"port {TRANSACTION_POOLER_PORT} on {self.host} is Supabase's transaction pooler, "
                "which cannot run pg_dump",
                f"use the session pooler instead: {self.session_pooler_url()}",
            )
        return self

    def session_pooler_url(self) -> str:
        """The same address on the session pooler's port, password elided."""
        return f"postgresql://{self.user}:[YOUR-PASSWORD]@{self.host}:5432/{self.dbname}"

    @property
    def is_supabase(self) -> bool:
        return self.host.lower().endswith(SUPABASE_DOMAINS)

    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost",) or self.host.startswith("/"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def sslmode(self) -> str:
        """TLS is required off loopback unless the URL asks for something else."""
        return self.params.get("sslmode") or ("prefer" if self.is_loopback else "require")

    @property
    def project_ref(self) -> str | None:
        """Supabase project ref, from `db.<ref>.supabase.co` or the pooler user `postgres.<ref>`."""
        if not self.is_supabase:
            return None
        match = re.match(r"^db\.([a-z0-9]+)\.supabase\.co$", self.host.lower())
        if match:
            return match.group(1)
        if "." in self.user:
            return self.user.split(".", 1)[1]
        return None

    @property
    def database_id(self) -> str:
        """A stable, path-safe name for this database inside the store."""
        base = self.project_ref or (self.host if self.port == 5432 else f"{self.host}-{self.port}")
        name = base if self.dbname == "postgres" and self.project_ref else f"{base}-{self.dbname}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()

    def display(self) -> str:
        """user@host:port/dbname: safe for logs and messages."""
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def libpq_env(self) -> dict[str, str]:
        """Environment for pg_dump and friends: connection via PG* variables, not argv."""
        env = {
            "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
            "PGDATABASE": self.dbname, "PGSSLMODE": self.sslmode,
            "PGAPPNAME": self.params.get("application_name", "supabackup"),
            "PGCONNECT_TIMEOUT": self.params.get("connect_timeout", "10"),
        }
        if self.password:
            env["PGPASSWORD"] = self.password
        for key in ("sslrootcert", "sslcert", "sslkey", "options", "target_session_attrs"):
            if key in self.params:
                env["PG" + key.upper()] = self.params[key]
        return env

    def psycopg_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "host": self.host, "port": self.port, "user": self.user, "dbname": self.dbname,
            "password": self.password, "sslmode": self.sslmode,
            "application_name": self.params.get("application_name", "supabackup"),
            "connect_timeout": int(self.params.get("connect_timeout", "10")),
        }
        for key in ("sslrootcert", "sslcert", "sslkey", "options", "target_session_attrs"):
            if key in self.params:
                kwargs[key] = self.params[key]
        return kwargs

    def redact(self, text: str) -> str:
        """Remove the password from text that came back from a server or a tool."""
        return text.replace(self.password, "***") if self.password else text

    def error_line(self, error: BaseException | str) -> str:
        """A server's or a tool's error as one password-free line, for a message."""
        return self.redact(" ".join(str(error).split()))
