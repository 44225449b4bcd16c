"""Where an object's envelope (wrapped data key, sealed object key, ...) is kept.

Two stores, chosen by ``backend.envelope_store`` in the configuration:

``metadata`` (default)
    The envelope travels as the object's user metadata (``x-amz-meta-cmek-*``), so a
    GET's response headers carry it: one backend request per read. Right for every
    backend that persists user metadata (AWS S3, MinIO, Ceph, GCS, R2, moto, ...).

``sidecar``
    For backends that do **not** persist user metadata - ``rclone serve s3`` keeps it in
    memory only and forgets it on restart. The envelope is a small JSON object at
    ``<bucket>/.cmek-proxy/env/<sha256(key)>/<backend ETag>``, under the reserved prefix
    clients can never address or list. It is keyed by the data object's ETag (for a
    single-part object the MD5 of the stored bytes, which the proxy computes while it
    streams), so every version of an object has its own immutable envelope, and readers
    cache them for good. For a single-part PUT the envelope is written *before* the final
    segment is released, so a stored object always has its envelope; for multipart
    completions and copies it is written right after, and an object found without one on
    an encrypted path is refused (never served as stored), since it cannot be told from
    a legacy plaintext object. The first read of each object version costs one extra
    small GET; later reads none.

The envelope holds only wrapped and sealed key forms, never a secret in the clear.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal, Protocol

from proxy import crypto
from proxy.backend.client import BackendClient, parse_error
from proxy.errors import FormatError, IntegrityError
from proxy.layer.bodies import read_prefix
from proxy.wire.xmldoc import parse_backend

SIDECAR_PREFIX: Final = ".cmek-proxy/env/"
KEY_FIELD: Final = "key"
"""The sidecar names its object's key, so ``gc`` can tell an orphan (the folder is a hash)."""
PENDING_PREFIX: Final = ".cmek-proxy/pending/"
"""``<sha256(key)>/<upload id>``: the envelope of a multipart Complete in flight (both stores)."""
_MAX_PENDING: Final = 16
_CACHE_ENTRIES: Final = 50_000

StoreKind = Literal["metadata", "sidecar"]
OpenKey = Callable[[crypto.Envelope], Awaitable[bytes]]
"""Opens an envelope's object key (unwrap through the KMS, then open the sealed key)."""


