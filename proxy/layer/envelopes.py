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

from collections.abc import Mapping
from typing import Protocol

from proxy import crypto
from proxy.backend.client import BackendClient
from proxy.layer.envelope_names import KEY_FIELD as KEY_FIELD
from proxy.layer.envelope_names import PENDING_PREFIX as PENDING_PREFIX
from proxy.layer.envelope_names import SIDECAR_PREFIX as SIDECAR_PREFIX
from proxy.layer.envelope_names import OpenKey, StoreKind
from proxy.layer.envelope_names import current_names as current_names
from proxy.layer.envelope_names import etag_core as etag_core
from proxy.layer.envelope_names import pending_prefix as pending_prefix
from proxy.layer.envelope_names import sidecar_prefix as sidecar_prefix
from proxy.layer.envelope_names import upload_record as upload_record
from proxy.layer.sidecar import SidecarEnvelopes
from proxy.layer.sidecar import first_segment as first_segment


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

    @property
    def files_completed_by_etag(self) -> bool:
        """Whether a completed multipart object's envelope is filed under the object's ETag,
        known only after the backend's Complete (the caller then finds it, ``_commit_completed``
        in ``multipart.py``, and drops the pending envelope)."""
        ...

    async def before_complete(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
    ) -> None:
        """Before a multipart Complete whose parts fit a layout: the envelope (``completed``,
        v2) the object will have; ``pending`` is the upload's, in the object's metadata."""
        ...

    async def commit_completed(
        self,
        bucket: str,
        key: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
        backend_etag: str | None,
    ) -> None:
        """After that Complete: the completed object's envelope filed for good (the sidecar
        store: under ``backend_etag``, the stored object's)."""
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
    completed object's v2 envelope (with the layout) is kept in a small object beside it,
    named after the pending envelope (``upload_record``): it is written before the
    backend's Complete and again after it, so the object never exists without it, and no
    ETag is needed (rclone's costs a hash of the whole object). Objects completed by
    earlier versions have it under their ETag, as the sidecar store keeps every envelope
    (``layouts``), or only as a pending envelope (``recover``)."""

    kind: StoreKind = "metadata"
    needs_stored_md5 = False
    files_completed_by_etag = False

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
            final = await self.layouts.read_named(bucket, key, upload_record(env))
            if final is None:  # completed by an earlier version: filed under the ETag
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

    async def before_complete(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
    ) -> None:
        await self.layouts.write_named(bucket, key, upload_record(pending), completed)

    async def commit_completed(
        self,
        bucket: str,
        key: str,
        pending: crypto.Envelope,
        completed: crypto.Envelope,
        backend_etag: str | None,
    ) -> None:
        # Written again: a prune or gc racing the Complete may have taken it between the
        # write before and the backend's Complete (they put back only what is current).
        await self.layouts.write_named(bucket, key, upload_record(pending), completed)

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


def make_store(kind: StoreKind, backend: BackendClient, cache_ttl: float = 300.0) -> EnvelopeStore:
    if kind == "sidecar":
        return SidecarEnvelopes(backend, cache_ttl=cache_ttl)
    return MetadataEnvelopes(backend, cache_ttl=cache_ttl)
