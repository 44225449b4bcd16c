"""HTTP/1.1 messages from the backend, parsed by httptools (llhttp); connections: ``pool.py``.

What ``client.py`` needs and no more (benchmarks/README.md: aiohttp's client cost ~200 us of
CPU per small backend request).  ``Response``: status, headers (``CIMultiDictProxy``),
``content`` (``read(n)``, ``readexactly``, ``iter_chunked``, ``readinto``), ``read()``,
``release()``/``close()`` (the connection is reused only if the body was read to its end).
At most ``HIGH_WATER`` body bytes are buffered before the socket stops being read; each wait
for more is bounded by the read timeout (``TimeoutError``).  Failures are ``HttpError``s: a
body never ends short without one.

llhttp parses the status line, the headers and chunked bodies.  A Content-Length body is
counted here once the headers are parsed (``Response.count_rest``): its bytes are taken as
they come, up to the announced length, and a reader waiting in ``readinto`` has the socket
read straight into its buffer (``pool.Conn.get_buffer``).  Bytes past that length make the
connection unusable; fewer before the connection closes are a ``PayloadError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.backend.pool import Conn

HIGH_WATER: Final = 4 * 64 * 1024
"""Body bytes buffered per response before the connection stops being read."""


class HttpError(Exception):
    """The backend connection failed: not reached, dropped, or a malformed response."""


class ConnectError(HttpError):
    """No connection could be made (refused, name unknown, TLS handshake failed)."""


class ConnectionLost(HttpError):
    """The connection closed before the response was complete."""


class PayloadError(HttpError):
    """A response body cut before its end, or a response that is not HTTP/1.1."""


def build_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The request line and header block; a CR or LF inside a name or value is refused."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    text = "\r\n".join(lines) + "\r\n\r\n"
    if not text.count("\n") == text.count("\r") == len(lines) + 1:
        raise ValueError("newline or carriage return in a backend request header")
    return text.encode("utf-8")


def expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Body:
    """A response body as it arrives (``resp.content``)."""

    def __init__(self, resp: Response) -> None:
        self._resp = resp
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.eof = False
        self.exc: BaseException | None = None

    def push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        resp = self._resp
        resp._wake()
        if self._size >= HIGH_WATER and resp._conn is not None:
            resp._conn.pause()

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of the body if ``n`` < 0); b"" at its end."""
        if n < 0 and self.eof and self.exc is None:  # all of it is here
            parts = list(self._chunks)
            self._chunks.clear()
            self._size = 0
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if n < 0:
            parts = []
            while chunk := await self.read(HIGH_WATER):
                parts.append(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        while True:
            if self.exc is not None:
                raise self.exc
            if self._chunks:
                return self._take(n)
            if self.eof:
                return b""
            conn = self._resp._conn
            if conn is not None:  # readinto may have paused it when its buffer filled
                conn.resume()
            await self._resp._wait()

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` with the body's next bytes: fewer only at its end (0 at the end).

        A Content-Length body not yet buffered is read from the socket straight into ``buf``;
        each read is bounded by the read timeout.
        """
        resp = self._resp
        want = len(buf)
        got = 0
        while got < want:
            if self.exc is not None:
                raise self.exc
            if self._chunks:
                got += self._take_into(buf[got:])
                continue
            if self.eof:
                break
            left = resp._left
            conn = resp._conn
            if left and conn is not None:
                resp._into = buf[got : got + min(want - got, left)]
                resp._into_got = 0
                conn.resume()
                try:
                    await resp._wait()
                finally:
                    got += resp._into_got
                    resp._into = None
                    resp._into_got = 0
            else:
                if conn is not None:
                    conn.resume()
                await resp._wait()
        return got

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk

    def _take(self, n: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        if len(first) > n:
            out = first[:n]
            chunks[0] = first[n:]
        elif len(first) == n or len(chunks) == 1:
            out = chunks.popleft()
        else:
            parts = []
            got = 0
            while chunks and got < n:
                c = chunks[0]
                if len(c) > n - got:
                    parts.append(c[: n - got])
                    chunks[0] = c[n - got :]
                    got = n
                else:
                    parts.append(chunks.popleft())
                    got += len(c)
            out = b"".join(parts)
        self._size -= len(out)
        conn = self._resp._conn
        if conn is not None and self._size < HIGH_WATER:
            conn.resume()
        return out

    def _take_into(self, buf: memoryview) -> int:
        chunks = self._chunks
        want = len(buf)
        got = 0
        while chunks and got < want:
            chunk = chunks[0]
            k = min(len(chunk), want - got)
            if k < len(chunk):
                buf[got : got + k] = memoryview(chunk)[:k]
                chunks[0] = chunk[k:]
            else:
                buf[got : got + k] = chunk
                chunks.popleft()
            got += k
        self._size -= got
        conn = self._resp._conn
        if conn is not None and self._size < HIGH_WATER:
            conn.resume()
        return got


class Response:
    """One backend response; the caller reads its body, then releases (or closes) it."""

    def __init__(self, conn: Conn, method: str, read_timeout: float) -> None:
        self._conn: Conn | None = conn
        self._method = method
        self._timeout = read_timeout
        self._parser: httptools.HttpResponseParser | None = None
        self._raw: list[tuple[bytes, bytes]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._informational = False
        self._data: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        """A Content-Length body, counted here once llhttp has parsed the headers."""
        self._seen = 0
        self._left: int | None = None
        """Bytes of a counted body still to come (None: llhttp delimits the body)."""
        self._into: memoryview | None = None
        """Where the next socket read goes: the free part of a waiting reader's buffer."""
        self._into_got = 0
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None
        self.content = Body(self)
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        self.released = False

    async def read(self) -> bytes:
        """The whole body (kept: a second call returns it again)."""
        if self._data is None:
            self._data = await self.content.read()
        return self._data

    def release(self) -> None:
        """Done with this response: its connection is reused if the body was read whole."""
        self.released = True
        if self._conn is not None:
            self._conn.settle()

    close = release
    """The same: a connection whose response was not read to its end is closed."""

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        self._timer = loop.call_later(self._timeout, expire, fut)
        try:
            await fut
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self.content.exc is not None:
                raise self.content.exc
            await self._wait()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the real answer follows
            self._raw = []
            self._informational = True
            return
        self.status = status
        se = "surrogateescape"  # as aiohttp decodes them
        headers = CIMultiDict(
            [(k.decode("utf-8", se), v.decode("utf-8", se)) for k, v in self._raw]
        )
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        no_body = self._method == "HEAD" or status in (204, 304)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.until_eof = not no_body and length is None and not chunked
        self._counted = not no_body and not chunked and self.content_length is not None
        self.headers_done = True
        self.keep_alive = self._parser.should_keep_alive() and not self.until_eof
        if self._method == "HEAD":  # llhttp does not know: it would wait for the body
            self.finish()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self._seen += len(body)
            self.content.push(body)

    def count_rest(self) -> None:
        """After llhttp's feed: from here on a Content-Length body is counted, not parsed."""
        if self._counted and self.headers_done and not self.complete and self._left is None:
            assert self.content_length is not None
            self._parser = None
            self._left = self.content_length - self._seen
            if self._left <= 0:
                self.finish()

    def raw_body(self, data: memoryview) -> bool:
        """Bytes of a counted body read into the scratch buffer; False if some are past it."""
        left = self._left
        assert left is not None
        take = min(len(data), left)
        if take and not self.complete:
            self.content.push(bytes(data[:take]))
            self._left = left - take
            if self._left == 0:
                self.finish()
        return take == len(data)

    def filled(self, nbytes: int) -> None:
        """``nbytes`` read straight into the waiting reader's buffer (``_into``)."""
        into = self._into
        assert into is not None and self._left is not None
        self._into_got += nbytes
        self._left -= nbytes
        if self._left == 0:
            self._into = None
            self.finish()
        elif nbytes == len(into):
            self._into = None
            if self._conn is not None:  # the next reads wait for the reader's next buffer
                self._conn.pause()
            self._wake()
        else:
            self._into = into[nbytes:]
            if self._timer is not None and self._waiter is not None:  # a fresh bound per read
                self._timer.cancel()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._timeout, expire, self._waiter)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.finish()

    def finish(self) -> None:
        if not self.complete:
            self.complete = True
            self.content.eof = True
            self._parser = None
            self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete and self.content.exc is None:
            self.content.exc = exc
            self._wake()
