"""A slow link for the benchmarks: a TCP proxy that paces every connection, each way.

It sits between a tool and PostgreSQL (or any TCP server) and limits each connection to
a fixed rate in each direction, e.g. 8 MB/s from the server and 8 MB/s to it. That is a
model of what bounds one stream in production: one server backend, a client far away.
Parallel streams then gain what they would gain there, whatever this machine's core
count. The limit is per connection, not shared: four connections may carry four times
the rate.

    with SlowLink("127.0.0.1", cluster.port, 8 * MB) as link:
        url = f"postgresql://...@127.0.0.1:{link.port}/db"

Each direction of each connection has its own token bucket. It holds up to `burst` bytes
(64 KiB), so a short exchange (the PostgreSQL handshake, a query and its answer) goes
through at once, and a long transfer runs at the rate. A side that closes its half is
passed on as a half-close (EOF one way, the other way still open); a reset or any other
error ends both ways (passed on as EOF, not as a reset). stop() closes every socket and
joins every thread.

One thread accepts; each connection has two, one a direction. The proxy runs in the
process that starts it (its CPU and its GIL are that process's); `--target` runs one on
its own instead:

    python bench/slowlink.py --target 127.0.0.1:5432 --rate 8   # until Ctrl-C
    python bench/slowlink.py --self-check                       # measures itself

Rates are in MB/s, MB = 10**6 bytes. Method, figures and caveats: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

MB = 1_000_000
BURST = 64 * 1024
CONNECT_TIMEOUT = 10.0


class TokenBucket:
    """`rate` bytes a second, up to `burst` bytes at once; one direction of one connection."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: int) -> float:
        """Take n bytes (n <= burst); the seconds to wait before sending them."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        return max(0.0, -self.tokens / self.rate)  # the debt is paid by the wait's refill


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class SlowLink:
    """A pacing TCP proxy to target_host:target_port, listening on a free port (`.port`)."""

    def __init__(self, target_host: str, target_port: int, rate_bytes_per_s: float,
                 listen_host: str = "127.0.0.1", burst: int = BURST,
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.rate, self.burst = float(rate_bytes_per_s), burst
        self.chunk = min(burst, 64 * 1024)
        self._listener = socket.create_server((listen_host, listen_port), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0                          # accepted so far
        self.carried = {"to target": 0, "from target": 0}  # bytes sent on, so far
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._acceptor = threading.Thread(target=self._accept, name="slowlink-accept",
                                          daemon=True)

    def start(self) -> SlowLink:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; return once every thread has ended."""
        with self._lock:
            self._stopping.set()
            sockets, threads = list(self._sockets), list(self._threads)
        _shut(self._listener)  # wakes accept() on Linux
        if self._acceptor.is_alive():
            self._acceptor.join()
        self._listener.close()
        for sock in sockets:
            _shut(sock)
        for thread in threads:
            thread.join()

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stop() shut the listener
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    return
                thread = threading.Thread(target=self._connection, args=(client,),
                                          name=f"slowlink-{self.connections}", daemon=True)
                self._sockets.add(client)
                self._threads.add(thread)
                self.connections += 1
            thread.start()

    def _connection(self, client: socket.socket) -> None:
        """One connection: its own connection to the target, a thread for each direction."""
        upstream = None
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                return  # closing the client tells it
            upstream.settimeout(None)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._sockets.add(upstream)
            for sock in (client, upstream):  # pass small messages on at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=self._pump, args=(upstream, client, "from target"),
                                    name=threading.current_thread().name + "-back", daemon=True)
            back.start()
            self._pump(client, upstream, "to target")
            back.join()
        finally:
            with self._lock:
                for sock in (client, upstream):
                    if sock is not None:
                        self._sockets.discard(sock)
                        sock.close()
                self._threads.discard(threading.current_thread())

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        """Copy src to dst at the rate until src's EOF (passed on as dst's), or an error."""
        bucket = TokenBucket(self.rate, self.burst)
        try:
            while data := src.recv(self.chunk):
                wait = bucket.take(len(data))
                if wait and self._stopping.wait(wait):
                    break
                dst.sendall(data)
                with self._lock:
                    self.carried[direction] += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # a reset, a closed peer, stop(): end both directions
            _shut(src)
            _shut(dst)


