"""The parts of the AWS Lambda API that hand out deployed code, on loopback: GetFunction
(GET /2015-03-31/functions/{FunctionName}) and GetLayerVersion
(GET /2018-10-31/layers/{LayerName}/versions/{VersionNumber}), answering in the rest-json
shapes of botocore's service model for Lambda (2015-03-31: GetFunctionResponse with
Configuration and Code, GetLayerVersionResponse with Content), so that a real boto3
client parses them; and the archives themselves, at presigned-style URLs on the same
server, as Lambda's Code.Location and Content.Location point at its own S3 bucket for ten
minutes.

moto's GetFunction answers with a Location that has no archive behind it, and its
GetLayerVersion with "s3://", so code that downloads what Lambda lists (the ECS task's
bootstrap in template.yaml) cannot run against it. A process reaches this server through
boto3's own AWS_ENDPOINT_URL_LAMBDA (`env()`).

Errors are Lambda's: the X-Amzn-ErrorType header and a {"Type", "Message"} body, which
botocore turns into a ClientError of that code (`refuse`). A request that carries no
SigV4 signature for the "lambda" service is refused as Lambda would refuse it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from .pg import free_port

URL_LIFETIME = 600  # seconds: Lambda's presigned Code.Location / Content.Location
GET_FUNCTION = "GetFunction"
GET_LAYER_VERSION = "GetLayerVersion"
DOWNLOAD = "Download"


def code_sha256(data: bytes) -> str:
    """Lambda's CodeSha256: the base64 of the archive's SHA-256 digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@dataclass
class Archive:
    """An archive as Lambda lists it (`listed`: its size and CodeSha256 come from it) and
    as its URL serves it (`served`: the same bytes, unless a test says otherwise)."""

    listed: bytes
    served: bytes

    @property
    def sha256(self) -> str:
        return code_sha256(self.listed)


@dataclass
class Function:
    name: str
    arn: str
    archive: Archive
    layers: list[str]
    runtime: str = "python3.12"
    handler: str = "supabackup.handlers.backup.handler"


@dataclass
class LayerVersion:
    name: str
    version: int
    archive: Archive

    def arn(self, region: str, account: str) -> str:
        return f"arn:aws:lambda:{region}:{account}:layer:{self.name}:{self.version}"


@dataclass
class Call:
    """One request the server answered: which operation, on what, signed for what service,
    and the status it got."""

    operation: str
    target: str
    signed_for: str | None
    status: int = 0


@dataclass
class _Refusal:
    status: int
    code: str
    message: str


