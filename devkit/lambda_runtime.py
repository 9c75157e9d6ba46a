"""A function as Lambda runs it: its built code under AWS's own runtime interface client
(awslambdaric), in a sandbox shaped like Lambda's, fed by a local Runtime API.

The Runtime API (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html) is the
handful of HTTP endpoints a runtime polls, version 2018-06-01:

    GET  /runtime/invocation/next               blocks until there is an event; the event is
                                                the body, its context in Lambda-Runtime-*
                                                headers (request id, deadline, function ARN)
    POST /runtime/invocation/{id}/response      the handler's result (at most 6 MB)
    POST /runtime/invocation/{id}/error         an error document, and its type in the
                                                Lambda-Runtime-Function-Error-Type header
    POST /runtime/init/error                    the handler could not even be loaded

`RuntimeAPI` serves them for one function, one invocation at a time (a function with
ReservedConcurrentExecutions 1, as every function of the template has), and times an
invocation out at its deadline as Lambda does: the sandbox is killed.

`Sandbox` starts the runtime client in a private mount namespace (unshare(1), as root)
laid out as a Lambda sandbox: the runtime's Python at /var/lang (this machine's Python
3.12, bound there, as the python3.12 runtime has it), awslambdaric at /var/runtime, the
function's built directory at /var/task, the layer at /opt, all read-only; the rest of
the file system read-only too; /tmp an empty tmpfs (512 MB, Lambda's default ephemeral
storage); no /dev/shm (Lambda has none, so multiprocessing's locks fail as they do
there). The client runs as an unprivileged user with no capabilities, in an environment
that holds only Lambda's own variables and the function's. Its stdout and stderr, where
Lambda's log lines come from, go to a file the caller reads per invocation.

What differs from Lambda, and why: the network (PostgreSQL and moto's server on this
machine's loopback, reached through boto3's AWS_ENDPOINT_URL: the one variable here that
Lambda would not set); the kernel (Lambda's is Firecracker's); the runtime's Python
(3.12 from pyenv, not Amazon Linux's build; its own site-packages are there, as Lambda's
/var/lang has boto3); and the user id (Lambda's sbx_user1051 is some uid; any unprivileged
one tells the same).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from .pg import free_port

API = "/2018-06-01/runtime"
MAX_RESPONSE = 6 * 1024 * 1024  # bytes: a synchronous invocation's response
EPHEMERAL_MB = 512  # Lambda's default /tmp
SANDBOX_UID = 993  # unprivileged, and no user of this machine's


@dataclass
class Result:
    """How one invocation ended: `payload` (the handler's return value) or `error` (the
    runtime's error document), and what the function printed meanwhile."""

    request_id: str
    payload: Any = None
    error: dict[str, Any] | None = None
    error_type: str | None = None
    timed_out: bool = False
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out

    def lines(self, prefix: str) -> list[dict[str, Any]]:
        """The JSON lines of the log that start with `prefix` (EMF: '{"_aws"')."""
        return [json.loads(line) for line in self.log.splitlines() if line.startswith(prefix)]


@dataclass
class _Pending:
    request_id: str
    event: bytes
    deadline_ms: int
    arn: str
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None


class RuntimeAPI:
    """The Runtime API on 127.0.0.1:<free port>, for one function; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.waiting: queue.Queue[_Pending] = queue.Queue()
        self.running: dict[str, _Pending] = {}
        self.init_error: dict[str, Any] | None = None
        self.init_failed = threading.Event()
        self.polls = 0  # GET next calls: the runtime is up once it polls
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """What AWS_LAMBDA_RUNTIME_API holds: host:port, no scheme."""
        return f"127.0.0.1:{self.port}"

    def submit(self, event: Any, timeout_seconds: float, arn: str) -> _Pending:
        pending = _Pending(str(uuid.uuid4()), json.dumps(event).encode(),
                           int((time.time() + timeout_seconds) * 1000), arn)
        self.waiting.put(pending)
        return pending

    def finish(self, request_id: str, result: Result) -> bool:
        pending = self.running.pop(request_id, None)
        if pending is None:
            return False
        pending.result = result
        pending.done.set()
        return True

    def __enter__(self) -> RuntimeAPI:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_for(api: RuntimeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the client keeps its connection

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != f"{API}/invocation/next":
                return self._reply(404, {"errorType": "NotFound", "errorMessage": self.path})
            api.polls += 1
            pending = api.waiting.get()  # blocks, as Lambda's does, until there is an event
            api.running[pending.request_id] = pending
            self.send_response(200)
            for name, value in (("Lambda-Runtime-Aws-Request-Id", pending.request_id),
                                ("Lambda-Runtime-Deadline-Ms", str(pending.deadline_ms)),
                                ("Lambda-Runtime-Invoked-Function-Arn", pending.arn),
                                ("Lambda-Runtime-Trace-Id",
                                 f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                                 "Sampled=0"),
                                ("Content-Type", "application/json"),
                                ("Content-Length", str(len(pending.event)))):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(pending.event)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = self.path.removeprefix(API + "/").split("/")
            if parts == ["init", "error"]:
                api.init_error = json.loads(body or b"{}")
                api.init_failed.set()
                return self._reply(202, {"status": "OK"})
            if len(parts) != 3 or parts[0] != "invocation" or parts[2] not in (
                    "response", "error"):
                return self._reply(404, {"errorType": "NotFound", "errorMessage": self.path})
            request_id, what = parts[1], parts[2]
            if what == "response" and len(body) > MAX_RESPONSE:
                api.finish(request_id, Result(request_id, error={
                    "errorMessage": f"Response payload size ({len(body)} bytes) exceeded "
                                    f"maximum allowed payload size ({MAX_RESPONSE} bytes).",
                    "errorType": "Function.ResponseSizeTooLarge"}))
                return self._reply(413, {"errorType": "RequestEntityTooLarge",
                                         "errorMessage": "response too large"})
            if what == "response":
                result = Result(request_id, payload=json.loads(body) if body else None)
            else:
                result = Result(request_id, error=json.loads(body or b"{}"),
                                error_type=self.headers.get("Lambda-Runtime-Function-Error-Type"))
            if not api.finish(request_id, result):
                return self._reply(400, {"errorType": "InvalidRequestID",
                                         "errorMessage": f"no invocation {request_id} runs"})
            return self._reply(202, {"status": "OK"})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@dataclass
class Function:
    """What a sandbox runs: the built directory, its handler string, its layer, the
    runtime client's packages, and the function's own configuration."""

    name: str
    code: Path  # .aws-sam/build/<Function>
    handler: str  # from the translated template
    layer: Path  # .aws-sam/build/<Layer>: its root is /opt
    runtime: Path  # awslambdaric's site-packages: /var/runtime
    python_home: Path  # a Python 3.12 installation: /var/lang
    environment: dict[str, str]  # the template's Variables, resolved
    memory_mb: int = 1024
    timeout_seconds: int = 900
    region: str = "us-east-1"
    account: str = "123456789012"

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{self.name}"

    def lambda_environment(self, runtime_api: str) -> dict[str, str]:
        """Lambda's defined runtime environment variables for python3.12, then the
        function's own (Lambda refuses a function variable that would replace one of its
        reserved ones)."""
        defined = {
            "_HANDLER": self.handler,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "AWS_LAMBDA_FUNCTION_NAME": self.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]")
                                          + uuid.uuid4().hex,
            "AWS_LAMBDA_RUNTIME_API": runtime_api,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            "AWS_XRAY_DAEMON_ADDRESS": "169.254.79.129:2000",
            "LAMBDA_TASK_ROOT": "/var/task",
            "LAMBDA_RUNTIME_DIR": "/var/runtime",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "PATH": "/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin",
            "LD_LIBRARY_PATH": "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:"
                               "/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
            "PYTHONPATH": "/var/runtime",
            # the execution role's credentials: moto's
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
        }
        clash = set(defined) & set(self.environment)
        assert not clash, f"Lambda reserves these variables: {sorted(clash)}"
        return {**defined, **self.environment}


# The sandbox's file system, made in the new mount namespace before the client starts.
_LAYOUT = """set -eu
mount --make-rprivate /
mount -t tmpfs -o mode=755,size=1m tmpfs /var
mkdir /var/lang /var/runtime /var/task
for pair in "$LANG_HOME:/var/lang" "$RUNTIME:/var/runtime" "$CODE:/var/task" "$LAYER:/opt"; do
    mount --bind "${pair%%:*}" "${pair#*:}"
    mount -o remount,bind,ro "${pair#*:}"
