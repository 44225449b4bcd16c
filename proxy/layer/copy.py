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

import re
import uuid
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote

from proxy import crypto
from proxy.errors import FormatError, IntegrityError, S3Error
from proxy.layer.checksum_store import FULL_OBJECT, StoredChecksum, reseal_checksum
from proxy.layer.copy_parts import CopySource, iso_time, multipart_copy
from proxy.layer.envelopes import etag_core
from proxy.layer.headers import client_storable_headers, copy_source, sse_headers, storable_headers
from proxy.layer.multipart import MultipartLayer
from proxy.layer.objects import (
    ObjectLayer,
    backend_etag,
    check_preconditions,
    client_etag,
    precondition_failed,
)
from proxy.layer.rewrite import write_plaintext
from proxy.wire.checksums import FLEXIBLE
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import find_text, raise_embedded_error, xml_doc

MAX_SINGLE_COPY: int = 5 * 1024**3
"""Largest stored object one backend CopyObject copies (S3's limit); read at call time."""
COPY_PART_SIZE: int = 512 * 1024 * 1024
"""Stored bytes per part of a backend multipart copy; read at call time."""
_COPY_ATTEMPTS: Final = 3
_TEMP_PREFIX: Final = RESERVED_PREFIX + "tmp/"
_COPY_CONDITIONS: Final = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")


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


