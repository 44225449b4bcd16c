"""Client CPU per backend request for HTTP client layers the backend path could use.

``python -m benchmarks.backend_clients [--requests N] [--rounds R]`` starts ``rclone serve s3``
on a temp directory, stores one 4 KiB object and GETs it ``N`` times at concurrency 16 with
each client in turn (alternating, ``R`` rounds, a warm-up round not recorded), and prints this
process's CPU time (user+system) per request: median (min-max) over the rounds.  Every client
sends the same request bytes, signed per request by ``proxy.wire.sigv4.sign_headers`` exactly
as ``proxy.backend.client`` does, and checks status and body length:

* ``aiohttp`` - ``aiohttp.ClientSession`` as the proxy used it before ``proxy/backend/pool.py``;
* ``httptools`` - an ``asyncio.Protocol`` per keep-alive connection parsing with httptools
  (llhttp, the parser of Node.js and of aiohttp's own C extension);
* ``handparsed`` - the same protocol with a minimal Content-Length-only parser in Python;
* ``BackendClient`` - the proxy's own client (``BackendClient.call``: signing, pool, timeouts,
  response object) - whichever ``proxy`` is imported, so two checkouts can be compared.

It measures the layer's own cost, not a finished client: no pool limits, retries, timeouts
or chunked responses in the two lean ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from benchmarks.targets import BACKEND_AK, BACKEND_SK, REGION, rclone_dir_backend
from proxy.wire.sigv4 import Credentials, SigningKeyCache, sign_headers

CONCURRENCY = 16
SIZE = 4096
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CREDS = Credentials(BACKEND_AK, BACKEND_SK)
KEYS = SigningKeyCache(4)


def signed(method: str, url: str) -> dict[str, str]:
    hdrs: dict[str, str] = {}
    hdrs.update(
        sign_headers(method, url, hdrs, EMPTY, CREDS, REGION, now=datetime.now(UTC), key_cache=KEYS)
    )
    return hdrs


def raw_request(method: str, url: str) -> bytes:
    u = URL(url, encoded=True)
    hdrs = signed(method, url)
    lines = [f"{method} {u.raw_path_qs} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.begin()
        self.transport.write(raw)
        return await self.fut

    def begin(self) -> None:
        raise NotImplementedError


class HttptoolsConn(_Conn):
    def begin(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.fut is not None
        self.fut.set_result((self.parser.get_status_code(), b"".join(self.body)))


class HandConn(_Conn):
    def begin(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.status = 0

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            del self.buf[: end + 4]
            self.need = length
        if len(self.buf) >= self.need:
            assert self.fut is not None
            self.fut.set_result((self.status, bytes(self.buf)))


async def lean_worker(cls: type[_Conn], host: str, port: int, url: str, n: int) -> None:
    loop = asyncio.get_running_loop()
    transport, conn = await loop.create_connection(cls, host, port)
    try:
        for _ in range(n):
            status, body = await conn.request(raw_request("GET", url))
            if status != 200 or len(body) != SIZE:
                raise RuntimeError(f"{cls.__name__}: {status}, {len(body)} B")
    finally:
        transport.close()


async def run_lean(cls: type[_Conn], url: str, n: int) -> None:
    u = URL(url)
    assert u.host is not None and u.port is not None
    per = n // CONCURRENCY
    await asyncio.gather(*(lean_worker(cls, u.host, u.port, url, per) for _ in range(CONCURRENCY)))


async def run_aiohttp(session: aiohttp.ClientSession, url: str, n: int) -> None:
    async def worker() -> None:
        for _ in range(n // CONCURRENCY):
            resp = await session.request(
                "GET", URL(url, encoded=True), headers=signed("GET", url), allow_redirects=False
            )
            try:
                body = await resp.read()
            finally:
                resp.release()
            if resp.status != 200 or len(body) != SIZE:
                raise RuntimeError(f"aiohttp: {resp.status}, {len(body)} B")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def run_backend_client(url: str, n: int) -> None:
    """``proxy.backend.client.BackendClient`` itself: signing, pool, response object."""
    from proxy.backend.client import BackendClient
    from proxy.config import Backend

    cfg = Backend(endpoint=url, region=REGION, access_key=BACKEND_AK, secret_key=BACKEND_SK)
    bc = BackendClient(cfg, BackendClient.make_session(cfg))

    async def worker() -> None:
        for _ in range(n // CONCURRENCY):
            _, body = await bc.call("GET", "clients", "obj")
            if len(body) != SIZE:
                raise RuntimeError(f"BackendClient: {len(body)} B")

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        await bc.session.close()


async def main_async(n: int, rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="cmek-bench-clients-") as tmp:
        async with rclone_dir_backend(Path(tmp)) as backend:
            connector = aiohttp.TCPConnector(limit=256)
            async with aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent"),
            ) as session:
                bucket = f"{backend.url}/clients"
                for method, u, data in (
                    ("PUT", bucket, b""),
                    ("PUT", f"{bucket}/obj", b"x" * SIZE),
                ):
                    hdrs = signed(method, u) if not data else {}
                    if data:
                        h: dict[str, str] = {"content-length": str(len(data))}
                        h.update(
                            sign_headers(
                                method,
                                u,
                                h,
                                "UNSIGNED-PAYLOAD",
                                CREDS,
                                REGION,
                                now=datetime.now(UTC),
                            )
                        )
                        hdrs = h
                    async with session.request(
                        method, URL(u, encoded=True), headers=hdrs, data=data
                    ) as r:
                        await r.read()
                url = f"{bucket}/obj"
                clients: dict[str, Callable[[], Awaitable[None]]] = {
                    "aiohttp": lambda: run_aiohttp(session, url, n),
                    "httptools": lambda: run_lean(HttptoolsConn, url, n),
                    "handparsed": lambda: run_lean(HandConn, url, n),
                    "BackendClient": lambda: run_backend_client(backend.url, n),
                }
                out: dict[str, list[float]] = {k: [] for k in clients}
                for rnd in range(rounds + 1):
                    for name, fn in clients.items():
                        t0 = time.process_time()
                        await fn()
                        cpu = time.process_time() - t0
                        if rnd:  # round 0 is the warm-up
                            out[name].append(cpu * 1e6 / n)
                return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend_clients", description=__doc__)
    p.add_argument("--requests", type=int, default=3200)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    factory: Any = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(main_async(a.requests, a.rounds))
    what = f"median (min-max) of {a.rounds} rounds, {a.requests} requests, c={CONCURRENCY}"
    print(f"client CPU per 4 KiB GET, us ({what})")
    for name, vals in res.items():
        print(f"  {name:13s} {statistics.median(vals):7.1f} ({min(vals):.1f}-{max(vals):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
