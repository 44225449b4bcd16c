"""The backend client against real S3 servers and scripted HTTP servers.

Against moto: what it sends for streamed bodies.  Against rclone and small asyncio servers:
its HTTP layer (``proxy/backend/pool.py``, ``http.py``) - connection reuse, cut and chunked
bodies, the pool bound, timeouts, flow control.

A small streamed body is gathered and sent in one piece (benchmarks/README.md: the CPU it
saves per small PUT); these tests pin what that must never change: the bytes stored are the
bytes streamed, and a stream whose length differs from the declared one is never sent - not
clipped to a silently short object, not left hanging for bytes that never come.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.backend.client import COALESCE_BYTES, BackendClient
from proxy.backend.http import HIGH_WATER, PayloadError
from proxy.config import Backend
from proxy.errors import S3Error
from proxy.layer.bodies import iter_body
from tests.fakes.azure_kv import tls_material
from tests.servers import BACKEND_AK, BACKEND_SK, REGION, Server, free_port


async def _chunks(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def _client(url: str) -> BackendClient:
    # A short read timeout: a request left waiting for body bytes fails fast instead of hanging.
    cfg = Backend(
        endpoint=url, region=REGION, access_key=BACKEND_AK, secret_key=BACKEND_SK, read_timeout=5
    )
    return BackendClient(cfg, BackendClient.make_session(cfg))


@pytest.fixture
async def backend_client(moto: Server) -> AsyncIterator[BackendClient]:
    bc = _client(moto.url)
    await bc.call("PUT", "bc-test")
    yield bc
    await bc.session.close()


async def _stored(bc: BackendClient, key: str) -> bytes | None:
    resp = await bc.request("GET", "bc-test", key)
    try:
        return await resp.read() if resp.status == 200 else None
    finally:
        resp.release()


@pytest.mark.parametrize(
    "size", [0, 1, 4096, COALESCE_BYTES, COALESCE_BYTES + 1, 3 * COALESCE_BYTES]
)
async def test_streamed_body_stored_whole(backend_client: BackendClient, size: int) -> None:
    data = os.urandom(size)
    key = f"whole-{size}"
    await backend_client.call("PUT", "bc-test", key, body=_chunks(data, 1000), content_length=size)
    assert await _stored(backend_client, key) == data


@pytest.mark.parametrize("declared", [4096, 2 * COALESCE_BYTES])
@pytest.mark.parametrize("delta", [-1, 1, 1000])
async def test_stream_of_wrong_length_is_never_stored(
    backend_client: BackendClient, declared: int, delta: int
) -> None:
    key = f"wrong-{declared}-{delta}"
    body: Any = _chunks(os.urandom(declared + delta), 700)
    with pytest.raises(S3Error) as err:
        await backend_client.call("PUT", "bc-test", key, body=body, content_length=declared)
    # A small body is refused before sending; a large one aborts the request mid-body
    # (send_put re-raises the iterator's own error; a bare call sees the aborted request).
    assert err.value.code in (
        ("InternalError",)
        if declared <= COALESCE_BYTES
        else ("InternalError", "ServiceUnavailable")
    )
    assert await _stored(backend_client, key) is None


# ---------------------------------------------------------------- the HTTP layer itself
# proxy.backend.http against moto (reuse, HEAD) and against small scripted asyncio servers
# (what a real S3 server will not do on demand: cut a body, chunk it, stall, close).


async def test_connection_reused_after_whole_bodies(rclone_backend: Server) -> None:
    # rclone (Go's net/http) keeps connections alive; moto's server closes each one.
    backend_client = _client(rclone_backend.url)
    await backend_client.call("PUT", "bc-test")
    pool = backend_client.session
    await backend_client.call("PUT", "bc-test", "reuse", body=b"x" * 5000)
    opened = pool.open
    for _ in range(5):
        head, _ = await backend_client.call("HEAD", "bc-test", "reuse")
        assert head.content_length == 5000  # HEAD: the length announced, no body waited for
        _, data = await backend_client.call("GET", "bc-test", "reuse")
        assert data == b"x" * 5000
    assert pool.open == opened == 1
    # A response released before its end is not reused: its connection closes.
    resp = await backend_client.request("GET", "bc-test", "reuse", headers={"range": "bytes=0-9"})
    assert await resp.content.readexactly(10) == b"x" * 10
    resp.release()
    big = await backend_client.call("PUT", "bc-test", "big", body=os.urandom(4 << 20))
    assert big[0].status == 200
    resp = await backend_client.request("GET", "bc-test", "big")
    assert len(await resp.content.read(100)) <= 100
    resp.release()
    assert pool.open == 0
    await backend_client.call("DELETE", "bc-test", "big", ok=(204,))
    assert pool.open == 1
    await pool.close()


class Scripted:
    """An HTTP/1.1 server whose answers a test writes: counts its connections."""

    def __init__(self, answer: Any, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.accepted = 0
        self.current = 0
        self.most = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.current += 1
        self.most = max(self.most, self.current)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        await reader.readexactly(int(line.split(":")[1]))
                if not await self.answer(head, writer):
                    return
        finally:
            self.current -= 1
            writer.close()


def _raw_client(url: str, **kw: Any) -> BackendClient:
    cfg = Backend(endpoint=url, region=REGION, access_key=BACKEND_AK, secret_key=BACKEND_SK, **kw)
    return BackendClient(cfg, BackendClient.make_session(cfg))


async def test_body_cut_mid_way_is_an_error_not_a_short_body() -> None:
    async def cut(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 40000)
        await w.drain()
        return False  # and the connection closes

    async with Scripted(cut) as srv:
        bc = _raw_client(srv.url)
        with pytest.raises(S3Error) as err:
            await bc.call("GET", "b", "k")
        assert err.value.code == "ServiceUnavailable"
        resp = await bc.request("GET", "b", "k")
        with pytest.raises(PayloadError):
            async for _ in iter_body(resp, 100000):
                pass
        resp = await bc.request("GET", "b", "k")
        with pytest.raises(PayloadError):
            await resp.content.readexactly(100000)
        resp.release()
        assert bc.session.open == 0
        await bc.session.close()


async def test_chunked_response_and_reuse() -> None:
    async def chunked(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Amz-Meta-A: b\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")
        return True

    async with Scripted(chunked) as srv:
        bc = _raw_client(srv.url)
        for _ in range(3):
            resp, data = await bc.call("GET", "b", "k")
            assert data == b"hello chunked world"
            assert resp.headers["x-amz-meta-a"] == "b"  # case-insensitive
            assert resp.content_length is None
        assert srv.accepted == 1
        await bc.session.close()


async def test_no_body_statuses_keep_the_connection() -> None:
    async def empty(head: bytes, w: asyncio.StreamWriter) -> bool:
        status = b"204 No Content" if head.startswith(b"DELETE") else b"304 Not Modified"
        w.write(b"HTTP/1.1 " + status + b'\r\nETag: "e"\r\n\r\n')
        return True

    async with Scripted(empty) as srv:
        bc = _raw_client(srv.url)
        for _ in range(2):
            await bc.call("DELETE", "b", "k", ok=(204,))
            resp, data = await bc.call("GET", "b", "k", ok=(304,))
            assert data == b"" and resp.headers["etag"] == '"e"'
        assert srv.accepted == 1
        await bc.session.close()


async def test_pool_bound_and_a_connection_closed_while_idle() -> None:
    async def slow(head: bytes, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return b"/close" not in head  # closed after answering, as an idle timeout would

    async with Scripted(slow) as srv:
        bc = _raw_client(srv.url, max_connections=2)
        got = await asyncio.gather(*(bc.call("GET", "b", f"k{i}") for i in range(8)))
        assert [d for _, d in got] == [b"ok"] * 8
        assert srv.most <= 2 and srv.accepted == 2
        await bc.call("GET", "b", "close")
        await asyncio.sleep(0.1)  # the server has closed that one
        got = await asyncio.gather(*(bc.call("GET", "b", f"k{i}") for i in range(4)))
        assert [d for _, d in got] == [b"ok"] * 4
        assert bc.session.open <= 2
        await bc.session.close()


async def test_body_flow_control_bounds_the_buffer() -> None:
    size = 16 << 20

    async def big(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * (1 << 20)
        for _ in range(size >> 20):
            w.write(block)
            await w.drain()
        return True

    async with Scripted(big) as srv:
        bc = _raw_client(srv.url)
        resp = await bc.request("GET", "b", "k")
        got = 0
        while chunk := await resp.content.read(1 << 20):
            got += len(chunk)
            assert resp.content._size <= HIGH_WATER + (1 << 20)
            await asyncio.sleep(0.002)  # a slow reader
        resp.release()
        assert got == size
        await bc.call("GET", "b", "k")  # reused: it was read to its end
        assert srv.accepted == 1
        await bc.session.close()


async def test_read_timeouts() -> None:
    async def silent(head: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/b/half" in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await asyncio.sleep(5)
        return False

    async with Scripted(silent) as srv:
        bc = _raw_client(srv.url, read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(S3Error) as err:
            await bc.request("GET", "b", "k")  # no response headers
        assert err.value.code == "ServiceUnavailable"
        resp = await bc.request("GET", "b", "half")  # headers, then part of the body
        with pytest.raises(TimeoutError):
            await resp.read()
        resp.release()
        assert time.monotonic() - started < 3
        assert bc.session.open == 0
        await bc.session.close()


async def test_connect_timeout_and_refused() -> None:
    port = free_port()  # nothing listens there
    bc = _raw_client(f"http://127.0.0.1:{port}", connect_timeout=1)
    with pytest.raises(S3Error) as err:
        await bc.request("GET", "b", "k")
    assert err.value.code == "ServiceUnavailable"
    assert bc.session.open == 0
    await bc.session.close()
    # A listener that never accepts, its backlog full: connecting hangs until the timeout.
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(lsock.getsockname())
            fillers.append(s)
        bc = _raw_client(f"http://127.0.0.1:{lsock.getsockname()[1]}", connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(S3Error) as err:
            await bc.request("GET", "b", "k")
        assert err.value.code == "ServiceUnavailable"
        assert time.monotonic() - started < 3
        for s in fillers:
            s.close()
        await bc.session.close()


async def test_reused_connection_closed_unanswered_is_retried_once() -> None:
    # The writers themselves are kept: an id() of a closed connection's writer can be
    # reused by a new connection's, which would then be refused as if it had answered.
    answered: list[asyncio.StreamWriter] = []

    async def once_per_connection(head: bytes, w: asyncio.StreamWriter) -> bool:
        if any(w is seen for seen in answered):
            return False  # closed without an answer, as a server timing out an idle one
        answered.append(w)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with Scripted(once_per_connection) as srv:
        bc = _raw_client(srv.url)
        for _ in range(3):  # sent again on a new connection: the body can be sent again
            assert (await bc.call("PUT", "b", "k", body=b"data"))[1] == b"ok"
        assert srv.accepted == 3
        # A streamed body cannot be sent again: the failure is the caller's to see.
        with pytest.raises(S3Error) as err:
            await bc.call(
                "PUT", "b", "k", body=_chunks(b"d" * 300_000, 1000), content_length=300_000
            )
        assert err.value.code == "ServiceUnavailable"
        await bc.session.close()


async def test_tls_backend_with_the_configured_trust(tmp_path: Path) -> None:
    tls = tls_material(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.cert_path, tls.key_path)

    async def ok(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        return True

    async with Scripted(ok, server_ctx) as srv:
        bc = _raw_client(srv.url, ca_bundle=tls.ca_path)
        for _ in range(3):
            assert (await bc.call("GET", "b", "k"))[1] == b"secret"
        assert srv.accepted == 1
        await bc.session.close()
        bc = _raw_client(srv.url, verify_tls=False)
        assert (await bc.call("GET", "b", "k"))[1] == b"secret"
        await bc.session.close()
        bc = _raw_client(srv.url)  # the system's trust: this CA is not in it
        with pytest.raises(S3Error) as err:
            await bc.call("GET", "b", "k")
        assert err.value.code == "ServiceUnavailable"
        await bc.session.close()
