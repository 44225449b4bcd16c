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

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Final
from xml.sax.saxutils import escape

from cachetools import TTLCache

from proxy import crypto
from proxy.errors import FormatError, S3Error
from proxy.layer.checksum_store import COMPOSITE, StoredChecksum, seal_checksum
from proxy.layer.envelopes import current_names, etag_core, first_segment, upload_record
from proxy.layer.headers import client_storable_headers, sse_headers
from proxy.layer.objects import ObjectLayer, PutResult, backend_etag, client_etag
from proxy.layer.rewrite import StoredPart, realign
from proxy.layer.uploads import (
    MIN_PART_SIZE,
    STATE_PREFIX,
    ClientPart,
    Completion,
    UploadState,
    checksum_request,
    combined_checksum,
    invalid_part,
    no_such_upload,
    parse_complete,
)
from proxy.layer.uploads import (
    part_number as parse_part_number,
)
from proxy.wire.xmldoc import (
    child_text,
    find_text,
    local,
    parse_backend,
    raise_embedded_error,
    serialize,
    xml_doc,
)

_MAX_LIST_PAGES: Final = 20  # 20 pages of 1000 parts cover S3's 10000


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

    async def state(
        self, bucket: str, key: str, upload_id: str, *, allow_done: bool = False
    ) -> UploadState:
        """The upload's state: from the cache, else one small backend GET.

        A completed upload is NoSuchUpload unless ``allow_done`` (a repeated Complete)."""
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
        if state.bucket != bucket or state.key != key or (state.done and not allow_done):
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
        alg, ctype = checksum_request(headers)
        out = client_storable_headers(headers)
        env: crypto.Envelope | None = None
        resp_headers: dict[str, str] = {}
        if decision.encrypt:
            assert decision.key_uri is not None
            dk = await self.objects.keys.data_key_for_write(decision.key_uri, bucket)
            sealed = crypto.seal_object_key(
                dk.plaintext,
                crypto.new_object_key(),
                crypto.Binding(bucket=bucket, key=key, multipart=True, pending=True),
            )
            env = crypto.Envelope(
                kek_uri=dk.kek_uri or decision.key_uri,
                kek_version=dk.key_version,
                wrapped_data_key=dk.wrapped,
                replicas=dk.replicas,
                sealed_object_key=sealed,
                multipart=True,
                pending=True,
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
        body: AsyncIterator[bytes | bytearray],
        length: int,
    ) -> PutResult:
        """Encrypt ``length`` plaintext bytes as part ``part_number``, streaming."""
        number = parse_part_number(part_number)
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
        await self.objects.envelopes.drop_pending(bucket, key, upload_id)
        await self._drop_state(bucket, upload_id)

    # ------------------------------------------------------------------ complete
    async def complete(
        self, bucket: str, key: str, upload_id: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        """CompleteMultipartUpload, crash-safe and repeatable.

        The completed object's envelope is written before the backend's Complete (named
        after the upload in the metadata store, as pending in the sidecar store: see
        ``envelopes.py``), so the key reads as the old object,
        the new one, or - during a realignment - an error, at every instant. The state object
        stays, marked done with the answer, so a Complete repeated after it succeeded (SDKs
        retry after a timeout) answers the same; a repeat after a crash between the backend's
        Complete and that mark finds the completed object by its sealed object key.
        """
        parts = parse_complete(body)
        state = await self.state(bucket, key, upload_id, allow_done=True)
        if state.done is not None:
            if state.done.parts != tuple((p.number, _etag(p.etag)) for p in parts):
                raise no_such_upload()
            return self._answer(bucket, key, state.done)
        if state.envelope is None:
            data = await self._backend_complete(bucket, key, upload_id, body, state)
            done = Completion(
                tuple((p.number, _etag(p.etag)) for p in parts), find_text(data, "ETag")
            )
            await self._put_state(upload_id, replace(state, done=done))
            return data, {}
        try:
            stored = await self.stored_parts(bucket, key, upload_id)
        except S3Error as exc:
            # RGW answers ListParts of a completed upload with NoSuchKey, S3 with NoSuchUpload
            if exc.code not in _UPLOAD_GONE or not await self._completed_by(bucket, key, state):
                raise
            return await self._finish_lost(bucket, key, upload_id, state, parts, headers)
        sizes: list[int] = []
        for p in parts:
            have = stored.get(p.number)
            if have is None or _etag(p.etag) != have.etag.strip('"'):
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
        checksum = combined_checksum(state, parts, sizes, headers)
        # The completed object's layout, bound into its envelope (FORMAT.md section 5.1);
        # None: not aligned, or too many runs to bind - the object is then rewritten.
        layout = crypto.PartLayout.from_parts(
            (p.number, size) for p, size in zip(parts, sizes, strict=True)
        )
        aligned = layout is not None
        store = self.objects.envelopes
        # the pending envelope to drop once the completed one is filed (by the object's ETag)
        pending = not aligned or store.files_completed_by_etag
        env = upload_env = state.envelope
        if layout is not None:
            env = await self.completed_envelope(bucket, key, env, layout, checksum)
            await store.before_complete(bucket, key, upload_id, upload_env, env)
        else:
            await store.write_pending(bucket, key, upload_id, env)
        if not aligned:
            redo = tuple(
                (p.number, stored[p.number].etag, stored[p.number].stored_size) for p in parts
            )
            state = replace(state, realign=redo)
            await self._put_state(upload_id, state)
        xml = "".join(
            f"<Part><PartNumber>{p.number}</PartNumber><ETag>{escape(stored[p.number].etag)}"
            "</ETag></Part>"
            for p in parts
        )
        doc = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
        try:
            data = await self._backend_complete(bucket, key, upload_id, doc, state)
        except S3Error as exc:
            if exc.status < 500 and pending:  # refused for sure: nothing was completed
                await store.drop_pending(bucket, key, upload_id)
            raise  # (a completed envelope named after the upload is left to gc)
        made = find_text(data, "ETag") or None
        if not aligned:
            await realign(
                self.objects, bucket, key, env, [stored[p.number] for p in parts], checksum
            )
            head, _ = await self.backend.call("HEAD", bucket, key)
            made = head.headers.get("etag")  # the rewritten object's
        elif store.files_completed_by_etag:
            made = await self._commit_completed(bucket, key, upload_env, env, made)
        else:
            await store.commit_completed(bucket, key, upload_env, env, made)
            if made is None:  # Ceph RGW answers <ETag></ETag>: the object's, if still this one
                made = await self._etag_of_upload(bucket, key, upload_env)
        etag = client_etag(made, True) or ""
        out = sse_headers(env.kek_uri)
        fields: list[tuple[str, str]] = []
        if checksum is not None:
            out.update(checksum.headers())
            fields.append((f"Checksum{checksum.algorithm.value}", checksum.value))
            fields.append(("ChecksumType", checksum.type))
        done = Completion(tuple((p.number, _etag(p.etag)) for p in parts), etag, out, tuple(fields))
        await self._put_state(upload_id, replace(state, done=done))
        if pending:
            await store.drop_pending(bucket, key, upload_id)
        return self._answer(bucket, key, done)

    async def _commit_completed(
        self,
        bucket: str,
        key: str,
        pending: crypto.Envelope,
        env: crypto.Envelope,
        answered: str | None,
    ) -> str | None:
        """File the completed envelope under the ETag of the object this Complete made;
        returns that ETag. The key's current object is checked to be this upload's: a racing
        writer may have replaced it already (its own envelope then stands), and the ETag the
        backend's Complete answered is not always the one it stores (rclone's is the MD5 of
        the whole body)."""
        head, _ = await self.backend.call("HEAD", bucket, key, ok=(200, 404))
        current = head.headers.get("etag") if head.status == 200 else None
        if current is None:
            return answered  # deleted meanwhile
        if etag_core(current) != etag_core(answered) and not await self._holds(
            bucket, key, head.headers, env
        ):
            return answered  # replaced meanwhile
        await self.objects.envelopes.commit_completed(bucket, key, pending, env, current)
        return current

    async def _etag_of_upload(self, bucket: str, key: str, pending: crypto.Envelope) -> str | None:
        """The ETag of the object at ``key`` if it is the upload's whose envelope is ``pending``
        (its metadata holds it: metadata store)."""
        head, _ = await self.backend.call("HEAD", bucket, key, ok=(200, 404))
        if head.status == 200 and upload_record(pending) in current_names(head.headers):
            return head.headers.get("etag")
        return None

    async def completed_envelope(
        self,
        bucket: str,
        key: str,
        env: crypto.Envelope,
        layout: crypto.PartLayout,
        checksum: StoredChecksum | None,
    ) -> crypto.Envelope:
        """The upload's envelope re-sealed for the completed object: its object key bound to
        ``layout`` (v2), with the client's checksum if it gave one."""
        data_key = await self.objects.keys.unwrap(
            env.kek_uri, env.wrapped_data_key, bucket, env.replicas
        )
        object_key = crypto.open_object_key(
            data_key, env.sealed_object_key, env.binding(bucket, key)
        )
        final = replace(env, pending=False, layout=layout)
        sealed = crypto.seal_object_key(data_key, object_key, final.binding(bucket, key))
        sealed_checksum = seal_checksum(object_key, bucket, key, checksum) if checksum else None
        return replace(final, sealed_object_key=sealed, checksum=sealed_checksum)

    async def _finish_lost(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        state: UploadState,
        parts: list[ClientPart],
        headers: Mapping[str, str],
    ) -> tuple[bytes, dict[str, str]]:
        """Completed on the backend by a proxy that died before it answered."""
        assert state.envelope is not None
        if state.realign:  # ...maybe before it rewrote the non-aligned parts: finish it
            if tuple(p.number for p in parts) != tuple(r[0] for r in state.realign):
                raise no_such_upload() from None
            again = [StoredPart(*r) for r in state.realign]
            sizes = [crypto.plaintext_size(r.stored_size) for r in again]
            checksum = combined_checksum(state, parts, sizes, headers)
            await realign(self.objects, bucket, key, state.envelope, again, checksum)
        head, _ = await self.backend.call("HEAD", bucket, key)
        if not state.realign:  # the completed envelope, from the pending one if not stored yet
            await self.objects.envelope(bucket, key, head.headers)
        done = Completion(
            tuple((p.number, _etag(p.etag)) for p in parts),
            client_etag(head.headers.get("etag"), True) or "",
            sse_headers(state.envelope.kek_uri),
        )
        await self._put_state(upload_id, replace(state, done=done))
        await self.objects.envelopes.drop_pending(bucket, key, upload_id)
        return self._answer(bucket, key, done)

    @staticmethod
    def _answer(bucket: str, key: str, done: Completion) -> tuple[bytes, dict[str, str]]:
        fields = [("Bucket", bucket), ("Key", key), ("ETag", done.etag), *done.fields]
        return xml_doc("CompleteMultipartUploadResult", fields), dict(done.headers)

    async def _backend_complete(
        self, bucket: str, key: str, upload_id: str, doc: bytes, state: UploadState
    ) -> bytes:
        """The backend's Complete; a NoSuchUpload for an upload that this very state completed
        (a proxy killed before it marked the state done) counts as done."""
        try:
            _, data = await self.backend.call(
                "POST", bucket, key, query=(("uploadId", upload_id),), body=doc
            )
            raise_embedded_error(data)
        except S3Error as exc:
            if exc.code not in _UPLOAD_GONE or not await self._completed_by(bucket, key, state):
                raise
            head, _ = await self.backend.call("HEAD", bucket, key)
            fields = (("Bucket", bucket), ("Key", key), ("ETag", head.headers.get("etag", "")))
            return xml_doc("CompleteMultipartUploadResult", fields)
        return data

    async def _completed_by(self, bucket: str, key: str, state: UploadState) -> bool:
        """Whether the object stored at the key is this upload, completed: its first stored
        segment authenticates under the upload's object key."""
        head, _ = await self.backend.call("HEAD", bucket, key, ok=(200, 404))
        if head.status != 200:
            return False
        if state.envelope is None:
            return "-" in (head.headers.get("etag") or "")  # a plaintext multipart object
        return await self._holds(bucket, key, head.headers, state.envelope)

    async def _holds(
        self, bucket: str, key: str, stored: Mapping[str, str], env: crypto.Envelope
    ) -> bool:
        """Whether the object version whose headers are ``stored`` is this upload's: its first
        stored segment authenticates under the upload's object key."""
        etag = etag_core(stored.get("etag"))
        try:
            total = crypto.segment_count(int(stored.get("content-length", "")))
        except (ValueError, FormatError):
            return False
        if etag is None:
            return False
        first = await first_segment(self.backend, bucket, key, etag)
        object_key = await self.objects.object_key_for(bucket, key, env)
        return crypto.opens_first_segment(object_key, first, total, multipart=True)


_UPLOAD_GONE: Final = frozenset({"NoSuchUpload", "NoSuchKey"})
"""How backends answer for an upload that was completed: S3 NoSuchUpload, RGW's ListParts
NoSuchKey."""


def _etag(client_value: str) -> str:
    """A client's part ETag as the backend's, without quotes."""
    return backend_etag(client_value).strip('"')
