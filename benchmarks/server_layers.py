"""Server CPU per request for HTTP server layers the S3 front end could use.

``python -m benchmarks.server_layers [--requests N] [--rounds R]`` starts each server layer in a
process of its own, answering every request with the same 4 KiB body and the headers of an S3
GetObject answer, and sends it ``N`` GETs at concurrency 16 over keep-alive connections from a
lean raw-socket client in this process (alternating the layers, ``R`` rounds, a warm-up round
not recorded); it prints the server process's CPU time (user+system) per request: median
(min-max) over the rounds.  The layers:

* ``aiohttp`` - ``aiohttp.web`` with one handler (``web.Response``), as ``proxy/s3/server.py``
  serves, without the proxy's middlewares, authentication or backend call;
* ``httptools`` - an ``asyncio.Protocol`` per connection parsing requests with httptools
  (llhttp) and answering with one ``transport.write``.

Both run on uvloop when it is installed, as the proxy does.  It measures the layer's own cost,
not a finished server: the lean one has no limits, timeouts, chunked requests or errors.
Bounded: ``N`` at most 100,000, ``R`` at most 20.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import cast

from benchmarks.targets import free_port, proc_usage

CONCURRENCY = 16
BODY = b"x" * 4096
HEADERS = {
    "Content-Type": "binary/octet-stream",
    "ETag": '"0123456789abcdef0123456789abcdef-c"',
    "Last-Modified": "Wed, 02 Dec 2026 17:00:00 GMT",
    "Accept-Ranges": "bytes",
    "x-amz-request-id": "0123456789ABCDEF",
    "x-amz-server-side-encryption": "aws:kms",
}
LAYERS = ("aiohttp", "httptools")


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=BODY, headers=HEADERS)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, loop=_loop())


def serve_httptools(port: int) -> None:
    import httptools

    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())

    class Proto(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                assert self.transport is not None
                self.transport.close()

        def on_message_complete(self) -> None:
            assert self.transport is not None
            date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
            self.transport.write(
                f"{head}Date: {date}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
            )

    loop = _loop()
    server = loop.run_until_complete(loop.create_server(Proto, "127.0.0.1", port))
    try:
        loop.run_forever()
    finally:
        server.close()


async def _client(port: int, requests: int) -> None:
    """``requests`` GETs over ``CONCURRENCY`` keep-alive connections; checks each answer."""
    request = f"GET /bucket/key HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    per = requests // CONCURRENCY

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if length != len(BODY) or len(await reader.readexactly(length)) != length:
                    raise RuntimeError("short answer")
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CONCURRENCY))), 300)


def _start(layer: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.server_layers", "--serve", layer, "--port", str(port)]
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            asyncio.run(_client(port, CONCURRENCY))
            return proc, port
        except (OSError, EOFError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{layer} server did not start")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server_layers", description=__doc__)
    p.add_argument("--requests", type=int, default=16_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--serve", choices=LAYERS)
    p.add_argument("--port", type=int)
    a = p.parse_args()
    if a.serve:
        serves: dict[str, Callable[[int], None]] = {
            "aiohttp": serve_aiohttp,
            "httptools": serve_httptools,
        }
        serves[a.serve](a.port)
        return
    requests = max(CONCURRENCY, min(a.requests, 100_000))
    rounds = max(1, min(a.rounds, 20))
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    got: dict[str, list[float]] = {layer: [] for layer in LAYERS}
    try:
        for layer in LAYERS:
            servers[layer] = _start(layer)
        for r in range(rounds + 1):
            for layer, (proc, port) in servers.items():
                before = proc_usage(proc.pid).cpu_seconds
                asyncio.run(_client(port, requests))
                if r:  # round 0 is the warm-up
                    used = proc_usage(proc.pid).cpu_seconds - before
                    got[layer].append(used * 1e6 / requests)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    for layer, values in got.items():
        med = statistics.median(values)
        print(f"{layer:10s} {med:7.1f} us/request ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