# --- the self-check ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
PG_DUMP = REPO / "build" / "postgresql-17" / "bin" / "pg_dump"


class _Server:
    """A loopback test server: `handler(conn)` in a thread for each connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def stop(self) -> None:
        _shut(self.sock)
        self.thread.join()
        self.sock.close()


def _sink(conn: socket.socket) -> None:
    """Read to EOF, answer with the number of bytes read."""
    count = 0
    while data := conn.recv(1 << 20):
        count += len(data)
    conn.sendall(str(count).encode())


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 20):
        conn.sendall(data)


def _send(port: int, size: int) -> tuple[float, float]:
    """Send `size` bytes to the sink at port; (start, end) of the exchange, perf_counter."""
    block = bytes(MB)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(size // MB):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(64), b""))
    if int(answer) != size // MB * MB:
        raise RuntimeError(f"the sink got {answer!r} bytes")
    return start, time.perf_counter()


def _parallel(port: int, size: int, streams: int) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * streams

    def one(i: int) -> None:
        spans[i] = _send(port, size)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return spans


def _duplex(port: int, size: int) -> float:
    """Send `size` bytes to the echo server while reading them back; the seconds."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(bytes(size)),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = sum(len(d) for d in iter(lambda: sock.recv(1 << 20), b""))
        sender.join()
    if got != size:
        raise RuntimeError(f"echoed {got} of {size} bytes")
    return time.perf_counter() - start


