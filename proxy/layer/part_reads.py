"""GET and HEAD with ``partNumber``: serve one part of an encrypted object.

Backends do not reliably serve a part (moto and rclone ignore ``partNumber`` on GET), and a
completed upload's part sizes are not recorded anywhere, so the proxy finds the part in the
body itself.  In the aligned layout every stored segment is ``S + 32`` bytes except the
object's last, and each segment header names its part; part numbers increase along the body.
Two binary searches over 16-byte header reads (about ``2 * log2(segments)`` small range GETs)
find the part's first and last segment; the part is then served as a plaintext range read,
which fetches only its segments and authenticates each one.

Limits: the probed headers are not authenticated themselves (the served bytes are), so a
backend that answers probes differently from the read can shift the part boundaries, never
the bytes; ``x-amz-mp-parts-count`` is the last part's number (clients number parts 1..n).
A single-part object is one part; an object re-encrypted at completion (non-aligned parts)
is single-part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

from proxy import crypto
from proxy.backend.client import parse_error
from proxy.errors import FormatError, S3Error
from proxy.layer.objects import GetResult, ObjectLayer, check_preconditions

_HEADER: Final = 16


def invalid_part_number() -> S3Error:
    return S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416)


class PartReader:
    def __init__(self, objects: ObjectLayer) -> None:
        self.objects = objects
        self.backend = objects.backend

    async def read(
        self,
        bucket: str,
        key: str,
        part_number: str,
        cond: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        *,
        head: bool,
    ) -> GetResult:
        """Part ``part_number``: a 206 with plaintext Content-Range; plaintext objects as stored."""
        if not part_number.isdigit() or not 1 <= int(part_number) <= crypto.MAX_PART:
            raise S3Error(
                "InvalidArgument", "Part number must be an integer between 1 and 10000", 400
            )
        number = int(part_number)
        resp, _ = await self.backend.call("HEAD", bucket, key, query=query)
        env = await self.objects.envelope(bucket, key, resp.headers)
        if env is None:  # stored as sent: the backend serves its own parts
            full = (*query, ("partNumber", part_number))
            if head:
                return await self.objects.head_object(bucket, key, cond, full)
            return await self.objects.get_object(bucket, key, None, cond, full)
        if check_preconditions(cond, self.objects.response_headers(resp.headers, env)) == 304:
            return GetResult(304, self.objects.response_headers(resp.headers, env), None, 0)
        stored = int(resp.headers.get("content-length", "0"))
        plain = self.objects.plaintext_size(stored)
        total = crypto.segment_count(stored)
        count = 1
        if not env.multipart:
            if number != 1:
                raise invalid_part_number()
            first, last = 0, total - 1
        elif env.layout is not None:  # v2: the bound layout tells, no header reads needed
            found = [(g, n) for p, g, n in env.layout.parts() if p == number]
            if not found:
                raise invalid_part_number()
            first, last = found[0][0], found[0][0] + found[0][1] - 1
            count = env.layout.runs[-1].last
        else:
            first, last, count = await self._locate(bucket, key, query, number, total)
        start = first * crypto.SEGMENT_SIZE
        end = plain - 1 if last == total - 1 else (last + 1) * crypto.SEGMENT_SIZE - 1
        if plain == 0:
            res = (
                await self.objects.head_object(bucket, key, cond, query)
                if head
                else (await self.objects.get_object(bucket, key, None, cond, query))
            )
        elif head:
            res = await self.objects.head_object(bucket, key, cond, query)
            res.content_length = end - start + 1
            res.headers["content-range"] = f"bytes {start}-{end}/{plain}"
            res.status = 206
        else:
            res = await self.objects.get_object(bucket, key, f"bytes={start}-{end}", cond, query)
        if res.status != 304:
            res.headers["x-amz-mp-parts-count"] = str(count)
        return res

    async def _locate(
        self,
        bucket: str,
        key: str,
        query: tuple[tuple[str, str], ...],
        number: int,
        total: int,
    ) -> tuple[int, int, int]:
        """(first segment, last segment, parts count) of part ``number``."""
        cache: dict[int, int] = {}

        async def part_at(g: int) -> int:
            if g not in cache:
                cache[g] = await self._segment_part(bucket, key, query, g)
            return cache[g]

        async def first_at_least(target: int, lo: int) -> int:
            hi = total
            while lo < hi:  # at most log2(total) + 1 rounds
                mid = (lo + hi) // 2
                if await part_at(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        first = await first_at_least(number, 0)
        if first == total or await part_at(first) != number:
            raise invalid_part_number()
        after = await first_at_least(number + 1, first)
        return first, after - 1, await part_at(total - 1)

    async def segment_part(
        self, bucket: str, key: str, query: tuple[tuple[str, str], ...], g: int
    ) -> int:
        """The part number in the header of stored segment ``g`` (one 16-byte range GET)."""
        return await self._segment_part(bucket, key, query, g)

    async def _segment_part(
        self, bucket: str, key: str, query: tuple[tuple[str, str], ...], g: int
    ) -> int:
        offset = g * crypto.STORED_SEGMENT_SIZE
        resp = await self.backend.request(
            "GET", bucket, key, query=query, headers={"range": f"bytes={offset}-{offset + 15}"}
        )
        try:
            if resp.status not in (200, 206):
                raise parse_error(resp.status, await resp.read())
            if "content-range" not in resp.headers and offset:
                raise FormatError("backend ignored a range request")
            header = await resp.content.readexactly(_HEADER)
        except asyncio.IncompleteReadError:
            raise FormatError("stored segment header is truncated") from None
        finally:
            resp.close()
        return int.from_bytes(header[2:4], "big")
