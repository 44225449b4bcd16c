"""Re-encryption by streaming, in bounded memory.

Two users: a completed multipart upload whose parts are not whole segments is rewritten into
the aligned layout (docs/FORMAT.md section 5), and a copy that cannot keep its ciphertext (other
key, plaintext source, passthrough destination) streams through decryption and encryption.
Above ``MAX_SINGLE_PUT`` plaintext bytes the result is written as a fresh aligned multipart
upload of ``WRITE_PART_SIZE`` parts (both read at call time, so tests can lower them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

from proxy import crypto
from proxy.backend.client import parse_error
from proxy.errors import FormatError, IntegrityError
from proxy.layer.bodies import READ_CHUNK
from proxy.layer.checksum_store import StoredChecksum, seal_checksum
from proxy.layer.headers import storable_headers
from proxy.layer.objects import ObjectLayer, client_etag
from proxy.wire.xmldoc import find_text, raise_embedded_error

MAX_SINGLE_PUT: int = 5 * 1024**3
WRITE_PART_SIZE: int = 64 * 1024 * 1024
_MAX_PARTS: Final = 10000


@dataclass(frozen=True)
class StoredPart:
    number: int
    etag: str
    stored_size: int


class ExactReader:
    """Hands out exact-length slices of one chunk stream, in order."""

    def __init__(self, source: AsyncIterator[bytes | bytearray]) -> None:
        self._source = source
        self._buf: bytes | bytearray = b""

    async def take(self, n: int) -> AsyncIterator[bytes | bytearray]:
        left = n
        while left:
            if not self._buf:
                self._buf = await anext(self._source, b"")
                if not self._buf:
                    raise IntegrityError("stored object ended early")
            piece, self._buf = self._buf[:left], self._buf[left:]
            left -= len(piece)
            yield piece

    async def at_end(self) -> bool:
        if self._buf:
            return False
        self._buf = await anext(self._source, b"")
        return not self._buf


async def realign(
    objects: ObjectLayer,
    bucket: str,
    key: str,
    env: crypto.Envelope,
    parts: list[StoredPart],
    checksum: StoredChecksum | None,
) -> None:
    """Rewrite a completed, non-aligned multipart object in place into the aligned layout."""
    object_key = await objects.object_key_for(bucket, key, env)
    resp = await objects.backend.request("GET", bucket, key)
    try:
        if resp.status != 200:
            raise parse_error(resp.status, await resp.read())
        headers = storable_headers(resp.headers)
        total = sum(crypto.plaintext_size(p.stored_size) for p in parts)
        reader = ExactReader(resp.content.iter_chunked(READ_CHUNK))
        body = _decrypt_parts(object_key, parts, reader)
        await write_plaintext(objects, bucket, key, headers, body, total, checksum)
    except IntegrityError:
        objects.metrics.integrity_failures.inc()
        raise
    finally:
        resp.close()


async def _decrypt_parts(
    object_key: bytes, parts: list[StoredPart], reader: ExactReader
) -> AsyncIterator[bytes | bytearray]:
    """Each part is its own stream: authenticate it on its own, and check its part number."""
    for part in parts:
        total = crypto.segment_count(part.stored_size)
        dec = crypto.StreamDecryptor(
            object_key,
            multipart=True,
            first_segment=0,
            last_segment=total - 1,
            total_segments=total,
        )
        first = True
        async for chunk in reader.take(part.stored_size):
            if first and int.from_bytes(chunk[2:4], "big") != part.number:
                raise IntegrityError(f"part {part.number} holds another part's segments")
            first = False
            plain = dec.update(chunk)
            if plain:
                yield plain
        last = dec.finalize()
        if last:
            yield last
    if not await reader.at_end():
        raise IntegrityError("stored object continues after its last part")


async def write_plaintext(
    objects: ObjectLayer,
    bucket: str,
    key: str,
    headers: Mapping[str, str],
    body: AsyncIterator[bytes | bytearray],
    length: int,
    checksum: StoredChecksum | None,
) -> str | None:
    """Store ``length`` plaintext bytes as the policy says; the client ETag is returned."""
    if length <= MAX_SINGLE_PUT:
        res = await objects.put_object(bucket, key, headers, body, length, stored_checksum=checksum)
        return res.etag
    return await _write_multipart(objects, bucket, key, headers, body, length, checksum)


async def _write_multipart(
    objects: ObjectLayer,
    bucket: str,
    key: str,
    headers: Mapping[str, str],
    body: AsyncIterator[bytes | bytearray],
    length: int,
    checksum: StoredChecksum | None,
) -> str | None:
    segment = crypto.SEGMENT_SIZE
    part_size = max(WRITE_PART_SIZE, -(-length // _MAX_PARTS))
    part_size = -(-part_size // segment) * segment  # whole segments: the aligned layout
    decision = objects.decide_write(bucket, key)
    meta = storable_headers(headers)
    object_key = crypto.new_object_key()
    env: crypto.Envelope | None = None
    if decision.encrypt:
        assert decision.key_uri is not None
        dk = await objects.keys.data_key_for_write(decision.key_uri, bucket)
        # the parts are chosen here, so the layout is known before the upload starts
        sizes = [min(part_size, length - off) for off in range(0, length, part_size)]
        layout = crypto.PartLayout.from_parts(enumerate(sizes, 1))
        assert layout is not None  # whole segments, at most two runs
        binding = crypto.Binding(bucket=bucket, key=key, multipart=True, layout=layout)
        env = crypto.Envelope(
            kek_uri=dk.kek_uri or decision.key_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            replicas=dk.replicas,
            sealed_object_key=crypto.seal_object_key(dk.plaintext, object_key, binding),
            multipart=True,
            checksum=seal_checksum(object_key, bucket, key, checksum) if checksum else None,
            layout=layout,
        )
        meta.update(objects.envelopes.put_headers(env))
    _, data = await objects.backend.call(
        "POST", bucket, key, query=(("uploads", ""),), headers=meta
    )
    upload_id = find_text(data, "UploadId")
    if not upload_id:
        raise FormatError("backend CreateMultipartUpload answered without an UploadId")
    done: list[tuple[int, str]] = []
    reader = ExactReader(body)
    try:
        offset, number = 0, 1
        while offset < length:
            size = min(part_size, length - offset)
            query = (("partNumber", str(number)), ("uploadId", upload_id))
            if decision.encrypt:
                res = await objects.send_put(
                    bucket,
                    key,
                    {},
                    objects.encrypt_stream(object_key, reader.take(size), size, number),
                    crypto.ciphertext_size(size),
                    encrypted=False,
                    query=query,
                )
            else:
                res = await objects.send_put(
                    bucket, key, {}, reader.take(size), size, encrypted=False, query=query
                )
            done.append((number, res.etag or ""))
            offset += size
            number += 1
        xml = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in done)
        _, data = await objects.backend.call(
            "POST",
            bucket,
            key,
            query=(("uploadId", upload_id),),
            body=f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode(),
        )
    except BaseException:
        await objects.backend.call(
            "DELETE", bucket, key, query=(("uploadId", upload_id),), ok=(200, 204, 404)
        )
        raise
    raise_embedded_error(data)
    head, _ = await objects.backend.call("HEAD", bucket, key)
    if env is not None:
        await objects.commit_envelope(bucket, key, env, head.headers.get("etag"))
    return client_etag(head.headers.get("etag"), decision.encrypt)