def _round_trip(port: int, count: int = 300) -> float:
    """The median seconds of a 100-byte request and its echo, on one connection."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(bytes(100))
            got = 0
            while got < 100:
                got += len(sock.recv(100 - got))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pg_dump(url: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(PG_DUMP), "-Fc", "--compress=0", "-d", url], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _connect_and_query(*urls: str, count: int = 20) -> list[float]:
    """For each URL, the median seconds to connect, run SELECT 1 and close (taken in turn)."""
    import psycopg2
    times: list[list[float]] = [[] for _ in urls]
    for _ in range(count):
        for url, taken in zip(urls, times, strict=True):
            t0 = time.perf_counter()
            with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
            taken.append(time.perf_counter() - t0)
    return [statistics.median(taken) for taken in times]


def self_check(rate: float, size: int, streams: int, table_mb: int) -> None:
    threads_before, fds_before = threading.active_count(), len(os.listdir("/proc/self/fd"))
    print(f"slowlink self-check: --rate {rate / MB:g} MB/s per connection per direction, "
          f"burst {BURST // 1024} KiB; {os.cpu_count()} CPUs; MB = 10**6 bytes", flush=True)
    sink, echo = _Server(_sink), _Server(_echo)
    try:
        start, end = _send(sink.port, size)
        print(f"  direct, no proxy, 1 connection:   {size / (end - start) / MB:8.1f} MB/s")
        with SlowLink("127.0.0.1", sink.port, 1e6 * MB) as link:
            start, end = _send(link.port, size)
        print(f"  proxy at no limit, 1 connection:  {size / (end - start) / MB:8.1f} MB/s"
              "   (the proxy's own ceiling)")
        with SlowLink("127.0.0.1", sink.port, rate) as link:
            start, end = _send(link.port, size)
            print(f"  proxy, 1 connection, {size // MB} MB:      "
                  f"{size / (end - start) / MB:8.2f} MB/s   in {end - start:.2f}s")
            spans = _parallel(link.port, size, streams)
            each = ", ".join(f"{size / (e - s) / MB:.2f}" for s, e in spans)
            wall = max(e for _, e in spans) - min(s for s, _ in spans)
            print(f"  proxy, {streams} connections at once:    {streams * size / wall / MB:8.2f}"
                  f" MB/s total in {wall:.2f}s; each: {each} MB/s")
        with SlowLink("127.0.0.1", echo.port, rate) as link:
            seconds = _duplex(link.port, size)
            print(f"  proxy, 1 connection, {size // MB} MB each way at once: {seconds:.2f}s "
                  f"({size / seconds / MB:.2f} MB/s each way; the directions are paced apart)")
            direct, proxied = _round_trip(echo.port), _round_trip(link.port)
        print(f"  100-byte round trip (median of 300): direct {direct * 1e6:.0f} us, "
              f"through the proxy {proxied * 1e6:.0f} us: adds {(proxied - direct) * 1e6:.0f} us")
    finally:
        sink.stop()
        echo.stop()
    _check_postgres(rate, table_mb)
    time.sleep(0.1)  # the test servers' connection threads end after their last reply
    print(f"  left behind: {threading.active_count() - threads_before} threads, "
          f"{len(os.listdir('/proc/self/fd')) - fds_before} file descriptors")


def _check_postgres(rate: float, table_mb: int) -> None:
    sys.path.insert(0, str(REPO))  # devkit, when run without the editable install
    from devkit.pg import Cluster, bindir_for
    print(f"  PostgreSQL 17: a table of about {table_mb} MB; pg_dump -Fc --compress=0 "
          f"> /dev/null", flush=True)
    cluster = Cluster(bindir_for(17))
    try:
        cluster.start()
        rows = table_mb * MB // 200  # an int and 192 characters: about 200 bytes of COPY
        cluster.execute("CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 6) AS body "
                        f"FROM generate_series(1, {rows}) AS g")
        cluster.execute("VACUUM (ANALYZE) t")
        size = cluster.execute("SELECT pg_table_size('t')")[0][0]
        url = cluster.url()
        _pg_dump(url)  # warms the page cache
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "a.dump"
            subprocess.run([str(PG_DUMP), "-Fc", "--compress=0", "--no-sync", "-f", str(archive),
                            "-d", url], check=True)
            archive_bytes = archive.stat().st_size
        direct = _pg_dump(url)
        with SlowLink("127.0.0.1", cluster.port, rate) as link:
            slow_url = url.replace(f":{cluster.port}/", f":{link.port}/")
            proxied = _pg_dump(slow_url)
            wire, dumps = link.carried["from target"], link.connections
            connects = _connect_and_query(url, slow_url)
        print(f"    table {size / MB:.1f} MB on disk, archive {archive_bytes / MB:.1f} MB, "
              f"{wire / MB:.1f} MB from the server through the proxy "
              f"({dumps} connection{'s' * (dumps != 1)})")
        print(f"    direct {direct:.2f}s, through the proxy {proxied:.2f}s: "
              f"{proxied / direct:.1f}x; wire bytes / rate = {wire / rate:.2f}s")
        print(f"    connect (scram) + SELECT 1 + close, median of 20: direct "
              f"{connects[0] * 1e3:.2f} ms, through the proxy {connects[1] * 1e3:.2f} ms")
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=8.0,
                        help="MB/s (10**6 bytes) per connection per direction (default 8)")
    parser.add_argument("--target", help="HOST:PORT to proxy to, until Ctrl-C")
    parser.add_argument("--port", type=int, default=0,
                        help="with --target: the port to listen on (default: a free one)")
    parser.add_argument("--self-check", action="store_true", help="measure the proxy itself")
    parser.add_argument("--size-mb", type=int, default=32, help="self-check: MB per stream")
    parser.add_argument("--streams", type=int, default=4, help="self-check: parallel streams")
    parser.add_argument("--table-mb", type=int, default=64, help="self-check: the table's MB")
    args = parser.parse_args()
    if args.self_check:
        self_check(args.rate * MB, args.size_mb * MB, args.streams, args.table_mb)
        return
    if not args.target:
        parser.error("give --target HOST:PORT or --self-check")
    host, _, port = args.target.rpartition(":")
    with SlowLink(host, int(port), args.rate * MB, listen_port=args.port) as link:
        print(f"slowlink: 127.0.0.1:{link.port} -> {args.target} at {args.rate:g} MB/s "
              "per connection per direction", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
