"""GetObjectAttributes answered with plaintext values.

For an encrypted object the backend's own answer would report ciphertext (stored size, the
MD5 of ciphertext, no checksum), so the proxy builds it from one HEAD and the envelope:

* ``ObjectSize`` - the plaintext size;
* ``ETag`` - in client form (the ``-c`` ETag, unquoted as S3 gives it here);
* ``Checksum`` - the client's checksum kept encrypted in the envelope, with its type;
* ``ObjectParts`` (multipart objects) - each part's plaintext size, found from the segment
  headers as ``partNumber`` reads find them (``part_reads.py``); ``x-amz-max-parts`` and
  ``x-amz-part-number-marker`` page them. Per-part checksums are not kept, so none is shown;
* ``StorageClass`` - as stored.

An object stored as sent is the backend's business: its request is passed through, and a
backend without the operation answers with its own error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from xml.sax.saxutils import escape

from proxy import crypto
from proxy.errors import S3Error
from proxy.layer.headers import CHECKSUM_HEADERS
from proxy.layer.objects import ObjectLayer
from proxy.layer.part_reads import PartReader
from proxy.wire.xmldoc import S3_NS

ATTRIBUTES: Final = ("ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize")
_PASS_REQUEST: Final = (
    "x-amz-object-attributes",
    "x-amz-max-parts",
    "x-amz-part-number-marker",
    "x-amz-expected-bucket-owner",
)
_PASS_RESPONSE: Final = ("last-modified", "x-amz-version-id", "x-amz-delete-marker")


def _requested(headers: Mapping[str, str]) -> list[str]:
    names = [n.strip() for n in headers.get("x-amz-object-attributes", "").split(",") if n.strip()]
    wanted = {n.lower() for n in names}
    if not wanted or not wanted <= {a.lower() for a in ATTRIBUTES}:
        raise S3Error(
            "InvalidArgument",
            "Invalid attribute name specified in x-amz-object-attributes",
            400,
        )
    return [a for a in ATTRIBUTES if a.lower() in wanted]


def _int_header(headers: Mapping[str, str], name: str, default: int) -> int:
    value = headers.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer", 400)
    return int(value)


class Attributes:
    def __init__(self, objects: ObjectLayer, parts: PartReader) -> None:
        self.objects = objects
        self.parts = parts

    async def get(
        self,
        bucket: str,
        key: str,
        headers: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
    ) -> tuple[bytes, dict[str, str]]:
        """The response document and headers."""
        wanted = _requested(headers)
        max_parts = min(_int_header(headers, "x-amz-max-parts", 1000), 1000)
        marker = _int_header(headers, "x-amz-part-number-marker", 0)
        plain_query = tuple(kv for kv in query if kv[0] != "attributes")
        resp, _ = await self.objects.backend.call("HEAD", bucket, key, query=plain_query)
        env = await self.objects.envelope(bucket, key, resp.headers)
        if env is None:
            return await self._passthrough(bucket, key, headers, query)
        head = await self.objects.head_object(bucket, key, {}, plain_query, checksum_mode=True)
        fields: list[str] = []
        for name in wanted:
            if name == "ETag":
                fields.append(f"<ETag>{escape(head.headers.get('etag', '').strip(chr(34)))}</ETag>")
            elif name == "Checksum":
                fields.append(_checksum(head.headers))
            elif name == "ObjectParts" and env.multipart:
                stored = int(resp.headers.get("content-length", "0"))
                fields.append(
                    await self._parts(bucket, key, plain_query, stored, max_parts, marker)
                )
            elif name == "StorageClass":
                sc = head.headers.get("x-amz-storage-class") or "STANDARD"
                fields.append(f"<StorageClass>{escape(sc)}</StorageClass>")
            elif name == "ObjectSize":
                fields.append(f"<ObjectSize>{head.content_length}</ObjectSize>")
        doc = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<GetObjectAttributesResponse xmlns="{S3_NS}">'
            + "".join(fields)
            + "</GetObjectAttributesResponse>"
        ).encode()
        return doc, {h: head.headers[h] for h in _PASS_RESPONSE if h in head.headers}

    async def _parts(
        self,
        bucket: str,
        key: str,
        query: tuple[tuple[str, str], ...],
        stored: int,
        max_parts: int,
        marker: int,
    ) -> str:
        """The parts of an aligned multipart object, from its segment headers."""
        total = crypto.segment_count(stored)
        plain = self.objects.plaintext_size(stored)
        cache: dict[int, int] = {}

        async def part_at(g: int) -> int:
            if g not in cache:
                cache[g] = await self.parts.segment_part(bucket, key, query, g)
            return cache[g]

        async def first_after(number: int, lo: int) -> int:
            hi = total
            while lo < hi:
                mid = (lo + hi) // 2
                if await part_at(mid) > number:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        found: list[tuple[int, int]] = []
        count = 0
        seg = 0
        truncated = False
        while seg < total:
            number = await part_at(seg)
            nxt = await first_after(number, seg)
            count += 1
            if number > marker:
                if len(found) == max_parts:
                    truncated = True
                else:
                    end = plain if nxt == total else nxt * crypto.SEGMENT_SIZE
                    found.append((number, end - seg * crypto.SEGMENT_SIZE))
            seg = nxt
        xml = "".join(
            f"<Part><PartNumber>{n}</PartNumber><Size>{size}</Size></Part>" for n, size in found
        )
        next_marker = found[-1][0] if found else marker
        return (
            f"<ObjectParts><PartsCount>{count}</PartsCount>"
            f"<PartNumberMarker>{marker}</PartNumberMarker>"
            f"<NextPartNumberMarker>{next_marker}</NextPartNumberMarker>"
            f"<MaxParts>{max_parts}</MaxParts>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{xml}</ObjectParts>"
        )

    async def _passthrough(
        self,
        bucket: str,
        key: str,
        headers: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
    ) -> tuple[bytes, dict[str, str]]:
        fwd = {h: headers[h] for h in _PASS_REQUEST if h in headers}
        resp, data = await self.objects.backend.call("GET", bucket, key, query=query, headers=fwd)
        return data, {h: resp.headers[h] for h in _PASS_RESPONSE if h in resp.headers}


def _checksum(headers: Mapping[str, str]) -> str:
    inner = ""
    for name in CHECKSUM_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if name == "x-amz-checksum-type":
            inner += f"<ChecksumType>{escape(value)}</ChecksumType>"
        else:
            tag = "Checksum" + name.removeprefix("x-amz-checksum-").upper()
            inner += f"<{tag}>{escape(value)}</{tag}>"
    return f"<Checksum>{inner}</Checksum>" if inner else ""
