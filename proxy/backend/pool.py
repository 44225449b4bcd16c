"""Keep-alive connections to the backend over ``asyncio.Protocol``: a bounded pool.

``Pool``: connections per (scheme, host, port), at most ``limit`` open in all (a request
waits for one).  An idle connection is reused for ``KEEPALIVE_S``, and only after its
response was read to its end; a reused connection found closed before any byte of the
answer is replaced once when the body can be sent again (bytes or none): the server closed
it while idle.  ``connect_timeout`` covers TCP and TLS set-up; ``read_timeout`` each wait on
the backend (response headers, the backend taking request bytes; body reads: ``http.py``).
Request bodies are bytes (sent with the headers in one write) or an async iterable written
as it yields, with the transport's flow control; the caller checks their length.

Reading is buffered (``asyncio.BufferedProtocol``): the socket is read into the pool's one
scratch buffer, whose bytes are parsed (and copied out) before the next read, or - while a
reader waits in ``Body.readinto`` on a Content-Length body - straight into that reader's
buffer, so a large body reaches the decryptor without an intermediate copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable
from typing import Final, cast

import httptools

from proxy.backend.http import ConnectError, ConnectionLost, PayloadError, Response, expire

ReqBody = bytes | AsyncIterable[bytes | bytearray] | None
"""A request body: whole, or streamed (the encryptor hands out ``bytearray`` segments)."""
KEEPALIVE_S: Final = 15.0
"""An idle connection is not reused after this long (aiohttp's default)."""
SMALL_BODY: Final = 64 * 1024
"""A bytes body up to this size is joined to the headers (one write, one packet)."""
SCRATCH: Final = 256 * 1024
"""The pool's read buffer (uvloop reads 256 KiB at a time into its own)."""

Key = tuple[str, str, int]
"""(scheme, host, port)"""


class Conn(asyncio.BufferedProtocol):
    """One keep-alive connection: one request at a time."""

    def __init__(self, pool: Pool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.counted = True
        self.lost = False
        self.idle_since = 0.0
        self.writing = False
        self.received = False
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._into_reader = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        resp = self.resp
        if resp is not None and resp._into is not None:  # a reader waits for body bytes
            self._into_reader = True
            return resp._into
        self._into_reader = False
        return self.pool.scratch

    def buffer_updated(self, nbytes: int) -> None:
        resp = self.resp
        if self._into_reader and resp is not None:
            self._into_reader = False
            self.received = True
            resp.filled(nbytes)
            if resp.complete:
                self.settle()
            return
        self.data_received(self.pool.scratch[:nbytes])

    def data_received(self, data: memoryview) -> None:
        """Bytes read into the scratch buffer: parsed, or counted into the body, at once."""
        resp = self.resp
        parser = resp._parser if resp is not None else None
        if resp is None or (parser is None and resp._left is None):
            self.lost = True  # nothing was asked: the connection is unusable
            assert self.transport is not None
            self.transport.close()
            return
        self.received = True
        if parser is None:
            if not resp.raw_body(data):
                self.lost = True  # bytes past the announced length
        else:
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                resp.fail(PayloadError(f"malformed backend response: {exc}"))
                self.lost = True
                assert self.transport is not None
                self.transport.close()
                return
            resp.count_rest()
        if resp.complete:
            self.settle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionLost("backend closed the connection"))
        resp = self.resp
        if resp is None:
            self.pool.drop(self)
            return
        if resp.headers_done and resp.until_eof:
            resp.finish()  # a body delimited by the connection's end
        elif resp.headers_done:
            resp.fail(PayloadError("backend closed the connection before the body's end"))
        else:
            resp.fail(ConnectionLost(f"backend closed the connection ({exc or 'EOF'})"))
        self.settle()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def begin(self, method: str) -> Response:
        resp = Response(self, method, self.pool.read_timeout)
        resp._parser = httptools.HttpResponseParser(resp)
        self.resp = resp
        self.received = False
        return resp

    async def send(self, head: bytes, body: ReqBody) -> None:
        transport = self.transport
        resp = self.resp
        assert transport is not None and resp is not None
        if self.lost:
            raise ConnectionLost("backend closed the connection")
        self.writing = True
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) <= SMALL_BODY:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
            else:
                transport.write(head)
                async for chunk in body:
                    if resp.headers_done:  # answered early: the rest is not wanted
                        resp.keep_alive = False
                        break
                    if self.lost:
                        raise ConnectionLost("backend closed the connection mid-request")
                    transport.write(chunk)
                    if self._write_paused:
                        await self._wait_drain()
        finally:
            self.writing = False
        if resp.complete:
            self.settle()

    async def _wait_drain(self) -> None:
        loop = asyncio.get_running_loop()
        fut = self._drain = loop.create_future()
        timer = loop.call_later(self.pool.read_timeout, expire, fut)
        try:
            await fut
        except ConnectionLost:
            if self.resp is None or not self.resp.headers_done:
                raise
        finally:
            timer.cancel()
            self._drain = None

    def settle(self) -> None:
        """After a response ended or was released: the connection back to the pool, or shut."""
        resp = self.resp
        if resp is None or self.writing:
            return
        if resp.complete:
            self.resp = None
            resp._conn = None
            if resp.keep_alive and not self.lost:
                self.resume()
                self.pool.put(self)
            else:
                self.pool.drop(self)
        elif resp.released:
            self.resp = None
            resp._conn = None
            resp._parser = None
            resp.fail(ConnectionLost("the response was closed before its end"))
            self.pool.drop(self)


