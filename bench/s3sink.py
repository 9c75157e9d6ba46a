"""A null S3 endpoint for the benchmark: answers the requests a backup makes, keeps nothing.

It speaks just enough of the S3 REST API (path-style, plain HTTP/1.1, keep-alive,
`Expect: 100-continue`) for boto3's uploads, the supabackup writer and the benchmark's
own clean-up: HEAD/PUT bucket, PUT object, multipart create/upload part/complete/abort,
ListObjectsV2, ListMultipartUploads and DELETE. Bodies are read and thrown away; only
object sizes are remembered, so a listing can report what was stored.

Its use is diagnostic (`bench_full.py --s3 sink`): it costs next to no CPU, so the
figures show what the backup itself costs, without the price of moto's in-memory S3
(which, on a 2-core machine, competes with pg_dump and the server for the CPUs).

    python bench/s3sink.py --port 9000
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import threading
import uuid
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

objects: dict[str, int] = {}                      # "bucket/key" -> size
uploads: dict[str, tuple[str, dict[int, int]]] = {}  # upload id -> ("bucket/key", parts)
lock = threading.Lock()
BUFFER = 1 << 20


def respond(conn: socket.socket, status: str, body: bytes = b"",
            headers: tuple[tuple[str, str], ...] = ()) -> None:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nx-amz-request-id: sink\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if body:
        head += "Content-Type: application/xml\r\n"
    conn.sendall(head.encode() + b"\r\n" + body)


def xml(root: str, inner: str) -> bytes:
    ns = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    return f'<?xml version="1.0" encoding="UTF-8"?><{root} {ns}>{inner}</{root}>'.encode()


def serve(conn: socket.socket) -> None:
    reader = conn.makefile("rb", buffering=BUFFER)
    scratch = memoryview(bytearray(BUFFER))
    with conn, reader:
        while True:
            line = reader.readline()
            if not line.strip():
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (h := reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            size = remaining = int(headers.get("content-length", "0") or 0)
            body = b""
            if remaining <= 1 << 16:
                body = reader.read(remaining)
            else:
                while remaining:
                    got = reader.readinto(scratch[:min(remaining, BUFFER)])
                    if not got:
                        return
                    remaining -= got
            handle(conn, method, target, size, body)


def handle(conn: socket.socket, method: str, target: str, size: int, body: bytes) -> None:
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    bucket, _, key = unquote(url.path).lstrip("/").partition("/")
    path = f"{bucket}/{key}"
    etag = f'"{hashlib.md5(f"{target}{size}".encode()).hexdigest()}"'  # noqa: S324
    if method == "HEAD":
        respond(conn, "200 OK")
    elif method == "GET" and "uploads" in query:
        respond(conn, "200 OK", xml("ListMultipartUploadsResult",
                                    f"<Bucket>{escape(bucket)}</Bucket><IsTruncated>false"
                                    "</IsTruncated>"))
    elif method == "GET":
        prefix = f"{bucket}/{query.get('prefix', [''])[0]}"
        with lock:
            found = sorted((k, s) for k, s in objects.items() if k.startswith(prefix))
        items = "".join(f"<Contents><Key>{escape(k.split('/', 1)[1])}</Key><Size>{s}</Size>"
                        f"<ETag>{etag}</ETag><StorageClass>STANDARD</StorageClass></Contents>"
                        for k, s in found)
        respond(conn, "200 OK", xml("ListBucketResult",
                                    f"<Name>{escape(bucket)}</Name><KeyCount>{len(found)}"
                                    f"</KeyCount><IsTruncated>false</IsTruncated>{items}"))
    elif method == "POST" and "uploads" in query:
        upload_id = uuid.uuid4().hex
        with lock:
            uploads[upload_id] = (path, {})
        respond(conn, "200 OK", xml("InitiateMultipartUploadResult",
                                    f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>"
                                    f"<UploadId>{upload_id}</UploadId>"))
    elif method == "PUT" and "uploadId" in query:
        with lock:
            upload = uploads.get(query["uploadId"][0])
            if upload:
                upload[1][int(query["partNumber"][0])] = size
        if upload is None:
            respond(conn, "404 Not Found", xml("Error", "<Code>NoSuchUpload</Code>"))
        else:
            respond(conn, "200 OK", headers=(("ETag", etag),))
    elif method == "POST" and "uploadId" in query:
        with lock:
            done = uploads.pop(query["uploadId"][0], None)
            if done:
                objects[done[0]] = sum(done[1].values())
        if done is None:
            respond(conn, "404 Not Found", xml("Error", "<Code>NoSuchUpload</Code>"))
        else:
            respond(conn, "200 OK", xml("CompleteMultipartUploadResult",
                                        f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}"
                                        f"</Key><ETag>{etag}</ETag>"))
    elif method == "PUT" and not key:
        respond(conn, "200 OK")  # CreateBucket
    elif method == "PUT":
        with lock:
            objects[path] = size
        respond(conn, "200 OK", headers=(("ETag", etag),))
    elif method == "DELETE":
        with lock:
            if "uploadId" in query:
                uploads.pop(query["uploadId"][0], None)
            else:
                objects.pop(path, None)
        respond(conn, "204 No Content")
    else:
        respond(conn, "501 Not Implemented", xml("Error", "<Code>NotImplemented</Code>"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = socket.create_server((args.host, args.port))
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