@dataclass
class _State:
    region: str
    account: str
    functions: dict[str, Function] = field(default_factory=dict)
    layers: dict[tuple[str, int], LayerVersion] = field(default_factory=dict)
    # token -> (archive bytes, the time the URL was handed out, the name it was given)
    urls: dict[str, tuple[bytes, float, str]] = field(default_factory=dict)
    refusals: dict[str, _Refusal] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LambdaAPI:
    """The server, on 127.0.0.1:<free port>; a context manager (a thread of this process)."""

    def __init__(self, region: str = "us-east-1", account: str = "123456789012") -> None:
        self.state = _State(region, account)
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ setting it up

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs for boto3's Lambda client to reach this server."""
        return {"AWS_ENDPOINT_URL_LAMBDA": self.endpoint}

    def add_function(self, name: str, archive: bytes, *, layers: tuple[str, ...] = (),
                     served: bytes | None = None) -> str:
        """A function whose code is `archive` (its URL serves `served` instead when
        given); its ARN."""
        arn = f"arn:aws:lambda:{self.state.region}:{self.state.account}:function:{name}"
        with self.state.lock:
            self.state.functions[name] = Function(
                name, arn, Archive(archive, archive if served is None else served), list(layers))
        return arn

    def add_layer_version(self, name: str, archive: bytes, *, served: bytes | None = None
                          ) -> str:
        """The next version of layer `name`; its version ARN."""
        with self.state.lock:
            version = 1 + max((v for (n, v) in self.state.layers if n == name), default=0)
            layer = LayerVersion(name, version,
                                 Archive(archive, archive if served is None else served))
            self.state.layers[(name, version)] = layer
        return layer.arn(self.state.region, self.state.account)

    def refuse(self, operation: str, status: int, code: str, message: str) -> None:
        """Answer every later `operation` (GetFunction, GetLayerVersion or Download) with
        this error, as Lambda (or its bucket, for Download) would."""
        with self.state.lock:
            self.state.refusals[operation] = _Refusal(status, code, message)

    def reset(self) -> None:
        with self.state.lock:
            for table in (self.state.functions, self.state.layers, self.state.urls,
                          self.state.refusals):
                table.clear()
            self.state.calls.clear()

    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    # ------------------------------------------------------------------ running it

    def __enter__(self) -> LambdaAPI:
        state = self.state
        handler = type("Handler", (_Handler,), {"state": state, "port": self.port})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="lambda-api", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    state: _State
    port: int
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # no line per request

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if match := re.fullmatch(r"/2015-03-31/functions/([^/]+)", path):
            self._api(GET_FUNCTION, urllib.parse.unquote(match.group(1)), url.query)
        elif match := re.fullmatch(r"/2018-10-31/layers/([^/]+)/versions/([^/]+)", path):
            self._api(GET_LAYER_VERSION, f"{urllib.parse.unquote(match.group(1))}:"
                                         f"{urllib.parse.unquote(match.group(2))}", url.query)
        elif match := re.fullmatch(r"/awslambda-[\w-]+-tasks/snapshots/\d+/([^/]+)", path):
            self._download(match.group(1), urllib.parse.parse_qs(url.query))
        else:
            self._json(404, {"Type": "User", "Message": f"no such path {path}"},
                       error="UnknownOperationException")

    # ---------------------------------------------------------------- the API

    def _api(self, operation: str, target: str, query: str) -> None:
        signed_for = self._signing_service()
        call = Call(operation, target, signed_for)
        with self.state.lock:
            self.state.calls.append(call)
            refusal = self.state.refusals.get(operation)
        if signed_for != "lambda":
            call.status = 403
            self._json(403, {"Type": "User", "Message": "Missing Authentication Token"},
                       error="MissingAuthenticationTokenException")
        elif refusal is not None:
            call.status = refusal.status
            self._json(refusal.status, {"Type": "User", "Message": refusal.message},
                       error=refusal.code)
        elif operation == GET_FUNCTION:
            call.status = self._get_function(target, urllib.parse.parse_qs(query))
        else:
            call.status = self._get_layer_version(target)

    def _signing_service(self) -> str | None:
        """The service a SigV4 Authorization header is scoped to (None: unsigned)."""
        found = re.search(r"Credential=[^/]+/\d{8}/[\w-]+/([\w-]+)/aws4_request",
                          self.headers.get("Authorization", ""))
        return found.group(1) if found else None

    def _get_function(self, target: str, query: dict[str, list[str]]) -> int:
        state = self.state
        name = target.split(":function:", 1)[-1].split(":", 1)[0]
        qualifier = query.get("Qualifier", ["$LATEST"])[0]
        with state.lock:
            function = state.functions.get(name)
        if function is None or qualifier != "$LATEST":
            return self._not_found(f"Function not found: arn:aws:lambda:{state.region}:"
                                   f"{state.account}:function:{target}")
        archive = function.archive
        with state.lock:
            layers = [{"Arn": arn, "CodeSize": len(layer.archive.listed)}
                      for arn in function.layers
                      for layer in state.layers.values()
                      if layer.arn(state.region, state.account) == arn]
        configuration = {
            "FunctionName": function.name, "FunctionArn": function.arn,
            "Runtime": function.runtime, "Handler": function.handler,
            "Role": f"arn:aws:iam::{state.account}:role/{function.name}-role",
            "CodeSize": len(archive.listed), "CodeSha256": archive.sha256,
            "Description": "", "Timeout": 900, "MemorySize": 1024,
            "LastModified": "2025-01-01T00:00:00.000+0000", "Version": "$LATEST",
            "Layers": layers, "State": "Active", "LastUpdateStatus": "Successful",
            "PackageType": "Zip", "Architectures": ["x86_64"],
            "RevisionId": "00000000-0000-0000-0000-000000000000",
        }
        location = self._presign(archive.served, f"{function.name}-{secrets.token_hex(8)}")
        return self._json(200, {"Configuration": configuration,
                                "Code": {"RepositoryType": "S3", "Location": location}})

    def _get_layer_version(self, target: str) -> int:
        state = self.state
        name, _, number = target.rpartition(":")
        name = name.split(":layer:", 1)[-1]
        try:
            key = (name, int(number))
        except ValueError:
            return self._json(400, {"Type": "User", "Message": f"bad version {number!r}"},
                              error="InvalidParameterValueException")
        with state.lock:
            layer = state.layers.get(key)
        if layer is None:
            return self._not_found(f"The resource you requested does not exist. (layer "
                                   f"{name}, version {number})")
        arn = layer.arn(state.region, state.account)
        location = self._presign(layer.archive.served, f"{name}-{secrets.token_hex(8)}")
        return self._json(200, {
            "Content": {"Location": location, "CodeSha256": layer.archive.sha256,
                        "CodeSize": len(layer.archive.listed)},
            "LayerArn": arn.rsplit(":", 1)[0], "LayerVersionArn": arn,
            "Description": "", "CreatedDate": "2025-01-01T00:00:00.000+0000",
            "Version": layer.version, "CompatibleRuntimes": ["python3.12"],
            "CompatibleArchitectures": ["x86_64"]})

    def _not_found(self, message: str) -> int:
        return self._json(404, {"Type": "User", "Message": message},
                          error="ResourceNotFoundException")

    # ---------------------------------------------------------------- the archives

    def _presign(self, data: bytes, name: str) -> str:
        """A URL shaped as Lambda's: the tasks bucket, a key, SigV4 query parameters."""
        token = secrets.token_hex(16)
        with self.state.lock:
            self.state.urls[token] = (data, time.monotonic(), name)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        query = urllib.parse.urlencode({
            "versionId": "null", "X-Amz-Security-Token": token,
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Date": stamp,
            "X-Amz-SignedHeaders": "host", "X-Amz-Expires": str(URL_LIFETIME),
            "X-Amz-Credential": f"ASIAFAKE/{stamp[:8]}/{self.state.region}/s3/aws4_request",
            "X-Amz-Signature": hashlib.sha256(token.encode()).hexdigest()})
        return (f"http://127.0.0.1:{self.port}/awslambda-{self.state.region}-tasks/snapshots/"
                f"{self.state.account}/{name}?{query}")

    def _download(self, name: str, query: dict[str, list[str]]) -> None:
        token = query.get("X-Amz-Security-Token", [""])[0]
        call = Call(DOWNLOAD, name, None)
        with self.state.lock:
            self.state.calls.append(call)
            refusal = self.state.refusals.get(DOWNLOAD)
            found = self.state.urls.get(token)
        if refusal is not None:
            call.status = self._s3_error(refusal.status, refusal.code, refusal.message)
        elif found is None or found[2] != name:
            call.status = self._s3_error(403, "AccessDenied", "Access Denied")
        elif time.monotonic() - found[1] > URL_LIFETIME:
            call.status = self._s3_error(403, "AccessDenied", "Request has expired")
        else:
            call.status = self._send(200, found[0], "application/zip")

    def _s3_error(self, status: int, code: str, message: str) -> int:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        return self._send(status, body, "application/xml")

    # ---------------------------------------------------------------- answers

    def _json(self, status: int, body: dict[str, object], error: str | None = None) -> int:
        headers = {"X-Amzn-ErrorType": error} if error else {}
        return self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", secrets.token_hex(16))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        return status
