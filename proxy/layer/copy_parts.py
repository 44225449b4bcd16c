"""Backend multipart copies of ciphertext ranges, for reseals above ``MAX_SINGLE_COPY``."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from proxy.backend.client import parse_error
from proxy.layer.bodies import READ_CHUNK
from proxy.layer.envelopes import etag_core
from proxy.layer.headers import copy_source
from proxy.layer.objects import ObjectLayer, client_etag
from proxy.layer.rewrite import ExactReader
from proxy.wire.xmldoc import find_text, raise_embedded_error


@dataclass(frozen=True)
class CopySource:
    bucket: str
    key: str
    version_id: str | None

    @property
    def query(self) -> tuple[tuple[str, str], ...]:
        return (("versionId", self.version_id),) if self.version_id else ()

    def header(self) -> str:
        value = copy_source(self.bucket, self.key)
        return value + (f"?versionId={self.version_id}" if self.version_id else "")


def iso_time(http_date: str | None) -> str:
    if not http_date:
        return ""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return http_date
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def multipart_copy(
    objects: ObjectLayer,
    src: CopySource,
    bucket: str,
    key: str,
    meta: dict[str, str],
    src_etag: str,
    stored_size: int,
    part_size: int,
    *,
    stream: bool = False,
) -> tuple[str | None, str] | bool | None:
    """Backend multipart copy of ciphertext ranges: the stored bytes stay as they are.

    With ``stream`` the ranges go through the proxy (still not decrypted) for backends
    without UploadPartCopy.  None (upload aborted) when the backend turns out to have none;
    False (upload aborted) when the source changed while its parts were copied (checked
    before Complete, so nothing of it is ever stored).
    """
    _, data = await objects.backend.call(
        "POST", bucket, key, query=(("uploads", ""),), headers=meta
    )
    upload_id = find_text(data, "UploadId")
    parts: list[tuple[int, str]] = []
    try:
        offset, number = 0, 1
        while offset < stored_size:
            end = min(offset + part_size, stored_size) - 1
            if stream:
                streamed = await _stream_part(
                    objects, src, bucket, key, upload_id, number, offset, end, src_etag
                )
                if streamed is None:
                    await _abort(objects, bucket, key, upload_id)
                    return False
                parts.append((number, streamed))
                offset, number = end + 1, number + 1
                continue
            resp, data = await objects.backend.call(
                "PUT",
                bucket,
                key,
                query=(("partNumber", str(number)), ("uploadId", upload_id)),
                headers={
                    "x-amz-copy-source": src.header(),
                    "x-amz-copy-source-range": f"bytes={offset}-{end}",
                    "x-amz-copy-source-if-match": src_etag,
                },
                ok=(200, 412),
            )
            if resp.status == 412:
                await _abort(objects, bucket, key, upload_id)
                return False
            raise_embedded_error(data)
            etag = find_text(data, "ETag")
            if not etag:
                await _abort(objects, bucket, key, upload_id)
                return None
            parts.append((number, etag))
            offset, number = end + 1, number + 1
        head, _ = await objects.backend.call("HEAD", src.bucket, src.key, query=src.query)
        if etag_core(head.headers.get("etag")) != etag_core(src_etag):
            await _abort(objects, bucket, key, upload_id)
            return False
        xml = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in parts
        )
        _, data = await objects.backend.call(
            "POST",
            bucket,
            key,
            query=(("uploadId", upload_id),),
            body=f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode(),
        )
        raise_embedded_error(data)
    except BaseException:
        await _abort(objects, bucket, key, upload_id)
        raise
    head, _ = await objects.backend.call("HEAD", bucket, key)
    return client_etag(head.headers.get("etag"), True), iso_time(head.headers.get("last-modified"))


async def _abort(objects: ObjectLayer, bucket: str, key: str, upload_id: str) -> None:
    await objects.backend.call(
        "DELETE", bucket, key, query=(("uploadId", upload_id),), ok=(200, 204, 404)
    )


async def _stream_part(
    objects: ObjectLayer,
    src: CopySource,
    bucket: str,
    key: str,
    upload_id: str,
    number: int,
    first: int,
    last: int,
    src_etag: str,
) -> str | None:
    """Upload stored bytes ``first..last`` of the source unchanged as part ``number``.

    None when the source is no longer the version ``src_etag``."""
    hdrs = {"range": f"bytes={first}-{last}", "if-match": src_etag}
    resp = await objects.backend.request("GET", src.bucket, src.key, query=src.query, headers=hdrs)
    try:
        if resp.status == 412:
            return None
        if resp.status not in (200, 206) or "content-range" not in resp.headers:
            raise parse_error(resp.status, await resp.read())
        res = await objects.send_put(
            bucket,
            key,
            {},
            ExactReader(resp.content.iter_chunked(READ_CHUNK)).take(last - first + 1),
            last - first + 1,
            encrypted=False,
            query=(("partNumber", str(number)), ("uploadId", upload_id)),
        )
    finally:
        resp.close()
    return res.etag or ""