def etag_core(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.strip().removeprefix("W/").strip('"')


class EnvelopeStore(Protocol):
    kind: StoreKind

    @property
    def needs_stored_md5(self) -> bool:
        """Whether PUTs must compute the MD5 of the stored bytes for ``before_commit``."""
        ...

    def put_headers(self, env: crypto.Envelope) -> dict[str, str]:
        """Headers to send with the backend write that stores the object."""
        ...

    async def before_commit(
        self, bucket: str, key: str, env: crypto.Envelope, stored_md5: str
    ) -> None:
        """Called after the whole body verified, before the final segment is released."""
        ...

    async def after_commit(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        """Called once an object exists whose ETag could not be known up front."""
        ...

    async def read(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> crypto.Envelope | None:
        """The envelope of the object whose backend response headers are ``headers``."""
        ...

    async def forget(self, bucket: str, key: str) -> None:
        """The object was deleted: drop its envelopes where that means anything."""
        ...

    async def committed(
        self, bucket: str, key: str, env: crypto.Envelope | None, backend_etag: str | None
    ) -> None:
        """A write of ``key`` committed (ETag ``backend_etag``, envelope ``env`` or None for a
        plaintext write): drop the envelopes of the versions it replaced."""
        ...

    async def commit_completed(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        """After a multipart Complete: the completed object's envelope (v2, with its layout)."""
        ...

    async def write_pending(
        self, bucket: str, key: str, upload_id: str, env: crypto.Envelope
    ) -> None:
        """Before a multipart Complete: the envelope the completed object will have."""
        ...

    async def drop_pending(self, bucket: str, key: str, upload_id: str) -> None:
        """After the completed object's envelope is stored."""
        ...

    async def recover(
        self, bucket: str, key: str, headers: Mapping[str, str], open_key: OpenKey
    ) -> crypto.Envelope | None:
        """The envelope of an object whose own was not found, from a pending completion."""
        ...

    def invalidate(self, bucket: str, key: str) -> None:
        """Forget what is cached about one object's envelope."""
        ...


class MetadataEnvelopes:
    """Envelopes in the object's own user metadata.

    A multipart object is the exception: its metadata is fixed at CreateMultipartUpload,
    before its layout is known, so it holds the upload's *pending* envelope, and the
    completed object's v2 envelope (with the layout) is kept as the sidecar store keeps
    every envelope, in a small object keyed by the completed object's ETag (``layouts``)."""

    kind: StoreKind = "metadata"
    needs_stored_md5 = False

    def __init__(self, backend: BackendClient, cache_ttl: float = 300.0) -> None:
        self.layouts = SidecarEnvelopes(backend, cache_ttl=cache_ttl)

    def put_headers(self, env: crypto.Envelope) -> dict[str, str]:
        return crypto.to_metadata(env)

    async def before_commit(
        self, bucket: str, key: str, env: crypto.Envelope, stored_md5: str
    ) -> None:
        return None

    async def after_commit(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        # a copy or rewrite stored its envelope in the metadata: completed envelopes of
        # multipart versions it replaced go (PUTs and deletes leave them to ``gc``)
        await self.layouts.prune(bucket, key, None, None)

    async def read(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> crypto.Envelope | None:
        env = crypto.from_metadata(headers)
        if env is not None and env.pending:
            final = await self.layouts.read(bucket, key, headers)
            if final is not None and final.layout is not None:
                return final
        return env  # pending: ``recover`` looks for the Complete in flight

    async def forget(self, bucket: str, key: str) -> None:
        return None

    async def committed(
        self, bucket: str, key: str, env: crypto.Envelope | None, backend_etag: str | None
    ) -> None:
        return None

    async def commit_completed(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        if env.layout is not None:
            await self.layouts.after_commit(bucket, key, env, backend_etag)

    async def write_pending(
        self, bucket: str, key: str, upload_id: str, env: crypto.Envelope
    ) -> None:
        await self.layouts.write_pending(bucket, key, upload_id, env)

    async def drop_pending(self, bucket: str, key: str, upload_id: str) -> None:
        await self.layouts.drop_pending(bucket, key, upload_id)

    async def recover(
        self, bucket: str, key: str, headers: Mapping[str, str], open_key: OpenKey
    ) -> crypto.Envelope | None:
        return await self.layouts.recover(bucket, key, headers, open_key)

    def invalidate(self, bucket: str, key: str) -> None:
        self.layouts.invalidate(bucket, key)

    def clear_cache(self) -> None:
        self.layouts.clear_cache()


def sidecar_prefix(key: str) -> str:
    return SIDECAR_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest() + "/"


class SidecarEnvelopes:
    """Envelopes in small objects under the reserved prefix, keyed by the data's ETag."""

    kind: StoreKind = "sidecar"
    needs_stored_md5 = True

    def __init__(
        self,
        backend: BackendClient,
        cache_entries: int = _CACHE_ENTRIES,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        # (bucket, key, etag) -> envelope and the time it was read. Bounded in size and
        # age: a rewrap replaces the envelope of an unchanged body (same ETag).
        self._cache: OrderedDict[tuple[str, str, str], tuple[crypto.Envelope, float]] = (
            OrderedDict()
        )
        self._max = cache_entries
        self._ttl = cache_ttl
        self._clock = clock

    def put_headers(self, env: crypto.Envelope) -> dict[str, str]:
        return {}

    def clear_cache(self) -> None:
        """Forget every cached envelope (tests; an operator tool after restoring a backup)."""
        self._cache.clear()

    def invalidate(self, bucket: str, key: str) -> None:
        """Drop cached envelopes of one object (its key was denied or did not open)."""
        for ck in [ck for ck in self._cache if ck[0] == bucket and ck[1] == key]:
            del self._cache[ck]

    def _remember(self, ck: tuple[str, str, str], env: crypto.Envelope) -> None:
        self._cache[ck] = (env, self._clock())
        self._cache.move_to_end(ck)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    async def _write(self, bucket: str, key: str, etag: str, env: crypto.Envelope) -> None:
        doc = {**crypto.to_metadata(env), KEY_FIELD: key}
        body = json.dumps(doc, sort_keys=True).encode()
        await self._backend.call(
            "PUT",
            bucket,
            sidecar_prefix(key) + etag,
            headers={"content-type": "application/json"},
            body=body,
        )
        self._remember((bucket, key, etag), env)

    async def before_commit(
        self, bucket: str, key: str, env: crypto.Envelope, stored_md5: str
    ) -> None:
        await self._write(bucket, key, stored_md5, env)

    async def after_commit(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        etag = etag_core(backend_etag)
        if etag is None:
            resp, _ = await self._backend.call("HEAD", bucket, key)
            etag = etag_core(resp.headers.get("etag"))
        if etag is None:
            raise FormatError("backend gave the stored object no ETag")
        await self._write(bucket, key, etag, env)
        await self.prune(bucket, key, etag, env)

    async def commit_completed(
        self, bucket: str, key: str, env: crypto.Envelope, backend_etag: str | None
    ) -> None:
        await self.after_commit(bucket, key, env, backend_etag)

    async def read(
        self, bucket: str, key: str, headers: Mapping[str, str]
    ) -> crypto.Envelope | None:
        etag = etag_core(headers.get("etag"))
        if etag is None:
            return None
        ck = (bucket, key, etag)
        hit = self._cache.get(ck)
        if hit is not None and self._clock() - hit[1] < self._ttl:
            self._cache.move_to_end(ck)
            return hit[0]
        resp = await self._backend.request("GET", bucket, sidecar_prefix(key) + etag)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status == 404:
            return None  # not cached: the envelope may be written a moment later
        if resp.status != 200:
            raise parse_error(resp.status, data)
        try:
            meta = json.loads(data)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise FormatError("envelope sidecar is not valid JSON") from exc
        env = crypto.from_metadata({str(k): str(v) for k, v in meta.items()})
        if env is None:
            raise FormatError("envelope sidecar holds no envelope")
        self._remember(ck, env)
        return env

    async def forget(self, bucket: str, key: str) -> None:
        await self.prune(bucket, key, None, None)

    async def committed(
        self, bucket: str, key: str, env: crypto.Envelope | None, backend_etag: str | None
    ) -> None:
        await self.prune(bucket, key, etag_core(backend_etag), env)

    async def listed(self, bucket: str, key: str) -> list[str]:
        """The ETags of the envelopes stored for ``key`` (one page: an object has few)."""
        prefix = sidecar_prefix(key)
        _, body = await self._backend.call(
            "GET", bucket, query=(("list-type", "2"), ("prefix", prefix))
        )
        return [
            el.text[len(prefix) :]
            for el in parse_backend(body).iter()
            if el.tag.endswith("Key") and el.text and el.text.startswith(prefix)
        ]

    async def prune(
        self, bucket: str, key: str, keep: str | None, env: crypto.Envelope | None
    ) -> int:
        """Delete every envelope of ``key`` but the one of ETag ``keep``; returns how many.

        Safe against a writer racing on the same key: a writer whose envelope was written
        but whose data had not committed yet when it was deleted finds it missing when it
        calls this after its commit (its own listing) and writes it again; and after
        deleting, the object is read once more - if the version now stored is one whose
        envelope was just deleted, that envelope is put back. So a current object never
        stays without its envelope.
        """
        stored = await self.listed(bucket, key)
        if keep is not None and env is not None and keep not in stored:
            await self._write(bucket, key, keep, env)  # a racing prune removed it
        removed: dict[str, bytes] = {}
        for etag in stored:
            if etag == keep:
                continue
            name = sidecar_prefix(key) + etag
            resp, data = await self._backend.call("GET", bucket, name, ok=(200, 404))
            if resp.status == 404:
                continue  # another remover took it (and keeps its bytes to put back)
            removed[etag] = data
            await self._backend.call("DELETE", bucket, name, ok=(200, 204, 404))
        self.invalidate(bucket, key)
        if keep is not None and env is not None:
            self._remember((bucket, key, keep), env)
        if removed:
            head, _ = await self._backend.call("HEAD", bucket, key, ok=(200, 404))
            current = etag_core(head.headers.get("etag")) if head.status == 200 else None
            if current is not None and current in removed:
                await self._backend.call(
                    "PUT",
                    bucket,
                    sidecar_prefix(key) + current,
                    headers={"content-type": "application/json"},
                    body=removed[current],
                )
        return len(removed)

    # A multipart object's ETag is known only after the backend's Complete (rclone's is the
    # MD5 of the whole body, not computable from the parts), so its sidecar cannot be written
    # before it. The envelope is written first under the key's pending prefix instead; a
    # reader that finds no sidecar tries the pending envelopes of that key, accepts the one
    # whose object key authenticates the object's first stored segment, and writes the
    # sidecar itself. A Complete killed half-way thus leaves an object that reads as the old
    # one (backend not completed) or the new one, never one without an envelope.
    async def write_pending(
        self, bucket: str, key: str, upload_id: str, env: crypto.Envelope
    ) -> None:
        body = json.dumps(crypto.to_metadata(env), sort_keys=True).encode()
        await self._backend.call(
            "PUT",
            bucket,
            pending_prefix(key) + upload_id,
            headers={"content-type": "application/json"},
            body=body,
        )

    async def drop_pending(self, bucket: str, key: str, upload_id: str) -> None:
        await self._backend.call(
            "DELETE", bucket, pending_prefix(key) + upload_id, ok=(200, 204, 404)
        )

    async def recover(
        self, bucket: str, key: str, headers: Mapping[str, str], open_key: OpenKey
    ) -> crypto.Envelope | None:
        etag = etag_core(headers.get("etag"))
        try:
            total = crypto.segment_count(int(headers.get("content-length", "")))
        except (ValueError, FormatError):
            return None
        if etag is None:
            return None
        prefix = pending_prefix(key)
        _, listing = await self._backend.call(
            "GET",
            bucket,
            query=(("list-type", "2"), ("prefix", prefix), ("max-keys", str(_MAX_PENDING))),
        )
        names = [
            el.text
            for el in parse_backend(listing).iter()
            if el.tag.endswith("Key") and el.text and el.text.startswith(prefix)
        ]
        if not names:
            return None
        first = await self._first_segment(bucket, key, etag)
        for name in names:
            resp, data = await self._backend.call("GET", bucket, name, ok=(200, 404))
            if resp.status != 200:
                continue
            try:
                meta = json.loads(data)
                env = crypto.from_metadata({str(k): str(v) for k, v in dict(meta).items()})
            except (ValueError, TypeError, FormatError):
                continue
            if env is None or not env.multipart or env.pending:
                continue  # a pending one: a Complete whose layout is being rewritten
            try:
                object_key = await open_key(env)
            except IntegrityError:
                continue
            if crypto.opens_first_segment(object_key, first, total, multipart=True):
                await self._write(bucket, key, etag, env)
                return env
        return None

    async def _first_segment(self, bucket: str, key: str, etag: str) -> bytes:
        return await first_segment(self._backend, bucket, key, etag)


async def first_segment(backend: BackendClient, bucket: str, key: str, etag: str) -> bytes:
    """The first stored segment of the object version ``etag`` (empty if it changed)."""
    hdrs = {"range": f"bytes=0-{crypto.STORED_SEGMENT_SIZE - 1}", "if-match": f'"{etag}"'}
    resp = await backend.request("GET", bucket, key, headers=hdrs)
    try:
        if resp.status not in (200, 206):
            return b""
        return await read_prefix(resp, crypto.STORED_SEGMENT_SIZE)
    finally:
        resp.close()


def pending_prefix(key: str) -> str:
    return PENDING_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest() + "/"


def make_store(kind: StoreKind, backend: BackendClient, cache_ttl: float = 300.0) -> EnvelopeStore:
    if kind == "sidecar":
        return SidecarEnvelopes(backend, cache_ttl=cache_ttl)
    return MetadataEnvelopes(backend, cache_ttl=cache_ttl)
