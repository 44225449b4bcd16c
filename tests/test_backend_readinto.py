"""Reading backend bodies into the caller's buffer (``Body.readinto``), on both event loops.

A Content-Length body is counted by ``proxy/backend/http.py`` once llhttp has parsed the
headers, and the socket is read straight into a waiting reader's buffer
(``pool.Conn.get_buffer``).  These tests pin what that must keep: the bytes are the bytes
sent, whatever the pieces they arrive in; a cut body is an error, never a short one; bytes
past the announced length never reach the next response; each read is bounded by the read
timeout, not the whole fill; chunked bodies, mixed reads and TLS work as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.backend.http import Body, PayloadError
from tests.fakes.azure_kv import tls_material
from tests.test_backend_client import Scripted, _raw_client

MiB = 1 << 20
LOOPS = ["asyncio", "uvloop"]


def _run(kind: str, coro: Callable[[], Awaitable[None]]) -> None:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro())  # type: ignore[arg-type]
    else:
        asyncio.run(coro())  # type: ignore[arg-type]


async def _read_all(body: Body, size: int) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(size))
    while n := await body.readinto(buf):
        out += buf[:n]
    return bytes(out)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_large_body_goes_straight_into_the_buffer(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(16 * MiB + 12345)
    pushed: list[int] = []
    original = Body.push

    def counting(self: Body, chunk: bytes) -> None:
        pushed.append(len(chunk))
        original(self, chunk)

    monkeypatch.setattr(Body, "push", counting)

    async def big(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
        for i in range(0, len(data), 65_536):  # many small pieces
            w.write(data[i : i + 65_536])
            await w.drain()
        return True

    async def scenario() -> None:
        async with Scripted(big) as srv:
            bc = _raw_client(srv.url)
            for _ in range(2):
                resp = await bc.request("GET", "b", "k")
                got = await _read_all(resp.content, MiB)
                resp.release()
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert srv.accepted == 1  # read to its end: the connection was reused
            # Nearly all of it was read into the reader's buffer, not queued as bytes.
            assert sum(pushed) < 2 * MiB
            await bc.session.close()

    _run(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_cut_body_is_an_error_never_a_short_read(kind: str) -> None:
    async def cut(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"a" * 40_000)
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"b" * 1_500_000)
        await w.drain()
        return False  # and the connection closes

    async def scenario() -> None:
        async with Scripted(cut) as srv:
            bc = _raw_client(srv.url)
            resp = await bc.request("GET", "b", "k")
            buf = memoryview(bytearray(MiB))
            got = 0
            with pytest.raises(PayloadError):
                while n := await resp.content.readinto(buf):
                    got += n
            assert got < 3_000_000
            resp.release()
            assert bc.session.open == 0
            await bc.session.close()

    _run(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_bytes_past_the_length_never_reach_the_next_response(kind: str) -> None:
    async def overlong(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.02)  # the body in reads of its own, then more than announced
        w.write(b"x" * 300_000 + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge")
        await w.drain()
        await asyncio.sleep(0.05)
        return True

    async def scenario() -> None:
        async with Scripted(overlong) as srv:
            bc = _raw_client(srv.url)
            for _ in range(2):
                resp = await bc.request("GET", "b", "k")
                assert await _read_all(resp.content, 64 * 1024) == b"x" * 300_000
                resp.release()
                await asyncio.sleep(0.1)
            assert srv.accepted == 2  # the first connection was not reused
            await bc.session.close()

    _run(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_each_read_is_bounded_not_the_whole_fill(kind: str) -> None:
    pieces = 8

    async def trickle(head: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/b/stall" in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"s" * 5000)
            await w.drain()
            await asyncio.sleep(5)
            return False
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (pieces * 10_000))
        for _ in range(pieces):  # each gap under the timeout, all of them over it
            await asyncio.sleep(0.15)
            w.write(b"t" * 10_000)
            await w.drain()
        return True

    async def scenario() -> None:
        async with Scripted(trickle) as srv:
            bc = _raw_client(srv.url, read_timeout=0.5)
            resp = await bc.request("GET", "b", "slow")
            assert await _read_all(resp.content, MiB) == b"t" * (pieces * 10_000)
            resp.release()
            started = time.monotonic()
            resp = await bc.request("GET", "b", "stall")
            with pytest.raises(TimeoutError):
                await _read_all(resp.content, MiB)
            assert time.monotonic() - started < 3
            resp.release()
            await bc.session.close()

    _run(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_chunked_and_mixed_reads(kind: str) -> None:
    data = os.urandom(700_000)

    async def answer(head: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/b/chunked" in head:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(data), 100_000):
                part = data[i : i + 100_000]
                w.write(b"%x\r\n%s\r\n" % (len(part), part))
                await w.drain()
            w.write(b"0\r\n\r\n")
            return True
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        return True

    async def scenario() -> None:
        async with Scripted(answer) as srv:
            bc = _raw_client(srv.url)
            resp = await bc.request("GET", "b", "chunked")
            assert await _read_all(resp.content, 256 * 1024) == data
            resp.release()
            resp = await bc.request("GET", "b", "plain")
            head = await resp.content.read(1000)
            buf = memoryview(bytearray(len(data)))
            n = await resp.content.readinto(buf)
            assert head + bytes(buf[:n]) == data
            assert await resp.content.readinto(buf) == 0
            resp.release()
            assert srv.accepted == 1
            await bc.session.close()

    _run(kind, scenario)


@pytest.mark.parametrize("kind", LOOPS)
def test_readinto_over_tls(kind: str, tmp_path: Path) -> None:
    tls = tls_material(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.cert_path, tls.key_path)
    data = os.urandom(3 * MiB + 7)

    async def ok(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
        for i in range(0, len(data), 200_000):
            w.write(data[i : i + 200_000])
            await w.drain()
        return True

    async def scenario() -> None:
        async with Scripted(ok, server_ctx) as srv:
            bc = _raw_client(srv.url, ca_bundle=tls.ca_path)
            for _ in range(2):
                resp = await bc.request("GET", "b", "k")
                assert await _read_all(resp.content, MiB) == data
                resp.release()
            assert srv.accepted == 1
            await bc.session.close()

    _run(kind, scenario)