done
mount -o remount,ro /var
mount -o remount,bind,ro /
mount -t tmpfs -o "mode=1777,size=${TMP_MB}m" tmpfs /tmp
mount -t tmpfs -o ro,size=1k tmpfs /dev/shm
exec setpriv --reuid="$SANDBOX_UID" --regid="$SANDBOX_UID" --clear-groups --inh-caps=-all \
    --bounding-set=-all env -i "$@"
"""


class Sandbox:
    """One running sandbox of `function`: started on entry (its runtime polls the API),
    invoked any number of times, killed on exit. A context manager."""

    def __init__(self, function: Function, log: Path) -> None:
        self.function = function
        self.api = RuntimeAPI()
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sandbox:
        self.api.__enter__()
        fn = self.function
        env = fn.lambda_environment(self.api.address)
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                _LAYOUT, "layout",
                *[f"{k}={v}" for k, v in env.items()],
                "sh", "-c", 'cd /var/task && exec /var/lang/bin/python3.12 -m awslambdaric '
                            '"$_HANDLER"']
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                     "LANG_HOME": str(fn.python_home), "RUNTIME": str(fn.runtime),
                     "CODE": str(fn.code), "LAYER": str(fn.layer),
                     "TMP_MB": str(EPHEMERAL_MB), "SANDBOX_UID": str(SANDBOX_UID)},
                start_new_session=True)
        self._wait(lambda: self.api.polls > 0, 60, "start polling the Runtime API")
        return self

    def invoke(self, event: Any, timeout_seconds: float | None = None) -> Result:
        """One invocation, as `aws lambda invoke` makes it: its result or error, and the log
        lines it printed. `timeout_seconds` sets the deadline the function sees (the
        function's Timeout when not given); past it the sandbox is killed, as Lambda's is."""
        seconds = timeout_seconds or self.function.timeout_seconds
        start = self.log_path.stat().st_size
        pending = self.api.submit(event, seconds, self.function.arn)
        self._wait(pending.done.is_set, seconds + 2, "answer", timing_out=True)
        result = pending.result or Result(pending.request_id, timed_out=True,
                                          error={"errorMessage": f"Task timed out after "
                                                                 f"{seconds:.2f} seconds"})
        # The client writes its log unbuffered, before it posts the result: it is all there.
        with self.log_path.open("rb") as log:
            log.seek(start)
            result.log = log.read().decode(errors="replace")
        return result

    def _wait(self, ready: Any, seconds: float, what: str, timing_out: bool = False) -> None:
        assert self.process is not None
        deadline = time.monotonic() + seconds
        while not ready():
            if self.api.init_failed.is_set():
                raise AssertionError(f"{self.function.name} failed to initialize: "
                                     f"{self.api.init_error}\n{self._tail()}")
            if self.process.poll() is not None:
                raise AssertionError(f"{self.function.name}'s sandbox exited "
                                     f"{self.process.returncode} before it would {what}:\n"
                                     f"{self._tail()}")
            if time.monotonic() > deadline:
                if timing_out:
                    self._kill()
                    return
                raise AssertionError(f"{self.function.name} did not {what} in {seconds} s:"
                                     f"\n{self._tail()}")
            time.sleep(0.02)

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._kill()
        self.api.__exit__(exc_type, exc, tb)