_COPY_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
"""The only form UploadPartCopy accepts (S3 refuses suffixes, open and multiple ranges)."""


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
        """Same KEK: a new envelope over the unchanged ciphertext.

        Backends may ignore ``x-amz-copy-source-if-match`` (moto and rclone do), so a writer
        that overwrites the source between our HEAD and the backend's copy makes the copy hold
        other bytes than those whose envelope was read.  The copy's result ETag says which
        bytes were copied; a copy that turns out wrong is redone (``_COPY_ATTEMPTS`` times),
        then the object is streamed through the proxy instead (consistent by construction:
        one GET returns body and envelope together), and if even that fails the wrong copy is
        removed before the error is answered.  No acknowledged copy fails to open.
        """
        written: str | None = None
        try:
            for attempt in range(_COPY_ATTEMPTS):
                if attempt:
                    head, _ = await self.backend.call("HEAD", src.bucket, src.key, query=src.query)
                    found = await self.objects.envelope(src.bucket, src.key, head.headers)
                    if found is None or found.kek_uri != env.kek_uri:
                        break  # the source changed its kind: stream it
                    env, src_headers = found, head.headers
                result, wrong = await self._reseal_once(src, bucket, key, env, meta, src_headers)
                if result is not None:
                    return result
                written = wrong or written
            return await self._recrypt(src, bucket, key, meta, {})
        except BaseException:
            if written is not None:
                await self._remove_if(bucket, key, written)
            raise

    async def _remove_if(self, bucket: str, key: str, etag: str) -> None:
        """Delete the object if it still is the (wrong) copy with ``etag``."""
        head, _ = await self.backend.call("HEAD", bucket, key, ok=(200, 404))
        if head.status == 200 and etag_core(head.headers.get("etag")) == etag_core(etag):
            await self.backend.call("DELETE", bucket, key, ok=(200, 204, 404))
            self.objects.envelopes.invalidate(bucket, key)

    async def _reseal_once(
        self,
        src: CopySource,
        bucket: str,
        key: str,
        env: crypto.Envelope,
        meta: dict[str, str],
        src_headers: Mapping[str, str],
    ) -> tuple[tuple[str | None, str] | None, str | None]:
        """One attempt: (client ETag, LastModified), or None and the ETag of a wrong copy."""
        src_etag = src_headers.get("etag", "")
        stored_size = int(src_headers.get("content-length", "0"))
        self_copy = (src.bucket, src.key) == (bucket, key) and not src.version_id
        if stored_size > MAX_SINGLE_COPY:
            new_env = await self._resealed(src, bucket, key, env)
            full = {**meta, **self.objects.envelopes.put_headers(new_env)}
            done = None
            if not self.no_part_copy:
                done = await multipart_copy(
                    self.objects, src, bucket, key, full, src_etag, stored_size, COPY_PART_SIZE
                )
                if done is None:
                    # The backend took UploadPartCopy for an empty UploadPart (rclone), and
                    # some backends cannot replace a streamed part: start again, streaming.
                    self.no_part_copy = True
            if done is None:
                done = await multipart_copy(
                    self.objects,
                    src,
                    bucket,
                    key,
                    full,
                    src_etag,
                    stored_size,
                    COPY_PART_SIZE,
                    stream=True,
                )
            if done is False:
                return None, None  # the source changed during the copy: nothing completed
            assert done is not None and done is not True
            await self.objects.commit_envelope(bucket, key, new_env, backend_etag(done[0] or ""))
            return done, None
        if self_copy and self.objects.envelopes.kind == "metadata":
            return await self._self_copy_via_temp(src, bucket, key, meta), None
        new_env = await self._resealed(src, bucket, key, env)
        done = await self._backend_copy(
            src.header(),
            bucket,
            key,
            {**meta, **self.objects.envelopes.put_headers(new_env)},
            if_match=src_etag,
        )
        if done is None:
            return None, None  # the backend honoured the condition: nothing was written
        etag, modified = done
        if self.objects.envelopes.kind == "sidecar":
            # The copy's answer may name other bytes than it stored: rclone can answer with the
            # ETag of the source version it looked at before a racing overwrite replaced the
            # bytes it then copied. Sidecars are filed under the stored ETag: read it. If it is
            # not the answer's, the copy is redone (or the object streamed, which rewrites it).
            head, _ = await self.backend.call("HEAD", bucket, key, ok=(200, 404))
            if head.status != 200 or etag_core(head.headers.get("etag")) != etag_core(etag):
                return None, None
        copied = await self._copied_envelope(src, env, src_etag, etag, self_copy)
        if copied is None:
            return None, etag
        if copied is not env:
            if self.objects.envelopes.kind != "sidecar":
                return None, etag  # the metadata written is another version's: redo
            new_env = await self._resealed(src, bucket, key, copied)
        await self.objects.commit_envelope(bucket, key, new_env, etag)
        return (client_etag(etag, True), modified), None

    async def _backend_copy(
        self, source: str, bucket: str, key: str, meta: Mapping[str, str], if_match: str = ""
    ) -> tuple[str, str] | None:
        """Backend CopyObject with REPLACE; the ETag and LastModified of the copy.

        None when the backend refused ``if_match`` (the source changed): S3 honours it, so
        there no wrong copy is ever written; moto and rclone ignore it.
        """
        hdrs = {**meta, "x-amz-copy-source": source, "x-amz-metadata-directive": "REPLACE"}
        if if_match:
            hdrs["x-amz-copy-source-if-match"] = if_match
        resp, data = await self.backend.call("PUT", bucket, key, headers=hdrs, ok=(200, 412))
        if resp.status == 412:
            return None
        raise_embedded_error(data)
        etag = find_text(data, "ETag")
        modified = find_text(data, "LastModified")
        if not (etag and modified):  # rclone answers a self-copy with an empty result
            head, _ = await self.backend.call("HEAD", bucket, key)
            etag = etag or head.headers.get("etag", "")
            modified = modified or iso_time(head.headers.get("last-modified"))
        if not etag:
            raise FormatError("backend gave the copy no ETag")
        return etag, modified

    async def _copied_envelope(
        self,
        src: CopySource,
        env: crypto.Envelope,
        src_etag: str,
        copied_etag: str,
        self_copy: bool,
    ) -> crypto.Envelope | None:
        """The envelope of the source version the backend really copied, if it can be known."""
        if etag_core(copied_etag) == etag_core(src_etag):
            return env  # same MD5: the bytes whose envelope was read
        if self.objects.envelopes.kind == "sidecar":
            # Sidecars are keyed by the stored bytes' ETag: the copied version's own envelope.
            found = await self.objects.envelope(src.bucket, src.key, {"etag": copied_etag})
            if found is not None and found.kek_uri == env.kek_uri:
                return found
        if "-" in (etag_core(src_etag) or "") and not self_copy:
            # A multipart source's copy gets a new ETag on some backends (moto: the MD5 of the
            # whole): the source unchanged from before the copy to after it was what it copied.
            head, _ = await self.backend.call("HEAD", src.bucket, src.key, query=src.query)
            if etag_core(head.headers.get("etag")) == etag_core(src_etag):
                return env
        return None

    async def _self_copy_via_temp(
        self, src: CopySource, bucket: str, key: str, meta: dict[str, str]
    ) -> tuple[str | None, str] | None:
        """A metadata-store self-copy, through a private temporary copy.

        Copied onto itself, a version written meanwhile by someone else would get our envelope
        and never open again (its own envelope is overwritten).  A copy with COPY directive
        takes bytes and envelope together into a temporary object nobody else writes; the
        resealed envelope comes from there.
        """
        tmp = _TEMP_PREFIX + uuid.uuid4().hex
        hdrs = {"x-amz-copy-source": src.header(), "x-amz-metadata-directive": "COPY"}
        _, data = await self.backend.call("PUT", bucket, tmp, headers=hdrs)
        try:
            raise_embedded_error(data)
            head, _ = await self.backend.call("HEAD", bucket, tmp)
            env = await self.objects.envelope(src.bucket, src.key, head.headers)
            if env is None:
                return None  # the source became plaintext: stream it
            new_env = await self._resealed(src, bucket, key, env)
            done = await self._backend_copy(
                copy_source(bucket, tmp), bucket, key, {**meta, **crypto.to_metadata(new_env)}
            )
            assert done is not None  # no condition
            etag, modified = done
        finally:
            await self.backend.call("DELETE", bucket, tmp, ok=(200, 204, 404))
        return client_etag(etag, True), modified

    async def _resealed(
        self, src: CopySource, bucket: str, key: str, env: crypto.Envelope
    ) -> crypto.Envelope:
        """``env`` (of the source) re-sealed for the destination's bucket, name and data key."""
        if env.pending:
            raise IntegrityError("copy source has no completed envelope")
        object_key = await self.objects.object_key_for(src.bucket, src.key, env)
        dk = await self.objects.keys.data_key_for_write(env.kek_uri, bucket)
        sealed = crypto.seal_object_key(dk.plaintext, object_key, env.binding(bucket, key))
        checksum = None
        if env.checksum is not None:
            checksum = reseal_checksum(
                object_key, env.checksum, (src.bucket, src.key), (bucket, key)
            )
        return crypto.Envelope(
            kek_uri=dk.kek_uri or env.kek_uri,
            kek_version=dk.key_version,
            wrapped_data_key=dk.wrapped,
            replicas=dk.replicas,
            sealed_object_key=sealed,
            multipart=env.multipart,
            checksum=checksum,
            layout=env.layout,
        )

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
        wanted = None
        if rng is not None:
            found = _COPY_RANGE.fullmatch(rng)
            if found is None or int(found.group(1)) > int(found.group(2)):
                raise S3Error(
                    "InvalidArgument",
                    "The x-amz-copy-source-range value must be of the form bytes=first-last",
                    400,
                )
            wanted = int(found.group(2)) - int(found.group(1)) + 1
        res = await self.objects.get_object(
            src.bucket, src.key, rng, copy_conditions(headers), src.query
        )
        if res.status == 304 or res.body is None:
            raise precondition_failed("x-amz-copy-source-If-None-Match/If-Modified-Since")
        if wanted is not None and res.content_length != wanted:
            await res.body.aclose()  # a range past the end of the source: S3 copies nothing
            raise S3Error("InvalidRange", "The requested range is not satisfiable", 416)
        try:
            put = await self.multipart.upload_part(
                bucket, key, upload_id, part_number, res.body, res.content_length
            )
        finally:
            await res.body.aclose()
        modified = iso_time(res.headers.get("last-modified"))
        return xml_doc("CopyPartResult", (("ETag", put.etag or ""), ("LastModified", modified)))
