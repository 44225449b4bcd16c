"""CopyObject and UploadPartCopy through the encryption layer.

When source and destination are protected by the same key-encryption key the copy never
touches the data: the object key is re-sealed for the destination's bucket, name and data key
(``crypto.seal_object_key`` after opening with the source's), the stored checksum re-encrypted
for the new name, and the backend copies the ciphertext as it is (CopyObject with
MetadataDirective REPLACE carrying the new envelope; above ``MAX_SINGLE_COPY`` stored bytes a
backend multipart copy of ciphertext ranges).  Any other combination - another key, a
plaintext source, a passthrough destination - streams through decryption and encryption.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from proxy import crypto
from proxy.backend.client import parse_error
from proxy.errors import S3Error
from proxy.layer.bodies import READ_CHUNK
from proxy.layer.checksum_store import FULL_OBJECT, StoredChecksum, reseal_checksum
from proxy.layer.headers import client_storable_headers, copy_source, sse_headers, storable_headers
from proxy.layer.multipart import MultipartLayer
from proxy.layer.objects import (
    ObjectLayer,
    backend_etag,
    check_preconditions,
    client_etag,
    precondition_failed,
)
from proxy.layer.rewrite import ExactReader, write_plaintext
from proxy.wire.checksums import FLEXIBLE
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import find_text, raise_embedded_error, xml_doc

MAX_SINGLE_COPY: int = 5 * 1024**3
"""Largest stored object one backend CopyObject copies (S3's limit); read at call time."""
COPY_PART_SIZE: int = 512 * 1024 * 1024
"""Stored bytes per part of a backend multipart copy; read at call time."""
_COPY_CONDITIONS: Final = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")


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


def parse_copy_source(value: str) -> CopySource:
    path, _, query = value.partition("?")
    bucket, sep, key = unquote(path).lstrip("/").partition("/")
    if not bucket or not sep or not key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key", 400)
    if key.startswith(RESERVED_PREFIX):
        raise S3Error("AccessDenied", "this key prefix is reserved by cmek-proxy", 403)
    version = None
    if query.startswith("versionId="):
        version = unquote(query[len("versionId=") :])
    return CopySource(bucket, key, version)


def copy_conditions(headers: Mapping[str, str]) -> dict[str, str]:
    """``x-amz-copy-source-if-*`` as the plain conditional names."""
    out = {}
    for name in _COPY_CONDITIONS:
        value = headers.get(f"x-amz-copy-source-{name}")
        if value is not None:
            out[name] = value
    return out


def iso_time(http_date: str | None) -> str:
    if not http_date:
        return ""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return http_date
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class CopyLayer:
    def __init__(self, objects: ObjectLayer, multipart: MultipartLayer) -> None:
        self.objects = objects
        self.multipart = multipart
        self.backend = objects.backend
        self.no_part_copy = False
        """Learnt once per process: the backend has no UploadPartCopy."""

    async def copy_object(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        """CopyObject; answers the CopyObjectResult document and response headers."""
        src = parse_copy_source(headers["x-amz-copy-source"])
        cond = copy_conditions(headers)
        directive = headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.", 400)
        if (src.bucket, src.key) == (bucket, key) and directive == "COPY" and not src.version_id:
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata, storage class, website redirect "
                "location or encryption attributes.",
                400,
            )
        head, _ = await self.backend.call("HEAD", src.bucket, src.key, query=src.query)
        env = await self.objects.envelope(src.bucket, src.key, head.headers)
        if check_preconditions(cond, self.objects.response_headers(head.headers, env)) == 304:
            raise precondition_failed("x-amz-copy-source-If-None-Match/If-Modified-Since")
        decision = self.objects.decide_write(bucket, key)
        meta = (
            storable_headers(head.headers)
            if directive == "COPY"
            else client_storable_headers(headers)
        )
        out: dict[str, str] = {}
        if src.version_id:
            out["x-amz-copy-source-version-id"] = src.version_id
        if env is not None and decision.encrypt and decision.key_uri == env.kek_uri:
            etag, modified = await self._reseal(src, bucket, key, env, meta, head.headers)
        else:
            etag, modified = await self._recrypt(src, bucket, key, meta, cond)
        if decision.key_uri is not None:
            out.update(sse_headers(decision.key_uri))
        doc = xml_doc("CopyObjectResult", (("ETag", etag or ""), ("LastModified", modified)))
        return doc, out

    async def _reseal(
        self,
        src: CopySource,
        bucket: str,
        key: str,
        env: crypto.Envelope,
        meta: dict[str, str],
        src_headers: Mapping[str, str],
    ) -> tuple[str | None, str]:
        """Same KEK: a new envelope over the unchanged ciphertext."""
        object_key = await self.objects.object_key_for(src.bucket, src.key, env)
        dk = await self.objects.keys.data_key_for_write(env.kek_uri, bucket)
        sealed = crypto.seal_object_key(
            dk.plaintext,
            object_key,
            crypto.Binding(bucket=bucket, key=key, multipart=env.multipart),
        )
        checksum = None
        if env.checksum is not None:
            checksum = reseal_checksum(
                object_key, env.checksum, (src.bucket, src.key), (bucket, key)
            )
        new_env = crypto.Envelope(
            kek_uri=dk.kek_uri or env.kek_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            replicas=dk.replicas,
            sealed_object_key=sealed,
            multipart=env.multipart,
            checksum=checksum,
        )
        meta = {**meta, **self.objects.envelopes.put_headers(new_env)}
        src_etag = src_headers.get("etag", "")
        stored_size = int(src_headers.get("content-length", "0"))
        if stored_size <= MAX_SINGLE_COPY:
            hdrs = {
                **meta,
                "x-amz-copy-source": src.header(),
                "x-amz-metadata-directive": "REPLACE",
                "x-amz-copy-source-if-match": src_etag,
            }
            _, data = await self.backend.call("PUT", bucket, key, headers=hdrs)
            raise_embedded_error(data)
            etag: str | None = find_text(data, "ETag")
            modified = find_text(data, "LastModified")
            if not (etag and modified):
                head, _ = await self.backend.call("HEAD", bucket, key)
                etag = head.headers.get("etag")
                modified = iso_time(head.headers.get("last-modified"))
            await self.objects.commit_envelope(bucket, key, new_env, etag)
            return client_etag(etag, True), modified
        done = None
        if not self.no_part_copy:
            done = await self._multipart_copy(src, bucket, key, meta, src_etag, stored_size)
            if done is None:
                # The backend took UploadPartCopy for an empty UploadPart (rclone), and some
                # backends cannot replace a streamed part: start again, streaming the bytes.
                self.no_part_copy = True
        if done is None:
            done = await self._multipart_copy(
                src, bucket, key, meta, src_etag, stored_size, stream=True
            )
        assert done is not None
        await self.objects.commit_envelope(bucket, key, new_env, backend_etag(done[0] or ""))
        return done

    async def _multipart_copy(
        self,
        src: CopySource,
        bucket: str,
        key: str,
        meta: dict[str, str],
        src_etag: str,
        stored_size: int,
        *,
        stream: bool = False,
    ) -> tuple[str | None, str] | None:
        """Backend multipart copy of ciphertext ranges: the stored bytes stay as they are.

        With ``stream`` the ranges go through the proxy (still not decrypted) for backends
        without UploadPartCopy.  None (upload aborted) when the backend turns out to have none.
        """
        _, data = await self.backend.call(
            "POST", bucket, key, query=(("uploads", ""),), headers=meta
        )
        upload_id = find_text(data, "UploadId")
        parts: list[tuple[int, str]] = []
        try:
            offset, number = 0, 1
            while offset < stored_size:
                end = min(offset + COPY_PART_SIZE, stored_size) - 1
                if stream:
                    etag = await self._stream_part(src, bucket, key, upload_id, number, offset, end)
                    parts.append((number, etag))
                    offset, number = end + 1, number + 1
                    continue
                _, data = await self.backend.call(
                    "PUT",
                    bucket,
                    key,
                    query=(("partNumber", str(number)), ("uploadId", upload_id)),
                    headers={
                        "x-amz-copy-source": src.header(),
                        "x-amz-copy-source-range": f"bytes={offset}-{end}",
                        "x-amz-copy-source-if-match": src_etag,
                    },
                )
                raise_embedded_error(data)
                etag = find_text(data, "ETag")
                if not etag:
                    await self._abort(bucket, key, upload_id)
                    return None
                parts.append((number, etag))
                offset, number = end + 1, number + 1
            xml = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in parts
            )
            _, data = await self.backend.call(
                "POST",
                bucket,
                key,
                query=(("uploadId", upload_id),),
                body=f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode(),
            )
            raise_embedded_error(data)
        except BaseException:
            await self._abort(bucket, key, upload_id)
            raise
        head, _ = await self.backend.call("HEAD", bucket, key)
        return client_etag(head.headers.get("etag"), True), iso_time(
            head.headers.get("last-modified")
        )

    async def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        await self.backend.call(
            "DELETE", bucket, key, query=(("uploadId", upload_id),), ok=(200, 204, 404)
        )

    async def _stream_part(
        self,
        src: CopySource,
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        first: int,
        last: int,
    ) -> str:
        """Upload stored bytes ``first..last`` of the source unchanged as part ``number``."""
        hdrs = {"range": f"bytes={first}-{last}"}
        resp = await self.backend.request("GET", src.bucket, src.key, query=src.query, headers=hdrs)
        try:
            if resp.status not in (200, 206) or "content-range" not in resp.headers:
                raise parse_error(resp.status, await resp.read())
            res = await self.objects.send_put(
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

    async def _recrypt(
        self, src: CopySource, bucket: str, key: str, meta: dict[str, str], cond: dict[str, str]
    ) -> tuple[str | None, str]:
        """Another key, or plaintext on either side: stream through the proxy."""
        res = await self.objects.get_object(
            src.bucket, src.key, None, cond, src.query, checksum_mode=True
        )
        if res.status == 304 or res.body is None:
            raise precondition_failed("x-amz-copy-source-If-None-Match/If-Modified-Since")
        checksum = None
        for alg in FLEXIBLE:
            value = res.headers.get(alg.header)
            if value is not None:
                ctype = res.headers.get("x-amz-checksum-type", FULL_OBJECT)
                checksum = StoredChecksum(alg, value, ctype)
        try:
            etag = await write_plaintext(
                self.objects, bucket, key, meta, res.body, res.content_length, checksum
            )
        finally:
            await res.body.aclose()
        head, _ = await self.backend.call("HEAD", bucket, key)
        return etag, iso_time(head.headers.get("last-modified"))

    async def upload_part_copy(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: str | None,
        headers: Mapping[str, str],
    ) -> bytes:
        """UploadPartCopy: decrypt the source range, encrypt it as the part, streaming."""
        src = parse_copy_source(headers["x-amz-copy-source"])
        await self.multipart.state(bucket, key, upload_id)  # NoSuchUpload before reading
        rng = headers.get("x-amz-copy-source-range")
        if rng is not None and (not rng.startswith("bytes=") or rng[6:].startswith("-")):
            raise S3Error(
                "InvalidArgument",
                "The x-amz-copy-source-range value must be of the form bytes=first-last",
                400,
            )
        res = await self.objects.get_object(
            src.bucket, src.key, rng, copy_conditions(headers), src.query
        )
        if res.status == 304 or res.body is None:
            raise precondition_failed("x-amz-copy-source-If-None-Match/If-Modified-Since")
        try:
            put = await self.multipart.upload_part(
                bucket, key, upload_id, part_number, res.body, res.content_length
            )
        finally:
            await res.body.aclose()
        modified = iso_time(res.headers.get("last-modified"))
        return xml_doc("CopyPartResult", (("ETag", put.etag or ""), ("LastModified", modified)))
