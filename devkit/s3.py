"""An S3-compatible endpoint on loopback: moto's server, in a thread of this process.

Subprocesses (the `supabackup` CLI, the demo, benchmarks) reach it through the standard
AWS_ENDPOINT_URL_S3 variable that boto3 reads itself; `env()` returns what to set.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.request
from types import TracebackType

import boto3
from moto.server import ThreadedMotoServer

from .pg import free_port

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class LocalS3:
    """moto's server on 127.0.0.1:<free port>; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self, service: str = "s3"):  # type: ignore[no-untyped-def]
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # noqa: S106

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> LocalS3:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()


class MotoProcess:
    """moto's server in a process of its own, on 127.0.0.1:<free port>: an S3 endpoint
    whose buckets are its own (a ThreadedMotoServer shares this process's moto state, and
    so the store's buckets). Stands in for Supabase Storage's S3 endpoint."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str = "s3"):  # type: ignore[no-untyped-def]
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # noqa: S106

    def reset(self) -> None:
        """Forget every bucket (moto's reset API), between tests."""
        urllib.request.urlopen(urllib.request.Request(  # noqa: S310 - loopback
            f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10).read()

    def __enter__(self) -> MotoProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"moto's server did not listen on port {self.port} in 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
