"""PUT of a body whose length is not known up front (``Transfer-Encoding: chunked``, no
Content-Length: streaming uploaders such as ``curl -T -``).

The stored form needs its length before the first byte goes to the backend, so the body is
taken a part at a time: when it ends within the first ``PART_SIZE`` bytes it is one ordinary
PUT; otherwise it becomes a backend multipart upload of ``PART_SIZE`` parts (a whole number
of segments: the aligned layout) and a last part, completed only after the whole body arrived
and verified; any failure aborts the upload, so nothing is stored. Memory per request: one
part. Up to 10,000 parts (48 GiB); a whole-object checksum header is verified by the front
end but, as for any multipart object, not stored as a full-object checksum.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final
from xml.sax.saxutils import escape

from proxy import crypto
from proxy.layer.multipart import MultipartLayer
from proxy.layer.writes import PutResult
from proxy.wire.xmldoc import find_text

PART_SIZE: Final = 5 * 1024 * 1024
"""Bytes per part: S3's smallest part size, a whole number of segments."""
assert PART_SIZE % crypto.SEGMENT_SIZE == 0


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _Parts:
    """Cuts a stream into parts of ``PART_SIZE`` and says which one is the last."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self._buf = bytearray()
        self._ended = False

    async def _fill(self) -> None:
        while not self._ended and len(self._buf) <= PART_SIZE:
            try:
                self._buf += await anext(self._body)
            except StopAsyncIteration:
                self._ended = True

    async def next(self) -> tuple[bytes, bool]:
        """The next part and whether it is the last."""
        await self._fill()
        part = bytes(self._buf[:PART_SIZE])
        del self._buf[:PART_SIZE]
        return part, self._ended and not self._buf


def _without_checksums(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in headers.items()
        if not k.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum-"))
    }


async def put_unsized(
    mp: MultipartLayer,
    bucket: str,
    key: str,
    headers: Mapping[str, str],
    body: AsyncIterator[bytes],
    verified_checksums: Callable[[], Mapping[str, str]] = dict,
) -> PutResult:
    parts = _Parts(body)
    first, last = await parts.next()
    if last:
        return await mp.objects.put_object(
            bucket, key, headers, _once(first), len(first), verified_checksums
        )
    doc, _ = await mp.create(bucket, key, _without_checksums(headers))
    upload_id = find_text(doc, "UploadId")
    done = False
    try:
        etags: list[str] = []
        data = first
        while True:
            res = await mp.upload_part(
                bucket, key, upload_id, str(len(etags) + 1), _once(data), len(data)
            )
            etags.append(res.etag or "")
            if last:
                break
            data, last = await parts.next()
        xml = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(e)}</ETag></Part>"
            for n, e in enumerate(etags, 1)
        )
        answer, out = await mp.complete(
            bucket,
            key,
            upload_id,
            f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode(),
            headers,
        )
        done = True
    finally:
        if not done:
            await mp.abort(bucket, key, upload_id)
    return PutResult(etag=find_text(answer, "ETag") or None, headers=dict(out))