class Pool:
    """Keep-alive connections to the backend's hosts, at most ``limit`` open at once."""

    def __init__(
        self,
        limit: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.open = 0
        self.closed = False
        self.scratch = memoryview(bytearray(SCRATCH))
        """Every connection's reads land here and are consumed before the next read."""
        self._idle: dict[Key, list[Conn]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def request(self, key: Key, method: str, head: bytes, body: ReqBody) -> Response:
        """Send one request; returns once the response headers are in."""
        replayable = body is None or isinstance(body, bytes)
        for attempt in (1, 2):
            conn, reused = await self._acquire(key)
            resp = conn.begin(method)
            ok = False
            try:
                await conn.send(head, body)
                await resp.wait_headers()
                ok = True
                return resp
            except ConnectionLost:
                if attempt == 1 and reused and replayable and not conn.received:
                    continue  # closed by the server while it was idle: a new connection
                raise
            finally:
                if not ok:
                    resp.release()
        raise AssertionError("unreachable")

    async def _acquire(self, key: Key) -> tuple[Conn, bool]:
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise ConnectError("the backend client is closed")
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.lost and now - conn.idle_since < KEEPALIVE_S:
                    return conn, True
                self.drop(conn)
            if self.open < self.limit:
                return await self._connect(key), False
            other = next((conns for conns in self._idle.values() if conns), None)
            if other is not None:  # an idle connection to another host makes room
                self.drop(other[0])
                continue
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if not fut.cancelled():  # woken as it was cancelled: pass the turn on
                    self._wake()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    async def _connect(self, key: Key) -> Conn:
        scheme, host, port = key
        conn = Conn(self, key)
        self.open += 1
        ok = False
        try:
            tls = self.ssl_context if scheme == "https" else None
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None
                )
            ok = True
            return conn
        except TimeoutError as exc:
            raise ConnectError(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        finally:
            if not ok:
                self.drop(conn)

    def put(self, conn: Conn) -> None:
        if self.closed:
            self.drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake()

    def drop(self, conn: Conn) -> None:
        """Close ``conn`` and free its place (once, however often it is called)."""
        conn.lost = True
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def close(self) -> None:
        """Close every idle connection; those in use close when their response is released."""
        self.closed = True
        for conns in list(self._idle.values()):
            for conn in list(conns):
                self.drop(conn)
        while self._waiters:
            self._wake()
