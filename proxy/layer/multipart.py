"""Multipart uploads through the encryption layer: streaming and stateless.

One fresh object key per upload, sealed with ``Binding(multipart=True)``; each part is
its own stream (``StreamEncryptor(object_key, part)``).  The envelope goes into the backend's
CreateMultipartUpload metadata, and - because no S3 API reads an upload's metadata back - into
a small state object ``<bucket>/.cmek-proxy/uploads/<upload id>`` too.  It holds only the
wrapped data key and the sealed object key, never a secret in the clear, and lets any proxy
replica serve any part of any upload (cached in-process, bounded and with a TTL).  The state
object goes at Complete and Abort.

Completion keeps the aligned layout of docs/FORMAT.md section 5: when a part other than the
last is not a whole number of segments, the completed object is rewritten (re-encrypted, by
streaming) into an aligned layout before Complete answers.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from cachetools import TTLCache

from proxy import crypto
from proxy.errors import FormatError, S3Error
from proxy.layer.checksum_store import COMPOSITE, FULL_OBJECT, StoredChecksum, seal_checksum
from proxy.layer.headers import client_storable_headers, sse_headers, storable_headers
from proxy.layer.objects import ObjectLayer, PutResult, backend_etag, client_etag
from proxy.layer.rewrite import StoredPart, realign
from proxy.wire import checksums
from proxy.wire.checksums import ChecksumAlgorithm
from proxy.wire.reserved import RESERVED_PREFIX
from proxy.wire.xmldoc import (
    child_text,
    find_text,
    local,
    parse_backend,
    raise_embedded_error,
    serialize,
    xml_doc,
)

STATE_PREFIX: Final = RESERVED_PREFIX + "uploads/"
MIN_PART_SIZE: Final = 5 * 1024 * 1024
MAX_COPY_SIZE: Final = 5 * 1024**3
"""Largest object a backend CopyObject handles (S3's limit)."""
_STATE_VERSION: Final = 1
_MAX_LIST_PAGES: Final = 20  # 20 pages of 1000 parts cover S3's 10000


def malformed() -> S3Error:
    return S3Error(
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our published schema",
        400,
    )


def no_such_upload() -> S3Error:
    return S3Error(
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
        404,
    )


def invalid_part(number: int) -> S3Error:
    return S3Error(
        "InvalidPart",
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag.",
        400,
        extra={"PartNumber": str(number)},
    )


@dataclass(frozen=True)
class UploadState:
    """What any replica needs to serve a part: the envelope (None: stored as sent)."""

    bucket: str
    key: str
    envelope: crypto.Envelope | None
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum_type: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": _STATE_VERSION,
                "bucket": self.bucket,
                "key": self.key,
                "meta": crypto.to_metadata(self.envelope) if self.envelope else None,
                "ck_alg": self.checksum_algorithm.value if self.checksum_algorithm else None,
                "ck_type": self.checksum_type,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UploadState:
        try:
            doc = json.loads(data)
            if doc["v"] != _STATE_VERSION:
                raise FormatError("unknown upload state version")
            meta = doc["meta"]
            env = crypto.from_metadata(meta) if meta is not None else None
            alg = ChecksumAlgorithm(doc["ck_alg"]) if doc["ck_alg"] else None
            return cls(str(doc["bucket"]), str(doc["key"]), env, alg, doc["ck_type"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError("upload state does not parse") from exc


@dataclass(frozen=True)
class ClientPart:
    number: int
    etag: str
    checksums: dict[str, str] = field(default_factory=dict)
    """Checksum element name (``ChecksumCRC32``) -> base64 value, as the client listed it."""


def parse_complete(body: bytes) -> list[ClientPart]:
    """The parts of a CompleteMultipartUpload document, checked for order."""
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - see xmldoc
    except ElementTree.ParseError:
        raise malformed() from None
    if local(root.tag) != "CompleteMultipartUpload":
        raise malformed()
    parts: list[ClientPart] = []
    for el in root:
        if local(el.tag) != "Part":
            continue
        fields = {local(c.tag): (c.text or "").strip() for c in el}
        number_s, etag = fields.get("PartNumber", ""), fields.get("ETag", "")
        if not number_s.isdigit() or not etag:
            raise malformed()
        number = int(number_s)
        if not 1 <= number <= crypto.MAX_PART:
            raise S3Error(
                "InvalidArgument", "Part number must be an integer between 1 and 10000", 400
            )
        cks = {k: v for k, v in fields.items() if k.startswith("Checksum") and k != "ChecksumType"}
        parts.append(ClientPart(number, etag, cks))
    if not parts:
        raise malformed()
    for a, b in itertools.pairwise(parts):
        if b.number <= a.number:
            raise S3Error(
                "InvalidPartOrder",
                "The list of parts was not in ascending order. Parts must be ordered by part "
                "number.",
                400,
            )
    return parts


def _checksum_request(headers: Mapping[str, str]) -> tuple[ChecksumAlgorithm | None, str | None]:
    alg_s = headers.get("x-amz-checksum-algorithm")
    ctype = headers.get("x-amz-checksum-type")
    if alg_s is None:
        if ctype is not None:
            raise S3Error(
                "InvalidRequest", "x-amz-checksum-type requires x-amz-checksum-algorithm", 400
            )
        return None, None
    alg = ChecksumAlgorithm.from_name(alg_s)
    if ctype is None:
        ctype = FULL_OBJECT if alg is ChecksumAlgorithm.CRC64NVME else COMPOSITE
    ctype = ctype.upper()
    if ctype not in (FULL_OBJECT, COMPOSITE):
        raise S3Error("InvalidRequest", "Value for x-amz-checksum-type header is invalid.", 400)
    if ctype == FULL_OBJECT and not alg.is_crc:
        raise S3Error(
            "InvalidRequest",
            f"The {alg.value} checksum algorithm does not support the FULL_OBJECT checksum type.",
            400,
        )
    if ctype == COMPOSITE and alg is ChecksumAlgorithm.CRC64NVME:
        raise S3Error(
            "InvalidRequest",
            "The CRC64NVME checksum algorithm does not support the COMPOSITE checksum type.",
            400,
        )
    return alg, ctype


class MultipartLayer:
    """CreateMultipartUpload, UploadPart, Complete, Abort and ListParts over ``ObjectLayer``."""

    def __init__(self, objects: ObjectLayer, *, cache_size: int = 4096, cache_ttl: float = 900):
        self.objects = objects
        self.backend = objects.backend
        self._states: TTLCache[tuple[str, str], UploadState] = TTLCache(cache_size, cache_ttl)

    # ------------------------------------------------------------------ state
    async def _put_state(self, upload_id: str, state: UploadState) -> None:
        await self.backend.call(
            "PUT",
            state.bucket,
            STATE_PREFIX + upload_id,
            headers={"content-type": "application/json"},
            body=state.to_json(),
        )
        self._states[(state.bucket, upload_id)] = state

    async def state(self, bucket: str, key: str, upload_id: str) -> UploadState:
        """The upload's state: from the cache, else one small backend GET."""
        state = self._states.get((bucket, upload_id))
        if state is None:
            if not upload_id or "/" in upload_id:
                raise no_such_upload()
            resp, data = await self.backend.call(
                "GET", bucket, STATE_PREFIX + upload_id, ok=(200, 404)
            )
            if resp.status == 404:
                raise no_such_upload()
            state = UploadState.from_json(data)
            self._states[(bucket, upload_id)] = state
        if state.bucket != bucket or state.key != key:
            raise no_such_upload()
        return state

    async def _drop_state(self, bucket: str, upload_id: str) -> None:
        self._states.pop((bucket, upload_id), None)
        await self.backend.call("DELETE", bucket, STATE_PREFIX + upload_id, ok=(200, 204, 404))

    # ------------------------------------------------------------------ create
    async def create(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        """Start an upload; the backend's UploadId is returned unchanged."""
        decision = self.objects.decide_write(bucket, key)
        alg, ctype = _checksum_request(headers)
        out = client_storable_headers(headers)
        env: crypto.Envelope | None = None
        resp_headers: dict[str, str] = {}
        if decision.encrypt:
            assert decision.key_uri is not None
            dk = await self.objects.keys.data_key_for_write(decision.key_uri, bucket)
            sealed = crypto.seal_object_key(
                dk.plaintext,
                crypto.new_object_key(),
                crypto.Binding(bucket=bucket, key=key, multipart=True),
            )
            env = crypto.Envelope(
                kek_uri=dk.kek_uri or decision.key_uri,
                kek_version=dk.key_version,
                wrapped_data_key=dk.wrapped,
                replicas=dk.replicas,
                sealed_object_key=sealed,
                multipart=True,
            )
            out.update(self.objects.envelopes.put_headers(env))
            resp_headers.update(sse_headers(decision.key_uri))
        elif alg is not None:
            out["x-amz-checksum-algorithm"] = alg.value
            out["x-amz-checksum-type"] = ctype or COMPOSITE
        _, data = await self.backend.call(
            "POST", bucket, key, query=(("uploads", ""),), headers=out
        )
        upload_id = find_text(data, "UploadId")
        if not upload_id:
            raise FormatError("backend CreateMultipartUpload answered without an UploadId")
        state = UploadState(bucket, key, env, alg, ctype)
        try:
            await self._put_state(upload_id, state)
        except S3Error:
            await self.backend.call(
                "DELETE", bucket, key, query=(("uploadId", upload_id),), ok=(200, 204, 404)
            )
            raise
        if alg is not None:
            resp_headers["x-amz-checksum-algorithm"] = alg.value
            resp_headers["x-amz-checksum-type"] = ctype or COMPOSITE
        doc = xml_doc(
            "InitiateMultipartUploadResult",
            (("Bucket", bucket), ("Key", key), ("UploadId", upload_id)),
        )
        return doc, resp_headers

    # ------------------------------------------------------------------ parts
    async def upload_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: str | None,
        body: AsyncIterator[bytes],
        length: int,
    ) -> PutResult:
        """Encrypt ``length`` plaintext bytes as part ``part_number``, streaming."""
        number = _part_number(part_number)
        state = await self.state(bucket, key, upload_id)
        query = (("partNumber", str(number)), ("uploadId", upload_id))
        if state.envelope is None:
            return await self.objects.send_put(
                bucket, key, {}, body, length, encrypted=False, query=query
            )
        object_key = await self.objects.object_key_for(bucket, key, state.envelope)
        res = await self.objects.send_put(
            bucket,
            key,
            {},
            self.objects.encrypt_stream(object_key, body, length, number),
            crypto.ciphertext_size(length),
            encrypted=True,
            query=query,
        )
        res.headers.update(sse_headers(state.envelope.kek_uri))
        return res

    async def stored_parts(self, bucket: str, key: str, upload_id: str) -> dict[int, StoredPart]:
        """Every uploaded part (ListParts, paginated)."""
        out: dict[int, StoredPart] = {}
        marker = "0"
        for _ in range(_MAX_LIST_PAGES):
            _, data = await self.backend.call(
                "GET",
                bucket,
                key,
                query=(("uploadId", upload_id), ("part-number-marker", marker)),
            )
            root = parse_backend(data)
            for el in root:
                if local(el.tag) != "Part":
                    continue
                f = {local(c.tag): (c.text or "").strip() for c in el}
                try:
                    part = StoredPart(int(f["PartNumber"]), f["ETag"], int(f["Size"]))
                except (KeyError, ValueError) as exc:
                    raise FormatError("backend ListParts entry does not parse") from exc
                out[part.number] = part
            truncated = child_text(root, "IsTruncated") == "true"
            marker = child_text(root, "NextPartNumberMarker")
            if not truncated or not marker:
                return out
        raise FormatError("backend ListParts does not end")

    async def list_parts(
        self, bucket: str, key: str, upload_id: str, query: Sequence[tuple[str, str]]
    ) -> bytes:
        """ListParts with plaintext sizes and client ETags."""
        state = await self.state(bucket, key, upload_id)
        _, data = await self.backend.call("GET", bucket, key, query=query)
        if state.envelope is None:
            return data
        root = parse_backend(data)
        for el in root:
            if local(el.tag) != "Part":
                continue
            for c in el:
                name = local(c.tag)
                if name == "Size" and c.text:
                    c.text = str(self.objects.plaintext_size(int(c.text)))
                elif name == "ETag" and c.text:
                    c.text = client_etag(c.text, True)
                elif name.startswith("Checksum"):
                    el.remove(c)  # over ciphertext: never shown
        return serialize(root)

    async def abort(self, bucket: str, key: str, upload_id: str) -> None:
        await self.state(bucket, key, upload_id)
        await self.backend.call("DELETE", bucket, key, query=(("uploadId", upload_id),))
        await self._drop_state(bucket, upload_id)

    # ------------------------------------------------------------------ complete
    async def complete(
        self, bucket: str, key: str, upload_id: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        parts = parse_complete(body)
        state = await self.state(bucket, key, upload_id)
        if state.envelope is None:
            _, data = await self.backend.call(
                "POST", bucket, key, query=(("uploadId", upload_id),), body=body
            )
            raise_embedded_error(data)
            await self._drop_state(bucket, upload_id)
            return data, {}
        stored = await self.stored_parts(bucket, key, upload_id)
        sizes: list[int] = []
        for p in parts:
            have = stored.get(p.number)
            if have is None or backend_etag(p.etag).strip('"') != have.etag.strip('"'):
                raise invalid_part(p.number)
            try:
                sizes.append(crypto.plaintext_size(have.stored_size))
            except FormatError:
                raise invalid_part(p.number) from None
        for p, size in zip(parts[:-1], sizes[:-1], strict=True):
            if size < MIN_PART_SIZE:
                raise S3Error(
                    "EntityTooSmall",
                    "Your proposed upload is smaller than the minimum allowed object size.",
                    400,
                    extra={"PartNumber": str(p.number), "ProposedSize": str(size)},
                )
        checksum = _combined_checksum(state, parts, sizes, headers)
        xml = "".join(
            f"<Part><PartNumber>{p.number}</PartNumber><ETag>{escape(stored[p.number].etag)}"
            "</ETag></Part>"
            for p in parts
        )
        doc = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
        _, data = await self.backend.call(
            "POST", bucket, key, query=(("uploadId", upload_id),), body=doc
        )
        raise_embedded_error(data)
        aligned = all(s % crypto.SEGMENT_SIZE == 0 for s in sizes[:-1]) and (
            len(sizes) == 1 or sizes[-1] > 0
        )
        env = state.envelope
        if not aligned:
            if self.objects.envelopes.kind == "sidecar":
                await self.objects.commit_envelope(bucket, key, env, None)  # to read it back
            await realign(
                self.objects, bucket, key, env, [stored[p.number] for p in parts], checksum
            )
        elif self.objects.envelopes.kind == "sidecar":
            if checksum is not None:
                object_key = await self.objects.object_key_for(bucket, key, env)
                env = replace(env, checksum=seal_checksum(object_key, bucket, key, checksum))
            await self.objects.commit_envelope(bucket, key, env, None)
        elif (
            checksum is not None and sum(crypto.ciphertext_size(s) for s in sizes) <= MAX_COPY_SIZE
        ):
            await self._store_checksum(bucket, key, env, checksum)
        await self._drop_state(bucket, upload_id)
        head, _ = await self.backend.call("HEAD", bucket, key)
        etag = client_etag(head.headers.get("etag"), True) or ""
        out = sse_headers(env.kek_uri)
        if checksum is not None:
            out.update(checksum.headers())
        fields = [("Bucket", bucket), ("Key", key), ("ETag", etag)]
        if checksum is not None:
            fields.append((f"Checksum{checksum.algorithm.value}", checksum.value))
            fields.append(("ChecksumType", checksum.type))
        return xml_doc("CompleteMultipartUploadResult", fields), out

    async def _store_checksum(
        self, bucket: str, key: str, env: crypto.Envelope, checksum: StoredChecksum
    ) -> None:
        """Add the client's checksum to a completed upload's envelope (metadata self-copy)."""
        head, _ = await self.backend.call("HEAD", bucket, key)
        object_key = await self.objects.object_key_for(bucket, key, env)
        new_env = replace(env, checksum=seal_checksum(object_key, bucket, key, checksum))
        await self.objects.update_envelope(
            bucket,
            key,
            storable_headers(head.headers),
            new_env,
            client_etag(head.headers.get("etag"), True) or "",
        )


def _combined_checksum(
    state: UploadState,
    parts: Sequence[ClientPart],
    sizes: Sequence[int],
    headers: Mapping[str, str],
) -> StoredChecksum | None:
    """The object's checksum as S3 computes it from the parts' checksums, if all have one."""
    alg = state.checksum_algorithm
    if alg is None:
        return None
    name = f"Checksum{alg.value}"
    values = [p.checksums.get(name) for p in parts]
    if any(v is None for v in values):
        raise S3Error(
            "InvalidRequest",
            f"The upload was created using a {alg.value} checksum. The complete request must "
            f"include the checksum for each part. It was missing for part "
            f"{next(p.number for p in parts if name not in p.checksums)} in the request.",
            400,
        )
    got = [v for v in values if v is not None]
    if state.checksum_type == FULL_OBJECT:
        value = checksums.combine_full_object(alg, list(zip(got, sizes, strict=True)))
        declared = headers.get(alg.header)
        if declared is not None and declared.strip() != value:
            raise S3Error(
                "BadDigest",
                f"The {alg.value} you specified did not match the calculated checksum.",
                400,
            )
        return StoredChecksum(alg, value, FULL_OBJECT)
    return StoredChecksum(alg, checksums.combine_composite(alg, got), COMPOSITE)


def _part_number(value: str | None) -> int:
    if value is None or not value.isdigit() or not 1 <= int(value) <= crypto.MAX_PART:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000", 400)
    return int(value)
